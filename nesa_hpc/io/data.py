"""Owner only: read rows, tokenize, and cut them into padded micro-batches (in input order)."""

from __future__ import annotations

import csv
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import ConfigError, UserError
from .inputs import Request, RowFields

__all__ = ["DataError", "RowError", "ON_ERROR", "ON_LONG", "Batch", "Encoded", "encode_rows", "read_rows",
           "make_batches", "prefetch", "detect_format", "sample_path", "FORMATS", "count_rows", "shard_range"]

log = logging.getLogger("nesa_hpc")

FORMATS = ("jsonl", "text", "csv", "parquet", "openai_batch")  # openai_batch: set explicitly (a .jsonl file)
# rows as long in CSV as in JSONL: the csv module's default refuses a field over 128 KiB as malformed
csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".txt": "text", ".text": "text",
               ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class DataError(UserError):
    """Bad input data; the message names the file and the line or row."""


@dataclass(frozen=True)
class RowError:
    """A row that cannot be used, yielded in its place with ``data.on_error=skip``."""

    reason: str


ON_ERROR = ("fail", "skip")
ON_LONG = ("truncate", "skip", "fail")


def sample_path() -> Path:
    """The small sample dataset shipped with nesa_hpc (used when ``data.path`` is null)."""
    return Path(__file__).parents[1] / "sample_data" / "sample.jsonl"


