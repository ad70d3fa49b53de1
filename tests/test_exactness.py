"""Split results with privacy off equal the unsplit transformers model, for every world size."""

from __future__ import annotations

import json

import pytest
from conftest import MPI_SCRIPT, run_mpi, world_share

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
    proc = run_mpi(n, ["-m", "mpi4py", str(MPI_SCRIPT), str(spec), str(report)], timeout=600)
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
    """Each case at two world sizes, one of them 3 or 4 ranks (see ``world_share``)."""
    cases = world_share(lambda m: _cases(m, tiny_models, str(texts_file)), n, lambda c: c["model"])
    entries = _run(n, cases, tmp_path)
    _assert_exact(entries, 1e-5, 1e-4)
    if n > 1:
        assert all(e["worker_messages"] > 0 for e in entries)


def test_real_models(smollm2_path, minilm_path, tmp_path):
    """SmolLM2-135M scored and MiniLM embedded across 3 ranks equal transformers in one process."""
    from nesa_hpc.io.read import sample_path

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(sample_path().read_text().splitlines(keepends=True)[:12]))
    cases = [
        {"model": str(smollm2_path), "task": "score", "k": 2, "head": "owner", "padding": "right",
         "data": str(rows), "batch_size": 4},
        {"model": str(smollm2_path), "task": "score", "k": 0, "head": "last", "padding": "left",
         "data": str(rows), "batch_size": 4},
        {"model": str(minilm_path), "task": "embed", "k": 1, "head": "owner", "padding": "right",
         "data": str(rows), "batch_size": 4},
        # rows cut by the tokenizer's own truncation: the closing [SEP] stays (sentence-transformers)
        {"model": str(minilm_path), "task": "embed", "k": 0, "head": "last", "padding": "right",
         "data": str(rows), "batch_size": 4, "max_length": 16},
    ]
    entries = _run(3, cases, tmp_path)
    score, emb = entries[:2], entries[2:]
    _assert_exact(score, 1e-4, 1e-3)
    _assert_exact(emb, 1e-5, 1e-5)


def _family_cases(n: int, models: dict, data: str) -> list[dict]:
    """Every supported family: score (decoders) or embed (encoders) at k in {0, 1, L//2}, both head
    placements (left padding with the head on the owner, right padding with it on the last rank), and the
    decoders' pooled final states."""
    from families import ENCODERS
    from families import NUM_LAYERS as L

    cases = []
    for family, folder in models.items():
        task = "embed" if family in ENCODERS else "score"
        for k in sorted({0, 1, L // 2}):
            if n > 1 and 0 < L - k < n - 1:
                continue
            for head, padding in (("owner", "left"), ("last", "right")):
                cases.append({"model": str(folder), "task": task, "k": k, "head": head, "padding": padding,
                              "data": data, "family": family})
        if task == "score":
            cases.append({"model": str(folder), "task": "embed", "k": 1, "head": "owner", "padding": "left",
                          "data": data, "family": family})
    return cases


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_family_every_split(n, family_models, texts_file, tmp_path):
    """Each family's own transformers code runs the split: masks (sliding windows shorter than the rows,
    per-layer types), rotary embeddings per layer type, embedding scale, soft-capping, ALiBi, learned
    positions, fused experts all give the unsplit model's numbers. Each case runs at one world size, taken
    in turn (``world_share(once=True)``): every family, and every kind of case (k, head placement, pooling),
    runs at every world size; the tiny models above run every case at two world sizes."""
    cases = world_share(lambda m: _family_cases(m, family_models, str(texts_file)), n, lambda c: c["family"],
                        once=True)
    entries = _run(n, cases, tmp_path)
    _assert_exact(entries, 1e-5, 1e-4)
    assert {e["case"]["family"] for e in entries} == set(family_models)
    if n > 1:
        assert all(e["worker_messages"] > 0 for e in entries)


def test_gemma3_real_model(gemma3_path, tmp_path):
    """Gemma 3 270M (sliding and full attention layers with their own rotary bases, embedding scale inside
    the embedding, its own BOS) scored across 3 ranks equals transformers in one process."""
    from nesa_hpc.io.read import sample_path

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(sample_path().read_text().splitlines(keepends=True)[:8]))
    cases = [
        {"model": str(gemma3_path), "task": "score", "k": 6, "head": "owner", "padding": "right",
         "data": str(rows), "batch_size": 4, "max_length": 96},
        {"model": str(gemma3_path), "task": "score", "k": 0, "head": "last", "padding": "left",
         "data": str(rows), "batch_size": 4, "max_length": 96},
    ]
    _assert_exact(_run(3, cases, tmp_path), 1e-4, 1e-3)
