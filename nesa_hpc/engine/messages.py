"""Every message between ranks, one class per kind: the only description of what crosses the wire.

A message is a ``batch_id`` (the micro-batch, generation lane or training step it belongs to) and named
tensors. On the wire it is a fixed int64 header (:mod:`nesa_hpc.engine.transport`: kind, ``batch_id``,
then dtype and shape of each tensor) followed by one raw byte buffer per tensor, in the order the
class's fields are declared (:attr:`Message.tensors`); the receiver rebuilds the same class from them
(:func:`decode`). No message to a worker carries token ids, labels or text.

Shapes: B rows, T positions, H hidden size, V vocabulary, N scored positions. ``nonfinite_at`` (B,) int32
is -1 for a clean row, else the stage where NaN/Inf first appeared in its activations (a rank, or the
world size for the owner's tail and head).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from typing import ClassVar

import torch

__all__ = ["Kind", "Message", "Activations", "Output", "GenerationStep", "GenerationOutput", "Free", "Split", "Stop",
           "Save", "Export", "TrainForward", "TrainOutput", "TrainGrad", "decode", "MESSAGES"]


class Kind(IntEnum):
    DATA = 1
    RESULT = 2
    STOP = 3
    GENERATE = 4
    GENERATE_OUT = 5
    FREE = 6
    TRAIN_FWD = 7
    TRAIN_OUT = 8
    TRAIN_BWD = 9
    SAVE = 10
    EXPORT = 11
    SPLIT = 12


@dataclass
class Message:
    """A message of kind :attr:`kind`; its tensor fields, in declaration order, are its wire payload."""

    kind: ClassVar[Kind]
    batch_id: int

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The payload in wire order."""
        return [getattr(self, f.name) for f in fields(self)[1:]]

    @classmethod
    def from_wire(cls, batch_id: int, tensors: list[torch.Tensor]) -> Message:
        return cls(batch_id, *tensors)


@dataclass
class Activations(Message):
    """Hidden states on their way down the pipeline (``task=score`` / ``embed``): rank 0 -> 1 -> ... -> last."""

    kind: ClassVar[Kind] = Kind.DATA
    states: torch.Tensor        # (B, T, H) in runtime.wire_dtype
    mask: torch.Tensor          # (B, T) int8: 1 = a real token
    positions: torch.Tensor     # (B, T) int32
    nonfinite_at: torch.Tensor  # (B,) int32

    @classmethod
    def pack(cls, batch_id: int, states: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             nonfinite_at: torch.Tensor, wire_dtype: torch.dtype) -> Activations:
        """The message with every field in its wire dtype."""
        return cls(batch_id, states.to(wire_dtype), mask.to(torch.int8), positions.to(torch.int32),
                   nonfinite_at.to(torch.int32))


@dataclass
class Output(Message):
    """The last worker's answer to rank 0: the final states (B, T, H) (or, in generation, the states of the
    positions rank 0 needs) with ``split.head=owner``; with ``split.head=last`` what the task's head
    computes there: score logits (N, V) float32, embeddings (B, H) float32, generation logits (B', V)."""

    kind: ClassVar[Kind] = Kind.RESULT
    output: torch.Tensor
    nonfinite_at: torch.Tensor  # (B,) int32


@dataclass
class GenerationStep(Message):
    """One step of a generation lane (``batch_id``), rank 0 -> 1 -> ... -> last (see
    :mod:`nesa_hpc.engine.lanes`): the lane's running rows decode one position each, and joining rows send a
    chunk of their prompt (rows whose prompt is still arriving first, then rows starting theirs).

    Each stage keeps the running rows ``kept`` (indices into the lane's running rows after its previous
    step, in that order) and runs ``decode_*`` with their KV cache; keeps the filling rows ``filling`` and
    runs ``join_*`` with theirs; then the joining rows marked in ``join_done`` move to the running rows,
    after the kept ones. Either part may have no rows."""

    kind: ClassVar[Kind] = Kind.GENERATE
    kept: torch.Tensor               # (B_d,) int32
    decode_states: torch.Tensor      # (B_d, 1, H) in runtime.wire_dtype
    decode_mask: torch.Tensor        # (B_d, past + 1) int8 over the running rows' cached positions and this one
    decode_positions: torch.Tensor   # (B_d, 1) int32
    filling: torch.Tensor            # (B_f,) int32: filling rows kept, the first B_f joining rows
    join_states: torch.Tensor        # (B_j, W, H) in runtime.wire_dtype: a chunk of each prompt, left-padded
    join_mask: torch.Tensor          # (B_j, fill_past + W) int8 over the filling rows' cached positions and this chunk
    join_positions: torch.Tensor     # (B_j, W) int32
    join_done: torch.Tensor          # (B_j,) int8: 1 = this chunk ends the row's prompt
    nonfinite_at: torch.Tensor       # (B_d + B_j,) int32: decode rows, then joining rows
    join_whole: torch.Tensor         # (1,) int8: 1 = the last stage returns every joining position's states, not
                                     # the last one's (rank 0 scores an echoed request's prompt)

    def plan(self):
        """The :class:`~nesa_hpc.engine.lanes.LanePlan` of this step."""
        from .lanes import LanePlan

        return LanePlan(self.kept.long(), self.decode_mask.shape[1] - 1, self.filling.long(),
                        self.join_mask.shape[1] - self.join_states.shape[1], self.join_done.bool())


