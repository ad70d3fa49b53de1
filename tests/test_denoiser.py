"""The owner-side denoiser: split inference with it equals the unsplit model with the same network inserted
before the final norm (score, embed, greedy generation); training it gives the same weights at every world
size and sends the workers nothing new; the owner-alone model ignores the workers; bad uses are named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import strict_json
import torch
from conftest import ROOT, run_jobs, run_mpi, write_texts
from hydra import compose, initialize_config_dir

from nesa_hpc.config import ConfigError
from nesa_hpc.privacy.denoiser import Denoiser, load_denoiser, save_denoiser
from nesa_hpc.train.options import train_spec

RUN_JOBS = str(ROOT / "tests" / "run_jobs.py")


def _random_denoiser(model_path: Path, folder: Path, k: int, alone: bool = False) -> Path:
    """A denoiser with random weights everywhere (an untrained one would be the identity)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    torch.manual_seed(11 + k)
    d = Denoiser(config.hidden_size, 2, 40, k, alone)
    with torch.no_grad():
        for name, p in d.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "down" in name else 0.5) + (1.0 if name == "gate" else 0.0))
    return save_denoiser(d, folder, config, {"steps": 0})


def _reference(model_path: Path, den_path: Path, k: int):
    """The unsplit transformers model with the denoiser before its final norm: (model, run(ids) -> output)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    d = load_denoiser(str(den_path), model.config, k)
    kept = {}

    def keep_clean(module, args, kwargs):
        kept["c"] = args[0] if args else kwargs["hidden_states"]

    def denoise(module, args):
        return (d(args[0], kept["c"]),)

    model.model.layers[k].register_forward_pre_hook(keep_clean, with_kwargs=True)
    model.model.norm.register_forward_pre_hook(denoise)
    return model


def _row_tokens(model_path: Path, texts: list[str], max_length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def inference_run(tiny_models, tmp_path_factory):
    """One 3-rank launch: score, embed and generate with denoisers at k=2 and k=0 (with an owner tail),
    an owner-alone denoiser with and without noise, and three refused uses."""
    tmp = tmp_path_factory.mktemp("denoise")
    llama = tiny_models["llama"]
    texts = ["short", "a somewhat longer row of plain words to tokenize", "x", "numbers 1 2 3 4 5 6 7 8 9 10",
             "hello world", "padding matters when rows differ in length a lot", "ok then"]
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    d2, d0 = _random_denoiser(llama, tmp / "d2", 2), _random_denoiser(llama, tmp / "d0", 0)
    alone = _random_denoiser(llama, tmp / "alone", 2, alone=True)
    base = [f"model.path={llama}", f"data.path={data}", "data.batch_size=3", "data.max_length=24",
            "runtime.threads=1", "output.overwrite=true"]
    jobs = {
        "score_k2": ["task=score", "split.k=2", f"split.denoiser={d2}"],
        "score_k0_tail": ["task=score", "split.k=0", "split.owner_tail=1", f"split.denoiser={d0}"],
        "embed_k2": ["task=embed", "split.k=2", f"split.denoiser={d2}"],
        "generate_k2": ["task=generate", "split.k=2", f"split.denoiser={d2}", "task.max_new_tokens=5"],
        "generate_k0_noisy": ["task=generate", "split.k=0", f"split.denoiser={d0}", "task.max_new_tokens=5",
                              "privacy=gaussian", "privacy.unit=token", "privacy.epsilon=2000", "privacy.clip=20.0",
                              "privacy.seed=4"],
        "generate_k0_plain_noisy": ["task=generate", "split.k=0", "task.max_new_tokens=5", "privacy=gaussian",
                                    "privacy.unit=token", "privacy.epsilon=2000", "privacy.clip=20.0",
                                    "privacy.seed=4"],
        "plain_k2": ["task=score", "split.k=2"],
        "alone_noisy": ["task=score", "split.k=2", f"split.denoiser={alone}", "privacy=sigma", "privacy.sigma=3",
                        "privacy.seed=1", "privacy.unit=sequence"],
        "alone_clean": ["task=score", "split.k=2", f"split.denoiser={alone}"],
        "noisy_plain": ["task=score", "split.k=2", "privacy=sigma", "privacy.sigma=3", "privacy.seed=1",
                        "privacy.unit=sequence"],
        "head_last": ["task=score", "split.k=2", "split.head=last", f"split.denoiser={d2}"],
        "wrong_k": ["task=score", "split.k=1", f"split.denoiser={d2}"],
        "missing": ["task=score", "split.k=2", f"split.denoiser={tmp / 'nowhere'}"],
    }
    spec = [[*base, *extra, f"output.path={tmp / name}.h5"] for name, extra in jobs.items()]
    (tmp / "jobs.json").write_text(json.dumps(spec))
    proc = run_mpi(3, ["-m", "mpi4py", RUN_JOBS, str(tmp / "jobs.json"), str(tmp / "report.json")], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = dict(zip(jobs, json.loads((tmp / "report.json").read_text()), strict=True))
    return {"tmp": tmp, "texts": texts, "report": report, "d2": d2, "d0": d0, "llama": llama,
            "stderr": proc.stderr}


def test_split_scores_and_embeddings_equal_the_unsplit_model_with_the_denoiser(inference_run):
    r = inference_run
    for name in ("score_k2", "score_k0_tail", "embed_k2"):
        assert r["report"][name] is None, r["report"][name]
    rows = _row_tokens(r["llama"], r["texts"], 24)
    for name, den, k in (("score_k2", r["d2"], 2), ("score_k0_tail", r["d0"], 0)):
        model = _reference(r["llama"], den, k)
        with h5py.File(r["tmp"] / f"{name}.h5") as f:
            nll = f["nll_sum"][:]
            assert f.attrs["denoiser"] == str(den)
        want = []
        with torch.no_grad():
            for ids in rows:
                x = torch.tensor([ids])
                logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
                want.append(-float(logp.gather(1, x[0, 1:, None]).sum()))
        np.testing.assert_allclose(nll, want, rtol=1e-5, atol=1e-4)
    with h5py.File(r["tmp"] / "plain_k2.h5") as f, h5py.File(r["tmp"] / "score_k2.h5") as g:
        assert np.abs(f["nll_sum"][:] - g["nll_sum"][:]).max() > 0.1  # the denoiser does change the scores
    model = _reference(r["llama"], r["d2"], 2)
    with h5py.File(r["tmp"] / "embed_k2.h5") as f:
        emb = f["embedding"][:]
    with torch.no_grad():
        want = [model.model(torch.tensor([ids])).last_hidden_state[0].mean(0).numpy() for ids in rows]
    np.testing.assert_allclose(emb, np.stack(want), rtol=1e-5, atol=1e-5)


def test_split_greedy_generation_equals_the_unsplit_model_with_the_denoiser(inference_run):
    r = inference_run
    assert r["report"]["generate_k2"] is None, r["report"]["generate_k2"]
    model = _reference(r["llama"], r["d2"], 2)
    with h5py.File(r["tmp"] / "generate_k2.h5") as f:
        got = [list(x) for x in f["generated_ids"][:]]
    eos = model.config.eos_token_id
    for ids, tokens in zip(_row_tokens(r["llama"], r["texts"], 24), got, strict=True):
        seq, want = list(ids), []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
                want.append(nxt)
                seq.append(nxt)
                if nxt == eos:
                    break
        assert tokens == want


def test_generation_at_k0_with_a_denoiser_counts_every_decode_step(inference_run):
    """The denoiser feeds rank 0's clean states into what picks each token, so at k=0 every decode step is
    a further release of the row: epsilon_spent is the composition of all n_releases. Without a denoiser a
    decode step at k=0 is post-processing and only the prompt counts."""
    from nesa_hpc.privacy.mechanism import Ledger

    r = inference_run
    spent = {}
    for name in ("generate_k0_noisy", "generate_k0_plain_noisy"):
        assert r["report"][name] is None, r["report"][name]
        with h5py.File(r["tmp"] / f"{name}.h5") as f:
            rel, eps, gen, attrs = f["n_releases"][:], f["epsilon_spent"][:], f["n_generated"][:], dict(f.attrs)
        assert np.array_equal(rel, gen), (name, rel, gen)
        ledger = Ledger("gaussian", 1e-5, attrs["privacy_sigma"] / (2 * attrs["privacy_clip"]), None)
        spent[name] = (rel, eps, ledger, attrs)
    rel, eps, ledger, attrs = spent["generate_k0_noisy"]
    assert rel.max() > 1
    np.testing.assert_allclose(eps, [ledger.epsilon(int(n)) for n in rel], rtol=1e-9)
    assert attrs["privacy_releases"] == int(rel.max())
    assert attrs["privacy_epsilon_spent"] == pytest.approx(float(eps.max()))
    rel, eps, ledger, attrs = spent["generate_k0_plain_noisy"]
    np.testing.assert_allclose(eps, ledger.epsilon(1), rtol=1e-9)
    assert attrs["privacy_releases"] == 1


def test_owner_alone_denoiser_ignores_the_workers(inference_run):
    r = inference_run
    with h5py.File(r["tmp"] / "alone_noisy.h5") as f, h5py.File(r["tmp"] / "alone_clean.h5") as g, \
            h5py.File(r["tmp"] / "noisy_plain.h5") as p, h5py.File(r["tmp"] / "score_k2.h5") as s:
        np.testing.assert_array_equal(f["nll_sum"][:], g["nll_sum"][:])
        assert not np.allclose(p["nll_sum"][:], s["nll_sum"][:])  # the noise does reach the workers' answer
    assert "owner-alone model" in r["stderr"]


def test_bad_denoiser_uses_are_named(inference_run):
    rep = inference_run["report"]
    assert "split.head=owner" in rep["head_last"]
    assert "split.k=2" in rep["wrong_k"] and "split.k=1" in rep["wrong_k"]
    assert "split.denoiser=" in rep["missing"] and "denoiser.json" in rep["missing"]


def test_a_denoiser_for_another_model_is_refused(tiny_models, tmp_path):
    from transformers import AutoConfig

    folder = _random_denoiser(tiny_models["llama"], tmp_path / "d", 2)
    with pytest.raises(ConfigError, match="another model"):
        load_denoiser(str(folder), AutoConfig.from_pretrained(tiny_models["gpt2"]), 2)


def test_untrained_denoiser_is_the_identity():
    d = Denoiser(8, 2, 16, 0)
    r, c = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    assert torch.equal(d(r, c), r)
    alone = Denoiser(8, 2, 16, 0, alone=True)
    assert torch.equal(alone(r, c), alone(torch.randn(2, 3, 8), c))


@pytest.mark.parametrize("overrides, message", [
    (["train.denoiser.alone=true"], "train.denoiser.blocks > 0"),
    (["train.denoiser.blocks=1", "split.head=last"], "split.head=owner"),
    (["train.denoiser.blocks=1", "train.denoiser.alone=true", "train.layers=[]", "privacy=sigma",
      "privacy.sigma=1", "privacy.unit=token", "split.k=0", "train.owner_dir=/tmp/y"], "privacy=none"),
    (["train.denoiser.blocks=1", "train.denoiser.alone=true"], "train.layers=[]"),
    (["train.denoiser.blocks=1", "split.denoiser=/x"], "split.denoiser applies to jobs/infer.py"),
    (["train.layers=[3]"], "train.layers"),
])
def test_bad_denoiser_training_options_are_named(overrides, message):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["train.out_dir=/tmp/x", *overrides])
    with pytest.raises(ConfigError, match=re.escape(message)):
        train_spec(cfg)


NOISE = ("privacy=sigma", "privacy.sigma=0.05", "privacy.clip=2", "privacy.unit=sequence", "privacy.seed=3")


def _train_job(model, data, out: Path, *extra: str, noise=NOISE) -> dict:
    """A jobs/train.py run for tests/run_jobs.py, its rank 0 files in ``out``/owner."""
    return {"config": "train", "overrides": [
        f"model.path={model}", f"data.path={data}", f"train.out_dir={out / 'shared'}",
        f"train.owner_dir={out / 'owner'}", "runtime.threads=1", "data.batch_size=3", "data.max_length=24",
        "train.grad_accum=2", "train.max_steps=3", "train.log_every=1", "split.k=1", *noise, "train.lr=5e-3",
        "train.denoiser.blocks=1", "train.denoiser.width=32", *extra]}


def _trained(out: Path):
    summary = strict_json.loads((out / "owner" / "summary.json").read_text())
    losses = [m["loss"] for m in strict_json.lines((out / "owner" / "metrics.jsonl").read_text())]
    return summary, losses


ALONE = ("train.layers=[]", "train.denoiser.alone=true")


@pytest.fixture(scope="module")
def trainings(tiny_models, tmp_path_factory) -> dict:
    """The trainings of the tests below in two launches (tests/run_jobs.py: the config jobs/train.py composes,
    run by the same function): at 1 rank, the denoiser alone, with LoRA, and the owner-alone denoiser; at 3
    ranks, the first two, then the owner-alone denoiser again (refused). Per job: None or the error."""
    work = tmp_path_factory.mktemp("train-denoiser")
    data, llama = write_texts(work), tiny_models["llama"]
    layers = {"denoiser": "[]", "lora+denoiser": "[1,6]"}
    one = {name: _train_job(llama, data, work / name / "one", f"train.layers={v}") for name, v in layers.items()}
    one["alone"] = _train_job(llama, data, work / "alone" / "a", *ALONE, noise=())
    three = {name: _train_job(llama, data, work / name / "three", f"train.layers={v}") for name, v in layers.items()}
    three["alone on 3"] = {"config": "train", "overrides": [
        f"model.path={llama}", f"data.path={data}", f"train.out_dir={work / 'alone' / 'b'}",
        "train.denoiser.blocks=1", *ALONE]}
    report = {**dict(zip(one, run_jobs(1, list(one.values()), work, "one", timeout=300), strict=True)),
              **{f"{name} 3": e for name, e in zip(three, run_jobs(3, list(three.values()), work, "three",
                                                                    timeout=300), strict=True)}}
    return {"work": work, "report": report}


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "denoiser.safetensors"))


@pytest.mark.parametrize("layers", ["[]", "[1,6]"], ids=["denoiser", "lora+denoiser"])
def test_denoiser_training_is_the_same_at_every_world_size(layers, trainings):
    """A denoiser (alone, or with LoRA on the workers) trained at 1 and 3 ranks: the same losses and weights;
    frozen workers get no gradient message; the saved denoiser records the noise it was trained with."""
    name = "denoiser" if layers == "[]" else "lora+denoiser"
    assert trainings["report"][name] is None and trainings["report"][f"{name} 3"] is None, trainings["report"]
    tmp_path = trainings["work"] / name
    one, three = _trained(tmp_path / "one"), _trained(tmp_path / "three")
    np.testing.assert_allclose(one[1], three[1], rtol=1e-5)
    a, b = _weights(tmp_path / "one" / "owner" / "denoiser"), _weights(tmp_path / "three" / "owner" / "denoiser")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(b[n], torch.zeros_like(b[n])) for n in b if n.startswith("down"))  # it trained
    summary = three[0]
    assert summary["denoiser"] == str(tmp_path / "three" / "owner" / "denoiser")
    meta = strict_json.loads((tmp_path / "three" / "owner" / "denoiser" / "denoiser.json").read_text())
    assert meta["k"] == 1 and meta["trained"]["privacy_sigma"] == pytest.approx(0.05)
    assert not (tmp_path / "three" / "shared" / "denoiser").exists()  # never where the workers write
    if layers == "[]":
        assert summary["backward_releases_per_row"] == 0 and summary["exported"] is None
        assert summary["epsilon_spent"] == "NaN"  # sigma mechanism: no claim, forward releases only
    else:
        assert summary["exported"] == str(tmp_path / "three" / "shared" / "adapter")


def test_owner_alone_training_runs_alone_and_is_refused_on_several_ranks(trainings):
    assert trainings["report"]["alone"] is None, trainings["report"]["alone"]
    summary, losses = _trained(trainings["work"] / "alone" / "a")
    assert losses[-1] < losses[0] and summary["forward_releases_per_row"] == 0
    refused = trainings["report"]["alone on 3 3"]
    assert refused is not None and "one process" in refused
