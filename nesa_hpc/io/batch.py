"""Owner only: cut rows into padded micro-batches (in input order, or by length inside a bucketing window), and
read ahead of the consumer."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .inputs import Request
from .read import DataError, RowError
from .tokenize import CONVENTIONS, LmEval, encode_pair, encode_rows

__all__ = ["ON_LONG", "Batch", "content_digests", "make_batches", "pad_batch", "position_ids", "prefetch"]

ON_LONG = ("truncate", "skip", "fail")


@dataclass
class Batch:
    """One padded micro-batch. ``ids``/``mask``/``pos`` are (B, T) int64; ``rows`` are input indices."""

    index: int
    rows: torch.Tensor        # (B,) int64
    ids: torch.Tensor         # (B, T) int64 token ids: never leave rank 0
    mask: torch.Tensor        # (B, T) int64, 1 = real token
    pos: torch.Tensor         # (B, T) int64 position ids derived from the mask
    lengths: torch.Tensor     # (B,) int64 real tokens per row
    truncated: torch.Tensor   # (B,) bool
    prompt_tokens: torch.Tensor | None = None  # (B,) int64: continuation scoring, the leading tokens not scored
    requests: list | None = None  # per row: the Request it came from (None for a plain text row)

    @property
    def size(self) -> int:
        return int(self.rows.numel())

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    def digests(self) -> list[bytes]:
        """Per row, a digest of what the row is (:func:`content_digests`): its real token ids, where its scored
        continuation starts, and its request's per-row settings."""
        tags = [(b"" if self.prompt_tokens is None else b"prompt %d" % int(self.prompt_tokens[i]))
                + (b"" if self.requests is None or self.requests[i] is None else repr(self.requests[i]).encode())
                for i in range(self.size)]
        return content_digests(self.ids, self.mask, tags)

    def row(self, i: int) -> Batch:
        """Row ``i`` alone, without its padding: a batch of one."""
        real = self.mask[i].bool()
        mask = self.mask[i:i + 1, real]
        return Batch(self.index, self.rows[i:i + 1], self.ids[i:i + 1, real], mask, position_ids(mask),
                     self.lengths[i:i + 1], self.truncated[i:i + 1],
                     None if self.prompt_tokens is None else self.prompt_tokens[i:i + 1],
                     None if self.requests is None else self.requests[i:i + 1])


