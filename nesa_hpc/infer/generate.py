"""Generation across the pipeline: every stage keeps the KV cache of its own layers; rank 0 picks the tokens.

A group is one micro-batch of left-padded prompts. Its prefill sends the whole prompt through the
pipeline; after that each decode step sends one position per row. Rank 0 (the owner) reads the last
position's state back (or, with ``split.head=last``, the last worker's next-token logits), picks the next
token of every row, embeds it, runs layers [0, k) over it and sends the privatised state on: token ids
never leave rank 0. Several groups are in flight at once, so while the owner picks tokens for one group
the workers run the others; a finished group's slot takes the next micro-batch, and rows that finish
early are dropped from their group's caches on every stage at the next step.

Messages (``batch_id`` = the group's micro-batch index):

- ``PREFILL`` / ``DECODE``: (B', T, H) states, (B', past + T) int8 mask, (B', T) int32 positions,
  (B',) int32 non-finite marks, (B',) int32 indices of the rows kept from the group's previous step.
- ``RESULT`` (last worker -> owner): the last position's (B', 1, H) states, or the whole prompt's on a
  prefill when the owner runs tail layers; with ``split.head=last`` the (B', V) float32 logits instead.
- ``FREE``: the group is done; every stage drops its cache.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..engine.owner import Owner
from ..engine.stage import StageStats, data_message, memory_guard
from ..engine.transport import Kind
from ..io.data import Batch
from ..models.adapter import StageCache

__all__ = ["Decoding", "GroupResult", "eos_token_ids", "row_generator", "pick_tokens", "run_generate"]


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
    """What a finished group hands to ``GenerateTask.finish`` (per row of the micro-batch)."""

    tokens: list[list[int]]
    reasons: list[str]
    texts: list[str]
    releases: np.ndarray  # (B,) int32: privacy releases of each row's activations


@dataclass
class _Group:
    batch: Batch
    cache: StageCache
    alive: list[int]            # rows of the batch still generating, in cache order
    mask: torch.Tensor          # (B', past + T) 2-D mask of the alive rows, including this step's positions
    pos: torch.Tensor           # (B', T) positions sent this step
    bad: torch.Tensor           # (B,) int32 non-finite marks
    releases: np.ndarray        # (B,) int32
    generators: list[torch.Generator | None] | None
    decodings: list[Decoding] | None  # per row when rows carry their own settings (else the job's)
    tokens: list[list[int]] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    prefill: bool = True


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
        if tokens[-1] in d.eos_ids:
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


def run_generate(owner: Owner, task, batches: Iterable[Batch],
                 on_result: Callable[[Batch, list, torch.Tensor], None], inflight: int, decoding: Decoding,
                 tokenizer, should_stop: Callable[[], bool] = lambda: False,
                 max_rows: int | None = None) -> StageStats:
    """Rank 0 of ``task=generate``: keep ``inflight`` groups in the pipeline, pick every next token here,
    and hand each finished group to ``on_result(batch, [GroupResult], nonfinite)``. Batches must be
    left-padded. With ``max_rows``, a further group (up to ``2 * inflight``) starts as soon as the rows
    still running leave room for it, so rows that finished early are replaced before their whole group
    is done. When ``should_stop()`` turns true no new group starts; the groups in flight finish."""
    stats = owner.stats
    stats.extra.update(generated=0, steps=0, max_groups=0)
    topo, adapter, dev = owner.topo, owner.adapter, owner.device
    world = topo.world_size
    stopper = _Stopper(decoding, tokenizer)
    groups: dict[int, _Group] = {}
    expected: deque[int] = deque()  # groups whose RESULT is due from the last rank, in order

    def forward(g: _Group, ids: torch.Tensor, keep: torch.Tensor) -> None:
        """Embed ``ids`` (B', T) at ``g.pos``, run layers [0, k) with the owner's cache, privatise, send on."""
        T = ids.shape[1]
        with memory_guard(0, "embedding and layers [0, k)", tuple(ids.shape)):
            # every row still running in a group has made the same number of releases so far (0 before the
            # prefill), which keys this step's noise; the owner decides whether a decode step costs the row
            z, bad = owner.front(ids.to(dev), g.mask, g.pos, g.batch.rows[g.alive],
                                 release=int(g.releases[g.alive[0]]), cache=g.cache, step_mask=g.mask[:, -T:],
                                 picked=not g.prefill, key=g.batch.index)
            g.releases[g.alive] += 1
            before = g.bad[g.alive].to(bad.device)  # a row keeps the stage where NaN/Inf first appeared
            bad = torch.where(before >= 0, before, bad)
        stats.batches += 1  # a prefill or a decode step: one micro-batch forward, as on every stage
        kind = Kind.PREFILL if g.prefill else Kind.DECODE
        # (B', T, H) states, (B', past + T) mask, (B', T) positions, (B',) marks, (B',) kept rows: no token ids
        owner.send(kind, g.batch.index, [*data_message(z, g.mask, g.pos, bad, owner.wire), keep.to(torch.int32)],
                   limit=2 * inflight)
        expected.append(g.batch.index)

    def start(batch: Batch) -> None:
        B = batch.size
        decs = None
        if batch.requests is not None and any(r is not None and r.options for r in batch.requests):
            decs = [decoding.for_request(r) for r in batch.requests]
        per_row = decs or [decoding] * B
        gens = None
        if not all(d.greedy for d in per_row):
            gens = [None if d.greedy else row_generator(d.seed, r) for d, r in zip(per_row, batch.rows.tolist(),
                                                                                    strict=True)]
        g = _Group(batch, adapter.new_cache(), list(range(B)), batch.mask.to(dev),
                   batch.pos.to(dev), torch.full((B,), -1, dtype=torch.int32), np.zeros(B, dtype=np.int32), gens,
                   decs, [[] for _ in range(B)], [None] * B, [""] * B)
        groups[batch.index] = g
        forward(g, batch.ids, torch.arange(B))

    def step(gid: int, tensors: list[torch.Tensor]) -> None:
        g = groups[gid]
        *out, bad = (t.to(dev, non_blocking=True) for t in tensors)
        with memory_guard(0, "the head", tuple(g.mask.shape)):
            if owner.head_here:
                ones = torch.ones(out[0].shape[:2], dtype=torch.long, device=dev)
                h, bad = owner.back(out[0], g.mask, g.pos, bad, g.cache, mark_mask=ones, key=gid)  # (B', T', H)
                logits = task.head_stage(adapter, h, None)[0]  # (B', V)
            else:
                logits = out[0]
        logits = logits.float().cpu()
        bad = bad.cpu()
        finite = torch.isfinite(logits).all(-1)  # (B',)
        if not finite.all():
            # recorded (runtime.on_nonfinite) when the group is written; such a row still gets a token
            bad = torch.where((bad < 0) & ~finite, torch.full_like(bad, world), bad)
            logits = torch.where(finite.unsqueeze(-1), logits, torch.zeros_like(logits))
        g.bad[g.alive] = bad
        gens = [g.generators[r] for r in g.alive] if g.generators is not None else [None] * len(g.alive)
        decs = [g.decodings[r] for r in g.alive] if g.decodings is not None else decoding
        picked = pick_tokens(logits, decs, gens).tolist()
        stats.extra["steps"] += 1
        keep = []
        for j, (r, t) in enumerate(zip(g.alive, picked, strict=True)):
            g.tokens[r].append(int(t))
            stats.extra["generated"] += 1
            reason, cut = stopper.check(g.tokens[r], g.decodings[r] if g.decodings is not None else None)
            if reason is None:
                keep.append(j)
            else:
                g.reasons[r] = reason
                g.texts[r] = cut if cut is not None else stopper.text(g.tokens[r])
        if not keep:
            del groups[gid]
            owner.send(Kind.FREE, gid, limit=2 * inflight)
            on_result(g.batch, [GroupResult(g.tokens, g.reasons, g.texts, g.releases)], g.bad)
            return
        keep_t = torch.tensor(keep, dtype=torch.long)
        if len(keep) < len(g.alive):  # free the finished rows' cache entries
            g.cache.batch_select_indices(keep_t.to(dev))
            g.mask = g.mask[keep_t.to(dev)]
        g.alive = [g.alive[j] for j in keep]
        g.pos = g.pos[keep_t.to(dev), -1:] + 1  # (B', 1)
        g.mask = torch.cat([g.mask, torch.ones(len(keep), 1, dtype=g.mask.dtype, device=dev)], dim=1)
        g.prefill = False
        ids = torch.tensor([[g.tokens[r][-1]] for r in g.alive], dtype=torch.long)  # (B', 1)
        forward(g, ids, keep_t)

    def room(batch: Batch) -> bool:
        if len(groups) < inflight:
            return True
        if max_rows is None or len(groups) >= 2 * inflight:
            return False
        return sum(len(g.alive) for g in groups.values()) + batch.size <= max_rows

    batches = iter(batches)
    waiting: Batch | None = None
    with torch.inference_mode():
        while True:
            while True:
                if should_stop():
                    # rows were left unless the input ended before (a stop after the last batch completes)
                    waiting = waiting or next(batches, None)
                    stats.extra["stopped"] = waiting is not None
                    break
                waiting = waiting or next(batches, None)
                if waiting is None or not room(waiting):
                    break
                t0 = time.perf_counter()
                start(waiting)
                stats.extra["max_groups"] = max(stats.extra["max_groups"], len(groups))
                waiting = None
                stats.compute_s += time.perf_counter() - t0
            if not groups:
                break
            gid = expected.popleft()
            msg = owner.recv(Kind.RESULT, gid)
            t0 = time.perf_counter()
            step(gid, msg.tensors)
            stats.compute_s += time.perf_counter() - t0
    owner.stop()
    return owner.all_stats()