@dataclass
class GenerationOutput(Message):
    """The last worker's answer to a :class:`GenerationStep` of lane ``batch_id``. With ``split.head=owner``
    the states rank 0's back needs: (B_d, 1, H) for the decode rows, and for the joining rows their chunk's
    last position (B_j, 1, H), or the whole chunk (B_j, W, H) when rank 0 runs tail layers; with
    ``split.head=last`` the next-token logits (B_d, V) and (B_j, V) float32."""

    kind: ClassVar[Kind] = Kind.GENERATE_OUT
    decode_out: torch.Tensor
    join_out: torch.Tensor
    nonfinite_at: torch.Tensor  # (B_d + B_j,) int32


@dataclass
class Free(Message):
    """A generation lane is done: every stage drops its cache. Passed along the pipeline."""

    kind: ClassVar[Kind] = Kind.FREE


@dataclass
class Split(Message):
    """Generation lane ``batch_id`` gives some of its running rows to the idle lane ``to``: every stage
    (and rank 0) moves those rows' KV caches there. Rows are indices into the lane's running rows after its
    previous step; ``moved`` become lane ``to``'s running rows and ``kept`` stay, each in the order given.
    Only running rows move (the lane has no rows whose prompt is still arriving). Passed along the pipeline.
    It carries no activations, only row indices."""

    kind: ClassVar[Kind] = Kind.SPLIT
    moved: torch.Tensor  # (M,) int32
    kept: torch.Tensor   # (K,) int32
    to: int

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.moved, self.kept, torch.tensor([self.to], dtype=torch.int32)]

    @classmethod
    def from_wire(cls, batch_id: int, tensors: list[torch.Tensor]) -> Split:
        moved, kept, to = tensors
        return cls(batch_id, moved, kept, int(to[0]))


@dataclass
class Stop(Message):
    """No more work: a worker passes it on and its loop ends."""

    kind: ClassVar[Kind] = Kind.STOP


@dataclass
class Save(Message):
    """Training: write this rank's part of the checkpoint of step ``batch_id``. Passed along the pipeline."""

    kind: ClassVar[Kind] = Kind.SAVE


@dataclass
class Export(Message):
    """Training: write this rank's part of the exported adapter or model (step ``batch_id``)."""

    kind: ClassVar[Kind] = Kind.EXPORT


@dataclass
class TrainForward(Message):
    """A training micro-batch ``batch_id`` on its way down; ``micro_batches`` and ``step`` let the first
    forward of a step set each stage's schedule."""

    kind: ClassVar[Kind] = Kind.TRAIN_FWD
    states: torch.Tensor        # (B, T, H) in runtime.wire_dtype
    mask: torch.Tensor          # (B, T) int8
    positions: torch.Tensor     # (B, T) int32
    nonfinite_at: torch.Tensor  # (B,) int32
    micro_batches: int
    step: int

    @property
    def tensors(self) -> list[torch.Tensor]:
        plan = torch.tensor([self.micro_batches, self.step], dtype=torch.int32)  # (2,)
        return [self.states, self.mask, self.positions, self.nonfinite_at, plan]

    @classmethod
    def from_wire(cls, batch_id: int, tensors: list[torch.Tensor]) -> TrainForward:
        *data, plan = tensors
        micro, step = (int(x) for x in plan.tolist())
        return cls(batch_id, *data, micro, step)

    @classmethod
    def pack(cls, batch_id: int, data: Activations, micro_batches: int, step: int) -> TrainForward:
        return cls(batch_id, data.states, data.mask, data.positions, data.nonfinite_at, micro_batches, step)


@dataclass
class TrainOutput(Message):
    """The last worker's training output for the loss: final states (B, T, H) in runtime.wire_dtype, or the
    logits (N, V) float32 with ``split.head=last``."""

    kind: ClassVar[Kind] = Kind.TRAIN_OUT
    output: torch.Tensor
    nonfinite_at: torch.Tensor  # (B,) int32


@dataclass
class TrainGrad(Message):
    """The gradient of the loss with respect to what the receiver sent for micro-batch ``batch_id``: rank 0
    -> last worker (privatised by ``train.grad_privacy``), then rank r -> r - 1."""

    kind: ClassVar[Kind] = Kind.TRAIN_BWD
    grad: torch.Tensor  # (B, T, H) in runtime.wire_dtype, or (N, V) float32 with split.head=last


MESSAGES: dict[int, type[Message]] = {cls.kind: cls for cls in (
    Activations, Output, GenerationStep, GenerationOutput, Free, Split, Stop, Save, Export, TrainForward, TrainOutput,
    TrainGrad)}


def decode(kind: int, batch_id: int, tensors: list[torch.Tensor]) -> Message:
    """The message a header of ``kind`` and its buffers describe."""
    cls = MESSAGES.get(int(kind))
    if cls is None:
        raise ValueError(f"unknown message kind {kind}")
    return cls.from_wire(batch_id, tensors)
