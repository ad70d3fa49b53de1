"""Generation across the pipeline with continuous batching: every stage keeps the KV cache of its own
layers per lane; rank 0 schedules the rows and picks the tokens.

A *lane* is one micro-batch in flight with up to ``data.batch_size`` rows; ``runtime.inflight`` lanes
(default: the world size) keep every stage busy. Each step of a lane sends one
:class:`~nesa_hpc.engine.messages.GenerationStep` down the pipeline: the lane's running rows decode one
position each, and rows waiting for a slot join with their whole prompt (a prefill beside the decode
steps, at most ``runtime.prefill_tokens`` padded prompt tokens per step). When a row finishes (EOS, a
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
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..engine.messages import Free, GenerationOutput, GenerationStep
from ..engine.owner import Owner
from ..engine.stage import StageStats, lane_step, memory_guard
from ..io.batch import Batch

__all__ = ["Decoding", "GroupResult", "eos_token_ids", "row_generator", "pick_tokens", "run_generate", "Generation"]


@dataclass(frozen=True)
class Decoding:
    """Decoding settings: greedy when ``temperature == 0``, else sampling (``top_k`` 0 and ``top_p`` 1 = off)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    eos_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False  # task.ignore_eos: only max_new_tokens and stop strings end a row

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def for_request(self, request) -> Decoding:
        """These settings with a row's own (an OpenAI batch request's ``max_tokens``, ``temperature``,
        ``top_p``, ``seed``, ``stop``) in place of the job's."""
        options = dict(request.options) if request is not None else {}
        return replace(self, **options) if options else self


def eos_token_ids(tokenizer, folder: str | None = None, config=None) -> frozenset[int]:
    """End-of-sequence ids: the tokenizer's EOS and the model's generation config (or config) EOS ids."""
    ids: set[int] = set()

    def add(value) -> None:
        if value is None:
            return
        for v in value if isinstance(value, (list, tuple)) else [value]:
            ids.add(int(v))

    add(getattr(tokenizer, "eos_token_id", None))
    gen = None
    if folder is not None:
        from transformers import GenerationConfig

        try:
            gen = GenerationConfig.from_pretrained(folder)
        except OSError:  # no generation_config.json: the model config's ids apply
            gen = None
    add(gen.eos_token_id if gen is not None else getattr(config, "eos_token_id", None))
    return frozenset(ids)


