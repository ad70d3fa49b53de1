"""How a row's next token is chosen and when a row ends: decoding settings (:class:`Decoding`, the job's or a
request's own), each row's sampling generator, the pick itself, and the stop rules (EOS, stop strings,
``max_new_tokens``). All of it runs on rank 0."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

__all__ = ["Decoding", "eos_token_ids", "row_generator", "pick_tokens", "Stopper"]


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
    hide_finish: bool = False  # task.hide_finish: a row finished early keeps stepping until max_new_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def pick_key(self) -> tuple:
        """What a pick depends on besides the logits and the row's generator: rows with equal keys pick as one."""
        return (0.0, 0, 1.0) if self.greedy else (self.temperature, self.top_k, self.top_p)

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
    if isinstance(decoding, list):  # rows that pick alike (their max tokens, seeds or stops may differ) pick at once
        groups: dict[tuple, list[int]] = {}
        for i, d in enumerate(decoding):
            groups.setdefault(d.pick_key, []).append(i)
        if len(groups) == 1:
            return pick_tokens(logits, decoding[0], generators)
        out = torch.empty(len(decoding), dtype=torch.long)
        for rows in groups.values():
            at = torch.tensor(rows)
            out[at] = pick_tokens(logits[at], decoding[rows[0]], [generators[i] for i in rows]).cpu()
        return out
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


class Stopper:
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
