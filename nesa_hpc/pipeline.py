"""The per-role loops: the owner (rank 0) and the workers (ranks 1..N-1).

Rank 0 keeps up to ``inflight`` micro-batches in the pipeline: it sends batch i+1 while the workers
still compute batch i, and only waits when that many are outstanding. Each worker receives, runs its
block, starts the send, and receives the next batch while the send completes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import Batch
from .models import Adapter
from .privacy import Privacy
from .tasks import Task
from .topology import Topology
from .transport import Kind, Transport

__all__ = ["StageStats", "run_owner", "run_worker", "BatchMemoryError", "memory_guard", "mark_nonfinite",
           "check_finite", "NonFiniteError"]

log = logging.getLogger("nesa_hpc")


@dataclass
class StageStats:
    compute_s: float = 0.0
    batches: int = 0
    extra: dict = field(default_factory=dict)


def _wire(h: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, bad: torch.Tensor,
          wire_dtype: torch.dtype) -> list[torch.Tensor]:
    # (B, T, H) hidden states, (B, T) int8 mask, (B, T) int32 positions, (B,) int32 non-finite marks:
    # no token ids, ever.
    return [h.to(wire_dtype), mask.to(torch.int8), pos.to(torch.int32), bad]


def _unwire(tensors: list[torch.Tensor], dtype: torch.dtype, device: torch.device):
    h, mask, pos, bad = (t.to(device) for t in tensors)
    return h.to(dtype), mask.long(), pos.long(), bad


class BatchMemoryError(ValueError):
    """A micro-batch did not fit in memory; the message suggests smaller batches."""


@contextmanager
def memory_guard(rank: int, what: str, shape: tuple[int, ...]):
    """Turn an allocation failure while computing one micro-batch into an error that says what to change."""
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as exc:
        text = str(exc)
        if not isinstance(exc, (MemoryError, torch.OutOfMemoryError)) and "alloc" not in text \
                and "out of memory" not in text:
            raise
        rows, tokens = shape
        raise BatchMemoryError(f"rank {rank}: out of memory running {what} on a micro-batch of {rows} rows x "
                               f"{tokens} tokens ({type(exc).__name__}: {text.splitlines()[0][:200]}); lower "
                               "data.batch_size or data.max_length, or spread the layers over more ranks") from None


def mark_nonfinite(h: torch.Tensor, mask: torch.Tensor, bad: torch.Tensor, stage: int) -> torch.Tensor:
    """(B,) int32: rows whose real tokens hold NaN/Inf in ``h`` (B, T, H) and were clean so far get
    ``stage`` (the stage where it first appeared); others keep their mark (-1 = clean)."""
    ok = (torch.isfinite(h).all(-1) | ~mask.bool()).all(-1)  # (B,)
    return torch.where((bad < 0) & ~ok, torch.full_like(bad, stage), bad)


def run_owner(topo: Topology, adapter: Adapter, privacy: Privacy, task: Task, batches: Iterable[Batch],
              on_result: Callable[[Batch, list[torch.Tensor], torch.Tensor], None],
              transport: Transport | None,
              inflight: int, wire_dtype: torch.dtype | None = None,
              should_stop: Callable[[], bool] = lambda: False,
              device: torch.device | str = "cpu") -> StageStats:
    """Rank 0: embed, run layers [0, k), privatise, send; collect results in order and hand them to
    ``on_result(batch, outputs, nonfinite)`` (which runs ``task.finish`` and writes). ``nonfinite`` (B,)
    marks rows whose activations held NaN/Inf with the stage where it first appeared: a rank, or
    ``world_size`` for the owner's tail layers and head (-1 = clean). When ``should_stop()`` turns true
    no new batch is started; the batches in flight are finished and the workers are told to stop.
    ``device`` is where rank 0 computes: batches move there, outputs and marks come back to the host."""
    stats = StageStats()
    front = range(0, topo.k)
    back = range(topo.k, topo.num_layers) if topo.world_size == 1 else range(0)
    head_here = topo.head_rank() == 0
    dtype = adapter_dtype(adapter)
    wire_dtype = wire_dtype or dtype
    outstanding: deque[tuple[Batch, object]] = deque()

    def collect() -> None:
        batch, pending = outstanding.popleft()
        msg = transport.recv(topo.last)  # RESULT: (B, T, H) states, or the head's outputs
        if msg.kind != Kind.RESULT or msg.batch_id != batch.index:
            raise RuntimeError(f"rank 0 expected the result of batch {batch.index}, got kind {msg.kind} "
                               f"batch {msg.batch_id}")
        pending.wait()
        t0 = time.perf_counter()
        *tensors, bad = (t.to(device) for t in msg.tensors)
        with torch.inference_mode(), memory_guard(0, "the head", tuple(batch.ids.shape)):
            if head_here:
                mask, pos = batch.mask.to(device), batch.pos.to(device)
                h = adapter.run_layers(topo.tail, tensors[0].to(dtype), mask, pos)  # (B, T, H)
                bad = mark_nonfinite(h, mask, bad, topo.world_size)
                out = task.head_stage(adapter, h, mask)
            else:
                out = tensors
            on_result(batch, out, bad.cpu())
        stats.compute_s += time.perf_counter() - t0

    for batch in batches:
        if should_stop():
            break
        t0 = time.perf_counter()
        with torch.inference_mode(), memory_guard(0, "embedding and layers [0, k)", tuple(batch.ids.shape)):
            ids, mask, pos = batch.ids.to(device), batch.mask.to(device), batch.pos.to(device)  # (B, T) each
            h = adapter.embed(ids, pos)  # (B, T, H)
            h = adapter.run_layers(front, h, mask, pos)
            z = privacy.apply(h, mask, batch.rows)  # (B, T, H): the only activations that leave rank 0
            bad = mark_nonfinite(z, mask, torch.full((batch.size,), -1, dtype=torch.int32, device=device), 0)
            if topo.world_size == 1:
                h = adapter.run_layers(back, z, mask, pos)
                bad = mark_nonfinite(h, mask, bad, 0)
                on_result(batch, task.head_stage(adapter, h, mask), bad.cpu())
        stats.compute_s += time.perf_counter() - t0
        stats.batches += 1
        if topo.world_size == 1:
            continue
        wire = _wire(z, mask, pos, bad, wire_dtype)
        outstanding.append((batch, transport.send(1, Kind.DATA, batch.index, wire)))
        while len(outstanding) >= inflight:
            collect()
    while outstanding:
        collect()
    if transport is not None and topo.world_size > 1:
        transport.send(1, Kind.STOP, -1).wait()
    return stats


def adapter_dtype(adapter: Adapter) -> torch.dtype:
    return next((p.dtype for p in adapter.model.parameters() if p.device.type != "meta"), torch.float32)


def run_worker(rank: int, topo: Topology, adapter: Adapter, task: Task, transport: Transport,
               wire_dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> StageStats:
    """Ranks 1..N-1: receive (B, T, H) states, run this rank's layers on ``device``, send on (the last rank
    sends to 0)."""
    stats = StageStats()
    layers = topo.layers_of(rank)
    is_last = rank == topo.last
    head_here = topo.head_rank() == rank
    dtype = adapter_dtype(adapter)
    wire_dtype = wire_dtype or dtype
    pending = None
    while True:
        msg = transport.recv(rank - 1)
        if msg.kind == Kind.STOP:
            if not is_last:
                transport.send(rank + 1, Kind.STOP, -1).wait()
            break
        if msg.kind != Kind.DATA:
            raise RuntimeError(f"rank {rank}: unexpected message kind {msg.kind} from rank {rank - 1}")
        t0 = time.perf_counter()
        with torch.inference_mode(), memory_guard(rank, f"layers [{layers.start}, {layers.stop})",
                                                  tuple(msg.tensors[1].shape)):
            h, mask, pos, bad = _unwire(msg.tensors, dtype, device)
            h = adapter.run_layers(layers, h, mask, pos)  # (B, T, H)
            bad = mark_nonfinite(h, mask, bad, rank)
            if is_last:
                out = task.head_stage(adapter, h, mask) if head_here else [h.to(wire_dtype)]
                out = [*out, bad]
        stats.compute_s += time.perf_counter() - t0
        stats.batches += 1
        if is_last:
            nxt = transport.send(0, Kind.RESULT, msg.batch_id, out)
        else:
            nxt = transport.send(rank + 1, Kind.DATA, msg.batch_id, _wire(h, mask, pos, bad, wire_dtype))
        if pending is not None:
            pending.wait()
        pending = nxt
    if pending is not None:
        pending.wait()
    return stats


class NonFiniteError(ValueError):
    """NaN or Inf in the activations of some rows (``runtime.on_nonfinite=error``)."""


def _stage_name(stage: int, topo) -> str:
    if stage == topo.world_size:
        extra = f"layers [{topo.tail.start}, {topo.tail.stop}) + " if len(topo.tail) else ""
        return f"rank {topo.head_rank()}: {extra}final norm and head"
    r = topo.ranges[stage] if topo.world_size > 1 else range(0, topo.num_layers)
    return f"rank {stage}: layers [{r.start}, {r.stop})"


def check_finite(cols: dict, bad: torch.Tensor, batch, topo, mode: str) -> torch.Tensor:
    """Mark rows whose outputs are NaN/Inf (stage = the head) and raise or log per ``mode``."""
    checked = [np.isfinite(v.reshape(len(v), -1)).all(-1) for k, v in cols.items() if k in ("nll_sum", "embedding")]
    outputs = np.stack(checked).all(0) if checked else np.ones(len(bad), dtype=bool)
    # a row with no predicted token has nll_mean NaN by definition; nll_sum stays finite
    bad = torch.where((bad < 0) & torch.from_numpy(~outputs), torch.full_like(bad, topo.world_size), bad)
    if (bad >= 0).any():
        rows = batch.rows[bad >= 0].tolist()
        stages = sorted(set(bad[bad >= 0].tolist()))
        where = "; ".join(_stage_name(st, topo) for st in stages)
        text = f"NaN/Inf in the activations of rows {rows[:20]}{' ...' if len(rows) > 20 else ''}, first in {where}"
        if mode == "error":
            raise NonFiniteError(text + " (runtime.on_nonfinite=error; use flag to record and continue)")
        log.warning("%s: flagged in `nonfinite`", text)
    return bad
