"""What one rank holds (a :class:`Stage`) and the one loop every worker runs (:func:`serve`).

A stage holds a block of layers (original indices) and, per micro-batch in flight, its state: the KV cache
of a generation lane, the activations a training micro-batch saved for its backward. It answers one
message (:mod:`nesa_hpc.engine.messages`) with a few verbs and returns the messages to send on; it never
touches the transport itself, so the same stage serves a worker rank (:func:`serve`) and, at world size
1, rank 0's in-process :class:`LocalPipe`. The memory guard, the non-finite marks and the wire dtype live
here, so every task has them. In training a stage follows its part of the step's schedule
(:mod:`nesa_hpc.engine.schedule`), which says whether its next message is a forward from the rank before
it or a gradient from the rank after it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from ..errors import UserError
from . import trace
from .lanes import LaneCache
from .messages import (
    Activations,
    Export,
    Free,
    GenerationOutput,
    GenerationStep,
    Message,
    Output,
    Save,
    Split,
    Stop,
    TrainForward,
    TrainGrad,
    TrainOutput,
)
from .schedule import Action, TrainingRole

__all__ = ["Stage", "StageStats", "LocalPipe", "serve", "BatchMemoryError", "NonFiniteError", "memory_guard",
           "mark_nonfinite", "finite_vectors", "adapter_dtype", "head_logits", "SavedBytes"]


@dataclass
class StageStats:
    compute_s: float = 0.0
    batches: int = 0                # micro-batch forwards computed (a prefill or a decode step is one)
    peak_saved_bytes: int = 0       # training: most bytes of activations saved for backward at once
    extra: dict = field(default_factory=dict)

    def computed(self, t0: float, what: str, **args) -> None:
        """Count the compute from ``t0`` (``time.perf_counter()``) to now, as ``what`` on the timeline
        (``runtime.trace``)."""
        t1 = time.perf_counter()
        self.compute_s += t1 - t0
        trace.span(what, "compute", t0, t1, **args)


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


def finite_vectors(x: torch.Tensor) -> torch.Tensor:
    """(...) bool: whether each vector along the last dimension of ``x`` holds only finite values. On the CPU
    it checks each vector's sum first (NaN and Inf carry into it; a sum that overflows is checked element by
    element): one pass over ``x`` instead of a mask of its size. On a GPU, one exact check without a sync."""
    if x.device.type != "cpu":
        return torch.isfinite(x).all(-1)
    ok = torch.isfinite(x.sum(-1))
    if not bool(ok.all()):
        bad = ~ok
        ok[bad] = torch.isfinite(x[bad]).all(-1)
    return ok


def mark_nonfinite(h: torch.Tensor, mask: torch.Tensor, bad: torch.Tensor, stage: int) -> torch.Tensor:
    """(B,) int32: rows whose real tokens hold NaN/Inf in ``h`` (B, T, H) and were clean so far get
    ``stage`` (the stage where it first appeared); others keep their mark (-1 = clean)."""
    ok = (finite_vectors(h) | ~mask.bool()).all(-1)  # (B,)
    return torch.where((bad < 0) & ~ok, torch.full_like(bad, stage), bad)


def adapter_dtype(adapter) -> torch.dtype:
    return next((p.dtype for p in adapter.model.parameters() if p.device.type != "meta"), torch.float32)


def head_logits(adapter, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, V) logits of the positions that predict a real token (training's head)."""
    from ..infer.tasks import score_positions

    return adapter.logits(adapter.norm(h[:, :-1][score_positions(mask)]))


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
    runs here when this stage holds the head (``split.head=last``), else None. In training, ``training``
    is its part of the schedule, ``handlers`` the job's action for a :class:`Save` or :class:`Export`
    (called with the step) and ``on_step_end(step)`` runs when its part of a step is done.
    """

    def __init__(self, rank: int, layers: range, adapter, device: torch.device, *, prev: int, nxt: int,
                 is_last: bool, head=None, mark: int | None = None, wire_dtype: torch.dtype | None = None,
                 tail_on_owner: bool = False, training: TrainingRole | None = None,
                 handlers: dict[type, Callable[[int], None]] | None = None,
                 on_step_end: Callable[[int], None] | None = None) -> None:
        self.rank, self.layers, self.adapter, self.device = rank, layers, adapter, torch.device(device)
        self.prev, self.nxt, self.is_last, self.head = prev, nxt, is_last, head
        self.mark = rank if mark is None else mark
        self.dtype = adapter_dtype(adapter)
        self.wire = wire_dtype or self.dtype
        self.tail_on_owner = tail_on_owner
        self.training = training
        self.handlers = handlers or {}
        self.on_step_end = on_step_end
        self.stats = StageStats()
        self.lanes: dict[int, LaneCache] = {}     # generation lane -> its KV caches over this stage's layers
        self.saved: dict[int, tuple] = {}         # training micro-batch -> (input, output, bytes)
        self.schedule: deque[Action] = deque()    # this training step's remaining actions
        self.step = -1
        self.finished: int | None = None
        self._saved_bytes: SavedBytes | None = None

    @classmethod
    def of_rank(cls, rank: int, topo, adapter, device, task=None, wire_dtype: torch.dtype | None = None,
                training: TrainingRole | None = None, handlers: dict | None = None,
                on_step_end: Callable[[int], None] | None = None) -> Stage:
        """Worker ``rank``'s stage: its block of layers, and the head (``task``) when it holds it."""
        last = rank == topo.last
        return cls(rank, topo.layers_of(rank), adapter, device, prev=rank - 1, nxt=0 if last else rank + 1,
                   is_last=last, head=task if topo.head_rank() == rank else None, wire_dtype=wire_dtype,
                   tail_on_owner=len(topo.tail) > 0, training=training, handlers=handlers, on_step_end=on_step_end)

    @classmethod
    def in_owner(cls, layers: range, adapter, device, training: TrainingRole | None = None) -> Stage:
        """World size 1: the pipeline's middle ``layers`` in rank 0's own process, the last of two stages
        (rank 0 both before and after it); NaN/Inf found there is marked as rank 0's."""
        return cls(0, layers, adapter, device, prev=0, nxt=0, is_last=True, mark=0, training=training)

    # -- where the next message comes from
    def wants_backward(self) -> bool:
        """Whether this stage's next message is a gradient (from the rank after it) rather than a forward."""
        return bool(self.schedule) and self.schedule[0].op == "B"

    def next_source(self) -> int:
        return self.nxt if self.wants_backward() else self.prev

    def _compute(self, states: torch.Tensor, *ints: torch.Tensor) -> list[torch.Tensor]:
        """Wire tensors on this rank's device: states in the compute dtype, masks and positions as int64."""
        out = [states.to(self.device, non_blocking=True).to(self.dtype)]
        return out + [t.to(self.device, non_blocking=True).long() for t in ints]

    def _guard(self, shape):
        return memory_guard(self.rank, f"layers [{self.layers.start}, {self.layers.stop})", tuple(shape))

    # -- the verbs
    def handle(self, msg: Message) -> list[tuple[int, Message]]:
        """Answer one message; returns the messages to send as (destination rank, message)."""
        if isinstance(msg, (Stop, Save, Export, Free, Split)):  # passed on; Free drops a lane's cache
            if isinstance(msg, Free):
                self.lanes.pop(msg.batch_id, None)
            elif isinstance(msg, Split):  # some of a lane's running rows move to an idle lane
                self.lanes[msg.to] = self.lanes.setdefault(msg.batch_id, LaneCache()).split(
                    msg.moved.long().to(self.device), msg.kept.long().to(self.device))
            return [] if self.is_last else [(self.nxt, msg)]
        verb = {Activations: self.forward, GenerationStep: self.generate, TrainForward: self.train_forward,
                TrainGrad: self.backward}.get(type(msg))
        if verb is None:
            raise RuntimeError(f"rank {self.rank}: unexpected message {type(msg).__name__}")
        t0 = time.perf_counter()
        out = verb(msg)
        self.stats.computed(t0, f"{type(msg).__name__} {msg.batch_id}", micro_batch=msg.batch_id)
        self.stats.batches += not isinstance(msg, TrainGrad)
        if isinstance(msg, (TrainForward, TrainGrad)) and not self.schedule:
            self.finished, self.step = self.step, -1  # the step's schedule ran out: see take_step_end
        return out

    def forward(self, msg: Activations) -> list[tuple[int, Message]]:
        """Inference: run this stage's layers; the last stage applies the head when it holds it."""
        h, mask, pos = self._compute(msg.states, msg.mask, msg.positions)
        with torch.inference_mode(), self._guard(mask.shape):
            h = self.adapter.run_layers(self.layers, h, mask, pos)  # (B, T, H)
            bad = mark_nonfinite(h, mask, msg.nonfinite_at.to(self.device), self.mark)
            if not self.is_last:
                return [(self.nxt, Activations.pack(msg.batch_id, h, mask, pos, bad, self.wire))]
            (out,) = self.head.head_stage(self.adapter, h, mask) if self.head is not None else [h.to(self.wire)]
        return [(0, Output(msg.batch_id, out, bad.to(torch.int32)))]

    def generate(self, msg: GenerationStep) -> list[tuple[int, Message]]:
        """One step of a generation lane (:class:`GenerationStep`) with this stage's KV caches of the lane."""
        n = len(msg.kept)
        dec = self._compute(msg.decode_states, msg.decode_mask, msg.decode_positions) if n else None
        join = self._compute(msg.join_states, msg.join_mask, msg.join_positions) if len(msg.join_states) else None
        plan = msg.plan()
        plan = replace(plan, kept=plan.kept.to(self.device), filling=plan.filling.to(self.device),
                       done=plan.done.to(self.device))

        def run(part, cache):
            return self.adapter.run_layers(self.layers, *part, cache)

        lane = self.lanes.setdefault(msg.batch_id, LaneCache())
        with torch.inference_mode(), self._guard((n + len(msg.join_states), msg.decode_mask.shape[1])):
            dec_out, join_out = lane.step(plan, dec, join, run, self.adapter.new_cache)
            bad = msg.nonfinite_at.to(self.device).clone()
            if dec_out is not None:
                bad[:n] = mark_nonfinite(dec_out, dec[1][:, -1:], bad[:n], self.mark)
            if join_out is not None:
                bad[n:] = mark_nonfinite(join_out, join[1][:, -join_out.shape[1]:], bad[n:], self.mark)
            dec_out = dec_out if dec_out is not None else msg.decode_states
            join_out = join_out if join_out is not None else msg.join_states
            if not self.is_last:
                return [(self.nxt, replace(msg, decode_states=dec_out.to(self.wire), join_states=join_out.to(self.wire),
                                           nonfinite_at=bad))]
            whole = bool(msg.join_whole.any())
            return [(0, GenerationOutput(msg.batch_id, *self._generation_answer(dec_out, join_out, whole), bad))]

    def _generation_answer(self, dec_out: torch.Tensor, join_out: torch.Tensor,
                           whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """What the last stage returns: next-token logits where it holds the head; else the last position's
        states, or every joining position when rank 0's tail layers need the whole prompt or rank 0 scores
        the prompt (``whole``)."""
        if self.head is not None:
            vocab = self.adapter.config.vocab_size
            return tuple(self.head.head_stage(self.adapter, x, None)[0] if len(x) else
                         torch.zeros(0, vocab, device=x.device) for x in (dec_out, join_out))
        every = self.tail_on_owner or whole
        return dec_out[:, -1:].to(self.wire), (join_out if every else join_out[:, -1:]).to(self.wire)

    def train_forward(self, msg: TrainForward) -> list[tuple[int, Message]]:
        """Training forward of one micro-batch; the first of a step sets this step's schedule."""
        if msg.batch_id == 0:
            self.step = msg.step
            self.schedule = deque(self.training.order(msg.micro_batches))
        self._next_action("F", msg.batch_id)
        h, mask, pos = self._compute(msg.states, msg.mask, msg.positions)
        if self._saved_bytes is None:
            self._saved_bytes = SavedBytes(self.adapter.model)
        backward = self.training.backward
        with torch.set_grad_enabled(backward), self._guard(mask.shape), self._saved_bytes.counting() as saved:
            if self.training.sends_back:
                h.requires_grad_(True)
            out = self.adapter.run_layers(self.layers, h, mask, pos)  # (B, T, H)
            bad = mark_nonfinite(out, mask, msg.nonfinite_at.to(self.device), self.mark)
            if self.is_last and self.head is not None:
                out = head_logits(self.adapter, out, mask).float()  # (N, V)
        if backward:
            self.saved[msg.batch_id] = (h, out, saved[0])
            live = sum(b for _, _, b in self.saved.values())
            self.stats.peak_saved_bytes = max(self.stats.peak_saved_bytes, live)
        if self.is_last:
            send = out.detach() if self.head is not None else out.detach().to(self.wire)
            return [(0, TrainOutput(msg.batch_id, send, bad.to(torch.int32)))]
        data = Activations.pack(msg.batch_id, out.detach(), mask, pos, bad, self.wire)
        return [(self.nxt, TrainForward.pack(msg.batch_id, data, msg.micro_batches, msg.step))]

    def backward(self, msg: TrainGrad) -> list[tuple[int, Message]]:
        """Training backward of one micro-batch: the gradient of this stage's output, back to its input."""
        self._next_action("B", msg.batch_id)
        h, out, _ = self.saved.pop(msg.batch_id)
        with self._guard(tuple(h.shape)):
            out.backward(msg.grad.to(device=out.device, dtype=out.dtype))
        return [(self.prev, TrainGrad(msg.batch_id, h.grad.to(self.wire)))] if self.training.sends_back else []

    def _next_action(self, op: str, micro: int) -> None:
        if not self.schedule or self.schedule.popleft() != Action(op, micro):
            what = "a forward" if op == "F" else "a gradient"
            raise RuntimeError(f"rank {self.rank}: {what} of micro-batch {micro} arrived out of schedule")

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
        self.queues[isinstance(msg, TrainGrad)].append(msg)

    def take(self, stage: Stage) -> Message | None:
        queue = self.queues[stage.wants_backward()]
        return queue.popleft() if queue else None


def serve(stage: Stage, transport, depth: int = 2) -> StageStats:
    """The worker loop: receive, answer with the stage's verbs, send on, until :class:`Stop`. At most
    ``depth`` sends are outstanding outside a training step; within one, sends complete at the step's end
    (a wait inside the step could block on a rank that waits for this one)."""
    pending: deque = deque()
    # the last worker of two ranks gets forwards and gradients from rank 0 alike: one may come early
    waiting = _Waiting()
    while True:
        msg = waiting.take(stage)
        if msg is None:
            waiting.put(transport.recv(stage.next_source()))
            continue
        for dest, out in stage.handle(msg):
            pending.append(transport.send(dest, out))
        if isinstance(msg, Stop):
            break
        handler = stage.handlers.get(type(msg))
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

    def send(self, dest: int, msg: Message):
        self.waiting.put(msg)
        while (nxt := self.waiting.take(self.stage)) is not None:
            for _, out in self.stage.handle(nxt):
                self.inbox.append(out)
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
