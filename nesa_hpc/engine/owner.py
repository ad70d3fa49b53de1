"""Rank 0's side of the pipeline: its front and back, its mailbox, and the driver of score and embed.

The owner's *front* (embed -> layers [0, k) -> privacy) makes the only activations that leave rank 0; its
*back* (owner tail -> denoiser -> final norm -> head) consumes what the last worker returns. :class:`Owner`
holds both, sends to rank 1 and receives from the workers; every task drives it (score and embed with
:func:`run_stream`, generation in :mod:`nesa_hpc.infer.generate`, a training step in
:mod:`nesa_hpc.train.step`). At world size 1 the workers' layers [k, L) run in a stage inside rank 0's
process behind a :class:`~nesa_hpc.engine.stage.LocalPipe`, so the same code path serves every world size.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch

from ..io.batch import Batch
from .messages import Activations, Message, Output, Stop
from .stage import LocalPipe, NonFiniteError, StageStats, adapter_dtype, mark_nonfinite, memory_guard
from .topology import Topology

__all__ = ["Owner", "Front", "run_stream", "check_finite", "describe_stage"]

log = logging.getLogger("nesa_hpc")


class Front(NamedTuple):
    """What :meth:`Owner.front` makes: Z (B, T, H), the only activations that leave rank 0; the (B,) int32
    non-finite marks of Z itself (what goes on the wire with it); when rank 0 has a denoiser, the clean
    layer-k states it reads in :meth:`Owner.back` (else None); and ``own``, the marks of rank 0's clean
    states, which stay on rank 0 (where an fp16 overflow before the noise depends on the data, so its mark
    must not leave with Z)."""

    z: torch.Tensor
    nonfinite_at: torch.Tensor
    clean: torch.Tensor | None
    own: torch.Tensor


class Owner:
    """Rank 0's two ends of the pipeline and its mailbox.

    ``transport`` reaches the workers, or at world size 1 is a :class:`LocalPipe` whose stage runs layers
    [k, L) here. ``privacy`` is the transform applied to Z; ``denoiser`` (``split.denoiser`` /
    ``train.denoiser``) runs before the head; ``wire_dtype`` is the dtype of hidden states on the wire.
    """

    def __init__(self, topo: Topology, adapter, privacy, transport, device: torch.device | str = "cpu",
                 wire_dtype: torch.dtype | None = None, denoiser=None) -> None:
        self.topo, self.adapter, self.privacy, self.denoiser = topo, adapter, privacy, denoiser
        self.device = torch.device(device)
        self.dtype = adapter_dtype(adapter)
        self.head_here = topo.head_rank() == 0
        self.local = transport.stage if isinstance(transport, LocalPipe) else None
        self.transport = transport
        self.wire = (wire_dtype if self.local is None else None) or self.dtype
        self.stages = max(topo.world_size, 2)  # pipeline stages that hold a micro-batch (for the windows)
        self.stats = StageStats()
        self.pending: deque = deque()
        self.mail: dict[int, deque[Message]] = {}

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
              releases: int | list[int] = 0, cache=None, step_mask: torch.Tensor | None = None,
              picked: bool = False, *, digests: list[bytes]) -> Front:
        """Embed ``ids`` (B, T), run layers [0, k) (with the owner's KV ``cache`` in generation; ``mask``
        then covers the cached positions and ``step_mask`` the new ones), privatise. ``releases``: each row's
        release index, and ``digests`` each row's content (:meth:`nesa_hpc.io.batch.Batch.digests`): with
        the row they key its noise. ``picked``: the ids are tokens rank 0 picked from what came back (a
        decode step); such a Z is a new release of the row unless :attr:`picks_from_releases_only`."""
        a = self.adapter
        h = a.embed(ids, pos)  # (B, T, H)
        h = a.run_layers(range(0, self.topo.k), h, mask, pos, cache)
        step_mask = mask if step_mask is None else step_mask
        clean = torch.full((ids.shape[0],), -1, dtype=torch.int32, device=h.device)
        # marked before the privacy transform, which sends a NaN/Inf as zero (it would slip past the clip);
        # this mark is rank 0's own: only the marks of Z, computed on Z, travel with it
        own = mark_nonfinite(h, step_mask, clean, 0)
        counted = not (picked and self.picks_from_releases_only)
        z = self.privacy.apply(h, step_mask, rows, releases=releases, counted=counted, digests=digests)  # (B, T, H)
        # a transform's final cast can still overflow (fp16 and a large sigma); without one, Z is h
        sent = own if z is h else mark_nonfinite(z, step_mask, clean, 0)
        return Front(z, sent, h.detach() if self.denoiser is not None else None, own)

    # -- the back: what rank 0 does with what comes back
    def back(self, h: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, bad: torch.Tensor, cache=None,
             mark_mask: torch.Tensor | None = None, clean: torch.Tensor | None = None):
        """The owner tail over the last worker's (B, T, H) states, then the denoiser (with the ``clean``
        states :meth:`front` returned; the last T of them when fewer positions come back); returns
        (states, marks)."""
        h = self.adapter.run_layers(self.topo.tail, h.to(self.dtype), mask, pos, cache)
        if self.denoiser is not None:
            h = self.denoiser(h, clean[:, clean.shape[1] - h.shape[1]:])
        return h, mark_nonfinite(h, mask if mark_mask is None else mark_mask, bad, self.topo.world_size)

    # -- messages
    def send(self, msg: Message, dest: int = 1, limit: int | None = None) -> None:
        """Start sending ``msg`` to ``dest`` (rank 1 by default); with ``limit``, wait for the oldest sends
        until at most that many are outstanding."""
        self.pending.append(self.transport.send(dest, msg))
        while limit is not None and len(self.pending) > limit:
            self.pending.popleft().wait()

    def flush(self) -> None:
        while self.pending:
            self.pending.popleft().wait()

    def recv(self, cls: type[Message], batch_id: int, source: int | None = None, strict: bool = True) -> Message:
        """The message of class ``cls`` for ``batch_id`` from ``source`` (default: the last rank). ``strict``:
        it must be the next one that rank sends; else messages that come before it are kept for later calls
        (a rank that sends both results and gradients, in the order of its schedule)."""
        source = self.last if source is None else source
        # the local pipe has one channel whatever the source: one box then holds what came early
        box = self.mail.setdefault(source if self.local is None else -1, deque())
        for i, msg in enumerate(box):
            if isinstance(msg, cls) and msg.batch_id == batch_id:
                del box[i]
                return msg
        while True:
            msg = self.transport.recv(source)
            if isinstance(msg, cls) and msg.batch_id == batch_id:
                return msg
            if strict or len(box) > 4 * self.stages + 64:
                raise RuntimeError(f"rank 0 expected {cls.__name__} of micro-batch {batch_id} from rank {source}, "
                                   f"got {type(msg).__name__} of micro-batch {msg.batch_id}")
            box.append(msg)

    def stop(self) -> None:
        """Tell the workers that no more work comes, and complete every send."""
        self.send(Stop(-1))
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
    outstanding: deque[tuple[Batch, torch.Tensor | None, torch.Tensor]] = deque()

    def collect() -> None:
        batch, clean, own = outstanding.popleft()
        msg = owner.recv(Output, batch.index)  # (B, T, H) states, or the head's outputs
        t0 = time.perf_counter()
        out, bad = msg.output.to(dev, non_blocking=True), msg.nonfinite_at.to(dev)
        bad = torch.where(own >= 0, own, bad)  # rank 0's own marks come first (they never left it)
        with torch.inference_mode(), memory_guard(0, "the head", tuple(batch.ids.shape)):
            if owner.head_here:
                mask, pos = batch.mask.to(dev), batch.pos.to(dev)
                h, bad = owner.back(out, mask, pos, bad, clean=clean)  # (B, T, H)
                outputs = task.head_stage(adapter, h, mask)
            else:
                outputs = [out]
            on_result(batch, outputs, bad.cpu())
        stats.computed(t0, f"head {batch.index}", micro_batch=batch.index, rows=batch.size)

    for batch in batches:
        if should_stop():
            stats.extra["stopped"] = True  # rows were left (a stop after the last batch is a completed job)
            break
        t0 = time.perf_counter()
        with torch.inference_mode(), memory_guard(0, "embedding and layers [0, k)", tuple(batch.ids.shape)):
            mask, pos = batch.mask.to(dev), batch.pos.to(dev)  # (B, T) each
            z, bad, clean, own = owner.front(batch.ids.to(dev), mask, pos, batch.rows, digests=batch.digests())
        stats.computed(t0, f"front {batch.index}", micro_batch=batch.index, rows=batch.size)
        stats.batches += 1
        owner.send(Activations.pack(batch.index, z, mask, pos, bad, owner.wire), limit=inflight)
        outstanding.append((batch, clean, own))
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

