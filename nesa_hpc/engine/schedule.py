"""The order of work in one training step, for every rank at once (``train.pipeline``).

:func:`step_order` gives each rank's ordered actions for the step's micro-batches; rank 0 drives its list
(:func:`nesa_hpc.train.step.owner_step`) and every worker follows its own (:class:`~nesa_hpc.engine.stage.Stage`),
so the two sides cannot disagree. The orders are checked once per shape by playing the step's messages
through them (:func:`check_order`): every action must find its input already sent, or the step would hang.

Actions (``op``, micro-batch):

- rank 0: ``F`` embed, run layers [0, k), privatise and send forward; ``L`` receive the last worker's
  output, compute the loss and its backward through rank 0's back, send the gradient to the last worker
  (when gradients flow there); ``B`` receive the gradient of Z from rank 1 and back-propagate rank 0's front;
- a worker: ``F`` its layers forward, sending on; ``B`` its layers backward, sending the gradient of its
  input to the rank before it (when gradients flow there).

Schedules: ``gpipe`` runs every forward of the step first, then every backward; ``1f1b`` lets a worker
run as many forwards as there are stages after it (rank 0's loss included), then alternates one forward
and one backward, so at most one more micro-batch than that holds activations on it (rank 0 keeps
``window`` micro-batches in flight).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

__all__ = ["PIPELINES", "Action", "TrainingRole", "step_order", "check_order"]

PIPELINES = ("gpipe", "1f1b")


class Action(NamedTuple):
    op: str     # "F", "L" (rank 0 only) or "B"
    micro: int  # the micro-batch


@dataclass(frozen=True)
class TrainingRole:
    """One pipeline stage's part in training: the schedule, rank 0's window, where the loss's gradient
    flows (``grads``, one flag per stage, rank 0 first) and this stage's ``position``."""

    pipeline: str
    window: int
    grads: tuple[bool, ...]
    position: int

    @property
    def backward(self) -> bool:
        """Whether this stage back-propagates (the gradient flows through it)."""
        return self.grads[self.position]

    @property
    def sends_back(self) -> bool:
        """Whether it sends the gradient of its input to the stage before it."""
        return self.position > 0 and self.grads[self.position - 1]

    def order(self, micro: int) -> tuple[Action, ...]:
        """This stage's actions in a step of ``micro`` micro-batches."""
        return step_order(self.pipeline, micro, len(self.grads), self.window, self.grads)[self.position]


@lru_cache(maxsize=64)
def step_order(pipeline: str, micro: int, world: int, window: int,
               grads: tuple[bool, ...]) -> tuple[tuple[Action, ...], ...]:
    """Every rank's actions in one step of ``micro`` micro-batches over ``world`` pipeline stages (rank 0
    and the workers; world size 1 runs as two stages, rank 0 and its in-process stage). ``grads[r]``:
    the loss's gradient flows back through rank r (some rank at or before it trains). ``window``: rank 0's
    micro-batches in flight under 1F1B (at least ``world``)."""
    if pipeline not in PIPELINES:
        raise ValueError(f"train.pipeline={pipeline!r} is not one of {PIPELINES}")
    if len(grads) != world or world < 2:
        raise ValueError(f"step_order needs one gradient flag per stage and at least 2 stages, got {grads}")
    orders = (_owner_order(pipeline, micro, max(window, world), grads),
              *(_worker_order(pipeline, micro, world, r, grads[r]) for r in range(1, world)))
    check_order(orders, grads)
    return orders


def _owner_order(pipeline: str, micro: int, window: int, grads: tuple[bool, ...]) -> tuple[Action, ...]:
    window = micro if pipeline == "gpipe" else min(window, micro)
    order = [Action("F", m) for m in range(window)]
    for m in range(micro):
        order.append(Action("L", m))
        if m + window < micro:
            order.append(Action("F", m + window))
        if grads[0]:
            order.append(Action("B", m))
    return tuple(order)


def _worker_order(pipeline: str, micro: int, world: int, rank: int, backward: bool) -> tuple[Action, ...]:
    if not backward:
        return tuple(Action("F", m) for m in range(micro))
    warm = micro if pipeline == "gpipe" else min(world - rank, micro)
    ops = ["F"] * warm + [op for _ in range(micro - warm) for op in ("F", "B")] + ["B"] * warm
    count = {"F": 0, "B": 0}
    order = []
    for op in ops:
        order.append(Action(op, count[op]))
        count[op] += 1
    return tuple(order)


def check_order(orders: tuple[tuple[Action, ...], ...], grads: tuple[bool, ...]) -> None:
    """Play one step's messages through ``orders``: sends never block (they are buffered), an action waits
    for its input. Raises RuntimeError naming the stuck ranks if some action would wait forever."""
    world = len(orders)
    last = world - 1
    sent: set[tuple[str, int, int]] = set()  # (what, to rank, micro-batch)

    def needs(rank: int, a: Action) -> tuple[str, int, int] | None:
        if rank == 0:
            return {"F": None, "L": ("out", 0, a.micro), "B": ("grad", 0, a.micro)}[a.op]
        return ("fwd", rank, a.micro) if a.op == "F" else ("grad", rank, a.micro)

    def sends(rank: int, a: Action) -> list[tuple[str, int, int]]:
        if a.op == "F":
            return [("fwd", rank + 1, a.micro) if rank < last else ("out", 0, a.micro)]
        if a.op == "L":
            return [("grad", last, a.micro)] if grads[last] else []
        return [("grad", rank - 1, a.micro)] if rank > 0 and grads[rank - 1] else []

    done = [0] * world
    while any(done[r] < len(orders[r]) for r in range(world)):
        moved = False
        for r in range(world):
            while done[r] < len(orders[r]):
                action = orders[r][done[r]]
                need = needs(r, action)
                if need is not None and need not in sent:
                    break
                sent.discard(need)
                sent.update(sends(r, action))
                done[r] += 1
                moved = True
        if not moved:
            stuck = {r: orders[r][done[r]] for r in range(world) if done[r] < len(orders[r])}
            raise RuntimeError(f"training schedule would hang: ranks wait at {stuck}")
