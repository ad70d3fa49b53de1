"""Generation across the pipeline with continuous batching: every stage keeps the KV cache of its own
layers per lane; rank 0 schedules the rows and picks the tokens.

A *lane* is one micro-batch in flight with up to ``data.batch_size`` rows; ``runtime.inflight`` lanes
(default: the world size) keep every stage busy. Each step of a lane sends one
:class:`~nesa_hpc.engine.messages.GenerationStep` down the pipeline: the lane's running rows decode one
position each, and rows waiting for a slot join with their whole prompt (a prefill beside the decode
steps, at most ``runtime.prefill_tokens`` prompt tokens per step; prompts that start together run packed
without their padding, see :meth:`~nesa_hpc.models.adapter.Adapter.run_layers`). When a row finishes (EOS, a
stop string, its ``max_new_tokens``) its slot goes to the next waiting row at the lane's next step, so
lanes stay full until the input runs out. Rank 0 reads back the last position's state of every row (or,
with ``split.head=last``, the last worker's next-token logits), picks each row's next token, embeds it,
runs layers [0, k) over it and sends the privatised state on: token ids never leave rank 0.

Within a lane every row's cached positions end at the lane's newest column; a row that joined later
is padded on the left, as in a left-padded batch (:meth:`~nesa_hpc.models.adapter.StageCache.add_rows`),
and columns no running row uses any more are dropped. A row's tokens depend only on its prompt, its
settings and (sampling) its own generator, never on which rows share its lane.
"""

from __future__ import annotations

import bisect
import functools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine.lanes import LaneCache, LanePlan
from ..engine.messages import Free, GenerationOutput, GenerationStep, Split
from ..engine.owner import Owner
from ..engine.stage import StageStats, finite_vectors, memory_guard
from ..io.batch import Batch
from .decoding import Decoding, Stopper, eos_token_ids, pick_tokens, row_generator

__all__ = ["Decoding", "GroupResult", "eos_token_ids", "row_generator", "pick_tokens", "run_generate", "Generation"]


@dataclass
class GroupResult:
    """What a finished row hands to ``GenerateTask.finish`` (per row of its one-row batch)."""

    tokens: list[list[int]]
    reasons: list[str]
    texts: list[str]
    releases: np.ndarray  # (B,) int32: privacy releases of each row's activations
    logprobs: list[list[float]] | None = None     # task.logprobs: each generated token's log-probability
    top_ids: list[list[int]] | None = None        # task.top_logprobs=N: N ids per generated token, most likely first
    top_logprobs: list[list[float]] | None = None  # and their log-probabilities
    # an echoed /v1/completions request with logprobs: each prompt token's after the first, and the N most likely
    prompt_logprobs: list[list[float]] | None = None
    prompt_top_ids: list[list[int]] | None = None
    prompt_top_logprobs: list[list[float]] | None = None