def row_generator(seed: int, row: int) -> torch.Generator:
    """The sampling generator of input row ``row``: depends only on (seed, row), so a row draws the same
    numbers whatever the world size, batching or order of completion."""
    state = np.random.SeedSequence([int(seed), int(row)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def pick_tokens(logits: torch.Tensor, decoding: Decoding | list[Decoding],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """Next token per row from (B, V) logits: argmax, or a draw after temperature / top-k / top-p. With one
    ``Decoding`` per row (rows of an OpenAI batch file), each row is picked with its own settings."""
    if isinstance(decoding, list):
        return torch.cat([pick_tokens(logits[i:i + 1], d, [generators[i]]) for i, d in enumerate(decoding)])
    logits = logits.float()
    if decoding.greedy:
        return logits.argmax(-1)
    x = logits / decoding.temperature
    if decoding.top_k and decoding.top_k < x.shape[-1]:
        kth = torch.topk(x, decoding.top_k, dim=-1).values[:, -1:]  # (B, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    if decoding.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the tokens ranked before it already hold top_p of the mass (the first always stays)
        drop = probs.cumsum(-1) - probs > decoding.top_p
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = torch.softmax(x, dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


@dataclass
class GroupResult:
    """What a finished row hands to ``GenerateTask.finish`` (per row of its one-row batch)."""

    tokens: list[list[int]]
    reasons: list[str]
    texts: list[str]
    releases: np.ndarray  # (B,) int32: privacy releases of each row's activations


@dataclass
class _Row:
    """One row being generated."""

    batch: Batch                          # the row alone (a batch of one)
    decoding: Decoding
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    releases: int = 0                     # sends of this row's activations so far
    nonfinite_at: int = -1
    reason: str | None = None
    text: str = ""

    @property
    def row(self) -> int:
        return int(self.batch.rows[0])

    @property
    def position(self) -> int:
        """Position id of the newest token (the next one to send)."""
        return int(self.batch.lengths[0]) + len(self.tokens) - 1


@dataclass
class _Sent:
    """A lane's step in flight: its rows in cache order (decode rows, then joining rows) and what rank 0
    needs to finish it."""

    decode: list[_Row]
    join: list[_Row]
    decode_mask: torch.Tensor | None     # (B_d, past + 1)
    decode_pos: torch.Tensor | None      # (B_d, 1)
    join_mask: torch.Tensor | None       # (B_j, T)
    join_pos: torch.Tensor | None        # (B_j, T)
    clean: tuple                         # (decode, join) clean layer-k states for the denoiser, or None
    kept: torch.Tensor                   # (B_d,) cached rows kept from the previous step


@dataclass
class _Lane:
    index: int
    rows: list[_Row] = field(default_factory=list)   # in cache order after the last step
    mask: torch.Tensor | None = None                 # (B, timeline) 1 where a row has a cached position
    front: object = None                             # rank 0's KV cache of layers [0, k) for this lane
    tail: object = None                              # and of its tail layers
    kept: list[int] = field(default_factory=list)    # rows of the last step still running, in cache order
    sent: _Sent | None = None


class Generation:
    """Rank 0 of ``task=generate``: lanes of rows in flight, their steps, the tokens picked here.

    ``start`` sends every lane's first step; ``step`` finishes the oldest step in flight and sends that
    lane's next one; ``room`` says how many rows a lane can take now. Finished rows go to ``on_result``
    one at a time, as (the row's batch of one, [GroupResult], (1,) non-finite mark)."""

    def __init__(self, owner: Owner, task, rows: Iterator[_Row], on_result: Callable, lanes: int, capacity: int,
                 prefill_tokens: int, stopper: _Stopper, should_stop: Callable[[], bool]) -> None:
        self.owner, self.task, self.rows, self.on_result = owner, task, rows, on_result
        self.capacity, self.prefill_tokens, self.stopper, self.should_stop = capacity, prefill_tokens, stopper, \
            should_stop
        self.lanes = [_Lane(i) for i in range(lanes)]
        # rows read but not started, longest possible generation first (the last rows to finish then start
        # early, so fewer steps run with lanes half empty at the end); at most two lanes' worth of look-ahead
        self.waiting: list[_Row] = []
        self.lookahead = 2 * lanes * capacity
        self.order: deque[_Lane] = deque()  # lanes with a step in flight, oldest first
        self.limit = 2 * lanes
        self.stopped = False
        self.stats = owner.stats
        self.stats.extra.update(generated=0, steps=0, max_rows=0, max_lanes=0)

    # -- scheduling
    def room(self, lane: _Lane) -> int:
        return self.capacity - len(lane.rows)

    def _admit(self, lane: _Lane) -> list[_Row]:
        """Waiting rows for ``lane``'s free slots, those allowed the most new tokens first, while their padded
        prompts stay within ``runtime.prefill_tokens`` (one row always fits)."""
        if self.should_stop():  # no row starts any more; rows in flight finish
            self.stopped = self.stopped or bool(self.waiting) or self._read_one()
            return []
        while len(self.waiting) < self.lookahead and self._read_one():
            pass
        joins: list[_Row] = []
        longest = 0
        while len(joins) < self.room(lane) and self.waiting:
            width = max(longest, int(self.waiting[0].batch.lengths[0]))
            if joins and width * (len(joins) + 1) > self.prefill_tokens:
                break
            joins.append(self.waiting.pop(0))
            longest = width
        return joins

    def _read_one(self) -> bool:
        row = next(self.rows, None)
        if row is None:
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
        """Send ``lane``'s next step (its running rows and any joining rows); a lane left without rows is
        freed on every stage."""
        owner, dev = self.owner, self.owner.device
        kept = torch.tensor(lane.kept, dtype=torch.long)
        joins = self._admit(lane)
        if not lane.rows and not joins:
            if lane.mask is not None:
                owner.send(Free(lane.index), limit=self.limit)
                lane.mask = lane.front = lane.tail = None
                lane.kept = []
            return
        t0 = time.perf_counter()
        with torch.inference_mode(), memory_guard(0, "embedding and layers [0, k)", (len(kept) + len(joins), 1)):
            dec = self._decode_part(lane) if lane.rows else None
            join = self._join_part(joins) if joins else None
            past = dec[1].shape[1] - 1 if dec is not None else 0

            def run(part, cache):
                ids, mask, pos, rows, releases, picked = part
                step_mask = mask[:, -ids.shape[1]:]
                return owner.front(ids, mask, pos, rows, releases, cache, step_mask, picked)

            lane.front, dec_front, join_front = lane_step(lane.front, kept.to(dev), past, dec, join, run,
                                                          owner.adapter.new_cache)
        for r in [*lane.rows, *joins]:
            r.releases += 1
        # a row keeps the stage where NaN/Inf first appeared in its activations; clean rows take the front's mark
        before = torch.tensor([r.nonfinite_at for r in [*lane.rows, *joins]], dtype=torch.int32)
        marks = torch.cat([f.nonfinite_at.cpu() for f in (dec_front, join_front) if f is not None]).to(torch.int32)
        msg = GenerationStep(lane.index, kept.to(torch.int32), *self._wire(dec, dec_front, 1),
                             *self._wire(join, join_front, 0), torch.where(before >= 0, before, marks))
        lane.sent = _Sent(lane.rows, joins, *(dec[1:3] if dec else (None, None)),
                          *(join[1:3] if join else (None, None)),
                          (dec_front.clean if dec else None, join_front.clean if join else None), kept)
        self.stats.batches += 1
        self.stats.compute_s += time.perf_counter() - t0
        owner.send(msg, limit=self.limit)
        self.order.append(lane)
        self.stats.extra["max_lanes"] = max(self.stats.extra["max_lanes"], len(self.order))

    def _decode_part(self, lane: _Lane) -> tuple:
        """The running rows' next position: (ids (B_d, 1), mask (B_d, past + 1), positions (B_d, 1), rows,
        releases, picked)."""
        dev = self.owner.device
        mask = lane.mask
        used = mask.any(0).nonzero()
        mask = mask[:, int(used[0]):] if len(used) else mask  # drop columns no running row uses
        mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=mask.dtype, device=dev)], dim=1)
        ids = torch.tensor([[r.tokens[-1]] for r in lane.rows], dtype=torch.long, device=dev)
        pos = torch.tensor([[r.position] for r in lane.rows], dtype=torch.long, device=dev)
        rows = torch.tensor([r.row for r in lane.rows])
        return ids, mask, pos, rows, [r.releases for r in lane.rows], True

    def _join_part(self, joins: list[_Row]) -> tuple:
        """Joining rows' prompts, left-padded: (ids (B_j, T), mask, positions, rows, releases, picked)."""
        dev = self.owner.device
        T = max(int(r.batch.lengths[0]) for r in joins)
        ids = torch.zeros(len(joins), T, dtype=torch.long)
        mask = torch.zeros(len(joins), T, dtype=torch.long)
        for i, r in enumerate(joins):
            n = int(r.batch.lengths[0])
            ids[i, T - n:] = r.batch.ids[0]
            mask[i, T - n:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = torch.tensor([r.row for r in joins])
        return ids.to(dev), mask.to(dev), pos.to(dev), rows, [0] * len(joins), False

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
        """Finish the oldest step in flight: rank 0's back, the head, a token per row; finished rows go to
        ``on_result``; the lane's next step goes out."""
        lane = self.order.popleft()
        sent, lane.sent = lane.sent, None
        msg = self.owner.recv(GenerationOutput, lane.index)
        t0 = time.perf_counter()
        with torch.inference_mode(), memory_guard(0, "the head", (len(sent.decode) + len(sent.join), 1)):
            logits, bad = self._logits(lane, sent, msg)
        self._pick(sent, logits, bad)
        self._update(lane, sent)
        self.stats.compute_s += time.perf_counter() - t0
        self._send(lane)

    def _logits(self, lane: _Lane, sent: _Sent, msg: GenerationOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_d + B_j, V) float32 next-token logits on the CPU and the rows' non-finite marks."""
        owner, dev = self.owner, self.owner.device
        bad = msg.nonfinite_at.to(dev)
        if not owner.head_here:
            return torch.cat([msg.decode_out, msg.join_out]).float().cpu(), bad.cpu()
        n = len(sent.decode)
        dec = (msg.decode_out, sent.decode_mask, sent.decode_pos, bad[:n], sent.clean[0]) if n else None
        join = (msg.join_out, sent.join_mask, sent.join_pos, bad[n:], sent.clean[1]) if sent.join else None

        def run(part, cache):
            h, mask, pos, marks, clean = part
            T = h.shape[1]
            return owner.back(h.to(dev), mask, pos[:, -T:], marks, cache, mask[:, -T:], clean)

        new_cache = owner.adapter.new_cache if len(owner.topo.tail) else lambda: None
        lane.tail, dec_back, join_back = lane_step(lane.tail, sent.kept.to(dev), sent.decode_mask.shape[1] - 1 if n
                                                   else 0, dec, join, run, new_cache)
        parts = [p for p in (dec_back, join_back) if p is not None]
        h = torch.cat([p[0][:, -1] for p in parts])  # (B, H): each row's newest position
        logits = self.task.head_stage(owner.adapter, h.unsqueeze(1), None)[0]
        return logits.float().cpu(), torch.cat([p[1] for p in parts]).cpu()

    def _pick(self, sent: _Sent, logits: torch.Tensor, bad: torch.Tensor) -> None:
        """Each row's next token (a row whose logits hold NaN/Inf is marked and still gets one)."""
        finite = torch.isfinite(logits).all(-1)  # (B,)
        if not finite.all():
            bad = torch.where((bad < 0) & ~finite, torch.full_like(bad, self.owner.topo.world_size), bad)
            logits = torch.where(finite.unsqueeze(-1), logits, torch.zeros_like(logits))
        rows = [*sent.decode, *sent.join]
        decodings = [r.decoding for r in rows]
        shared = decodings[0] if all(d is decodings[0] for d in decodings) else decodings  # one pick for all
        picked = pick_tokens(logits, shared, [r.generator for r in rows]).tolist()
        self.stats.extra["steps"] += 1
        for r, t, mark in zip(rows, picked, bad.tolist(), strict=True):
            r.nonfinite_at = mark
            r.tokens.append(int(t))
            self.stats.extra["generated"] += 1
            r.reason, cut = self.stopper.check(r.tokens, r.decoding)
            if r.reason is not None:
                r.text = cut if cut is not None else self.stopper.text(r.tokens)

    def _update(self, lane: _Lane, sent: _Sent) -> None:
        """The lane after the step: rows in cache order, its timeline mask; finished rows handed over."""
        dev = self.owner.device
        masks = []
        if sent.decode:
            masks.append(sent.decode_mask)
        if sent.join:
            masks.append(sent.join_mask)
        width = max(m.shape[1] for m in masks)
        mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in masks])
        rows = [*sent.decode, *sent.join]
        alive = [i for i, r in enumerate(rows) if r.reason is None]
        for r in rows:
            if r.reason is not None:
                self._finish(r)
        lane.rows = [rows[i] for i in alive]
        lane.mask = mask[torch.tensor(alive, dtype=torch.long, device=dev)]
        lane.kept = alive  # the next step keeps these cached rows, in this order, on every stage
        self.stats.extra["max_rows"] = max(self.stats.extra["max_rows"], sum(len(x.rows) for x in self.lanes))

    def _finish(self, r: _Row) -> None:
        result = GroupResult([r.tokens], [r.reason], [r.text], np.array([r.releases], dtype=np.int32))
        self.on_result(r.batch, [result], torch.tensor([r.nonfinite_at], dtype=torch.int32))


