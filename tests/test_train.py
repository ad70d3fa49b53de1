"""Split fine-tuning: gradients and losses equal training the unsplit model; privacy, resume, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import strict_json
import torch
from conftest import ROOT, mpiexec, run_jobs, run_mpi, world_share, write_texts

TRAIN = str(ROOT / "jobs" / "train.py")
INFER = str(ROOT / "jobs" / "infer.py")
SCRIPT = str(ROOT / "tests" / "mpi_train.py")


@pytest.fixture(scope="module")
def pc_file(tmp_path_factory):
    """Prompt/completion rows for train.loss=completion."""
    rows = [("what is two plus two", "four"), ("name a colour", "blue like the sky"), ("say hi", "hello there"),
            ("count to three", "one two three"), ("a long prompt with many words before the answer", "yes")]
    path = tmp_path_factory.mktemp("pc") / "pc.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    return path


def _cases(n: int, models: dict, data: str, pc: str) -> list[dict]:
    llama, gpt2 = str(models["llama"]), str(models["gpt2"])
    cases = []
    for k in (0, 1, 3):
        if n > 1 and 6 - k < n - 1:
            continue
        for head in ("owner", "last"):
            cases.append({"model": llama, "data": data, "k": k, "head": head, "mode": "lora"})
    cases += [
        {"model": llama, "data": data, "k": 1, "head": "owner", "mode": "full"},
        {"model": gpt2, "data": data, "k": 1, "head": "last", "mode": "lora"},
        {"model": gpt2, "data": data, "k": 0, "head": "owner", "mode": "full", "owner_trainable": True},
        {"model": llama, "data": data, "k": 2, "head": "owner", "mode": "lora", "owner_trainable": True,
         "extra": {"train.layers": "[1,5]", "train.lora.target_modules": "[q_proj,v_proj]"}},
        {"model": llama, "data": pc, "k": 1, "head": "last", "mode": "lora",
         "extra": {"train.loss": "completion", "train.schedule": "linear"}},
    ]
    if n > 1:
        cases.append({"model": llama, "data": data, "k": 1, "head": "owner", "mode": "lora", "owner_trainable": True,
                      "extra": {"split.owner_tail": 1}})
    # both schedules, with more micro-batches than stages (and an uneven last step), gradients flowing back to
    # a trained owner, left padding and a wider 1F1B window
    cases += [
        {"model": llama, "data": data, "k": 1, "head": "owner", "mode": "lora", "owner_trainable": True,
         "batch_size": 1, "grad_accum": 5, "steps": 2, "extra": {"train.pipeline": "1f1b", "train.lr": 0.001}},
        {"model": llama, "data": data, "k": 1, "head": "last", "mode": "lora", "owner_trainable": True,
         "batch_size": 1, "grad_accum": 5, "steps": 2,
         "extra": {"train.pipeline": "gpipe", "data.padding_side": "left", "train.lr": 0.001}},
        {"model": gpt2, "data": data, "k": 0, "head": "last", "mode": "lora", "batch_size": 2, "grad_accum": 4,
         "extra": {"train.pipeline": "1f1b", "runtime.inflight": 6}},
    ]
    return cases


def _run(n: int, cases: list[dict], tmp_path) -> list[dict]:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(cases))
    report = tmp_path / "report.json"
    proc = run_mpi(n, ["-m", "mpi4py", SCRIPT, str(spec), str(report)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(report.read_text())


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_split_gradients_and_losses_equal_unsplit_training(n, tiny_models, texts_file, pc_file, tmp_path):
    """Each case at two world sizes, one of them 3 or 4 ranks (see ``world_share``)."""
    cases = world_share(lambda m: _cases(m, tiny_models, str(texts_file), str(pc_file)), n)
    report = _run(n, cases, tmp_path)
    assert len(report) == len(cases)
    _check_equal(report, n)


def test_every_family_trains_like_one_process(family_models, texts_file, tmp_path):
    """LoRA on every decoder family, and full fine-tuning of the mixture-of-experts families (fused expert
    weights), at 3 ranks: gradients and losses equal training the unsplit model in one process."""
    from families import DECODERS

    cases = [{"model": str(family_models[f]), "data": str(texts_file), "k": 1, "head": "owner", "mode": "lora",
              "family": f} for f in DECODERS]
    cases += [{"model": str(family_models[f]), "data": str(texts_file), "k": 0, "head": "last", "mode": "full",
               "family": f} for f in ("mixtral", "qwen2_moe", "gemma3_text")]
    report = _run(3, cases, tmp_path)
    assert len(report) == len(cases)
    _check_equal(report, 3)


def _check_equal(report: list[dict], n: int) -> None:
    for e in report:
        label = {k: v for k, v in e["case"].items() if k not in ("model", "data")}
        assert e["grad_names_equal"], label
        assert e["nonzero_grads"] > 0, label
        # the first step's gradients of every trainable parameter; the last step's come after two AdamW steps,
        # which divide each gradient by its own running scale and so magnify rounding in the smallest entries
        assert e["max_grad_rel_diff_first"] <= 1e-5, (label, e["max_grad_rel_diff_first"])
        assert e["max_grad_rel_diff_last"] <= 1e-4, (label, e["max_grad_rel_diff_last"])
        assert len(e["split_losses"]) == len(e["ref_losses"]) == e["case"].get("steps", 3), label
        assert np.allclose(e["split_losses"], e["ref_losses"], rtol=1e-6, atol=0), (label, e["split_losses"],
                                                                                   e["ref_losses"])
        assert e["split_losses"][0] != e["split_losses"][-1], label  # the optimizer moved the weights
        if n > 1:
            # activations, masks and positions only: no int64 tensor (token ids, labels) reaches a worker
            assert set(e["worker_dtypes"]) <= {"torch.float32", "torch.int8", "torch.int32"}, label
            assert e["worker_messages"] > 0, label


def test_1f1b_bounds_activation_memory_with_gpipe_losses(tiny_models, texts_file, tmp_path):
    """With 8 micro-batches per step on 3 ranks, 1F1B holds fewer activations on every worker than GPipe (which
    holds all 8) and trains exactly the same."""
    llama = str(tiny_models["llama"])
    base = {"model": llama, "data": str(texts_file), "k": 1, "head": "owner", "mode": "lora", "batch_size": 1,
            "grad_accum": 8, "steps": 2, "reference": False}
    report = _run(3, [{**base, "extra": {"train.pipeline": p}} for p in ("gpipe", "1f1b")], tmp_path)
    gpipe, one = report
    assert gpipe["split_losses"] == one["split_losses"]
    peaks = {e["case"]["extra"]["train.pipeline"]: [r["peak_activation_mb"] for r in e["summary"]["rank_stats"]]
             for e in report}
    assert len(peaks["gpipe"]) == 3
    for rank in (1, 2):
        assert 0 < peaks["1f1b"][rank] < peaks["gpipe"][rank], peaks


def _noise_cases(models: dict, data: str) -> list[dict]:
    llama = str(models["llama"])
    noisy = {"privacy": "sigma", "privacy.sigma": 0.05, "privacy.clip": 2.0, "privacy.unit": "token",
             "privacy.seed": 3, "train.grad_privacy.mechanism": "gaussian", "train.grad_privacy.epsilon": 5.0,
             "train.grad_privacy.clip": 0.5, "train.owner_dir": "allow_shared"}
    gauss = {"privacy": "gaussian", "privacy.epsilon": 50.0, "privacy.clip": 3.0, "privacy.seed": 4,
             "train.grad_privacy.mechanism": "gaussian", "train.grad_privacy.epsilon": 8.0,
             "train.grad_privacy.clip": 1.0, "train.epochs": 2, "train.max_steps": "null",
             "train.owner_dir": "allow_shared"}
    return [{"model": llama, "data": data, "k": 0, "head": "owner", "mode": "lora", "reference": False,
             "extra": noisy},
            {"model": llama, "data": data, "k": 1, "head": "last", "mode": "lora", "reference": False,
             "extra": gauss},
            {"model": llama, "data": data, "k": 0, "head": "owner", "mode": "lora", "reference": False,
             "extra": {**noisy, "train.grad_privacy.mechanism": "none"}}]


def test_noise_aware_training_is_the_same_at_every_world_size(tiny_models, texts_file, tmp_path):
    """The noise of both messages is keyed by (row, epoch): 2 and 3 ranks train identically, and differently
    from training without noise; the ledger composes both directions over the epochs."""
    from nesa_hpc.privacy.mechanism import gaussian_sigma
    from nesa_hpc.train.job import training_epsilon

    cases = _noise_cases(tiny_models, str(texts_file))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # the same training without noise runs in the first launch too
    *two, clean = _run(2, [*cases, {**cases[0], "extra": {}}], tmp_path / "a")
    three = _run(3, cases, tmp_path / "b")
    for a, b in zip(two, three, strict=True):
        assert a["split_losses"] == b["split_losses"]
    assert clean["split_losses"] != two[0]["split_losses"]
    # sigma forward mechanism: no formal claim
    assert two[0]["summary"]["epsilon_spent"] == "NaN"  # strict JSON's spelling
    # gaussian both ways, 2 epochs: one release per row and epoch in each direction
    s = two[1]["summary"]
    assert s["forward_releases_per_row"] == 2 and s["backward_releases_per_row"] == 2
    assert s["privacy_sigma"] == pytest.approx(gaussian_sigma(50.0, 1e-5, 6.0))
    assert s["grad_privacy_sigma"] == pytest.approx(gaussian_sigma(8.0, 1e-5, 2.0))
    expected = training_epsilon([(s["privacy_sigma"] / 6.0, 2), (s["grad_privacy_sigma"] / 2.0, 2)], 1e-5)
    assert s["epsilon_spent"] == pytest.approx(expected)
    assert 8.0 < expected < 2 * (50.0 + 8.0)
    # an unprotected gradient message: nothing is claimed
    assert two[2]["summary"]["epsilon_spent"] in ("Infinity", "NaN")


def test_training_epsilon_matches_the_pld_accountant():
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.pld import PLDAccountant

    from nesa_hpc.train.job import training_epsilon

    for (z1, n1), (z2, n2) in [((1.0, 3), (2.0, 3)), ((0.7, 1), (1.5, 4)), ((3.0, 10), (3.0, 10))]:
        acc = PLDAccountant(value_discretization_interval=1e-4)
        acc.compose(SelfComposedDpEvent(GaussianDpEvent(z1), n1))
        acc.compose(SelfComposedDpEvent(GaussianDpEvent(z2), n2))
        assert training_epsilon([(z1, n1), (z2, n2)], 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=2e-3)


def test_gradient_message_is_clipped_per_row_and_noised():
    from nesa_hpc.privacy.mechanism import PrivacySpec, make_privacy
    from nesa_hpc.train.step import grad_message

    g = torch.randn(40, 16) * 5
    row_of = torch.tensor([0] * 10 + [1] * 25 + [2] * 5)
    rows = torch.tensor([7, 8, 9])
    clip_only = make_privacy(PrivacySpec("sigma", sigma=0.0, clip=1.5), 0, key=b"k")
    out = grad_message(clip_only, g / 4.0, row_of, rows, release=0, scale=4.0) * 4.0
    for i in range(3):
        assert float(out[row_of == i].norm()) == pytest.approx(1.5, rel=1e-6)
    small = torch.full((40, 16), 1e-3)
    assert torch.allclose(grad_message(clip_only, small, row_of, rows, 0, 1.0), small)
    noisy = make_privacy(PrivacySpec("sigma", sigma=2.0, clip=1.5), 0, key=b"k")
    a = grad_message(noisy, torch.zeros(4000, 16), torch.zeros(4000, dtype=torch.long), rows[:1], 0, 1.0)
    assert float(a.std()) == pytest.approx(2.0, rel=0.03)
    b = grad_message(noisy, torch.zeros(4000, 16), torch.zeros(4000, dtype=torch.long), rows[:1], 1, 1.0)
    assert not torch.equal(a, b)  # a new release (epoch) draws new noise
    assert torch.equal(a, grad_message(noisy, torch.zeros(4000, 16), torch.zeros(4000, dtype=torch.long),
                                        rows[:1], 0, 1.0))
    # the message is divided by a public count: the noise a worker sees does not reveal the private one
    # (train.loss=completion: the completion tokens of the step), and a NaN entry leaves as zero plus noise
    zeros, one_row = torch.zeros(50, 16), torch.zeros(50, dtype=torch.long)
    m7 = grad_message(noisy, zeros, one_row, rows[:1], 0, scale=7.0, public_scale=30.0)
    m19 = grad_message(noisy, zeros, one_row, rows[:1], 0, scale=19.0, public_scale=30.0)
    assert torch.equal(m7, m19) and float(m7.std() * 30) == pytest.approx(2.0, rel=0.15)
    nan = zeros.clone()
    nan[3, 4] = float("nan")
    assert torch.equal(grad_message(noisy, nan, one_row, rows[:1], 0, 7.0, 30.0), m7)


BAD_OPTIONS = [
    ("train.mode=half", "train.mode"),
    ("train.layers=[4,2]", "train.layers"),
    ("train.grad_privacy.mechanism=gaussian", "train.grad_privacy.epsilon"),
    ("train.grad_privacy.unit=token", "train.grad_privacy.unit"),
    ("train.export=adapter train.mode=full", "train.export=adapter"),
    ("train.lr=-1", "train.lr"),
    ("train.lora.dropout=0.1", "train.lora.dropout"),
    ("model.adapters=/tmp", "model.adapters"),
]


@pytest.fixture(scope="module")
def refused(tiny_models, tmp_path_factory) -> dict:
    """The jobs of the tests below that must be refused (and the training that one of them repeats), run one
    after another in one launch on 2 ranks (tests/run_jobs.py: the configs that jobs/train.py and
    jobs/infer.py compose, run by the same functions). Per job: None, or the error that ended it on every rank
    (a JobError: jobs/*.py print it once and exit 2)."""
    work = tmp_path_factory.mktemp("refused")
    data = write_texts(work)
    llama = tiny_models["llama"]
    jobs = {f"bad {override}": {"config": "train", "overrides": [
        f"model.path={llama}", f"data.path={data}", f"train.out_dir={work / f'bad{i}'}", *override.split()]}
        for i, (override, _) in enumerate(BAD_OPTIONS)}
    once = [f"model.path={llama}", f"data.path={data}", f"train.out_dir={work / 'once'}", "train.max_steps=1",
            "runtime.threads=1"]
    jobs["train"] = jobs["train again"] = {"config": "train", "overrides": once}
    infer = [f"model.path={llama}", f"data.path={data}", f"output.path={work / 'o.h5'}"]
    (work / "empty").mkdir()
    jobs["adapters nope"] = [*infer, f"model.adapters={work / 'nope'}"]
    jobs["adapters empty"] = [*infer, f"model.adapters={work / 'empty'}"]
    report = run_jobs(2, list(jobs.values()), work, timeout=300)
    return {"work": work, **dict(zip(jobs, report, strict=True))}


@pytest.mark.parametrize("override,message", BAD_OPTIONS)
def test_bad_training_options_are_named(override, message, refused):
    error = refused[f"bad {override}"]
    assert error is not None
    assert message in error, error


def test_out_dir_is_not_overwritten_by_accident(refused):
    assert refused["train"] is None
    again = refused["train again"]
    assert again is not None and "train.overwrite=true" in again


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory):
    """96 rows: 6 steps an epoch of the runs below (batches of 8, 2 per step), 12 in their 2 epochs."""
    rng = np.random.default_rng(5)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    path = tmp_path_factory.mktemp("long") / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(8, 40)))}) + "\n"
                            for _ in range(96)))
    return path


def _train_args(model, data, out, *extra):
    return [TRAIN, f"model.path={model}", f"data.path={data}", f"train.out_dir={out}", "runtime.threads=1",
            "data.batch_size=8", "data.max_length=48", "train.grad_accum=2", "train.epochs=2", "train.save_every=2",
            "train.log_every=1", "privacy=sigma", "privacy.sigma=0.02", "privacy.unit=token", "split.k=0",
            "train.grad_privacy.mechanism=sigma", "train.grad_privacy.sigma=0.001", "train.grad_privacy.clip=5",
            *([] if any(e.startswith("train.owner_dir=") for e in extra) else ["train.owner_dir=allow_shared"]),
            *extra]


def _losses(out) -> list[float]:
    return [m["loss"] for m in strict_json.lines((out / "metrics.jsonl").read_text())]


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, many_rows, tmp_path_factory):
    """The run that the interrupted ones below must equal, once resumed."""
    ref = tmp_path_factory.mktemp("uninterrupted") / "ref"
    whole = run_mpi(3, _train_args(tiny_models["llama"], many_rows, ref, "privacy.seed=11"), timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    return ref


@pytest.mark.parametrize("how", ["sigterm", "kill-worker"])
def test_stop_or_kill_then_resume_equals_uninterrupted(how, tiny_models, many_rows, uninterrupted, tmp_path):
    """OS-seeded noise, a stop (SIGTERM: checkpoint, exit 75) or a killed worker (back to the last periodic
    checkpoint), then train.resume=true: the same losses and the same adapter as an uninterrupted run."""
    import psutil
    from safetensors.torch import load_file

    ref = uninterrupted
    out = tmp_path / "out"
    args = _train_args(tiny_models["llama"], many_rows, out, "privacy.seed=11")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([mpiexec(), "-n", "3", sys.executable, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, seen = time.monotonic() + 120, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen.append(line)
        if "step 5/" in line:
            break
    else:
        raise AssertionError("".join(seen[-20:]))
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        victim = next(c for c in psutil.Process(proc.pid).children(recursive=True)
                      if "train.py" in " ".join(c.cmdline()) and c.environ().get("PMI_RANK") == "2")
        os.kill(victim.pid, signal.SIGKILL)
    rest = proc.communicate(timeout=120)[0]
    if how == "sigterm":
        assert proc.returncode == 75 and "stopped by SIGTERM" in rest, rest[-2000:]
    else:
        assert proc.returncode != 0
    steps_before = len(_losses(out))
    assert 0 < steps_before < len(_losses(ref))
    resumed = run_mpi(3, [*args, "train.resume=true"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after step" in resumed.stderr
    assert _losses(out) == _losses(ref)
    a, b = load_file(str(ref / "adapter" / "adapter_model.safetensors")), \
        load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "noise-key").exists()


def test_os_seeded_training_keeps_its_noise_key_until_done(tiny_models, many_rows, tmp_path):
    out, owner = tmp_path / "o", tmp_path / "owner"
    args = _train_args(tiny_models["llama"], many_rows, out, f"train.owner_dir={owner}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([mpiexec(), "-n", "2", sys.executable, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while "step 2/" not in (proc.stdout.readline() or "step 2/"):
        pass
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 75
    key = owner / "noise-key"
    assert key.is_file() and (key.stat().st_mode & 0o777) == 0o600
    # rank 0's own files stay in train.owner_dir; the shared folder holds the workers' checkpoint parts
    assert not (out / "noise-key").exists() and not (out / "metrics.jsonl").exists()
    assert (owner / "metrics.jsonl").is_file() and list((out / "checkpoints").glob("step-*/rank-1.safetensors"))
    saved = key.read_bytes()
    key.unlink()
    refused = run_mpi(2, [*args, "train.resume=true"], timeout=120, own_launch=True)  # rank 0 alone sees it
    assert refused.returncode != 0 and "noise-key" in refused.stderr
    key.write_bytes(saved)
    key.chmod(0o600)  # a key readable by others is refused
    assert run_mpi(2, [*args, "train.resume=true"], timeout=300).returncode == 0
    assert not key.exists()
    # a finished run resumes to nothing more than another export (no key needed: nothing more is released)
    again = run_mpi(2, [*args, "train.resume=true", "train.export=merged"], timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "model" / "model.safetensors.index.json").is_file() and (out / "adapter").is_dir()


def test_exported_adapter_and_merged_model_serve_inference(tiny_models, texts_file, tmp_path):
    """jobs/infer.py with model.adapters=<adapter> or model.path=<merged model> scores like peft's own
    PeftModel on the base model, at 3 ranks."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nesa_hpc.io.read import read_rows
    from nesa_hpc.io.results import read_results

    model = tiny_models["llama"]
    base = [f"model.path={model}", f"data.path={texts_file}", "runtime.threads=1", "train.max_steps=4",
            "train.lr=0.05", "data.batch_size=3", "split.k=1"]
    ad, mg = tmp_path / "ad", tmp_path / "mg"
    # the two trainings, then the three inference jobs, one after another in one launch (tests/run_jobs.py:
    # the configs that jobs/train.py and jobs/infer.py compose, run by the same functions)
    jobs: list = [{"config": "train", "overrides": [*base, f"train.out_dir={out}", *extra]}
                  for out, extra in ((ad, []), (mg, ["train.export=merged"]))]
    scored = (("adapter", [f"model.path={model}", f"model.adapters={ad / 'adapter'}"]),
              ("merged", [f"model.path={mg / 'model'}"]), ("base", [f"model.path={model}"]))
    jobs += [[*extra, f"data.path={texts_file}", f"output.path={tmp_path / f'{name}.h5'}", "runtime.threads=1",
              "split.k=2"] for name, extra in scored]
    assert run_jobs(3, jobs, tmp_path, timeout=300) == [None] * len(jobs)
    assert (mg / "model" / "model.safetensors.index.json").is_file()
    results = {}
    for name, _ in scored:
        res = read_results(tmp_path / f"{name}.h5")[0]
        results[name] = dict(zip(res["row"].tolist(), res["nll_mean"].tolist(), strict=True))
    tok = AutoTokenizer.from_pretrained(model)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                                           str(ad / "adapter")).eval()
    hf_merged = AutoModelForCausalLM.from_pretrained(mg / "model", dtype=torch.float32).eval()
    for row, text in read_rows(texts_file):
        ids = torch.tensor([tok(text)["input_ids"][:512]])
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            want = float(torch.nn.functional.cross_entropy(peft_model(ids).logits[0, :-1], ids[0, 1:]))
            merged = float(torch.nn.functional.cross_entropy(hf_merged(ids).logits[0, :-1], ids[0, 1:]))
        assert results["adapter"][row] == pytest.approx(want, abs=2e-4)
        assert merged == pytest.approx(results["merged"][row], abs=2e-4)
    # both runs trained the same way, so the merged model equals base + adapter; training changed the scores
    assert all(results["merged"][r] == pytest.approx(results["adapter"][r], abs=2e-4) for r in results["adapter"])
    assert any(abs(results["base"][r] - results["adapter"][r]) > 1e-3 for r in results["adapter"])


def test_missing_or_foreign_adapter_folder_is_named(refused):
    nope, empty = refused["adapters nope"], refused["adapters empty"]
    assert nope is not None and "model.adapters" in nope and "nope" in nope
    assert empty is not None and "adapter_config.json" in empty
    assert not (refused["work"] / "o.h5").exists()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_targets_are_the_same_after_injection(family, tiny_models):
    """The exported adapter's target modules are the layer's own linear modules even when the exporting rank
    holds LoRA in the layer they are read from (world size 1, or layer 0 on rank 0)."""
    from nesa_hpc.models.lora import add_lora, lora_config
    from nesa_hpc.models.weights import build_adapter, load_modules
    from nesa_hpc.train.options import TrainSpec

    folder = str(tiny_models[family])
    adapter = build_adapter(folder)
    load_modules(adapter, folder, [adapter.layer_module(i) for i in range(adapter.num_layers)], "float32")
    spec = TrainSpec(out_dir="x")
    before = lora_config(adapter, spec).target_modules
    add_lora(adapter, [0, 1], spec)
    after = lora_config(adapter, spec, [0, 1])
    assert after.target_modules == before and "base_layer" not in after.target_modules
    assert after.fan_in_fan_out == (family == "gpt2")
