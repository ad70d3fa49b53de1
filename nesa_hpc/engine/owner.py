"""Rank 0's side of the pipeline: its front and back, its mailbox, and the driver of score and embed.

The owner's *front* (embed -> layers [0, k) -> privacy) makes the only activations that leave rank 0; its
*back* (owner tail -> final norm -> head) consumes what the last worker returns. :class:`Owner` holds
both, sends to rank 1 and receives from the workers; every task drives it (score and embed with
:func:`run_stream`, generation in :mod:`nesa_hpc.infer.generate`, a training step in :mod:`nesa_hpc.train.step`).
At world size 1 the workers' layers [k, L) run in a :class:`~nesa_hpc.engine.stage.LocalPipe`, so the same
code path serves every world size.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace

import numpy as np
import torch

from ..io.data import Batch
from .stage import (
    LocalPipe,
    NonFiniteError,
    Stage,
    StageStats,
    adapter_dtype,
    data_message,
    mark_nonfinite,
    memory_guard,
)
from .topology import Topology
from .transport import Kind, Message

__all__ = ["Owner", "run_stream", "check_finite", "describe_stage"]

log = logging.getLogger("nesa_hpc")


class Owner:
    """Rank 0's two ends of the pipeline and its mailbox.

    ``transport`` is None at world size 1: layers [k, L) then run in a local stage behind a
    :class:`LocalPipe`. ``wire_dtype`` is the dtype of hidden states on the wire (none at world size 1).
    """

    def __init__(self, topo: Topology, adapter, privacy, transport, device: torch.device | str = "cpu",
                 wire_dtype: torch.dtype | None = None) -> None:
        self.topo, self.adapter, self.privacy = topo, adapter, privacy
        self.device = torch.device(device)
        self.dtype = adapter_dtype(adapter)
        self.head_here = topo.head_rank() == 0
        if transport is None:
            # the pipeline's middle runs here: a last stage in position 1 of 2, marking non-finite rows as 0
            self.local = Stage(0, range(topo.k, topo.num_layers), adapter, self.device, prev=0, nxt=0, is_last=True,
                               mark=0, world=2, position=1)
            transport, wire_dtype = LocalPipe(self.local), None
        else:
            self.local = None
        self.transport = transport
        self.wire = wire_dtype or self.dtype
        self.stages = max(topo.world_size, 2)  # pipeline stages that hold a micro-batch (for the windows)
        self.stats = StageStats()
        self.pending: deque = deque()
        self.mail: dict[int, deque[Message]] = {}
        self.denoiser = None  # split.denoiser / train.denoiser: rank 0's network before the head
        self.kept: dict[int, torch.Tensor] = {}  # micro-batch -> its clean layer-k states, for the denoiser

    @property
    def last(self) -> int:
        return self.topo.last

    @property
    def picks_from_releases_only(self) -> bool:
        """Whether a token rank 0 picks is a function of released activations alone. Only then is a decode
        step's Z (the picked token's embedding, re-noised) post-processing that costs the row nothing. At
        k > 0 rank 0's layers mix the row's clean prompt (their KV cache) into it; a denoiser feeds the
        clean layer-k states into what picks the token. The owner tail and a head on the last worker read
        only what the workers returned."""
        return self.topo.k == 0 and self.denoiser is None

    # -- the front: what leaves rank 0
    def front(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
              release: int = 0, cache=None, step_mask: torch.Tensor | None = None, picked: bool = False,
              key: int | None = None):
        """Embed ``ids`` (B, T), run layers [0, k) (with the owner's KV ``cache`` in generation), privatise.
        ``picked``: the ids are tokens rank 0 picked from what came back (a decode step); such a Z is a new
        release of the row unless :attr:`picks_from_releases_only`. With a denoiser, the clean states at
        layer k are kept under ``key`` (the micro-batch) for :meth:`back`.
        Returns (Z (B, T, H), (B,) int32 marks): the only activations that leave rank 0."""
        a = self.adapter
        h = a.embed(ids, pos)  # (B, T, H)
        h = a.run_layers(range(0, self.topo.k), h, mask, pos, cache)
        if self.denoiser is not None:
            self.kept[key] = h.detach()
        step_mask = mask if step_mask is None else step_mask
        clean = torch.full((ids.shape[0],), -1, dtype=torch.int32, device=h.device)
        # marked before the privacy transform, which sends a NaN/Inf as zero (it would slip past the clip)
        bad = mark_nonfinite(h, step_mask, clean, 0)
        counted = not (picked and self.picks_from_releases_only)
        z = self.privacy.apply(h, step_mask, rows, release=release, counted=counted)  # (B, T, H)
        # a transform's final cast can still overflow (fp16 and a large sigma); without one, Z is h, checked above
        return z, (bad if z is h else mark_nonfinite(z, step_mask, bad, 0))

    # -- the back: what rank 0 does with what comes back
    def back(self, h: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, bad: torch.Tensor, cache=None,
             mark_mask: torch.Tensor | None = None, key: int | None = None):
        """The owner tail over the last worker's (B, T, H) states, then the denoiser (with the clean states
        :meth:`front` kept under ``key``; the last T of them when fewer positions come back); returns
        (states, marks)."""
        h = self.adapter.run_layers(self.topo.tail, h.to(self.dtype), mask, pos, cache)
        if self.denoiser is not None:
            clean = self.kept.pop(key)
            h = self.denoiser(h, clean[:, clean.shape[1] - h.shape[1]:])
        return h, mark_nonfinite(h, mask if mark_mask is None else mark_mask, bad, self.topo.world_size)

    # -- messages
    def send(self, kind: int, batch_id: int, tensors: list[torch.Tensor] = (), dest: int = 1,
             limit: int | None = None) -> None:
        """Start a send to ``dest`` (rank 1 by default); with ``limit``, wait for the oldest sends until at
        most that many are outstanding."""
        self.pending.append(self.transport.send(dest, kind, batch_id, list(tensors)))
        while limit is not None and len(self.pending) > limit:
            self.pending.popleft().wait()

    def flush(self) -> None:
        while self.pending:
            self.pending.popleft().wait()

    def recv(self, kind: int, batch_id: int, source: int | None = None, strict: bool = True) -> Message:
        """The message (``kind``, ``batch_id``) from ``source`` (default: the last rank). ``strict``: it must be
        the next one that rank sends; else messages that come before it are kept for later calls (a rank
        that sends both results and gradients, in the order of its schedule)."""
        source = self.last if source is None else source
        # the local pipe has one channel whatever the source: one box then holds what came early
        box = self.mail.setdefault(source if self.local is None else -1, deque())
        for i, msg in enumerate(box):
            if msg.kind == kind and msg.batch_id == batch_id:
                del box[i]
                return msg
        while True:
            msg = self.transport.recv(source)
            if msg.kind == kind and msg.batch_id == batch_id:
                return msg
            if strict or len(box) > 4 * self.stages + 64:
                raise RuntimeError(f"rank 0 expected message kind {kind} of micro-batch {batch_id} from rank "
                                   f"{source}, got kind {msg.kind} micro-batch {msg.batch_id}")
            box.append(msg)

    def stop(self) -> None:
        """Tell the workers that no more work comes, and complete every send."""
        self.send(Kind.STOP, -1)
        self.flush()

    def all_stats(self) -> StageStats:
        """Rank 0's figures, with the local stage's compute at world size 1."""
        if self.local is None:
            return self.stats
        local = self.local.stats
        return replace(self.stats, compute_s=self.stats.compute_s + local.compute_s,
                       peak_saved_bytes=max(self.stats.peak_saved_bytes, local.peak_saved_bytes))


def run_stream(owner: Owner, task, batches: Iterable[Batch],
               on_result: Callable[[Batch, list[torch.Tensor], torch.Tensor], None], inflight: int,
               should_stop: Callable[[], bool] = lambda: False) -> StageStats:
    """Score or embed: keep up to ``inflight`` micro-batches in the pipeline and hand each result, in order,
    to ``on_result(batch, outputs, nonfinite)``. ``nonfinite`` (B,) marks rows whose activations held NaN/Inf
    with the stage where it first appeared: a rank, or ``world_size`` for the owner's tail layers and head
    (-1 = clean). When ``should_stop()`` turns true no new batch starts; those in flight are finished, and
    ``extra["stopped"]`` is set if any batch was left."""
    stats, dev, adapter = owner.stats, owner.device, owner.adapter
    outstanding: deque[Batch] = deque()

    def collect() -> None:
        batch = outstanding.popleft()
        msg = owner.recv(Kind.RESULT, batch.index)  # (B, T, H) states, or the head's outputs; (B,) marks
        t0 = time.perf_counter()
        *tensors, bad = (t.to(dev, non_blocking=True) for t in msg.tensors)
        with torch.inference_mode(), memory_guard(0, "the head", tuple(batch.ids.shape)):
            if owner.head_here:
                mask, pos = batch.mask.to(dev), batch.pos.to(dev)
                h, bad = owner.back(tensors[0], mask, pos, bad, key=batch.index)  # (B, T, H)
                out = task.head_stage(adapter, h, mask)
            else:
                out = tensors
            on_result(batch, out, bad.cpu())
        stats.compute_s += time.perf_counter() - t0

    for batch in batches:
        if should_stop():
            stats.extra["stopped"] = True  # rows were left (a stop after the last batch is a completed job)
            break
        t0 = time.perf_counter()
        with torch.inference_mode(), memory_guard(0, "embedding and layers [0, k)", tuple(batch.ids.shape)):
            mask, pos = batch.mask.to(dev), batch.pos.to(dev)  # (B, T) each
            z, bad = owner.front(batch.ids.to(dev), mask, pos, batch.rows, key=batch.index)
        stats.compute_s += time.perf_counter() - t0
        stats.batches += 1
        owner.send(Kind.DATA, batch.index, data_message(z, mask, pos, bad, owner.wire), limit=inflight)
        outstanding.append(batch)
        while len(outstanding) >= inflight:
            collect()
    while outstanding:
        collect()
    owner.stop()
    return owner.all_stats()


def describe_stage(stage: int, topo: Topology) -> str:
    """Where stage number ``stage`` (a rank, or ``world_size`` for the owner's back) runs, in words."""
    if stage == topo.world_size:
        extra = f"layers [{topo.tail.start}, {topo.tail.stop}) + " if len(topo.tail) else ""
        return f"rank {topo.head_rank()}: {extra}final norm and head"
    r = topo.ranges[stage] if topo.world_size > 1 else range(0, topo.num_layers)
    return f"rank {stage}: layers [{r.start}, {r.stop})"


def check_finite(cols: dict, bad: torch.Tensor, batch, topo: Topology, mode: str) -> torch.Tensor:
    """Mark rows whose outputs are NaN/Inf (stage = the head) and raise or log per ``mode``."""
    checked = [np.isfinite(v.reshape(len(v), -1)).all(-1) for k, v in cols.items() if k in ("nll_sum", "embedding")]
    outputs = np.stack(checked).all(0) if checked else np.ones(len(bad), dtype=bool)
    # a row with no predicted token has nll_mean NaN by definition; nll_sum stays finite
    bad = torch.where((bad < 0) & torch.from_numpy(~outputs), torch.full_like(bad, topo.world_size), bad)
    if (bad >= 0).any():
        rows = batch.rows[bad >= 0].tolist()
        stages = sorted(set(bad[bad >= 0].tolist()))
        where = "; ".join(describe_stage(st, topo) for st in stages)
        text = f"NaN/Inf in the activations of rows {rows[:20]}{' ...' if len(rows) > 20 else ''}, first in {where}"
        if mode == "error":
            raise NonFiniteError(text + " (runtime.on_nonfinite=error; use flag to record and continue)")
        log.warning("%s: flagged in `nonfinite`", text)
    return bad