class _Stopper:
    """Per-row finish checks: EOS ids, ``max_new_tokens``, and stop strings in the decoded continuation."""

    def __init__(self, decoding: Decoding, tokenizer) -> None:
        self.d = decoding
        self.tokenizer = tokenizer
        self._stop_ids: dict[tuple[str, ...], set[int]] = {}

    def stop_ids(self, stop: tuple[str, ...]) -> set[int]:
        """A stop string that is a whole added token (Gemma's <end_of_turn>) is skipped by decode as a special
        token, so it never shows in the text: its id is matched instead."""
        if stop not in self._stop_ids:
            added = self.tokenizer.get_added_vocab() if self.tokenizer is not None and stop else {}
            self._stop_ids[stop] = {added[s] for s in stop if s in added}
        return self._stop_ids[stop]

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""

    def check(self, tokens: list[int], d: Decoding | None = None) -> tuple[str | None, str | None]:
        """(finish reason or None, the text cut before the first stop string when one matched), under the
        row's settings ``d`` (default: the job's)."""
        d = d or self.d
        if tokens[-1] in d.eos_ids and not d.ignore_eos:
            return "eos", None
        if tokens[-1] in self.stop_ids(d.stop):
            return "stop", self.text(tokens[:-1])
        if d.stop:
            text = self.text(tokens)
            hits = [text.find(s) for s in d.stop if s in text]
            if hits:
                return "stop", text[:min(hits)]
        if len(tokens) >= d.max_new_tokens:
            return "length", None
        return None, None




def run_generate(owner: Owner, task, batches: Iterable[Batch], on_result: Callable, inflight: int,
                 decoding: Decoding, tokenizer, should_stop: Callable[[], bool] = lambda: False,
                 capacity: int = 16, prefill_tokens: int = 512) -> StageStats:
    """Rank 0 of ``task=generate``: ``inflight`` lanes of up to ``capacity`` rows each through the pipeline
    until every row of ``batches`` has finished; each finished row goes to ``on_result`` (see
    :class:`Generation`). When ``should_stop()`` turns true no further row starts; the rows in flight
    finish, and ``extra["stopped"]`` says whether rows were left."""
    generation = Generation(owner, task, _rows(batches, decoding), on_result, inflight, capacity, prefill_tokens,
                            _Stopper(decoding, tokenizer), should_stop)
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