@dataclass
class _Row:
    """One row being generated."""

    batch: Batch                          # the row alone (a batch of one)
    decoding: Decoding
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    releases: int = 0                     # sends of this row's activations so far
    sent: int = 0                         # prompt tokens sent so far
    nonfinite_at: int = -1
    reason: str | None = None
    text: str = ""
    finished: tuple[str, str, int] | None = None  # task.hide_finish: (reason, text, tokens) of the real finish
    logprobs: list[float] = field(default_factory=list)   # task.logprobs: of each picked token
    top_ids: list[int] = field(default_factory=list)      # task.top_logprobs=N: N per picked token
    top_logprobs: list[float] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)  # an echoed request's prompt tokens (after the first)
    prompt_top_ids: list[int] = field(default_factory=list)
    prompt_top_logprobs: list[float] = field(default_factory=list)

    @property
    def row(self) -> int:
        return int(self.batch.rows[0])

    @property
    def prompt_length(self) -> int:
        return int(self.batch.lengths[0])

    @functools.cached_property
    def digest(self) -> bytes:
        """The row's content (its prompt and request): with the row and the release it keys every release's
        noise, decode steps included (a row's generation is a function of its prompt and settings)."""
        return self.batch.digests()[0]

    @property
    def scores_prompt(self) -> bool:
        """An echoed ``/v1/completions`` request with logprobs: its prompt's tokens are scored too."""
        request = self.batch.requests[0] if self.batch.requests is not None else None
        return request is not None and request.echo and request.logprobs is not None

    @property
    def position(self) -> int:
        """Position id of the newest token (the next one to send)."""
        return self.prompt_length + len(self.tokens) - 1

    def chunk(self, size: int) -> int:
        """Prompt tokens this row sends next, chunks of at most ``size``: what does not divide first, so every
        later chunk is a whole one."""
        left = self.prompt_length - self.sent
        return left - size * ((left - 1) // size) if self.sent == 0 else min(size, left)


@dataclass
class _Sent:
    """A lane's step in flight: its rows (decode rows, then joining rows) and what rank 0 needs to finish it."""

    decode: list[_Row]
    join: list[_Row]
    plan: LanePlan
    decode_part: tuple | None             # (mask (B_d, past + 1), positions (B_d, 1), clean states)
    join_part: tuple | None               # (mask (B_j, fill_past + W), positions (B_j, W), clean states)
    starts: list[int] = field(default_factory=list)  # each joining row's first prompt position in this step


@dataclass
class _Lane:
    index: int
    rows: list[_Row] = field(default_factory=list)      # running rows, in cache order after the last step
    mask: torch.Tensor | None = None                    # (B, timeline) 1 where a running row has a cached position
    filling: list[_Row] = field(default_factory=list)   # rows whose prompt is still arriving, in cache order
    fill_mask: torch.Tensor | None = None               # (B_f, their timeline)
    kept: list[int] = field(default_factory=list)       # rows of the last step still running, in cache order
    front: LaneCache = field(default_factory=LaneCache)  # rank 0's KV caches of layers [0, k) for this lane
    tail: LaneCache = field(default_factory=LaneCache)   # and of its tail layers
    sent: _Sent | None = None
    used: bool = False                                  # the stages hold caches of this lane


class Generation:
    """Rank 0 of ``task=generate``: lanes of rows in flight, their steps, the tokens picked here.

    ``start`` sends every lane's first step; ``step`` finishes the oldest step in flight and sends that
    lane's next one; ``room`` says how many rows a lane can take now. Finished rows go to ``on_result``
    one at a time, as (the row's batch of one, [GroupResult], (1,) non-finite mark)."""

    def __init__(self, owner: Owner, task, rows: Iterator[_Row], on_result: Callable, lanes: int, capacity: int,
                 prefill_tokens: int, stopper: Stopper, should_stop: Callable[[], bool]) -> None:
        self.owner, self.task, self.rows, self.on_result = owner, task, rows, on_result
        self.capacity, self.chunk, self.stopper, self.should_stop = capacity, prefill_tokens, stopper, should_stop
        self.lanes = [_Lane(i) for i in range(lanes)]
        # rows read but not started, longest possible generation first (the last rows to finish then start
        # early, so fewer steps run with lanes half empty at the end); at most two lanes' worth of look-ahead
        self.waiting: list[_Row] = []
        self.lookahead = 2 * lanes * capacity
        self.order: deque[_Lane] = deque()  # lanes with a step in flight, oldest first
        self.limit = 2 * lanes
        self.stopped = False
        self.drained = False  # every row of the input has been read
        self.stats = owner.stats
        self.stats.extra.update(generated=0, steps=0, max_rows=0, max_lanes=0, splits=0)

    # -- scheduling
    def room(self, lane: _Lane) -> int:
        return self.capacity - len(lane.rows) - len(lane.filling)

    def _admit(self, lane: _Lane) -> list[_Row]:
        """The lane's joining rows this step: its filling rows (their next chunk), then waiting rows for its
        free slots, those allowed the most new tokens first, while the chunks stay within
        ``runtime.prefill_tokens`` (one row always fits): their tokens when they run packed, else their
        padded width times their number."""
        joins = list(lane.filling)
        if self.should_stop():  # no row starts any more; rows in flight finish
            self.stopped = self.stopped or bool(self.waiting) or self._read_one()
            return joins
        while len(self.waiting) < self.lookahead and self._read_one():
            pass
        # new rows alone run packed, without their padding (Adapter.run_layers): their tokens count, else the
        # padded chunks
        packs = not lane.filling and self.owner.adapter.pack_limit > 0
        width = max((r.chunk(self.chunk) for r in joins), default=0)
        tokens = sum(r.chunk(self.chunk) for r in joins)
        while self.room(lane) > len(joins) - len(lane.filling) and self.waiting:
            c = self.waiting[0].chunk(self.chunk)
            w = max(width, c)
            packed = packs and tokens + c <= self.owner.adapter.pack_limit
            if joins and (tokens + c if packed else w * (len(joins) + 1)) > self.chunk:
                break
            joins.append(self.waiting.pop(0))
            width, tokens = w, tokens + c
        return joins

    def _read_one(self) -> bool:
        row = next(self.rows, None)
        if row is None:
            self.drained = True
            return False
        # after every waiting row allowed as many tokens, so equal rows keep their input order
        at = bisect.bisect_right([-r.decoding.max_new_tokens for r in self.waiting], -row.decoding.max_new_tokens)
        self.waiting.insert(at, row)
        return True

    def start(self) -> None:
        for lane in self.lanes:
            self._send(lane)

    def busy(self) -> bool:
        return bool(self.order)

    # -- a lane's step: out
    def _send(self, lane: _Lane) -> None:
        """Send ``lane``'s next step (its running rows and its joining rows); a lane left without rows is
        freed on every stage."""
        owner, dev = self.owner, self.owner.device
        joins = self._admit(lane)
        if not lane.rows and not joins:
            if lane.used:
                owner.send(Free(lane.index), limit=self.limit)
                self.lanes[lane.index] = _Lane(lane.index)
            return
        t0 = time.perf_counter()
        with torch.inference_mode(), memory_guard(0, "embedding and layers [0, k)", (len(lane.rows) + len(joins), 1)):
            dec = self._decode_part(lane) if lane.rows else None
            join, done = self._join_part(lane, joins) if joins else (None, torch.zeros(0, dtype=torch.bool))
            plan = LanePlan(torch.tensor(lane.kept, dtype=torch.long, device=dev),
                            dec[1].shape[1] - 1 if dec is not None else 0,
                            torch.arange(len(lane.filling), device=dev),
                            join[1].shape[1] - join[0].shape[1] if join is not None else 0, done.to(dev))

            def run(part, cache):
                ids, mask, pos, rows, releases, picked, digests = part
                return owner.front(ids, mask, pos, rows, releases, cache, mask[:, -ids.shape[1]:], picked,
                                   digests=digests)

            dec_front, join_front = lane.front.step(plan, dec, join, run, owner.adapter.new_cache)
        starts = [r.sent for r in joins]
        for r in joins:
            r.sent += r.chunk(self.chunk)
        for r in [*lane.rows, *joins]:
            r.releases += 1
        # a row keeps the stage where NaN/Inf first appeared in its activations (rank 0's own marks of its clean
        # states stay here); the message carries the marks of this step's Z only
        fronts = [f for f in (dec_front, join_front) if f is not None]
        for r, own in zip([*lane.rows, *joins], torch.cat([f.own.cpu() for f in fronts]).tolist(), strict=True):
            r.nonfinite_at = r.nonfinite_at if r.nonfinite_at >= 0 else own
        marks = torch.cat([f.nonfinite_at.cpu() for f in fronts]).to(torch.int32)
        msg = GenerationStep(lane.index, plan.kept.cpu().to(torch.int32), *self._wire(dec, dec_front, 1),
                             plan.filling.cpu().to(torch.int32), *self._wire(join, join_front, 1),
                             done.to(torch.int8), marks,
                             torch.tensor([int(any(r.scores_prompt for r in joins))], dtype=torch.int8))
        lane.sent = _Sent(lane.rows, joins, plan, (dec[1], dec[2], dec_front.clean) if dec else None,
                          (join[1], join[2], join_front.clean) if join else None, starts)
        lane.used = True
        self.stats.batches += 1
        joining = sum(r.sent - s for r, s in zip(joins, starts, strict=True))  # prompt tokens, padding not counted
        self.stats.computed(t0, f"lane {lane.index}: front", lane=lane.index, decode_rows=len(lane.rows),
                            joining_rows=len(joins), joining_tokens=joining,
                            joining_width=int(join[0].shape[1]) if join is not None else 0)
        owner.send(msg, limit=self.limit)
        self.order.append(lane)
        self.stats.extra["max_lanes"] = max(self.stats.extra["max_lanes"], len(self.order))

    def _decode_part(self, lane: _Lane) -> tuple:
        """The running rows' next position: (ids (B_d, 1), mask (B_d, past + 1), positions (B_d, 1), rows,
        releases, picked, digests)."""
        dev = self.owner.device
        mask = _trimmed(lane.mask)
        mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=mask.dtype, device=dev)], dim=1)
        ids = torch.tensor([[r.tokens[-1]] for r in lane.rows], dtype=torch.long, device=dev)
        pos = torch.tensor([[r.position] for r in lane.rows], dtype=torch.long, device=dev)
        rows = torch.tensor([r.row for r in lane.rows])
        return ids, mask, pos, rows, [r.releases for r in lane.rows], True, [r.digest for r in lane.rows]

    def _join_part(self, lane: _Lane, joins: list[_Row]) -> tuple[tuple, torch.Tensor]:
        """The joining rows' next chunks, left-padded to one width W: ((ids (B_j, W), mask (B_j, fill_past +
        W), positions (B_j, W), rows, releases, picked, digests), (B_j,) bool: the chunk ends the row's prompt)."""
        dev = self.owner.device
        chunks = [r.chunk(self.chunk) for r in joins]
        W = max(chunks)
        ids = torch.zeros(len(joins), W, dtype=torch.long)
        step = torch.zeros(len(joins), W, dtype=torch.long)
        pos = torch.zeros(len(joins), W, dtype=torch.long)
        for i, (r, c) in enumerate(zip(joins, chunks, strict=True)):
            ids[i, W - c:] = r.batch.ids[0, r.sent:r.sent + c]
            step[i, W - c:] = 1
            pos[i, W - c:] = torch.arange(r.sent, r.sent + c)
        history = _trimmed(lane.fill_mask) if lane.filling else torch.zeros(0, 0, dtype=torch.long, device=dev)
        # rows starting their prompt have nothing cached in the filling rows' timeline
        history = torch.cat([history, history.new_zeros(len(joins) - len(history), history.shape[1])])
        mask = torch.cat([history, step.to(dev)], dim=1)
        done = torch.tensor([r.sent + c == r.prompt_length for r, c in zip(joins, chunks, strict=True)])
        rows = torch.tensor([r.row for r in joins])
        return (ids.to(dev), mask, pos.to(dev), rows, [r.releases for r in joins], False,
                [r.digest for r in joins]), done

    def _wire(self, part: tuple | None, front, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states, mask, positions) of one part in their wire dtypes; empty tensors for a part with no rows."""
        if part is None:
            H = self.owner.adapter.hidden_size
            return (torch.zeros(0, width, H, dtype=self.owner.wire), torch.zeros(0, width, dtype=torch.int8),
                    torch.zeros(0, width, dtype=torch.int32))
        _, mask, pos, *_ = part
        return front.z.to(self.owner.wire), mask.to(torch.int8), pos.to(torch.int32)

    # -- a lane's step: back
    def step(self) -> None:
        """Finish the oldest step in flight: rank 0's back, the head, a token for every running row and every
        row whose prompt is done; finished rows go to ``on_result``; the lane's next step goes out."""
        lane = self.order.popleft()
        sent, lane.sent = lane.sent, None
        msg = self.owner.recv(GenerationOutput, lane.index)
        t0 = time.perf_counter()
        with torch.inference_mode(), memory_guard(0, "the head", (len(sent.decode) + len(sent.join), 1)):
            logits, bad = self._logits(lane, sent, msg)
        self._pick(sent, logits, bad)
        self._update(lane, sent)
        self.stats.computed(t0, f"lane {lane.index}: head, pick", lane=lane.index,
                            rows=len(sent.decode) + len(sent.join))
        for other in self._spread(lane):
            self._send(other)
        self._send(lane)

    def _spread(self, lane: _Lane) -> list[_Lane]:
        """Once no row waits for a slot, deal ``lane``'s running rows over it and the idle lanes (no rows, no
        step in flight), those with the most tokens left first, in turn; every stage moves their caches
        (:class:`~nesa_hpc.engine.messages.Split`). The last rows of the input then still run as several
        micro-batches that the stages work on side by side, instead of one that they work on in turn.
        Returns the lanes that took rows."""
        if lane.filling or len(lane.rows) < 2 or self.waiting or not (self.drained or self.should_stop()):
            return []
        idle = [x for x in self.lanes if x is not lane and x.sent is None and not x.rows and not x.filling]
        idle = idle[:len(lane.rows) - 1]
        if not idle:
            return []
        rows, dev = lane.rows, self.owner.device
        most_left = sorted(range(len(rows)), key=lambda i: len(rows[i].tokens) - rows[i].decoding.max_new_tokens)
        groups = [sorted(most_left[p::len(idle) + 1]) for p in range(len(idle) + 1)]
        at = list(lane.kept)  # the lane's caches hold row i at index at[i]
        here = list(range(len(rows)))  # rows still in the lane, in cache order
        for other, group in zip(idle, groups[1:], strict=True):
            here = [i for i in here if i not in group]
            moved = torch.tensor([at[i] for i in group], dtype=torch.int32)
            kept = torch.tensor([at[i] for i in here], dtype=torch.int32)
            self.owner.send(Split(lane.index, moved, kept, other.index), limit=self.limit)
            other.front = lane.front.split(moved.long().to(dev), kept.long().to(dev))
            other.tail = lane.tail.split(moved.long().to(dev), kept.long().to(dev))
            other.rows, other.kept, other.used = [rows[i] for i in group], list(range(len(group))), True
            other.mask = lane.mask[torch.tensor(group, device=lane.mask.device)]
            at = {i: j for j, i in enumerate(here)}
        lane.rows, lane.kept = [rows[i] for i in here], list(range(len(here)))
        lane.mask = lane.mask[torch.tensor(here, device=lane.mask.device)]
        self.stats.extra["splits"] += len(idle)
        return idle

    def _logits(self, lane: _Lane, sent: _Sent, msg: GenerationOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V) float32 next-token logits on the CPU of the rows that pick a token (decode rows, then joining
        rows whose prompt is done) and the (B_d + B_j,) non-finite marks of every row of the step."""
        owner, dev = self.owner, self.owner.device
        bad = msg.nonfinite_at.to(dev)
        done = sent.plan.done
        if not owner.head_here:
            return torch.cat([msg.decode_out, msg.join_out[done.cpu()]]).float().cpu(), bad.cpu()
        n = len(sent.decode)
        dec = (msg.decode_out, *sent.decode_part, bad[:n]) if n else None
        join = (msg.join_out, *sent.join_part, bad[n:]) if sent.join else None

        def run(part, cache):
            h, mask, pos, clean, marks = part
            T = h.shape[1]
            return owner.back(h.to(dev), mask, pos[:, -T:], marks, cache, mask[:, -T:], clean)

        new_cache = owner.adapter.new_cache if len(owner.topo.tail) else lambda: None
        dec_back, join_back = lane.tail.step(sent.plan, dec, join, run, new_cache)
        h = [dec_back[0][:, -1]] if dec_back is not None else []
        if join_back is not None:
            h.append(join_back[0][done, -1])
            if any(r.scores_prompt for r in sent.join):
                self._score_prompts(sent, join_back[0])
        marks = torch.cat([p[1] for p in (dec_back, join_back) if p is not None])
        logits = self.task.head_stage(owner.adapter, torch.cat(h).unsqueeze(1), None)[0] if sum(map(len, h)) else \
            torch.zeros(0, owner.adapter.config.vocab_size)
        return logits.float().cpu(), marks.cpu()

    def _score_prompts(self, sent: _Sent, h: torch.Tensor) -> None:
        """The log-probabilities of the prompt tokens that this step's chunk of an echoed request predicts
        (position p predicts token p + 1), from the final states ``h`` (B_j, W, H) of the joining rows."""
        adapter, top, W = self.owner.adapter, self.task.top_logprobs, h.shape[1]
        for i, (r, start) in enumerate(zip(sent.join, sent.starts, strict=True)):
            c = r.sent - start  # the chunk's tokens, in the last c columns
            n = min(c, r.prompt_length - 1 - start)
            if not r.scores_prompt or n <= 0:
                continue
            logp = torch.log_softmax(adapter.logits(adapter.norm(h[i, W - c:W - c + n])).float(), dim=-1).cpu()
            targets = r.batch.ids[0, start + 1:start + 1 + n]
            r.prompt_logprobs.extend(logp.gather(1, targets.unsqueeze(1)).squeeze(1).tolist())
            if top:
                vals, ids = logp.topk(top, dim=-1)
                r.prompt_top_ids.extend(ids.reshape(-1).tolist())
                r.prompt_top_logprobs.extend(vals.reshape(-1).tolist())

    def _pick(self, sent: _Sent, logits: torch.Tensor, bad: torch.Tensor) -> None:
        """Each picking row's next token (a row whose logits hold NaN/Inf is marked and still gets one); every
        row of the step keeps its mark."""
        done = sent.plan.done.cpu().tolist()
        for r, mark in zip([*sent.decode, *sent.join], bad.tolist(), strict=True):
            r.nonfinite_at = r.nonfinite_at if r.nonfinite_at >= 0 else mark
        rows = [*sent.decode, *(r for r, d in zip(sent.join, done, strict=True) if d)]
        if not rows:
            return
        marks = torch.tensor([r.nonfinite_at for r in rows], dtype=torch.int32)
        finite = finite_vectors(logits)  # (B,)
        if not finite.all():
            marks = torch.where((marks < 0) & ~finite, torch.full_like(marks, self.owner.topo.world_size), marks)
            logits = torch.where(finite.unsqueeze(-1), logits, torch.zeros_like(logits))
        picked = pick_tokens(logits, [r.decoding for r in rows], [r.generator for r in rows]).tolist()
        if getattr(self.task, "logprobs", False):
            _keep_logprobs(rows, logits, picked, self.task.top_logprobs)
        self.stats.extra["steps"] += 1
        for r, t, mark in zip(rows, picked, marks.tolist(), strict=True):
            r.nonfinite_at = mark
            r.tokens.append(int(t))
            self.stats.extra["generated"] += r.finished is None  # not the steps a hidden finish adds
            self._check(r)

    def _check(self, r: _Row) -> None:
        """Whether ``r`` is done after its newest token. With ``task.hide_finish`` a row that EOS or a stop
        string ends before its ``max_new_tokens`` keeps stepping (its further tokens are dropped) until it has
        them all, so the workers see it leave at its max tokens, not when its content ended it."""
        if r.finished is None:
            reason, cut = self.stopper.check(r.tokens, r.decoding)
            if reason is None:
                return
            text = cut if cut is not None else self.stopper.text(r.tokens)
            if not (r.decoding.hide_finish and len(r.tokens) < r.decoding.max_new_tokens):
                r.reason, r.text = reason, text
                return
            r.finished = (reason, text, len(r.tokens))
        if len(r.tokens) >= r.decoding.max_new_tokens:
            r.reason, r.text, n = r.finished
            del r.tokens[n:], r.logprobs[n:]
            top = self.task.top_logprobs if getattr(self.task, "logprobs", False) else 0
            del r.top_ids[n * top:], r.top_logprobs[n * top:]

    def _update(self, lane: _Lane, sent: _Sent) -> None:
        """The lane after the step: its running rows (decode rows, then rows whose prompt is done) and their
        timeline mask, its filling rows; finished rows handed over."""
        dev = self.owner.device
        done = sent.plan.done.to(dev)
        masks = [m for m in (sent.decode_part[0] if sent.decode else None,
                             sent.join_part[0][done] if sent.join else None) if m is not None and len(m)]
        rows = [*sent.decode, *(r for r, d in zip(sent.join, done.tolist(), strict=True) if d)]
        mask = None
        if masks:  # the running rows' timelines end together: the shorter ones are padded on the left
            width = max(m.shape[1] for m in masks)
            mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in masks])
        alive = [i for i, r in enumerate(rows) if r.reason is None]
        for r in rows:
            if r.reason is not None:
                self._finish(r)
        lane.rows = [rows[i] for i in alive]
        lane.mask = mask[torch.tensor(alive, dtype=torch.long, device=dev)] if alive else None
        lane.kept = alive  # the next step keeps these running rows, in this order, on every stage
        lane.filling = [r for r, d in zip(sent.join, done.tolist(), strict=True) if not d]
        lane.fill_mask = sent.join_part[0][~done] if lane.filling else None
        running = sum(len(x.rows) + len(x.filling) for x in self.lanes)
        self.stats.extra["max_rows"] = max(self.stats.extra["max_rows"], running)

    def _finish(self, r: _Row) -> None:
        result = GroupResult([r.tokens], [r.reason], [r.text], np.array([r.releases], dtype=np.int32),
                             [r.logprobs], [r.top_ids], [r.top_logprobs], [r.prompt_logprobs], [r.prompt_top_ids],
                             [r.prompt_top_logprobs])
        self.on_result(r.batch, [result], torch.tensor([r.nonfinite_at], dtype=torch.int32))


def _keep_logprobs(rows: list[_Row], logits: torch.Tensor, picked: list[int], top: int) -> None:
    """Each row's picked token's log-probability under the model (the log-softmax of its logits, before
    temperature, top-k or top-p), and with ``top`` the ``top`` most likely tokens and theirs."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = logp.gather(1, torch.tensor(picked, dtype=torch.long).unsqueeze(1)).squeeze(1).tolist()
    if top:
        vals, ids = logp.topk(top, dim=-1)
    for i, r in enumerate(rows):
        r.logprobs.append(chosen[i])
        if top:
            r.top_ids.extend(ids[i].tolist())
            r.top_logprobs.extend(vals[i].tolist())


