"""What one rank holds (a :class:`Stage`) and the one loop every worker runs (:func:`serve`).

A stage holds a block of layers (original indices) and, per micro-batch in flight, its state: the KV cache
of a generation group, the activations a training micro-batch saved for its backward. It answers one
message with a few verbs and returns the messages to send on; it never touches the transport itself,
so the same stage serves a worker rank (:func:`serve`) and, at world size 1, rank 0's in-process
:class:`LocalPipe`. The memory guard, the non-finite marks and the wire dtype live here, so every task
has them.

Messages a stage answers (``batch_id`` = the micro-batch or generation group):

- ``DATA`` (score/embed): (B, T, H) states, (B, T) int8 mask, (B, T) int32 positions, (B,) int32 marks.
- ``PREFILL`` / ``DECODE`` (generate): the same plus (B',) int32 rows kept since the group's last step;
  the mask covers the cached positions too.
- ``FREE``: a generation group is done; drop its cache.
- ``TRAIN_FWD``: a data message plus (2,) int32 ``[micro-batches in this step, step]``; ``TRAIN_BWD``:
  the gradient of what the receiver sent. Within a step a stage follows a fixed schedule (GPipe or 1F1B),
  which says whether its next message comes from the rank before it or the rank after it.
- ``SAVE`` / ``EXPORT`` (training): passed on, then the job's handler for it runs on this rank.
- ``STOP``: passed on; the loop ends.
The last stage answers with ``RESULT`` (inference) or ``TRAIN_OUT`` (training) to rank 0.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from .transport import Kind, Message

__all__ = ["Stage", "StageStats", "LocalPipe", "serve", "BatchMemoryError", "NonFiniteError", "memory_guard",
           "mark_nonfinite", "adapter_dtype", "data_message", "train_schedule", "head_logits", "PIPELINES",
           "SavedBytes"]

PIPELINES = ("gpipe", "1f1b")


@dataclass
class StageStats:
    compute_s: float = 0.0
    batches: int = 0                # micro-batch forwards computed (a prefill or a decode step is one)
    peak_saved_bytes: int = 0       # training: most bytes of activations saved for backward at once
    extra: dict = field(default_factory=dict)


class BatchMemoryError(UserError):
    """A micro-batch did not fit in memory; the message suggests smaller batches."""


class NonFiniteError(UserError):
    """NaN or Inf in the activations of some rows (``runtime.on_nonfinite=error``), or in a training loss."""


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
        rows, tokens = shape[:2]
        raise BatchMemoryError(f"rank {rank}: out of memory running {what} on a micro-batch of {rows} rows x "
                               f"{tokens} tokens ({type(exc).__name__}: {text.splitlines()[0][:200]}); lower "
                               "data.batch_size or data.max_length, or spread the layers over more ranks") from None


def mark_nonfinite(h: torch.Tensor, mask: torch.Tensor, bad: torch.Tensor, stage: int) -> torch.Tensor:
    """(B,) int32: rows whose real tokens hold NaN/Inf in ``h`` (B, T, H) and were clean so far get
    ``stage`` (the stage where it first appeared); others keep their mark (-1 = clean)."""
    ok = (torch.isfinite(h).all(-1) | ~mask.bool()).all(-1)  # (B,)
    return torch.where((bad < 0) & ~ok, torch.full_like(bad, stage), bad)


def adapter_dtype(adapter) -> torch.dtype:
    return next((p.dtype for p in adapter.model.parameters() if p.device.type != "meta"), torch.float32)


def data_message(h: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, bad: torch.Tensor,
                 wire_dtype: torch.dtype) -> list[torch.Tensor]:
    # (B, T, H) hidden states, (B, T) int8 mask, (B, T) int32 positions, (B,) int32 non-finite marks:
    # no token ids, ever.
    return [h.to(wire_dtype), mask.to(torch.int8), pos.to(torch.int32), bad.to(torch.int32)]


def head_logits(adapter, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, V) logits of the positions that predict a real token (training's head)."""
    from ..infer.tasks import score_positions

    return adapter.logits(adapter.norm(h[:, :-1][score_positions(mask)]))


