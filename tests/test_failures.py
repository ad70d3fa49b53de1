"""Broken models, NaN activations and bad output paths end the job with one clear message."""

from __future__ import annotations

import json
import shutil
import time

import h5py
import pytest
import torch
from conftest import ROOT, run_jobs, run_mpi, write_texts

INFER = str(ROOT / "jobs" / "infer.py")


def _overrides(model, data, out, *extra) -> list[str]:
    return [f"model.path={model}", f"data.path={data}", f"output.path={out}", "runtime.threads=1", "split.k=1",
            *extra]


def _infer(model, data, out, *extra, n=3, own_launch=False):
    return run_mpi(n, [INFER, *_overrides(model, data, out, *extra)], timeout=120, own_launch=own_launch)


@pytest.fixture(scope="module")
def nan_model(tiny_models, tmp_path_factory):
    """The tiny Llama with one NaN weight in layer 3 (held by rank 1 at 3 ranks, k=1: layers [1, 4))."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("nan") / "llama"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    for f in tiny_models["llama"].iterdir():  # the tokenizer files
        if not (folder / f.name).exists():
            shutil.copy(f, folder)
    return folder


def _break(folder, damage: str):
    """A copy of a model folder with ``damage`` done to it."""
    weights = folder / "model.safetensors"
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "garbage":
        weights.write_bytes(b"\x00\x01 not safetensors at all")
    elif damage == "missing-shard":
        weights.rename(folder / "model-00001-of-00002.safetensors")
        index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                                "lm_head.weight": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif damage == "no-weights":
        weights.unlink()
    else:
        from transformers import BloomConfig

        BloomConfig(vocab_size=100, hidden_size=16, n_layer=2, n_head=2).save_pretrained(folder)
    return folder


BROKEN = [
    ("truncate", "model.safetensors: cannot read safetensors file"),
    ("garbage", "model.safetensors: cannot read safetensors file"),
    ("missing-shard", "names shard files that do not exist"),
    ("no-weights", "no safetensors checkpoint in"),
    ("unsupported", "unsupported model architecture BloomForCausalLM"),
]


@pytest.fixture(scope="module")
def failures(nan_model, tiny_models, tmp_path_factory):
    """The jobs of the tests below, one after another in one launch on 3 ranks (tests/run_jobs.py: the
    config jobs/infer.py composes, run by the same function): name -> (error or None, output path)."""
    work = tmp_path_factory.mktemp("failures")
    texts = write_texts(work)
    jobs = {"nan-flag": (nan_model, ["runtime.on_nonfinite=flag", "split.head=last"]),
            "clean-flag": (tiny_models["gpt2"], ["runtime.on_nonfinite=flag"])}
    jobs |= {damage: (_break(_copy(tiny_models["llama"], work / damage), damage), []) for damage, _ in BROKEN}
    outs = {name: work / f"{name}.h5" for name in jobs}
    outs["missing-folder"] = work / "nope" / "out.h5"
    jobs["missing-folder"] = (tiny_models["gpt2"], [])
    report = run_jobs(3, [_overrides(model, texts, outs[name], *extra) for name, (model, extra) in jobs.items()],
                      work)
    return {name: (error, outs[name]) for name, error in zip(jobs, report, strict=True)}


def test_nan_activations_name_the_rows_and_layers(nan_model, texts_file, tmp_path):
    """Seen mid-run by rank 0 (not at start-up): every rank ends, with the rows and the first stage named."""
    proc = _infer(nan_model, texts_file, tmp_path / "out.h5", own_launch=True)
    assert proc.returncode != 0
    assert "NaN/Inf in the activations of rows" in proc.stderr
    assert "first in rank 1: layers [1, 4)" in proc.stderr


def test_nan_activations_flagged(failures):
    error, out = failures["nan-flag"]
    assert error is None, error
    with h5py.File(out) as f:
        assert f["nonfinite"][()].all() and len(f["row"]) == 9 and f.attrs["complete"] == True  # noqa: E712


def test_clean_rows_are_not_flagged(failures):
    error, out = failures["clean-flag"]
    assert error is None, error
    with h5py.File(out) as f:
        assert not f["nonfinite"][()].any()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, expected", BROKEN)
def test_broken_model_folder(damage, expected, failures):
    error, out = failures[damage]
    assert error is not None and expected in error, error
    assert not out.exists()


def test_broken_model_folder_ends_every_rank_with_one_line(tiny_models, texts_file, tmp_path):
    """What jobs/infer.py prints of the errors above: one line, exit 2 on every rank."""
    out = tmp_path / "out.h5"
    proc = _infer(_break(_copy(tiny_models["llama"], tmp_path / "model"), "garbage"), texts_file, out)
    assert proc.returncode == 2
    assert "model.safetensors: cannot read safetensors file" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    assert not out.exists()


def test_output_folder_missing(failures, tmp_path):
    error, out = failures["missing-folder"]
    assert error is not None and f"folder {out.parent} does not exist" in error


def _tmpfs(path, options: str):
    import os
    import subprocess

    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a tmpfs of our own needs root and mount")
    yield path
    for _ in range(20):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            break
        time.sleep(0.5)


@pytest.fixture()
def small_disk(tmp_path):
    """A 400 KiB tmpfs: fills up mid-run."""
    yield from _tmpfs(tmp_path / "small", "size=400k")


@pytest.fixture()
def read_only_dir(tmp_path):
    yield from _tmpfs(tmp_path / "ro", "ro,size=64k")


def test_output_folder_read_only(read_only_dir, tiny_models, texts_file):
    proc = _infer(tiny_models["gpt2"], texts_file, read_only_dir / "out.h5", n=2)
    assert proc.returncode != 0
    assert f"folder {read_only_dir} is not writable" in proc.stderr and proc.stderr.count("error:") == 1


def test_disk_full_keeps_committed_rows_and_resumes(small_disk, tiny_models, tmp_path):
    import numpy as np

    from nesa_hpc.io.results import read_results

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * (1 + i % 50)}) + "\n" for i in range(3000)))
    args = ["task=embed", "data.bucket_window=0"]
    out = small_disk / "out.h5"
    proc = _infer(tiny_models["llama"], data, out, *args, n=2, own_launch=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"output.path {out}: cannot write rows" in proc.stderr and "No space left on device" in proc.stderr
    moved = tmp_path / "moved.h5"
    shutil.copy(out, moved)
    with h5py.File(moved) as f:
        assert 0 < f.attrs["next_row"] < 3000 and f.attrs["complete"] == False  # noqa: E712
    full = tmp_path / "full.h5"
    # the resume, then the uninterrupted run to compare with, in one launch
    assert run_jobs(2, [_overrides(tiny_models["llama"], data, moved, *args, "output.resume=true"),
                        _overrides(tiny_models["llama"], data, full, *args)], tmp_path) == [None, None]
    got, attrs = read_results(moved)
    want, _ = read_results(full)
    assert attrs["complete"] == True  # noqa: E712
    assert all(np.array_equal(got[k], want[k]) for k in want)
