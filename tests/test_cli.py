"""The Hydra entry point under mpiexec: schema of the results file, and clean failures on every rank."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import ROOT, run_jobs, run_mpi, write_texts

INFER = str(ROOT / "jobs" / "infer.py")


def _infer(n, *overrides, timeout=180, own_launch=False):
    return run_mpi(n, [INFER, "runtime.threads=1", *overrides], timeout=timeout, own_launch=own_launch)


def test_score_job_writes_the_documented_schema(tiny_models, texts_file, tmp_path):
    out = tmp_path / "out.h5"
    proc = _infer(3, f"model.path={tiny_models['llama']}", f"data.path={texts_file}", f"output.path={out}",
                  "split.k=1", "data.batch_size=4", "data.max_length=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 9 rows" in proc.stderr and "perplexity" in proc.stderr
    with h5py.File(out) as f:
        assert f["row"].dtype == np.int64 and f["row"][()].tolist() == list(range(9))
        assert f["n_tokens"].dtype == np.int32
        assert f["truncated"].dtype == np.bool_ and f["truncated"][()].any()  # max_length=8 cuts long rows
        assert f["n_tokens"][()].max() == 7  # predicted tokens = kept length - 1
        assert f["nll_sum"].dtype == np.float64 and f["nll_mean"].dtype == np.float64
        np.testing.assert_allclose(f["nll_sum"][()] / f["n_tokens"][()], f["nll_mean"][()])
        a = f.attrs
        assert a["task"] == "score" and a["complete"] == True  # noqa: E712 (numpy bool)
        assert a["num_layers"] == 6 and a["split_k"] == 1 and a["split_head"] == "owner"
        assert a["world_size"] == 3 and json.loads(a["layers_per_rank"]) == [1, 3, 2]
        assert a["model_path"] == str(tiny_models["llama"]) and a["nesa_hpc_version"]
        assert "split:" in a["config"] and a["privacy_mechanism"] == "none"
        # privacy off: every row was released in the clear, which the ledger records as an infinite epsilon
        assert f["epsilon_spent"].dtype == np.float64 and np.all(np.isinf(f["epsilon_spent"][()]))
        assert a["privacy_epsilon_spent"] == np.inf and a["privacy_releases"] == 1
        assert a["privacy_unit"] == "none" and a["privacy_sigma"] == 0.0
        total = f["nll_sum"][()].sum() / f["n_tokens"][()].sum()
        assert a["perplexity"] == pytest.approx(np.exp(total))
    # an existing file is refused, and left as it was
    before = out.read_bytes()
    again = _infer(2, f"model.path={tiny_models['llama']}", f"data.path={texts_file}", f"output.path={out}")
    assert again.returncode != 0
    assert "already exists" in again.stderr and "output.overwrite=true" in again.stderr
    assert out.read_bytes() == before


def test_embed_job_on_minilm(texts_file, minilm_path, tmp_path):
    """model=minilm task=embed with no embedding option equals SentenceTransformer.encode on the packaged
    folder: mean pooling, normalised (its modules.json), rows cut at its max_seq_length (256)."""
    from sentence_transformers import SentenceTransformer

    work = tmp_path / "work"
    work.mkdir()
    out = work / "emb.h5"
    proc = run_mpi(2, [INFER, "runtime.threads=1", "model=minilm", "task=embed", "split.head=last",
                       f"data.path={texts_file}", "output.path=emb.h5"], timeout=180, cwd=work, own_launch=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in work.iterdir()] == ["emb.h5"]  # no Hydra folders or log files, from any rank
    with h5py.File(out) as f:
        emb = f["embedding"][()]
        assert emb.shape == (9, 384) and emb.dtype == np.float32
        assert f.attrs["task"] == "embed" and f.attrs["pooling"] == "mean" and f.attrs["normalize"] == True  # noqa: E712
    texts = [json.loads(line)["text"] for line in texts_file.read_text().splitlines()]
    st = SentenceTransformer(str(minilm_path), device="cpu")
    assert st.max_seq_length == 256
    np.testing.assert_allclose(emb, st.encode(texts, convert_to_numpy=True), atol=1e-6, rtol=0)


BAD_CONFIGS = [
    (["split.k=99"], "split.k=99 must be between 0 and the model's num_layers=6"),
    (["split.k=5"], "leaves 1 for the workers"),
    (["split.partition=[1,1]"], "sums to 2 but num_layers=6 - split.k=2 = 4"),
    (["data.batch_size=0"], "data.batch_size=0 must be >= 1"),
    (["data.path=/nonexistent/rows.jsonl"], "no such file: /nonexistent/rows.jsonl"),
    (["model.path=/nonexistent/model"], "no such model folder: /nonexistent/model"),
    (["runtime.trace=/nonexistent/trace.json"],
     "runtime.trace=/nonexistent/trace.json: folder /nonexistent does not exist"),
]


def _bad_config_args(model, data, out, overrides: list[str]) -> list[str]:
    return [f"model.path={model}", f"data.path={data}", f"output.path={out}", *overrides]


@pytest.fixture(scope="module")
def bad_configs(tiny_models, tmp_path_factory):
    """The jobs of BAD_CONFIGS one after another in one launch on 3 ranks (tests/run_jobs.py: the config
    jobs/infer.py composes, run by the same function); per job, the error, when every rank raised one."""
    work = tmp_path_factory.mktemp("bad-configs")
    data = write_texts(work)
    jobs = [["runtime.threads=1", *_bad_config_args(tiny_models["llama"], data, work / f"out{i}.h5", overrides)]
            for i, (overrides, _) in enumerate(BAD_CONFIGS)]
    return work, run_jobs(3, jobs, work, timeout=300)


@pytest.mark.parametrize("overrides, expected", BAD_CONFIGS)
def test_bad_config_ends_every_rank_with_one_message(overrides, expected, bad_configs):
    """Every rank raises the error (JobError), so jobs/infer.py prints it once, on rank 0, and every rank exits
    with status 2 (test_bad_config_is_printed_once_by_the_entry_script runs one of them through the script)."""
    work, report = bad_configs
    i = BAD_CONFIGS.index((overrides, expected))
    error = report[i]
    assert error is not None and not error.startswith("only ranks"), error
    assert expected in error, error
    assert not (work / f"out{i}.h5").exists()


def test_bad_config_is_printed_once_by_the_entry_script(tiny_models, texts_file, tmp_path):
    overrides, expected = BAD_CONFIGS[0]
    out = tmp_path / "out.h5"
    proc = _infer(3, *_bad_config_args(tiny_models["llama"], texts_file, out, overrides), timeout=120,
                  own_launch=True)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("error:") == 1  # reported once, by rank 0
    assert not out.exists()


def test_unknown_key_is_refused(tmp_path):
    """Hydra's hint for a typo'd key (+data.pth=...) would run the job on the default data: the entry script
    refuses both spellings with one line (rank 0's) naming the nearest key, and exit 2."""
    for typo in ("data.pth=rows.jsonl", "+data.pth=rows.jsonl"):
        proc = _infer(2, typo, f"output.path={tmp_path / 'x.h5'}", timeout=120, own_launch=True)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.count("error:") == 1 and "data.pth is not a config key (did you mean data.path?)" in \
            proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("config, args, message", [
    ("infer", ["data.pth=x"], "data.pth is not a config key (did you mean data.path?)"),
    ("infer", ["++data.pth=x"], "data.pth is not a config key"),
    ("infer", ["task=generat"], "task must be one of ['embed', 'generate', 'score'] (did you mean generate?)"),
    ("infer", ["task=generate", "task.max_new_tokns=3"], "did you mean task.max_new_tokens?"),
    ("train", ["train.max_step=3"], "did you mean train.max_steps?"),
    ("audit", ["audit.epsilon=[1]"], "audit.epsilon is not a config key"),
    ("infer", ["data.path"], "cannot parse the overrides"),
])
def test_bad_overrides_exit_2_with_one_line(config, args, message, capsys):
    from nesa_hpc.overrides import check_overrides

    with pytest.raises(SystemExit) as stop:
        check_overrides(config, args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_good_overrides_pass():
    from nesa_hpc.overrides import check_overrides

    check_overrides("infer", ["task=generate", "task.max_new_tokens=5", "model=minilm", "split.k=2",
                              "hydra.run.dir=.", "hydra/job_logging=none", "privacy=gaussian", "privacy.epsilon=3"])
    check_overrides("infer", ["--cfg", "job"])  # Hydra's own flags: left to Hydra


def test_bad_row_mid_run_stops_all_ranks_and_keeps_committed_rows(tiny_models, tmp_path):
    rows = tmp_path / "rows.jsonl"
    good = [json.dumps({"text": f"row number {i} with some words"}) for i in range(12)]
    rows.write_text("\n".join(good + ['{"text": "broken', *good]) + "\n")
    out = tmp_path / "out.h5"
    proc = _infer(3, f"model.path={tiny_models['gpt2']}", f"data.path={rows}", f"output.path={out}",
                  "data.batch_size=4", "data.bucket_window=0", "runtime.inflight=1", timeout=120, own_launch=True)
    assert proc.returncode != 0
    assert f"{rows}:13: malformed JSON" in proc.stderr
    with h5py.File(out) as f:  # still readable: the batches committed before the bad line
        assert f.attrs["complete"] == False  # noqa: E712
        assert f["row"][()].tolist() == list(range(len(f["row"])))
        assert len(f["row"]) >= 4


def test_path_problems_are_found_before_start_up(tmp_path):
    """Rank 0's files and the model folder, read from the composed config alone (nothing but MPI and h5py
    loaded): the job's own words for each refusal."""
    from omegaconf import OmegaConf

    from nesa_hpc.preflight import path_problems

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n')
    existing = tmp_path / "old.h5"
    existing.write_bytes(b"")

    def problems(rank=0, name="infer", **parts):
        cfg = {"model": {"path": None}, "data": {"path": str(rows)},
               "output": {"path": str(tmp_path / "new.h5"), "overwrite": False, "resume": False},
               "train": {"out_dir": str(tmp_path / "run"), "resume": False, "overwrite": False}}
        for key, value in parts.items():
            cfg[key].update(value)
        return path_problems(OmegaConf.create(cfg), name, rank)

    assert problems() == [] and problems(data={"path": None}) == []
    assert problems(data={"path": str(tmp_path / "no.jsonl")}) == [f"data.path: no such file: {tmp_path / 'no.jsonl'}"]
    assert problems(data={"path": str(tmp_path)}) == [f"data.path: no such file: {tmp_path} (a folder)"]
    assert problems(rank=1, data={"path": str(tmp_path / "no.jsonl")}) == []  # only rank 0 holds the data
    assert "already exists; pass output.overwrite=true" in problems(output={"path": str(existing)})[0]
    assert problems(output={"path": str(existing), "overwrite": True}) == []
    assert problems(output={"path": str(existing), "resume": True}) == []
    assert "folder" in problems(output={"path": str(tmp_path / "no" / "x.h5")})[0]
    missing = f"model.path: no such model folder: {tmp_path / 'm'}"
    assert problems(rank=3, model={"path": str(tmp_path / "m")}) == [missing]
    (tmp_path / "run").mkdir()
    assert "holds no training run" in problems(name="train", train={"resume": True})[0]
    (tmp_path / "run" / "train.json").write_text("{}")
    assert "already holds a training run" in problems(name="train")[0]
    assert problems(name="train", train={"resume": True}) == []


def test_a_missing_input_ends_the_job_before_start_up(tmp_path):
    """jobs/infer.py: exit 2 with rank 0's one line, before any rank loads torch (no layer map is printed)."""
    proc = _infer(2, f"data.path={tmp_path / 'missing.jsonl'}", f"output.path={tmp_path / 'x.h5'}", timeout=60,
                  own_launch=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("error:") == 1 and "data.path: no such file" in proc.stderr, proc.stderr[-2000:]
    assert "layers [" not in proc.stderr and not (tmp_path / "x.h5").exists()
