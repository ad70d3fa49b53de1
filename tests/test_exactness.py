"""Split results with privacy off equal the unsplit transformers model, for every world size."""

from __future__ import annotations

import json

import pytest
from conftest import MPI_SCRIPT, run_mpi

NUM_LAYERS = 6  # the tiny models in conftest


def _cases(n: int, models: dict, data: str) -> list[dict]:
    ks = sorted({0, 1, NUM_LAYERS // 2, NUM_LAYERS})
    cases = []
    for family, folder in models.items():
        for k in ks:
            if n > 1 and 0 < NUM_LAYERS - k < n - 1:
                continue  # not enough layers left to give every worker one
            for head in ("owner", "last"):
                for padding in ("right", "left"):
                    cases.append({"model": str(folder), "task": "score", "k": k, "head": head, "padding": padding,
                                  "data": data, "family": family})
    # decoder embeddings (final norm, pooled) on the tiny Llama
    cases.append({"model": str(models["llama"]), "task": "embed", "k": 1, "head": "last", "padding": "left",
                  "pooling": "last", "data": data, "family": "llama"})
    # balanced partitions (the owner may keep tail layers before its head), no bucketing, one in flight
    for family, folder in models.items():
        cases.append({"model": str(folder), "task": "score", "k": 1, "head": "owner", "padding": "right",
                      "data": data, "family": family,
                      "extra": {"split.partition": "balanced", "data.bucket_window": 0, "runtime.inflight": 1}})
    if n > 1:
        cases.append({"model": str(models["llama"]), "task": "score", "k": 0, "head": "owner", "padding": "left",
                      "data": data, "family": "llama", "extra": {"split.owner_tail": 2}})
    return cases


def _run(n: int, cases: list[dict], tmp_path) -> list[dict]:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(cases))
    report = tmp_path / "report.json"
    proc = run_mpi(n, [str(MPI_SCRIPT), str(spec), str(report)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(report.read_text())


def _assert_exact(entries: list[dict], tol_padded: float, tol_single: float) -> None:
    assert entries
    for e in entries:
        label = {k: v for k, v in e["case"].items() if k not in ("model", "data")}
        assert e["error"] is None, (label, e["error"])
        assert e["complete"], label
        assert e["rows"] == sorted(e["rows"]), label
        assert e["max_diff_padded"] <= tol_padded, (label, e["max_diff_padded"])
        assert e["max_diff_single"] <= tol_single, (label, e["max_diff_single"])
        assert e["traffic_error"] is None, (label, e["traffic_error"])


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_tiny_models_every_split(n, tiny_models, texts_file, tmp_path):
    entries = _run(n, _cases(n, tiny_models, str(texts_file)), tmp_path)
    _assert_exact(entries, 1e-5, 1e-4)
    if n > 1:
        assert all(e["worker_messages"] > 0 for e in entries)


def test_real_models(smollm2_path, minilm_path, tmp_path):
    """SmolLM2-135M scored and MiniLM embedded across 3 ranks equal transformers in one process."""
    from nesa_hpc.data import sample_path

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(sample_path().read_text().splitlines(keepends=True)[:12]))
    cases = [
        {"model": str(smollm2_path), "task": "score", "k": 2, "head": "owner", "padding": "right",
         "data": str(rows), "batch_size": 4},
        {"model": str(smollm2_path), "task": "score", "k": 0, "head": "last", "padding": "left",
         "data": str(rows), "batch_size": 4},
        {"model": str(minilm_path), "task": "embed", "k": 1, "head": "owner", "padding": "right",
         "data": str(rows), "batch_size": 4},
    ]
    entries = _run(3, cases, tmp_path)
    score, emb = entries[:2], entries[2:]
    _assert_exact(score, 1e-4, 1e-3)
    _assert_exact(emb, 1e-5, 1e-5)
