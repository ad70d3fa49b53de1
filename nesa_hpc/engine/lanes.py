"""A generation lane's KV caches over one block of layers, the same on every stage and on rank 0's front and
tail (:class:`LaneCache`), and what one step of a lane does to them (:class:`LanePlan`).

A lane holds two sets of rows. The *running* rows decode one position per step; each one's cached positions
end at the lane's newest column (a row that joined later is padded on the left, as in a left-padded batch),
and columns no running row uses any more are dropped. The *filling* rows are rows whose prompt arrives in
chunks (``runtime.prefill_tokens`` at a time); they have a timeline of their own, which every one of them
advances by the same chunk width each step. When a row's last chunk has run it moves to the running rows.
A prompt that fits in one chunk starts and finishes filling in the same step.

Once no row waits for a slot, a lane may give some of its running rows to an idle lane
(:meth:`LaneCache.split`), so that the last rows of a dataset still keep every stage busy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["LanePlan", "LaneCache"]


@dataclass(frozen=True)
class LanePlan:
    """What one step does to a lane's rows (the same on every block, and in the message)."""

    kept: torch.Tensor     # (B_d,) running rows kept from the previous step, in their new order
    past: int              # columns of the running rows' timeline kept (those before this step's position)
    filling: torch.Tensor  # (B_f,) filling rows kept from the previous step (they come first in the join part)
    fill_past: int         # columns of the filling rows' timeline kept
    done: torch.Tensor     # (B_j,) bool: this chunk ends the row's prompt; it then joins the running rows


@dataclass
class LaneCache:
    """A lane's KV caches over one block of layers: ``main`` for the running rows, ``fill`` for the rows whose
    prompt is still arriving (None when a set has no rows)."""

    main: object = None
    fill: object = None

    def step(self, plan: LanePlan, decode: tuple | None, join: tuple | None, run: Callable[[tuple, object], object],
             new_cache: Callable[[], object]):
        """Run one step: the ``decode`` part (one position per running row) with ``main``, then the ``join``
        part (the filling rows' next chunks, then new rows' first chunks, left-padded to one width) with
        ``fill``; rows whose prompt is done then move from ``fill`` to ``main``, after the running rows.
        ``run(part, cache)`` computes one part over this block. Returns (decode output, join output)."""
        self.main = _kept(self.main, plan.kept, plan.past)
        dec_out = run(decode, self.main) if decode is not None else None
        if join is None:
            self.fill = _kept(self.fill, plan.filling, plan.fill_past)
            return dec_out, None
        fill = _kept(self.fill, plan.filling, plan.fill_past)
        new = int(plan.done.numel()) - len(plan.filling)
        if fill is None:
            fill = new_cache()
        elif new:
            fill.add_empty_rows(new)
        join_out = run(join, fill)
        if fill is None:  # this block caches nothing (no layers here)
            return dec_out, join_out
        done = plan.done.nonzero().squeeze(-1)
        if len(done) == len(plan.done):
            moved, self.fill = fill, None
        else:
            moved = fill.take_rows(done) if len(done) else None
            fill.keep_rows((~plan.done).nonzero().squeeze(-1))
            self.fill = fill
        if moved is not None:
            if self.main is None:
                self.main = moved
            else:
                self.main.add_rows(moved)
        return dec_out, join_out

    def split(self, moved: torch.Tensor, kept: torch.Tensor) -> LaneCache:
        """Move the running rows ``moved`` to a new lane's caches (returned) and keep ``kept`` here (indices
        into the running rows after the last step, each in its new order). The lane has no filling rows."""
        if self.fill is not None:
            raise RuntimeError("a lane with rows still filling cannot be split")
        if self.main is None:  # this block caches nothing (no layers here)
            return LaneCache()
        other = LaneCache(main=self.main.take_rows(moved))
        self.main.keep_rows(kept)
        return other


def _kept(cache, rows: torch.Tensor, past: int):
    """``cache`` with only ``rows`` and the last ``past`` columns of its timeline (None when no row stays)."""
    if cache is None or len(rows) == 0:
        return None
    cache.keep_rows(rows)
    cache.keep_last(past)
    return cache