def detect_format(path: Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(f"data.format={fmt!r} must be 'auto' or one of {FORMATS}")
        return fmt
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise DataError(f"{path}: cannot tell the format from the extension {suffix!r}; set data.format to one "
                        f"of {FORMATS}")
    return _EXTENSIONS[suffix]


def read_rows(path: str | Path, fmt: str = "auto", text_field: str = "text", on_error: str = "fail",
              fields: RowFields | None = None) -> Iterator[tuple[int, str | Request | RowError]]:
    """Yield ``(row_index, text)`` for every row, streaming; row indices count from 0 in file order.

    Without ``fields`` a row is the string in ``text_field``. With ``fields`` (:class:`~nesa_hpc.io.inputs.RowFields`)
    a row may also be a :class:`~nesa_hpc.io.inputs.Request`: a chat (a messages list), a prompt and a
    completion, or (``fmt="openai_batch"``) an OpenAI batch request line.

    A bad row (malformed JSON, missing or non-string field, invalid UTF-8 or an unpaired surrogate, empty
    JSONL line, a null or non-string Parquet value) raises
    :class:`DataError` naming the file and line, or with ``on_error="skip"`` is yielded as
    ``(row_index, RowError(reason))`` so the caller can record it. Errors that make the rest of the
    file unreadable (a broken CSV or Parquet file) always raise.
    """
    if on_error not in ON_ERROR:
        raise DataError(f"data.on_error={on_error!r} must be one of {ON_ERROR}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path: no such file: {path}")
    fmt = detect_format(path, fmt)
    fields = fields or RowFields(text_field, messages_field=None)
    if fmt == "openai_batch" and not fields.openai:
        fields = RowFields(openai=True)
    if fmt == "parquet":
        rows = _read_parquet(path, fields)
    elif fmt == "csv":
        rows = _read_csv(path, fields)
    else:
        rows = _read_lines(path, fmt, fields)
    for row, value in rows:
        if isinstance(value, RowError) and on_error == "fail":
            raise DataError(value.reason)
        yield row, value


def _read_lines(path: Path, fmt: str, fields: RowFields) -> Iterator[tuple[int, str | Request | RowError]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno - 1, RowError(f"{path}:{lineno}: invalid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            line = line.rstrip("\r\n")
            if fmt == "text":
                yield lineno - 1, line
                continue
            if not line.strip():
                yield lineno - 1, RowError(f"{path}:{lineno}: empty line (JSONL needs one JSON object per line)")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno - 1, RowError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})")
                continue
            except RecursionError:
                yield lineno - 1, RowError(f"{path}:{lineno}: malformed JSON (nested too deeply)")
                continue
            except ValueError as exc:  # an integer of more than sys.get_int_max_str_digits() digits
                yield lineno - 1, RowError(f"{path}:{lineno}: unusable JSON ({exc})")
                continue
            try:
                yield lineno - 1, fields.extract(obj, f"{path}:{lineno}")
            except ValueError as exc:
                yield lineno - 1, RowError(str(exc))


def _read_csv(path: Path, fields: RowFields) -> Iterator[tuple[int, str | Request | RowError]]:
    if fields.openai:
        raise DataError(f"{path}: data.format=openai_batch reads JSONL request lines, not CSV")
    wanted = fields.columns() if fields.pairs else [fields.text_field]  # a CSV cell holds text, not messages
    with open(path, encoding="utf-8-sig", newline="") as text:  # -sig: tolerate a byte-order mark
        reader = csv.DictReader(text)
        try:
            for name in wanted:
                if reader.fieldnames is None or name not in reader.fieldnames:
                    raise DataError(f"{path}: no column {name!r} ({fields.describe()}); columns: "
                                    f"{reader.fieldnames}")
            for i, rec in enumerate(reader):
                missing = [name for name in wanted if rec.get(name) is None]
                if missing:
                    yield i, RowError(f"{path}: row {i} (line {reader.line_num}): missing value for {missing[0]!r}")
                elif fields.pairs:
                    yield i, fields.extract(rec, f"{path}: row {i} (line {reader.line_num})")
                else:
                    yield i, rec[fields.text_field]
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: invalid UTF-8 after line {reader.line_num} ({exc.reason})") from None
        except csv.Error as exc:
            raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None


def _read_parquet(path: Path, fields: RowFields) -> Iterator[tuple[int, str | Request | RowError]]:
    import pyarrow.parquet as pq

    if fields.openai:
        raise DataError(f"{path}: data.format=openai_batch reads JSONL request lines, not Parquet")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    columns = [c for c in fields.columns() if c in names]
    needed = fields.columns() if fields.pairs else [fields.text_field]
    if (fields.pairs and len(columns) < 2) or not columns:
        missing = next(c for c in needed if c not in names)
        raise DataError(f"{path}: no column {missing!r} ({fields.describe()}); columns: {names}")
    if columns != [fields.text_field]:  # prompt/completion pairs or chats: whole records
        yield from _parquet_records(path, pf, columns, fields)
        return
    text_field = fields.text_field
    i = 0
    batches = pf.iter_batches(columns=[text_field])
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # corrupt pages: pyarrow raises OSError, ArrowInvalid, ...
            raise DataError(f"{path}: row {i}: unreadable Parquet data ({exc})") from None
        if batch is None:
            return
        try:
            values = batch.column(0).to_pylist()
        except UnicodeDecodeError:  # a string column holding invalid UTF-8: find the rows one by one
            values = []
            for k, scalar in enumerate(batch.column(0)):
                try:
                    values.append(scalar.as_py())
                except UnicodeDecodeError as exc:
                    values.append(RowError(f"{path}: row {i + k}: column {text_field!r} holds invalid UTF-8 "
                                           f"({exc.reason} at byte {exc.start})"))
        for value in values:
            if isinstance(value, RowError):
                yield i, value
            elif not isinstance(value, str):
                yield i, RowError(f"{path}: row {i}: column {text_field!r} must be a string, got "
                                  f"{type(value).__name__}")
            else:
                yield i, value
            i += 1


def _parquet_records(path: Path, pf, columns: list[str], fields: RowFields):
    """Rows of ``columns`` as records for ``fields.extract`` (chats, prompt/completion pairs)."""
    i = 0
    batches = pf.iter_batches(columns=columns)
    while True:
        try:
            batch = next(batches, None)
            records = batch.to_pylist() if batch is not None else None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: row {i} or after: invalid UTF-8 ({exc.reason})") from None
        except Exception as exc:  # corrupt pages: pyarrow raises OSError, ArrowInvalid, ...
            raise DataError(f"{path}: row {i}: unreadable Parquet data ({exc})") from None
        if records is None:
            return
        for rec in records:
            try:
                yield i, fields.extract(rec, f"{path}: row {i}")
            except ValueError as exc:
                yield i, RowError(str(exc))
            i += 1


def count_rows(path: str | Path, fmt: str = "auto") -> int:
    """Rows :func:`read_rows` yields for the file (bad rows included: they keep their row numbers)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.path: no such file: {path}")
    fmt = detect_format(path, fmt)
    if fmt in ("jsonl", "text", "openai_batch"):
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    with open(path, encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(text)
        try:
            return max(0, sum(1 for rec in reader if rec) - 1)  # DictReader passes blank lines over; minus the header
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{path}: cannot read as CSV after line {reader.line_num} ({exc})") from None


def shard_range(num_rows: int, num_shards: int, shard: int, window: int) -> range:
    """Input rows of shard ``shard`` of ``num_shards``: a contiguous block whose bounds are multiples of
    ``window`` (the batching window), so every row lands in the same micro-batch as in an unsharded run.
    The ``ceil(num_rows / window)`` windows are dealt out as evenly as possible."""
    if not 0 <= shard < num_shards:
        raise ConfigError(f"data.shard={shard} must be in [0, data.num_shards={num_shards})")
    windows = -(-num_rows // window)
    first, last = shard * windows // num_shards, (shard + 1) * windows // num_shards
    return range(min(first * window, num_rows), min(last * window, num_rows))


# ---------------------------------------------------------------- tokenizing with truncation


class Encoded(NamedTuple):
    """One row, tokenized by :func:`encode_rows`."""

    ids: list[int]     # exactly ``tokenizer(text, truncation=True, max_length=max_length)["input_ids"]``
    truncated: bool    # the whole row has more than ``max_length`` tokens
    n_tokens: int      # tokens of the whole row when ``exact``, else a lower bound (> max_length)
    exact: bool


# A row longer than this many characters per token of ``max_length`` is tokenized by prefixes (see encode_rows).
_CHARS_PER_TOKEN = 8
_MIN_PREFIX_CHARS = 256
_GROW = 4
_unsafe_warned: set[int] = set()


def _spaced_added_tokens(tokenizer) -> tuple[str, ...]:
    """Added (special) tokens whose text holds a space: one could straddle a cut at a space."""
    try:
        added = [t.content if hasattr(t, "content") else str(t) for t in tokenizer.added_tokens_decoder.values()]
    except AttributeError:
        added = []
    return tuple({t.lower() for t in added if " " in t})


def _safe_cut(text: str, limit: int, spaced: tuple[str, ...]) -> int | None:
    """The largest ``j <= limit`` where ``text[j]`` is a space right after a letter or digit (``text[j-1]``),
    not inside an added token that holds a space; None if there is none."""
    j = text.rfind(" ", 1, limit + 1)
    while j > 0:
        if text[j - 1].isalnum() and not any(t in text[max(0, j - len(t) + 1):j + len(t)].lower() for t in spaced):
            return j
        j = text.rfind(" ", 1, j)
    return None


def encode_rows(tokenizer, texts: Sequence[str], max_length: int, add_special_tokens: bool = True) -> list[Encoded]:
    """Tokenize ``texts`` with the tokenizer's defaults, truncated to ``max_length`` tokens by the tokenizer
    itself: ``ids`` are exactly ``tokenizer(text, truncation=True, max_length=max_length)["input_ids"]``, so
    special tokens are kept where the tokenizer keeps them (BERT: ``[CLS] ... [SEP]``; a BOS stays first),
    and ``truncated`` says whether the whole row has more than ``max_length`` tokens.

    A row of at most ``8 * max_length + 256`` characters is tokenized whole. A longer row is tokenized by
    *prefixes* only, so that a 100 MB row costs about as much as a short one: the prefix ends at a cut
    ``j`` where ``text[j]`` is a space and ``text[j - 1]`` a letter or digit. At such a cut the tokens of
    ``text[:j]`` are the first tokens of ``text``: the normalizers in use work character by character (a
    space composes with nothing), and the pre-tokenizers end a word there (BERT's whitespace split,
    byte-level BPE's regexes, whose matches never run from a letter into a space, Metaspace/SentencePiece,
    which starts a new piece at a space), and the model then tokenizes each word on its own, so what follows
    the cut cannot change a token before it; added tokens that hold a space are kept off the cut. As a
    check on a tokenizer without these properties, a second, shorter prefix (cut at about half) must give
    a prefix of the first one's tokens; if not, the row is tokenized whole (and a warning logged once).
    If the prefix has more than ``max_length`` tokens (special tokens counted), the row is truncated and
    ``tokenizer(prefix, truncation=True, max_length=...)`` equals the whole row's: it keeps the same first
    tokens and adds the same special tokens. Otherwise the prefix grows (4x) until it decides, or is the
    whole row. A row with no such cut (no spaces) is tokenized whole; so is every row of a tokenizer that
    truncates on the left (``truncation_side="left"``). ``add_special_tokens=False`` tokenizes without
    special tokens.
    """
    kw = {} if add_special_tokens else {"add_special_tokens": False}
    n = len(texts)
    out: list[Encoded | None] = [None] * n
    finals: list[tuple[int, str]] = []          # rows to truncate: (index, text or a deciding prefix)
    prefixes = getattr(tokenizer, "truncation_side", "right") == "right"
    spaced = _spaced_added_tokens(tokenizer) if prefixes else ()
    limit = [_CHARS_PER_TOKEN * max_length + _MIN_PREFIX_CHARS] * n
    prev = [0] * n                               # the last prefix that did not decide
    whole_only: set[int] = set()
    pending = list(range(n))
    while pending:
        whole, cuts = [], []
        for i in pending:
            text, j = texts[i], None
            while prefixes and i not in whole_only and limit[i] < len(text):
                j = _safe_cut(text, limit[i], spaced)
                if j is not None and j > prev[i]:
                    break
                j = None
                limit[i] *= _GROW
            if j is None:
                whole.append(i)
            else:
                cuts.append((i, j, _safe_cut(texts[i], j // 2, spaced)))
        pending = []
        if whole:
            for i, ids in zip(whole, tokenizer([texts[i] for i in whole], **kw)["input_ids"], strict=True):
                ids = list(ids)
                out[i] = Encoded(ids, len(ids) > max_length, len(ids), True)
                if len(ids) > max_length:
                    finals.append((i, texts[i]))
        if cuts:
            batch = [texts[i][:j] for i, j, _ in cuts] + [texts[i][:j1] for i, _, j1 in cuts if j1]
            encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
            special = tokenizer.num_special_tokens_to_add(pair=False) if add_special_tokens else 0
            checks = iter(encoded[len(cuts):])
            for (i, j, j1), ids in zip(cuts, encoded[:len(cuts)], strict=True):
                shorter = list(next(checks)) if j1 else []
                if list(ids[:len(shorter)]) != shorter:
                    if id(tokenizer) not in _unsafe_warned:
                        _unsafe_warned.add(id(tokenizer))
                        log.warning("the tokenizer %s tokenizes a prefix of a row differently from the row: long "
                                    "rows are tokenized whole", type(tokenizer).__name__)
                    whole_only.add(i)
                    pending.append(i)
                elif len(ids) + special > max_length:
                    out[i] = Encoded([], True, len(ids) + special, False)
                    finals.append((i, texts[i][:j]))
                else:
                    prev[i] = j
                    limit[i] *= _GROW
                    pending.append(i)
    if finals:
        cut = tokenizer([t for _, t in finals], truncation=True, max_length=max_length, **kw)["input_ids"]
        for (i, _), ids in zip(finals, cut, strict=True):
            out[i] = out[i]._replace(ids=list(ids))
    return out


def encode_pair(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int, bool]:
    """A prompt and its continuation, tokenized as an evaluation harness's ``loglikelihood`` request: spaces
    that end the prompt move to the start of the continuation, ``prompt + completion`` is tokenized whole
    (the tokenizer's defaults, a BOS first where it adds one; special tokens it appends, such as BERT's
    ``[SEP]``, are left out), and the continuation is what follows the prompt's own tokens.

    Returns (ids, prompt tokens, truncated): a row over ``max_length`` tokens keeps its last ``max_length``
    (prompt tokens cut from the left, as the harness does); ValueError when the prompt has no token or the
    continuation is empty. A continuation that cannot fit with at least one prompt token gives
    ([], its token count, True)."""
    spaces = len(prompt) - len(prompt.rstrip())
    if spaces:
        prompt, completion = prompt[:-spaces], prompt[-spaces:] + completion
    # special tokens the tokenizer appends (BERT's [SEP], an EOS) end the text, not the prompt: dropped
    after = _appended_special_tokens(tokenizer)
    whole = list(tokenizer(prompt + completion)["input_ids"])
    whole = whole[:len(whole) - after]
    n_prompt = len(tokenizer(prompt)["input_ids"]) - after
    if n_prompt == 0:
        raise ValueError("the prompt has no tokens: the first completion token would have no context")
    if n_prompt >= len(whole):
        raise ValueError("the completion has no tokens")
    if len(whole) <= max_length:
        return whole, n_prompt, False
    n_completion = len(whole) - n_prompt
    if n_completion > max_length - 1:
        return [], n_completion, True
    return whole[-max_length:], max_length - n_completion, True


def _appended_special_tokens(tokenizer) -> int:
    """How many special tokens the tokenizer puts after a text's own tokens (0 for most decoders)."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return len(full) - start - len(plain)
    return 0


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

    def row(self, i: int) -> Batch:
        """Row ``i`` alone, without its padding: a batch of one."""
        real = self.mask[i].bool()
        mask = self.mask[i:i + 1, real]
        return Batch(self.index, self.rows[i:i + 1], self.ids[i:i + 1, real], mask, position_ids(mask),
                     self.lengths[i:i + 1], self.truncated[i:i + 1],
                     None if self.prompt_tokens is None else self.prompt_tokens[i:i + 1],
                     None if self.requests is None else self.requests[i:i + 1])


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding starts each row at 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def pad_batch(seqs: list[list[int]], pad_id: int, padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
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
                 on_skip: Callable[[int, str], None] | None = None) -> Iterator[Batch]:
    """Tokenize ``rows`` with :func:`encode_rows` (the tokenizer's defaults and its own truncation to
    ``max_length``, special tokens kept), and pad.

    With ``bucket_window > 0`` rows are read ``bucket_window`` at a time and, inside each window, sorted
    by length (longest first) before being cut into batches, so rows of similar length share a batch.
    Batches then leave input order within a window; every row keeps its input index in ``Batch.rows``.

    Rows that cannot be used go to ``on_skip(row, reason)``: ``RowError`` rows and empty texts (with
    ``on_error="skip"``; else they raise), and rows longer than ``max_length`` with ``on_long="skip"``
    (``"truncate"`` keeps what ``tokenizer(text, truncation=True, max_length=max_length)`` keeps and flags the
    row; ``"fail"`` raises).
    """
    if padding_side not in ("left", "right"):
        raise DataError(f"data.padding_side={padding_side!r} must be 'left' or 'right'")
    if on_long not in ON_LONG:
        raise DataError(f"data.on_long={on_long!r} must be one of {ON_LONG}")

    def skip(row: int, reason: str) -> None:
        if on_skip is None:
            raise DataError(reason)
        on_skip(row, reason)

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    window = max(bucket_window, batch_size) if bucket_window > 0 else batch_size
    index = 0
    for chunk in _chunks(rows, window):
        good, pairs = [], []
        for row, text in chunk:
            request = text if isinstance(text, Request) else None
            if request is not None and not request.is_pair:
                text = request.text
            if isinstance(text, str) and not text:
                text = RowError(f"{source}: row {row}: the text is empty")
            if isinstance(text, RowError):
                if on_error == "fail":
                    raise DataError(text.reason)
                skip(row, text.reason)
            elif request is not None and request.is_pair:
                pairs.append((row, request))
            else:
                good.append((row, text, request))
        encoded = encode_rows(tokenizer, [t for _, t, _ in good], max_length) if good else []
        items = []  # (row, ids, truncated, prompt tokens, request)
        for (row, _, request), (ids, truncated, count, exact) in zip(good, encoded, strict=True):
            if count == 0:
                reason = f"{source}: row {row}: the text has no tokens"
                if on_error == "fail":
                    raise DataError(reason)
                skip(row, reason)
                continue
            if truncated and on_long != "truncate":
                reason = (f"{source}: row {row}: {'' if exact else 'at least '}{count} tokens, longer than "
                          f"data.max_length={max_length} (data.on_long={on_long})")
                if on_long == "fail":
                    raise DataError(reason)
                skip(row, reason)
                continue
            items.append((row, ids, truncated, 0, request))
        for row, request in pairs:
            try:
                ids, n_prompt, truncated = encode_pair(tokenizer, request.prompt, request.completion, max_length)
            except ValueError as exc:
                reason = f"{source}: row {row}: {exc}"
                if on_error == "fail":
                    raise DataError(reason) from None
                skip(row, reason)
                continue
            if truncated and (on_long != "truncate" or not ids):
                reason = (f"{source}: row {row}: " + (f"longer than data.max_length={max_length} (data.on_long="
                                                      f"{on_long})" if ids else f"the completion's {n_prompt} tokens "
                                                      f"leave no room for a prompt token in data.max_length="
                                                      f"{max_length}"))
                if on_long == "fail":
                    raise DataError(reason)
                skip(row, reason)
                continue
            items.append((row, ids, truncated, n_prompt, request))
        if pairs:
            items.sort(key=lambda it: it[0])  # input order, as for plain rows
        if bucket_window > 0:
            # longest first (stable: equal lengths keep input order), so a window ends with its cheapest
            # batches and the pipeline drains quickly
            items.sort(key=lambda it: -len(it[1]))
        for start in range(0, len(items), batch_size):
            part = items[start:start + batch_size]
            ids, mask = pad_batch([it[1] for it in part], pad_id, padding_side)
            requests = [it[4] for it in part]
            yield Batch(index, torch.tensor([it[0] for it in part], dtype=torch.long), ids, mask,
                        position_ids(mask), mask.sum(-1), torch.tensor([it[2] for it in part], dtype=torch.bool),
                        torch.tensor([it[3] for it in part], dtype=torch.long) if pairs else None,
                        requests if any(r is not None for r in requests) else None)
            index += 1


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
