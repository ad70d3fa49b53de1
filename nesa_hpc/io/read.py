"""Owner only: read the rows of a data file (JSONL, text, CSV, Parquet, OpenAI batch requests), count them, and
cut the rows of one shard."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, UserError
from .inputs import Request, RowFields

__all__ = ["DataError", "RowError", "ON_ERROR", "read_rows", "detect_format", "sample_path", "FORMATS", "count_rows",
           "shard_range"]

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


def sample_path() -> Path:
    """The small sample dataset shipped with nesa_hpc (used when ``data.path`` is null)."""
    return Path(__file__).parents[1] / "sample_data" / "sample.jsonl"


def detect_format(path: Path, fmt: str = "auto") -> str:
    """The format of ``path``: ``fmt`` when set (checked), else the one its extension names."""
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
    if fmt == "text" and fields.id_field:
        raise DataError(f"{path}: data.id_field={fields.id_field!r} needs rows with fields (jsonl, csv, parquet), "
                        "not plain text lines")
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
    first: dict[str, int] = {}  # OpenAI batch: custom_id -> its first line (ids must be unique in a batch)
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
                row = fields.extract(obj, f"{path}:{lineno}")
            except ValueError as exc:
                yield lineno - 1, RowError(str(exc))
                continue
            cid = row.custom_id if isinstance(row, Request) else None
            if cid is not None and first.setdefault(cid, lineno) != lineno:
                row = RowError(f"{path}:{lineno}: duplicate custom_id {cid!r} (first on line {first[cid]}): each "
                               "request of a batch needs its own")
            yield lineno - 1, row


def _read_csv(path: Path, fields: RowFields) -> Iterator[tuple[int, str | Request | RowError]]:
    if fields.openai:
        raise DataError(f"{path}: data.format=openai_batch reads JSONL request lines, not CSV")
    wanted = fields.columns() if fields.pairs else [fields.text_field, *([fields.id_field] if fields.id_field else [])]
    # a CSV cell holds text, not messages
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
                elif fields.pairs or fields.id_field:
                    try:
                        yield i, fields.extract(rec, f"{path}: row {i} (line {reader.line_num})")
                    except ValueError as exc:
                        yield i, RowError(str(exc))
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