def content_digests(ids: torch.Tensor, mask: torch.Tensor, tags: list[bytes]) -> list[bytes]:
    """Per row of ``ids`` (B, T), a 16-byte digest of its real tokens (``mask``) and its ``tags`` (what else
    decides what the row releases). The privacy transform keys each row's noise with it beside the row's
    index, so a row whose content changed between a stopped run and its resume gets fresh noise, not the
    noise of its earlier version (whose difference with the new release would reveal the change)."""
    out = []
    for i, tag in enumerate(tags):
        h = hashlib.blake2b(digest_size=16)
        h.update(ids[i][mask[i].bool()].cpu().numpy().astype("<i8").tobytes())
        h.update(b"|" + tag)
        out.append(h.digest())
    return out


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding starts each row at 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def pad_batch(seqs: list[list[int]], pad_id: int, padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``seqs`` padded with ``pad_id`` to the longest, on ``padding_side``: (ids, mask), both (B, T) int64."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
        ids[b, sl] = torch.tensor(s, dtype=torch.long)
        mask[b, sl] = 1
    return ids, mask


def make_batches(rows: Iterable[tuple[int, str | RowError]], tokenizer, batch_size: int, max_length: int,
                 padding_side: str = "right", source: str = "data", bucket_window: int = 0,
                 on_error: str = "fail", on_long: str = "truncate",
                 on_skip: Callable[[int, str], None] | None = None, convention: str = "hf") -> Iterator[Batch]:
    """Tokenize ``rows`` with :func:`encode_rows` (the tokenizer's defaults and its own truncation to
    ``max_length``, special tokens kept), and pad.

    With ``bucket_window > 0`` rows are read ``bucket_window`` at a time and, inside each window, sorted
    by length (longest first) before being cut into batches, so rows of similar length share a batch.
    Batches then leave input order within a window; every row keeps its input index in ``Batch.rows``.

    Rows that cannot be used go to ``on_skip(row, reason)``: ``RowError`` rows and empty texts (with
    ``on_error="skip"``; else they raise), and rows longer than ``max_length`` with ``on_long="skip"``
    (``"truncate"`` keeps what ``tokenizer(text, truncation=True, max_length=max_length)`` keeps and flags the
    row; ``"fail"`` raises).

    ``convention="lm_eval"`` (``task.convention``) tokenizes and marks the scored tokens as
    lm-evaluation-harness's HF model does (:class:`~nesa_hpc.io.tokenize.LmEval`): every row then has
    ``prompt_tokens`` (1, the prefix token, for a text row).
    """
    if padding_side not in ("left", "right"):
        raise DataError(f"data.padding_side={padding_side!r} must be 'left' or 'right'")
    if on_long not in ON_LONG:
        raise DataError(f"data.on_long={on_long!r} must be one of {ON_LONG}")
    if convention not in CONVENTIONS:
        raise DataError(f"task.convention={convention!r} must be one of {CONVENTIONS}")
    window = max(bucket_window, batch_size) if bucket_window > 0 else batch_size
    rules = _Rows(tokenizer, max_length, source, on_error, on_long, on_skip, convention)
    pad_id = _pad_id(tokenizer)
    index = 0
    for chunk in _chunks(rows, window):
        items, pairs = rules.items(chunk)
        if bucket_window > 0:
            # longest first (stable: equal lengths keep input order), so a window ends with its cheapest
            # batches and the pipeline drains quickly
            items.sort(key=lambda it: -len(it.ids))
        for start in range(0, len(items), batch_size):
            yield _batch(index, items[start:start + batch_size], pad_id, padding_side, pairs)
            index += 1


class _Item(NamedTuple):
    """A usable row of a window, tokenized."""

    row: int
    ids: list[int]
    truncated: bool
    prompt_tokens: int          # continuation scoring: the leading tokens not scored (0 for a plain row)
    request: Request | None     # the Request it came from (None for a plain text row)


class _Rows:
    """The rules of one :func:`make_batches` call: a window of rows becomes its usable rows, tokenized, in input
    order; a row that cannot be used raises :class:`DataError` or goes to ``on_skip``."""

    def __init__(self, tokenizer, max_length: int, source: str, on_error: str, on_long: str,
                 on_skip: Callable[[int, str], None] | None, convention: str = "hf") -> None:
        self.tokenizer, self.max_length, self.source = tokenizer, max_length, source
        self.on_error, self.on_long, self.on_skip = on_error, on_long, on_skip
        if convention == "lm_eval":
            try:
                self.lm_eval = LmEval(tokenizer)
            except ValueError as exc:
                raise DataError(str(exc)) from None
        else:
            self.lm_eval = None

    def items(self, chunk: list[tuple[int, str | Request | RowError]]) -> tuple[list[_Item], bool]:
        """The window's usable rows, and whether it held prompt/completion pairs."""
        texts, pairs = self._sort_out(chunk)
        items = self._texts(texts) + self._pairs(pairs)
        if pairs:
            items.sort(key=lambda it: it.row)  # input order, as for plain rows
        return items, bool(pairs) or self.lm_eval is not None

    def _sort_out(self, chunk: list[tuple[int, str | Request | RowError]]
                  ) -> tuple[list[tuple[int, str, Request | None]], list[tuple[int, Request]]]:
        """Text rows (row, text, request) and prompt/completion pairs (row, request); bad rows go here."""
        texts, pairs = [], []
        for row, text in chunk:
            request = text if isinstance(text, Request) else None
            if request is not None and not request.is_pair:
                text = request.text
            if isinstance(text, str) and not text:
                text = RowError(f"{self.source}: row {row}: the text is empty")
            if isinstance(text, RowError):
                self._unusable(row, text.reason)
            elif request is not None and request.is_pair:
                pairs.append((row, request))
            else:
                texts.append((row, text, request))
        return texts, pairs

    def _texts(self, texts: list[tuple[int, str, Request | None]]) -> list[_Item]:
        """Text rows tokenized by :func:`encode_rows`; a row without tokens or too long (not truncated) goes."""
        if not texts:
            return []
        if self.lm_eval is not None:  # the prefix token, then the text: scored from its first token
            encoded = self.lm_eval.texts([t for _, t, _ in texts], self.max_length)
        else:
            encoded = encode_rows(self.tokenizer, [t for _, t, _ in texts], self.max_length)
        items = []
        for (row, _, request), (ids, truncated, count, exact) in zip(texts, encoded, strict=True):
            if count == 0:
                self._unusable(row, f"{self.source}: row {row}: the text has no tokens")
            elif truncated and self.on_long != "truncate":
                self._too_long(row, f"{self.source}: row {row}: {'' if exact else 'at least '}{count} tokens, "
                                    f"longer than data.max_length={self.max_length} (data.on_long={self.on_long})")
            else:
                items.append(_Item(row, ids, truncated, 0 if self.lm_eval is None else 1, request))
        return items

    def _pairs(self, pairs: list[tuple[int, Request]]) -> list[_Item]:
        """Prompt/completion pairs tokenized by :func:`encode_pair`; a pair that cannot be scored goes."""
        items = []
        for row, request in pairs:
            try:
                if self.lm_eval is not None:
                    ids, n_prompt, truncated = self.lm_eval.pair(request.prompt, request.completion, self.max_length)
                else:
                    ids, n_prompt, truncated = encode_pair(self.tokenizer, request.prompt, request.completion,
                                                           self.max_length)
            except ValueError as exc:  # its message is the reason: raised from None
                reason = f"{self.source}: row {row}: {exc}"
                if self.on_error == "fail":
                    raise DataError(reason) from None
                self._skip(row, reason)
                continue
            if truncated and (self.on_long != "truncate" or not ids):
                self._too_long(row, f"{self.source}: row {row}: " + (
                    f"longer than data.max_length={self.max_length} (data.on_long={self.on_long})" if ids
                    else f"the completion's {n_prompt} tokens leave no room for a prompt token in "
                         f"data.max_length={self.max_length}"))
                continue
            items.append(_Item(row, ids, truncated, n_prompt, request))
        return items

    def _unusable(self, row: int, reason: str) -> None:
        """A bad row: raise with ``data.on_error=fail``, else skip it."""
        if self.on_error == "fail":
            raise DataError(reason)
        self._skip(row, reason)

    def _too_long(self, row: int, reason: str) -> None:
        """A row over ``max_length`` tokens that is not truncated: raise with ``data.on_long=fail``, else skip it."""
        if self.on_long == "fail":
            raise DataError(reason)
        self._skip(row, reason)

    def _skip(self, row: int, reason: str) -> None:
        if self.on_skip is None:
            raise DataError(reason)
        self.on_skip(row, reason)


def _pad_id(tokenizer) -> int:
    """The tokenizer's padding token, else its end-of-sequence token, else 0."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return pad_id


def _batch(index: int, part: list[_Item], pad_id: int, padding_side: str, pairs: bool) -> Batch:
    """Micro-batch ``index`` of ``part``'s rows (``prompt_tokens`` set when the window held pairs)."""
    ids, mask = pad_batch([it.ids for it in part], pad_id, padding_side)
    requests = [it.request for it in part]
    return Batch(index, torch.tensor([it.row for it in part], dtype=torch.long), ids, mask, position_ids(mask),
                 mask.sum(-1), torch.tensor([it.truncated for it in part], dtype=torch.bool),
                 torch.tensor([it.prompt_tokens for it in part], dtype=torch.long) if pairs else None,
                 requests if any(r is not None for r in requests) else None)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def prefetch(batches: Iterable[Batch], depth: int = 4) -> Iterator[Batch]:
    """Read and tokenize ahead in a background thread (the tokenizer releases the GIL), ``depth`` batches
    at most; an error in the reader is raised here, in the consumer, at the point it occurred."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for b in batches:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, name="nesa-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # let the reader finish the batch it is on: a daemon thread still tokenizing when the process exits
        # can abort it ("terminate called without an active exception")
        thread.join()