def _trimmed(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` without its leading columns that no row uses any more."""
    used = mask.any(0).nonzero()
    return mask[:, int(used[0]):] if len(used) else mask


def run_generate(owner: Owner, task, batches: Iterable[Batch], on_result: Callable, inflight: int,
                 decoding: Decoding, tokenizer, should_stop: Callable[[], bool] = lambda: False,
                 capacity: int = 16, prefill_tokens: int = 512) -> StageStats:
    """Rank 0 of ``task=generate``: ``inflight`` lanes of up to ``capacity`` rows each through the pipeline
    until every row of ``batches`` has finished; each finished row goes to ``on_result`` (see
    :class:`Generation`). When ``should_stop()`` turns true no further row starts; the rows in flight
    finish, and ``extra["stopped"]`` says whether rows were left."""
    generation = Generation(owner, task, _rows(batches, decoding), on_result, inflight, capacity, prefill_tokens,
                            Stopper(decoding, tokenizer), should_stop)
    generation.start()
    while generation.busy():
        generation.step()
    owner.stop()
    stats = owner.all_stats()
    stats.extra["stopped"] = generation.stopped
    return stats


def _rows(batches: Iterable[Batch], decoding: Decoding) -> Iterator[_Row]:
    """Each row of ``batches`` with its decoding settings (its own, for an OpenAI batch request) and, when
    it samples, its own generator."""
    for batch in batches:
        for i in range(batch.size):
            request = batch.requests[i] if batch.requests is not None else None
            d = decoding.for_request(request)
            row = int(batch.rows[i])
            yield _Row(batch.row(i), d, None if d.greedy else row_generator(d.seed, row))
