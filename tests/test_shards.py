"""Dataset shards (data.num_shards / data.shard) and jobs/merge.py: row blocks, defaults from Slurm job
arrays, merged files equal to the unsharded run, resume of a shard, and clear errors for bad shard sets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, run_mpi
from hydra import compose, initialize_config_dir

from nesa_hpc.config import ConfigError, settings_from_cfg
from nesa_hpc.io.merge import MergeError, merge_shards
from nesa_hpc.io.read import count_rows, read_rows, shard_range
from nesa_hpc.io.results import read_results

JOBS = str(ROOT / "tests" / "run_jobs.py")
MERGE = str(ROOT / "jobs" / "merge.py")
ROWS = 30
BAD_ROW = 10  # malformed JSON: skipped (data.on_error=skip) and recorded by the shard that holds it


# -- pure helpers -------------------------------------------------------------------------------------


def test_shard_range_covers_every_row_once_on_window_bounds():
    for rows in (0, 1, 7, 8, 9, 64, 100, 1001):
        for window in (1, 4, 8, 256):
            for shards in (1, 2, 3, 7):
                parts = [shard_range(rows, shards, s, window) for s in range(shards)]
                assert [r for p in parts for r in p] == list(range(rows))
                for p in parts:
                    assert p.start % window == 0 and (p.stop % window == 0 or p.stop == rows)
                sizes = [-(-len(p) // window) for p in parts]
                assert max(sizes) - min(sizes) <= 1  # windows dealt out evenly


def test_shard_range_refuses_a_shard_outside_the_count():
    with pytest.raises(ValueError, match=r"data.shard=3 must be in \[0, data.num_shards=3\)"):
        shard_range(10, 3, 3, 4)


def test_count_rows_matches_read_rows(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": broken\n{"text": "d"}\n')
    text = tmp_path / "b.txt"
    text.write_text("one\ntwo\n\nfour")
    csv = tmp_path / "c.csv"
    csv.write_text('id,text\n1,plain\n\n2,"two\nlines"\n3,last\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["x", None, "z"]}), parquet)
    for path in (jsonl, text, csv, parquet):
        assert count_rows(path) == len(list(read_rows(path, on_error="skip"))), path.name


@pytest.fixture(scope="module")
def hydra_ctx():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield


@pytest.mark.parametrize(("env", "overrides", "expected"), [
    ({}, [], (1, 0)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}, [], (3, 1)),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2",
      "SLURM_ARRAY_TASK_COUNT": "3"}, [], (3, 2)),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, ["data.shard=0"], (4, 0)),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, ["data.num_shards=1"], (1, 0)),
    ({}, ["data.num_shards=3", "data.shard=2"], (3, 2)),
])
def test_shards_default_from_a_slurm_job_array(hydra_ctx, monkeypatch, env, overrides, expected):
    for name in ("ID", "COUNT", "MIN", "STEP"):
        monkeypatch.delenv(f"SLURM_ARRAY_TASK_{name}", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = settings_from_cfg(compose(config_name="infer", overrides=overrides))
    assert (s.num_shards, s.shard) == expected


@pytest.mark.parametrize(("env", "overrides", "message"), [
    ({}, ["data.num_shards=3"], "data.shard must be set when data.num_shards=3"),
    ({}, ["data.num_shards=2", "data.shard=2"], "data.shard=2 must be < data.num_shards=2"),
    ({}, ["data.num_shards=0"], "data.num_shards=0 must be >= 1"),
    ({}, ["data.num_shards=2", "data.shard=-1"], "data.shard=-1 must be >= 0"),
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "3"}, [],
     "SLURM_ARRAY_TASK_ID=9"),
])
def test_bad_shard_options_raise_config_error(hydra_ctx, monkeypatch, env, overrides, message):
    for name in ("ID", "COUNT", "MIN", "STEP"):
        monkeypatch.delenv(f"SLURM_ARRAY_TASK_{name}", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        settings_from_cfg(compose(config_name="infer", overrides=overrides))


# -- real jobs ------------------------------------------------------------------------------------------


def _run_jobs(folder: Path, jobs: list[list[str]]) -> list:
    spec, report = folder / "jobs.json", folder / "report.json"
    spec.write_text(json.dumps(jobs))
    proc = run_mpi(2, ["-m", "mpi4py", JOBS, str(spec), str(report)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def sharded(tiny_models, tmp_path_factory):
    """One unsharded run and its 3 shards (windows of 8 rows: rows [0, 8), [8, 16), [16, 30))."""
    work = tmp_path_factory.mktemp("shards")
    lines = [json.dumps({"text": f"row {i} " + "word " * (i % 9)}) for i in range(ROWS)]
    lines[BAD_ROW] = '{"text": broken'
    data = work / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    common = [f"model.path={tiny_models['llama']}", f"data.path={data}", "runtime.threads=1", "data.batch_size=4",
              "data.bucket_window=8", "data.on_error=skip"]
    jobs = [[*common, f"output.path={work}/full.h5"]]
    jobs += [[*common, "data.num_shards=3", f"data.shard={s}", f"output.path={work}/shard{s}.h5"] for s in range(3)]
    jobs.append([*common, "data.num_shards=3", "data.shard=1", "data.max_length=8", f"output.path={work}/other.h5"])
    jobs.append([*common, "data.num_shards=5", "data.shard=0", f"output.path={work}/empty.h5"])
    report = _run_jobs(work, jobs)
    return {"work": work, "common": common, "report": report, "shards": [work / f"shard{s}.h5" for s in range(3)],
            "full": read_results(work / "full.h5")[0]}


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name, values in b.items():
        assert np.array_equal(a[name], values, equal_nan=values.dtype.kind == "f"), name


def test_shards_hold_their_rows_and_merge_to_the_unsharded_run(sharded, tmp_path):
    assert sharded["report"][:5] == [None] * 5
    blocks = []
    for path in sharded["shards"]:
        got, attrs = read_results(path)
        blocks.append(json.loads(attrs["shard_rows"]))
        start, stop = blocks[-1]
        assert sorted([*got["row"], *got["skipped_row"]]) == list(range(start, stop))
    assert blocks == [[0, 8], [8, 16], [16, 30]]
    assert read_results(sharded["shards"][1])[0]["skipped_row"].tolist() == [BAD_ROW]
    out = tmp_path / "merged.h5"
    done = merge_shards(list(reversed(sharded["shards"])), out)  # any order
    assert done == {"rows": ROWS - 1, "skipped": 1, "shards": 3, "output": str(out)}
    got, attrs = read_results(out)
    _same(got, sharded["full"])
    _, full_attrs = read_results(sharded["work"] / "full.h5")
    assert attrs["resume_key"] == full_attrs["resume_key"]  # the unsharded job's settings
    assert attrs["perplexity"] == pytest.approx(full_attrs["perplexity"], rel=1e-12)
    assert attrs["complete"] == True and attrs["next_row"] == ROWS  # noqa: E712
    assert "shard" not in attrs and len(json.loads(attrs["merged_from"])) == 3


def test_an_empty_shard_is_refused_with_the_numbers(sharded):
    error = sharded["report"][5]
    assert "data.shard=0 of data.num_shards=5 has no rows" in error
    assert "30 rows, 4 batching windows of 8" in error and "data.num_shards <= 4" in error
    assert not (sharded["work"] / "empty.h5").exists()


def _copy(paths: list[Path], folder: Path) -> list[Path]:
    return [Path(shutil.copy(p, folder / p.name)) for p in paths]


def _edit_rows(path: Path, keep) -> None:
    """Rewrite every per-row dataset with ``keep(array)``, as a broken or hand-edited file would be."""
    with h5py.File(path, "r+") as f:
        n = len(f["row"])
        for name in f:
            if len(f[name]) == n and name not in ("skipped_row", "skipped_reason"):
                values = keep(f[name][()])
                f[name].resize(len(values), axis=0)
                f[name][...] = values


@pytest.mark.parametrize(("case", "message"), [
    ("missing-shard", r"shards \[2\] of data.num_shards=3 are missing"),
    ("duplicate-shard", "shard 0 appears twice"),
    ("missing-row", "shard2.h5: input row 29 is missing"),
    ("duplicate-row", "shard0.h5: input row 0 appears twice in `row`"),
    ("other-settings", "other.h5 was written with other settings than .*max_length: 512 vs 8"),
    ("incomplete", "shard1.h5: shard 1 is incomplete"),
    ("not-a-shard", "full.h5: not a shard"),
])
def test_merge_refuses_a_bad_set_of_shards(sharded, tmp_path, case, message):
    shards = _copy(sharded["shards"], tmp_path)
    if case == "missing-shard":
        shards = shards[:2]
    elif case == "duplicate-shard":
        shards = [shards[0], *shards]
    elif case == "missing-row":
        _edit_rows(shards[2], lambda v: v[:-1])
    elif case == "duplicate-row":
        _edit_rows(shards[0], lambda v: np.concatenate([v[:1], v[:-1]]))
    elif case == "other-settings":
        shards[1] = Path(shutil.copy(sharded["work"] / "other.h5", tmp_path / "other.h5"))
    elif case == "incomplete":
        with h5py.File(shards[1], "r+") as f:
            f.attrs["complete"] = False
    elif case == "not-a-shard":
        shards.append(Path(shutil.copy(sharded["work"] / "full.h5", tmp_path / "full.h5")))
    out = tmp_path / "merged.h5"
    with pytest.raises(MergeError, match=message):
        merge_shards(shards, out)
    assert not out.exists()


def test_merge_command_line(sharded, tmp_path):
    shards = _copy(sharded["shards"], tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    ok = subprocess.run([sys.executable, MERGE, "-o", str(tmp_path / "m.h5"), str(tmp_path / "shard*.h5")],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert f"merged 3 shards: {ROWS - 1} rows, 1 skipped" in ok.stdout
    _same(read_results(tmp_path / "m.h5")[0], sharded["full"])
    again = subprocess.run([sys.executable, MERGE, "-o", str(tmp_path / "m.h5"), *map(str, shards)],
                           capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = subprocess.run([sys.executable, MERGE, "-o", str(tmp_path / "n.h5"), *map(str, shards[:2])],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "merge: error: shards [2] of data.num_shards=3 are missing" in bad.stderr


def test_a_shard_resumes_to_the_same_file_and_refuses_another_shard(sharded, tmp_path):
    common = sharded["common"]
    partial = tmp_path / "shard2.h5"
    shutil.copy(sharded["shards"][2], partial)
    with h5py.File(partial, "r+") as f:  # as if killed after committing rows [16, 20)
        f.attrs["complete"] = False
        f.attrs["next_row"] = 20
    wrong = tmp_path / "shard0.h5"
    shutil.copy(sharded["shards"][0], wrong)
    report = _run_jobs(tmp_path, [
        [*common, "data.num_shards=3", "data.shard=2", "output.resume=true", f"output.path={partial}"],
        [*common, "data.num_shards=3", "data.shard=1", "output.resume=true", f"output.path={wrong}"],
    ])
    assert report[0] is None
    got, attrs = read_results(partial)
    _same(got, read_results(sharded["shards"][2])[0])
    assert attrs["complete"] == True  # noqa: E712
    assert "different configuration" in report[1] and "shard: file has 0, this run 1" in report[1]