def train_schedule(pipeline: str, micro: int, position: int, world: int, backward: bool) -> list[str]:
    """This stage's order of forwards ("F") and backwards ("B") in a training step of ``micro`` micro-batches.

    ``position`` is the worker's rank; rank 0 is both the first stage (its front) and the last (the loss),
    so a worker has ``world - position`` stages after it. GPipe runs every forward first; 1F1B runs that
    many forwards, then alternates one forward and one backward, so at most ``world - position + 1``
    micro-batches hold activations here. Without a backward (nothing before the head trains here or
    earlier) a stage only runs forwards."""
    if not backward:
        return ["F"] * micro
    warm = micro if pipeline == "gpipe" else min(world - position, micro)
    steady = [a for _ in range(micro - warm) for a in ("F", "B")]
    return ["F"] * warm + steady + ["B"] * warm


class SavedBytes:
    """Counts the bytes of activations autograd saves for backward, parameters excluded: one counter per
    rank (built once its trainable parameters exist), a fresh count per micro-batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}

    @contextmanager
    def counting(self):
        """Within the block, count what autograd saves; yields a one-item list holding the bytes."""
        seen: set[int] = set()
        total = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.params and ptr not in seen:
                seen.add(ptr)
                total[0] += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield total


class Stage:
    """One rank's layers, its per-micro-batch state and the verbs that answer messages.

    ``prev`` / ``nxt`` are the ranks before and after this stage (``nxt`` is 0 for the last stage);
    ``mark`` is the stage number written into non-finite marks; ``head`` is the task whose ``head_stage``
    runs here when this stage holds the head (``split.head=last``), else None.
    """

    def __init__(self, rank: int, layers: range, adapter, device: torch.device, *, prev: int, nxt: int,
                 is_last: bool, head=None, mark: int | None = None, wire_dtype: torch.dtype | None = None,
                 tail_on_owner: bool = False, world: int = 1, position: int | None = None) -> None:
        self.rank, self.layers, self.adapter, self.device = rank, layers, adapter, torch.device(device)
        self.prev, self.nxt, self.is_last, self.head = prev, nxt, is_last, head
        self.mark = rank if mark is None else mark
        self.dtype = adapter_dtype(adapter)
        self.wire = wire_dtype or self.dtype
        self.tail_on_owner = tail_on_owner
        self.world = world
        self.position = rank if position is None else position  # place in the pipeline, for the schedule
        self.stats = StageStats()
        self.caches: dict[int, tuple[object, int]] = {}      # generation group -> (KV cache, rows in it)
        self.saved: dict[int, tuple] = {}                    # training micro-batch -> (input, output, bytes)
        self.schedule: deque[str] = deque()                  # this training step's remaining F/B actions
        self.step = -1
        # training: set by the job (whether this stage back-propagates, and sends a gradient back)
        self.trains, self.sends_back, self.pipeline = False, False, "1f1b"
        self.handlers: dict[int, Callable[[int], None]] = {}  # SAVE / EXPORT handlers of the job
        self.on_step_end: Callable[[int], None] | None = None
        self.finished: int | None = None
        self._saved_bytes: SavedBytes | None = None

    @classmethod
    def of_rank(cls, rank: int, topo, adapter, device, task=None, wire_dtype: torch.dtype | None = None) -> Stage:
        """Worker ``rank``'s stage: its block of layers, and the head (``task``) when it holds it."""
        last = rank == topo.last
        return cls(rank, topo.layers_of(rank), adapter, device, prev=rank - 1, nxt=0 if last else rank + 1,
                   is_last=last, head=task if topo.head_rank() == rank else None, wire_dtype=wire_dtype,
                   tail_on_owner=len(topo.tail) > 0, world=topo.world_size)

    # -- where the next message comes from
    def wants_backward(self) -> bool:
        """Whether this stage's next message is a gradient (from the rank after it) rather than a forward."""
        return bool(self.schedule) and self.schedule[0] == "B"

    def next_source(self) -> int:
        return self.nxt if self.wants_backward() else self.prev

    def _unwire(self, tensors: list[torch.Tensor]):
        h, mask, pos, bad = (t.to(self.device, non_blocking=True) for t in tensors[:4])
        return h.to(self.dtype), mask.long(), pos.long(), bad

    def _guard(self, shape):
        return memory_guard(self.rank, f"layers [{self.layers.start}, {self.layers.stop})", tuple(shape))

    # -- the verbs
    def handle(self, msg: Message) -> list[tuple[int, int, int, list[torch.Tensor]]]:
        """Answer one message; returns the messages to send as (dest, kind, batch_id, tensors)."""
        kind = msg.kind
        if kind in (Kind.STOP, Kind.SAVE, Kind.EXPORT, Kind.FREE):  # passed on; FREE drops a group's cache
            if kind == Kind.FREE:
                self.caches.pop(msg.batch_id, None)
            return [] if self.is_last else [(self.nxt, kind, msg.batch_id, [])]
        t0 = time.perf_counter()
        if kind == Kind.DATA:
            out = self.forward(msg)
        elif kind in (Kind.PREFILL, Kind.DECODE):
            out = self.generate(msg)
        elif kind == Kind.TRAIN_FWD:
            out = self.train_forward(msg)
        elif kind == Kind.TRAIN_BWD:
            out = self.backward(msg)
        else:
            raise RuntimeError(f"rank {self.rank}: unexpected message kind {kind}")
        self.stats.compute_s += time.perf_counter() - t0
        self.stats.batches += kind != Kind.TRAIN_BWD
        if kind in (Kind.TRAIN_FWD, Kind.TRAIN_BWD) and not self.schedule:
            self.finished, self.step = self.step, -1  # the step's schedule ran out: see take_step_end
        return out

    def forward(self, msg: Message):
        """Inference: run this stage's layers; the last stage applies the head when it holds it."""
        h, mask, pos, bad = self._unwire(msg.tensors)
        with torch.inference_mode(), self._guard(mask.shape):
            h = self.adapter.run_layers(self.layers, h, mask, pos)  # (B, T, H)
            bad = mark_nonfinite(h, mask, bad, self.mark)
            if not self.is_last:
                return [(self.nxt, Kind.DATA, msg.batch_id, data_message(h, mask, pos, bad, self.wire))]
            out = self.head.head_stage(self.adapter, h, mask) if self.head is not None else [h.to(self.wire)]
        return [(0, Kind.RESULT, msg.batch_id, [*out, bad])]

    def generate(self, msg: Message):
        """Prefill or one decode step of a generation group, with this stage's KV cache of the group."""
        h, mask, pos, bad = self._unwire(msg.tensors)
        keep = msg.tensors[4].to(self.device, non_blocking=True).long()
        with torch.inference_mode(), self._guard(mask.shape):
            if msg.kind == Kind.PREFILL:
                self.caches[msg.batch_id] = (self.adapter.new_cache(), len(keep))
            cache, rows = self.caches[msg.batch_id]
            if len(keep) != rows:  # rows that finished at the owner: drop their cache entries
                cache.batch_select_indices(keep)
                self.caches[msg.batch_id] = (cache, len(keep))
            h = self.adapter.run_layers(self.layers, h, mask, pos, cache)  # (B', T, H)
            bad = mark_nonfinite(h, mask[:, -h.shape[1]:], bad, self.mark)
            if not self.is_last:
                return [(self.nxt, msg.kind, msg.batch_id,
                         [*data_message(h, mask, pos, bad, self.wire), keep.to(torch.int32)])]
            if self.head is not None:
                out = self.head.head_stage(self.adapter, h, None)  # [(B', V) logits of the last position]
            elif msg.kind == Kind.PREFILL and self.tail_on_owner:
                out = [h.to(self.wire)]  # the owner's tail layers need every prompt position
            else:
                out = [h[:, -1:].to(self.wire)]  # (B', 1, H)
        return [(0, Kind.RESULT, msg.batch_id, [*out, bad])]

    def train_forward(self, msg: Message):
        """Training forward of one micro-batch; the first of a step sets this step's schedule."""
        micro, step = (int(x) for x in msg.tensors[4].tolist())
        if msg.batch_id == 0:
            self.step = step
            self.schedule = deque(train_schedule(self.pipeline, micro, self.position, self.world, self.trains))
        if not self.schedule or self.schedule.popleft() != "F":
            raise RuntimeError(f"rank {self.rank}: a forward of micro-batch {msg.batch_id} arrived out of schedule")
        h, mask, pos, bad = self._unwire(msg.tensors)
        if self._saved_bytes is None:
            self._saved_bytes = SavedBytes(self.adapter.model)
        with torch.set_grad_enabled(self.trains), self._guard(mask.shape), self._saved_bytes.counting() as saved:
            if self.sends_back:
                h.requires_grad_(True)
            out = self.adapter.run_layers(self.layers, h, mask, pos)  # (B, T, H)
            bad = mark_nonfinite(out, mask, bad, self.mark)
            if self.is_last and self.head is not None:
                out = head_logits(self.adapter, out, mask).float()  # (N, V)
        if self.trains:
            self.saved[msg.batch_id] = (h, out, saved[0])
            live = sum(b for _, _, b in self.saved.values())
            self.stats.peak_saved_bytes = max(self.stats.peak_saved_bytes, live)
        if self.is_last:
            send = out.detach() if self.head is not None else out.detach().to(self.wire)
            return [(0, Kind.TRAIN_OUT, msg.batch_id, [send, bad])]
        return [(self.nxt, Kind.TRAIN_FWD, msg.batch_id,
                 [*data_message(out.detach(), mask, pos, bad, self.wire), msg.tensors[4]])]

    def backward(self, msg: Message):
        """Training backward of one micro-batch: the gradient of this stage's output, back to its input."""
        if not self.schedule or self.schedule.popleft() != "B":
            raise RuntimeError(f"rank {self.rank}: a gradient of micro-batch {msg.batch_id} arrived out of schedule")
        h, out, _ = self.saved.pop(msg.batch_id)
        with self._guard(tuple(h.shape)):
            out.backward(msg.tensors[0].to(device=out.device, dtype=out.dtype))
        return [(self.prev, Kind.TRAIN_BWD, msg.batch_id, [h.grad.to(self.wire)])] if self.sends_back else []

    def take_step_end(self) -> int | None:
        """The training step this stage just finished (its schedule ran out), once; else None."""
        step, self.finished = self.finished, None
        return step


