"""Length bucketing, in-order writing, read-ahead, balanced partitions and the wire dtype."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import ROOT, run_mpi
from transformers import AutoTokenizer

from nesa_hpc.engine.topology import balanced_plan, make_topology
from nesa_hpc.io.batch import make_batches, prefetch
from nesa_hpc.io.read import DataError
from nesa_hpc.io.results import InOrder


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


def _rows(n: int, seed: int = 0) -> list[tuple[int, str]]:
    rng = np.random.default_rng(seed)
    return [(i, " ".join(["word"] * int(rng.integers(1, 40)))) for i in range(n)]


def test_bucketing_cuts_padding_and_keeps_every_row(tokenizer):
    rows = _rows(200)
    plain = list(make_batches(iter(rows), tokenizer, 8, 64))
    bucketed = list(make_batches(iter(rows), tokenizer, 8, 64, bucket_window=100))

    def waste(batches):
        return 1 - sum(b.tokens for b in batches) / sum(b.ids.numel() for b in batches)

    assert waste(bucketed) < 0.1 < waste(plain)
    seen = sorted(r for b in bucketed for r in b.rows.tolist())
    assert seen == list(range(200))
    # sorting happens inside each window only: the first 13 batches hold exactly rows 0..99
    assert sorted(r for b in bucketed[:13] for r in b.rows.tolist()) == list(range(100))
    assert [b.index for b in bucketed] == list(range(len(bucketed)))


class _Recorder:
    def __init__(self):
        self.commits = []

    def commit(self, values, skipped, next_row):
        self.commits.append((None if values is None else values["row"].tolist(), skipped, next_row))


def test_in_order_commits_contiguous_rows_only():
    rec = _Recorder()
    sink = InOrder(rec)
    sink.add({"row": np.array([2, 3]), "x": np.array([2.0, 3.0])})
    assert rec.commits == [] and sink.pending == 2
    sink.add({"row": np.array([0]), "x": np.array([0.0])})
    assert rec.commits == [([0], [], 1)]
    sink.skip(1, "bad row")
    assert rec.commits[-1] == ([2, 3], [(1, "bad row")], 4)
    sink.add({"row": np.array([4]), "x": np.array([4.0])})
    assert rec.commits[-1] == ([4], [], 5) and sink.pending == 0


def test_in_order_passes_over_rows_already_in_the_file():
    rec = _Recorder()
    sink = InOrder(rec, first_row=8, keep_from=10)
    sink.skip(9, "bad")
    sink.add({"row": np.array([8, 10, 11]), "x": np.zeros(3)})
    assert rec.commits == [([10, 11], [], 12)]


def test_prefetch_passes_items_and_raises_reader_errors_in_the_consumer():
    def source():
        yield 1
        yield 2
        raise DataError("rows.jsonl:3: malformed JSON")

    got = []
    with pytest.raises(DataError, match="rows.jsonl:3"):
        for item in prefetch(source(), depth=1):
            got.append(item)
    assert got == [1, 2]


def test_balanced_plan_evens_out_the_stages():
    counts, tail = balanced_plan(30, 2, 2, "owner", 11.0)
    topo = make_topology(30, 2, 2, "owner", "balanced", 11.0)
    costs = topo.stage_costs(11.0)
    assert (counts, tail) == ([len(topo.ranges[1])], len(topo.tail))
    assert max(costs) - min(costs) <= 1.0 and len(topo.tail) > 0
    assert topo.ranges[1].stop == topo.tail.start and topo.tail.stop == 30
    # head on the last worker: the last block is shorter than the others
    last = make_topology(30, 2, 3, "last", "balanced", 11.0)
    assert len(last.ranges[2]) < len(last.ranges[1]) and len(last.tail) == 0
    with pytest.raises(ValueError, match="split.owner_tail=3 needs split.head=owner"):
        make_topology(30, 2, 3, "last", "uniform", 0.0, owner_tail=3)


def test_wire_dtype_bfloat16_stays_close(tiny_models, texts_file, tmp_path):
    outs = {}
    for wire in ("float32", "bfloat16"):
        out = tmp_path / f"{wire}.h5"
        proc = run_mpi(3, [str(ROOT / "jobs" / "infer.py"), f"model.path={tiny_models['llama']}",
                           f"data.path={texts_file}", f"output.path={out}", f"runtime.wire_dtype={wire}",
                           "runtime.threads=1", "split.k=1"], timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with h5py.File(out) as f:
            outs[wire] = f["nll_mean"][()]
            assert f.attrs["wire_dtype"] == wire
            stats = json.loads(f.attrs["rank_stats"])
            assert [s["rank"] for s in stats] == [0, 1, 2]
            assert all(0.0 <= s["idle_share"] <= 1.0 for s in stats)
            bytes_sent = stats[0]["bytes_sent"]
        outs[wire + "_bytes"] = bytes_sent
    diff = np.abs(outs["float32"] - outs["bfloat16"]).max()
    assert 0 < diff < 0.05
    assert outs["bfloat16_bytes"] < 0.7 * outs["float32_bytes"]


def test_memory_guard_turns_a_failed_allocation_into_advice():
    import torch

    from nesa_hpc.engine.stage import BatchMemoryError, memory_guard

    with pytest.raises(BatchMemoryError, match=r"rank 2: out of memory running layers \[4, 8\) on a micro-batch of "
                                               r"8 rows x 512 tokens .*lower data.batch_size or data.max_length"):
        with memory_guard(2, "layers [4, 8)", (8, 512)):
            torch.empty(2**46, dtype=torch.uint8)  # 64 TiB: a real allocation failure
    with pytest.raises(RuntimeError, match="unrelated"):
        with memory_guard(0, "head", (1, 1)):
            raise RuntimeError("unrelated failure")