class _Waiting:
    """Messages a stage has received but its training schedule does not want yet: forwards and gradients
    wait apart, and the stage takes the next of the kind its schedule asks for."""

    def __init__(self) -> None:
        self.queues: dict[bool, deque[Message]] = {False: deque(), True: deque()}  # by "is a gradient"

    def put(self, msg: Message) -> None:
        self.queues[msg.kind == Kind.TRAIN_BWD].append(msg)

    def take(self, stage: Stage) -> Message | None:
        queue = self.queues[stage.wants_backward()]
        return queue.popleft() if queue else None


def serve(stage: Stage, transport, depth: int = 2) -> StageStats:
    """The worker loop: receive, answer with the stage's verbs, send on, until ``STOP``. At most ``depth``
    sends are outstanding outside a training step; within one, sends complete at the step's end (a wait
    inside the step could block on a rank that waits for this one)."""
    pending: deque = deque()
    # the last worker of two ranks gets forwards and gradients from rank 0 alike: one may come early
    waiting = _Waiting()
    while True:
        msg = waiting.take(stage)
        if msg is None:
            waiting.put(transport.recv(stage.next_source()))
            continue
        for dest, kind, batch_id, tensors in stage.handle(msg):
            pending.append(transport.send(dest, kind, batch_id, tensors))
        if msg.kind == Kind.STOP:
            break
        handler = stage.handlers.get(msg.kind)
        if handler is not None:
            handler(msg.batch_id)
        step = stage.take_step_end()
        if step is not None:
            while pending:
                pending.popleft().wait()
            if stage.on_step_end is not None:
                stage.on_step_end(step)
        elif not stage.schedule:
            while len(pending) > depth:
                pending.popleft().wait()
    while pending:
        pending.popleft().wait()
    return stage.stats


class LocalPipe:
    """The pipeline at world size 1: rank 0 sends to a stage in its own process.

    It has the transport's interface, so rank 0 drives world size 1 exactly as it drives workers: messages
    wait in two queues (forwards, gradients) as they would in a transport, and the stage takes them in the
    order its schedule asks for."""

    wait_seconds = {"recv": 0.0, "send": 0.0}
    bytes_sent = 0

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.waiting = _Waiting()
        self.inbox: deque[Message] = deque()

    def send(self, dest: int, kind: int, batch_id: int, tensors: list[torch.Tensor] = ()):
        self.waiting.put(Message(kind, batch_id, list(tensors)))
        while (msg := self.waiting.take(self.stage)) is not None:
            for _, k, b, out in self.stage.handle(msg):
                self.inbox.append(Message(k, b, out))
            self.stage.take_step_end()  # rank 0's own optimizer covers the local stage's parameters
        return _Done()

    def recv(self, source: int) -> Message:
        if not self.inbox:
            raise RuntimeError("rank 0 waits for a message its own pipeline never produced")
        return self.inbox.popleft()

    def close(self) -> None:
        """Nothing to release."""


class _Done:
    @staticmethod
    def wait() -> None:
        return None
