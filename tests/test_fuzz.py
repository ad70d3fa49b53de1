"""Fuzzing the input path: over 1000 generated inputs per run, each ending in correct rows or a clear error.

Documents are generated with structure: valid rows mixed with bad rows of known kinds (malformed JSON, wrong
types, missing fields, nulls, empty lines, invalid UTF-8, lone surrogates, nesting too deep, huge integers),
odd but valid text (combining marks, emoji, right-to-left text, NULs, U+2028, BOMs, CRLF, very long rows),
CSV quoting edge cases, Parquet columns of the wrong type, and ``data.text_field`` variants. Each is rendered
as a jsonl, text, csv or parquet file, so the texts to expect are known:

* ``read_rows(on_error="skip")`` gives exactly the expected texts, row indices in file order, and a
  ``RowError`` exactly at each bad row, its reason naming the file and the line or row;
  ``on_error="fail"`` raises a ``DataError`` for the first bad row (or gives the same rows if none);
  a file that cannot be read at all raises a ``DataError`` naming the file.
* ``make_batches`` over those rows (``on_long`` / ``on_error`` / bucketing / padding variants, small
  ``max_length``) gives exactly the batches predicted from the tokenizer itself, skips exactly the bad and
  (``on_long=skip``) long rows, or raises a ``DataError`` for exactly the first row that must fail.
* Random bytes, and mutated structured documents, give rows in order or a ``DataError`` naming the file.

Never another exception type, never a hang (a watchdog fails an example that runs too long). Every
hypothesis test is derandomized, so CI runs the same examples every time.
"""

from __future__ import annotations

import io
import json
import re
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import ROOT, run_mpi
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from nesa_hpc.io.batch import make_batches
from nesa_hpc.io.read import DataError, RowError, read_rows

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

# generated inputs per run: per test, and per kind of document where a test is split by kind (so that every
# kind gets its share: hypothesis does not draw a sampled_from evenly)
CSV_DAMAGE = {"none": 120, "no_column": 25, "bad_utf8": 50, "garbled": 50}
PARQUET_KINDS = {"string": 50, "large_string": 30, "dictionary": 30, "wrong_type": 40, "missing": 15,
                 "truncated": 20, "corrupt": 50}
EXAMPLES = {"jsonl": 300, "text": 150, "csv": sum(CSV_DAMAGE.values()), "parquet": sum(PARQUET_KINDS.values()),
            "batches": 240, "noise": 200}


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


@contextmanager
def no_hang(seconds: int = 30):
    """Fail (instead of hanging the CI job) if one example runs longer than ``seconds``."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def alarm(signum, frame):
        raise AssertionError(f"an example ran for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def tokenizers(tokenizer):
    """MiniLM (BERT WordPiece, [CLS] ... [SEP]) and, when converted in the cache, SmolLM2 (byte-level BPE)."""
    from nesa_hpc.models.weights import packaged_model_path

    found = [tokenizer]
    folder = packaged_model_path("smollm2-135m-instruct", convert=False)
    if (folder / "tokenizer.json").exists():
        found.append(AutoTokenizer.from_pretrained(folder))
    return found


def test_fuzz_budget():
    assert sum(EXAMPLES.values()) >= 1000


# ---------------------------------------------------------------- generated texts and field names

_FRAGMENTS = ["a", "word", "Hello", " ", "  ", "\t", "é", "e\u0301", "n\u0303\u0323", "Z\u0351\u0362\u0489", "👍🏽",
              "👨\u200d👩\u200d👧", "🙂", "🇫🇷", "שלום", "مرحبا", "\u202e", "\u200f", "\u200b", "\u2066x\u2069",
              "中文字", "東京", "\x00", "\x01", "\x04", "\x1d", "\x1f", "\x7f", "\x85",
              "\u2028", "\u2029", "\ufeff", "\ufffd", "\ue000", "\U0010ffff",
              '"', "'", '""', ",", ";", "\\", "\\n", "{", "}", "[", "]", ":", "\r", "\n", "\r\n", "[SEP]", "[CLS]",
              "<|im_start|>", "𝔘𝔫𝔦", "İ", "ß", "ﬁ", "123", "-1e9", "null", "true", "NaN"]
_short_texts = st.one_of(st.lists(st.sampled_from(_FRAGMENTS), max_size=8).map("".join), st.text(max_size=16))
_long_texts = st.builds(lambda unit, n: unit * n,
                        st.sampled_from(["word ", "x", "é ", "a\u0301", "🙂 ", "internationalization ", "東京", " "]),
                        st.integers(40, 1500))
_HUGE = "word " * 27_000  # over the csv module's default 128 KiB field limit
# texts that tokenize to nothing but special tokens, or (\x04, \x1d, \x14 in SmolLM2) to no token at all
_bare_texts = st.sampled_from(["\x04", "\x04\x1d", "\x14", " ", "\t", "\u200b", "\ufeff", "\x00", "\u0301", "\r",
                              "\x7f"])
TEXTS = st.one_of(_short_texts, _short_texts, _short_texts, _long_texts, _bare_texts)
TEXTS_OR_HUGE = st.one_of(TEXTS, TEXTS, TEXTS, TEXTS, st.just(_HUGE))
FIELDS = st.sampled_from(["text", "text", "text", "body", "", "t e x t", "naïve", "列", "a,b", 'q"uote', "a.b", "Text",
                          "\u00e9", "e\u0301", "\U0001f642"])
_OTHER_FIELDS = ["id", "Text", "TEXT", "text ", " text", "meta", "é", "e\u0301", "label", "x,y", "tëxt"]
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _short_texts,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_short_texts, inner, max_size=3),
                           max_leaves=6)
BAD_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xf5\x80\x80\x80",
            b"\xf0\x9f\x99", b"\xc3\x28"]

OK, BAD = "ok", "bad"


class Doc(NamedTuple):
    """A generated input file and what reading it must give."""

    fmt: str
    data: bytes
    text_field: str
    rows: tuple = ()            # per row in file order: (OK, text) or (BAD, words its reason must hold)
    error: str | tuple | None = None  # the whole file fails: words the DataError must hold (or one of them)
    weak: bool = False          # mutated or garbled: rows in order or a DataError naming the file, nothing more
    bom: bool = False           # starts with a UTF-8 byte-order mark


SUFFIX = {"jsonl": ".jsonl", "text": ".txt", "csv": ".csv", "parquet": ".parquet"}


def _other_fields(draw, field: str, max_size: int = 3) -> list[str]:
    return draw(st.lists(st.sampled_from([f for f in _OTHER_FIELDS if f != field]), max_size=max_size, unique=True))


# ---------------------------------------------------------------- JSONL


@st.composite
def _jsonl_row(draw, field: str, clean: bool) -> tuple[bytes, tuple]:
    bad = ["wrong_type", "missing", "not_object", "malformed", "truncated", "empty", "bad_utf8", "surrogate", "deep",
           "bigint"]
    kind = draw(st.sampled_from(["good"] * (30 if clean else 7) + ["duplicate"] + bad))
    text = draw(TEXTS if clean else TEXTS_OR_HUGE)
    extras = {k: draw(JSON_VALUES) for k in _other_fields(draw, field)}
    ascii_ = draw(st.booleans())
    compact = {"separators": (",", ":")} if draw(st.booleans()) else {}

    def dumps(obj) -> str:
        return json.dumps(obj, ensure_ascii=ascii_, **compact)

    def obj_with(value) -> dict:
        items = list(extras.items())
        items.insert(draw(st.integers(0, len(items))), (field, value))
        return dict(items)

    if kind in ("good", "bad_utf8"):
        pad = draw(st.sampled_from(["", " ", "\t", "  "]))
        line = (pad + dumps(obj_with(text)) + draw(st.sampled_from(["", " ", "\t"]))).encode()
        if kind == "good":
            return line, (OK, text)
        at = draw(st.integers(0, len(line)))
        return line[:at] + draw(st.sampled_from(BAD_UTF8)) + line[at:], (BAD, "invalid UTF-8")
    if kind == "duplicate":  # the last of two equal keys wins, as in json.loads
        decoy = draw(JSON_VALUES)
        return f"{{{dumps(field)}: {dumps(decoy)}, {dumps(field)}: {dumps(text)}}}".encode(), (OK, text)
    if kind == "wrong_type":
        value = draw(st.sampled_from([0, -7, 1.5, -1e300, float("inf"), True, False, None, [], ["a"], {"text": "x"}]))
        return dumps(obj_with(value)).encode(), (BAD, f"field {field!r} must be a string, got {type(value).__name__}")
    if kind == "missing":
        return dumps(extras).encode(), (BAD, f"missing field {field!r}")
    if kind == "not_object":
        value = draw(st.sampled_from([[1, 2], [{field: "x"}], "s", text, 3, -0.5, None, True]))
        return dumps(value).encode(), (BAD, "expected a JSON object")
    if kind == "malformed":
        line = draw(st.sampled_from([f"{{{dumps(field)}: ", "{'text': 'a'}", '{"text": "a",}', '{text: "a"}',
                                     '{"text": "a"} x', '{"text": "a"}}', '{"text": "a\x00"}', '{"text": "a\tb"}',
                                     '{"text": "\\x41"}', '{"text": "a"', "{]", "NaN x", '\x00{"text":"a"}',
                                     '{"text": "a"}\x00', "[1,]", "{,}", '{"text": "a" "b": 1}', "\ufeff{}"]))
        return line.encode(), (BAD, "malformed JSON")
    if kind == "truncated":  # a proper prefix of an object is never complete JSON
        full = json.dumps(obj_with(text), ensure_ascii=ascii_, separators=(",", ":"))
        return full[:draw(st.integers(1, len(full) - 1))].encode(), (BAD, "malformed JSON")
    if kind == "empty":
        return draw(st.sampled_from(["", " ", "\t", " \t ", "\x0c", "\u3000", "\x85"])).encode(), (BAD, "empty line")
    if kind == "surrogate":
        bad = draw(st.sampled_from(["\\ud800", "\\udfff", "\\uDC00", "\\ude00\\ud83d", "\\ud83d"]))
        at = draw(st.integers(0, 3))
        body = json.dumps("abc", ensure_ascii=True)
        return f"{{{dumps(field)}: {body[:at + 1]}{bad}{body[at + 1:]}}}".encode(), (BAD, "unpaired surrogate")
    if kind == "deep":
        n = 100_000
        line = draw(st.sampled_from(["[" * n, "[" * n + "]" * n, f'{{{dumps(field)}: "a", "x": ' + "{\"a\": " * n]))
        return line.encode(), (BAD, "malformed JSON (nested too deeply)")
    assert kind == "bigint"
    digits = "9" * draw(st.integers(4400, 6000))
    line = draw(st.sampled_from([f'{{{dumps(field)}: "a", "n": {digits}}}', f"{{{dumps(field)}: {digits}}}"]))
    return line.encode(), (BAD, "unusable JSON")


def _join_lines(draw, lines: list[bytes]) -> bytes:
    """Lines ended by \\n or \\r\\n; the last one maybe unterminated (unless empty: it would not be a line)."""
    out = []
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        out.append(line + draw(st.sampled_from([b"\n", b"\r\n"] + ([b""] if last and line else []))))
    return b"".join(out)


@st.composite
def jsonl_docs(draw, clean: bool = False) -> Doc:
    field = draw(FIELDS)
    rows = draw(st.lists(_jsonl_row(field, clean), max_size=12))
    bom = bool(rows) and draw(st.integers(0, 3)) == 2
    data = (b"\xef\xbb\xbf" if bom else b"") + _join_lines(draw, [line for line, _ in rows])
    return Doc("jsonl", data, field, tuple(e for _, e in rows), bom=bom)


# ---------------------------------------------------------------- text


@st.composite
def _text_row(draw, clean: bool) -> tuple[bytes, tuple]:
    text = draw(TEXTS if clean else TEXTS_OR_HUGE).replace("\n", " ")  # a text row cannot hold a line break
    line = text.encode()
    if draw(st.integers(0, 15 if clean else 7)) == 0:
        at = draw(st.integers(0, len(line)))
        return line[:at] + draw(st.sampled_from(BAD_UTF8)) + line[at:], (BAD, "invalid UTF-8")
    return line, (OK, text.rstrip("\r"))  # the line ending goes, with any \r before it (CRLF)


@st.composite
def text_docs(draw, clean: bool = False) -> Doc:
    rows = draw(st.lists(_text_row(clean), max_size=12))
    bom = bool(rows) and draw(st.integers(0, 3)) == 2
    data = (b"\xef\xbb\xbf" if bom else b"") + _join_lines(draw, [line for line, _ in rows])
    return Doc("text", data, draw(FIELDS), tuple(e for _, e in rows), bom=bom)


# ---------------------------------------------------------------- CSV


def _cell(value: str, force: bool) -> str:
    if force or any(c in value for c in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


@st.composite
def csv_docs(draw, clean: bool = False, damage: str | None = None) -> Doc:
    field = draw(FIELDS)
    columns = _other_fields(draw, field)
    at = draw(st.integers(0, len(columns)))
    columns.insert(at, field)
    ending = draw(st.sampled_from(["\r\n", "\n", "\r"]))
    quote_all = draw(st.booleans())

    def line(cells: list[str]) -> str:
        if len(cells) == 1 and cells[0] == "":
            return '""'  # unquoted, a lone empty cell would be a blank line, which is no row
        return ",".join(_cell(c, quote_all or draw(st.booleans())) for c in cells)

    if damage is None:
        damage = "none" if clean else draw(st.sampled_from(["none"] * 7 + ["no_column", "bad_utf8", "garbled"]))
    header = [c for c in columns if c != field] if damage == "no_column" else columns
    lines, rows, bad_bytes, garbled = [line(header) if header else ""], [], False, False
    kinds = ["good"] * (16 if clean else 6) + ["extra", "blank", "short"]
    n = draw(st.integers(0, 10))
    damaged = draw(st.integers(0, n - 1)) if n and damage in ("bad_utf8", "garbled") else -1
    for k in range(n):
        kind = damage if k == damaged else draw(st.sampled_from(kinds))
        if kind == "short" and at == 0:
            kind = "blank"  # no cell at all is a blank line
        text = draw(TEXTS if clean else TEXTS_OR_HUGE)
        cells = [draw(_short_texts) for _ in columns]
        cells[at] = text
        if kind == "blank":
            lines.append("")  # DictReader passes blank lines over: no row, no row number
            continue
        if kind == "short":
            lines.append(line(cells[:draw(st.integers(1, at))]))
            rows.append((BAD, f"missing value for {field!r}"))
            continue
        if kind == "extra":
            cells += draw(st.lists(_short_texts, min_size=1, max_size=2))
        if kind == "garbled":
            garbled = True
            lines.append(draw(st.sampled_from(['"unterminated', 'a"b', '"a"b', '"a""', '"', 'x,"y', '""""x'])))
            continue
        lines.append(line(cells))
        if kind == "bad_utf8":
            bad_bytes = True
        rows.append((OK, text))
    data = "".join(ln + ending for ln in lines[:-1]) + lines[-1] + draw(st.sampled_from([ending, ""]))
    if lines[-1] == "" and len(lines) > 1:
        data += ending  # keep a trailing blank line a line
    raw = data.encode()
    if bad_bytes:
        cut = draw(st.integers(len(lines[0].encode()) + 1, max(len(lines[0].encode()) + 1, len(raw))))
        raw = raw[:cut] + draw(st.sampled_from(BAD_UTF8)) + raw[cut:]
    bom = draw(st.booleans())  # CSV reading strips a BOM: the rows stay exactly as expected
    raw = (b"\xef\xbb\xbf" if bom else b"") + raw
    if garbled:
        return Doc("csv", raw, field, weak=True, bom=bom)
    if field not in header and bad_bytes:  # which comes first depends on how far the decoder reads ahead
        return Doc("csv", raw, field, error=(f"no column {field!r}", "invalid UTF-8"), bom=bom)
    if field not in header:
        return Doc("csv", raw, field, error=f"no column {field!r}", bom=bom)
    if bad_bytes:
        return Doc("csv", raw, field, tuple(rows), error="invalid UTF-8", bom=bom)
    return Doc("csv", raw, field, tuple(rows), bom=bom)


# ---------------------------------------------------------------- Parquet

_WRONG_TYPES = [(pa.int64(), st.integers(-2**63, 2**63 - 1), "int"), (pa.float64(), st.floats(), "float"),
                (pa.bool_(), st.booleans(), "bool"), (pa.binary(), st.binary(max_size=8), "bytes"),
                (pa.list_(pa.string()), st.lists(_short_texts, max_size=2), "list"),
                (pa.struct([("text", pa.string())]), st.builds(lambda t: {"text": t}, _short_texts), "dict"),
                (pa.date32(), st.dates(), "date")]


@st.composite
def parquet_docs(draw, clean: bool = False, kind: str | None = None) -> Doc:
    field = draw(FIELDS)
    n = draw(st.integers(0, 12))
    if kind is None:
        kind = draw(st.sampled_from(["string"] * 3 + ["large_string", "dictionary"] +
                                    ([] if clean else ["wrong_type", "missing", "corrupt", "truncated"])))
    values, rows = [], []
    if kind == "wrong_type":
        arrow_type, strategy, name = draw(st.sampled_from(_WRONG_TYPES))
        for _ in range(n):
            value = None if draw(st.integers(0, 4)) == 0 else draw(strategy)
            values.append(value)
            rows.append((BAD, f"must be a string, got {type(value).__name__ if value is None else name}"))
        column = pa.array(values, type=arrow_type)
    else:
        for _ in range(n):
            roll = draw(st.integers(0, 19 if clean else 9))
            if roll == 0:
                values.append(None)
                rows.append((BAD, "must be a string, got NoneType"))
            elif roll == 1 and kind in ("string", "large_string"):
                values.append(draw(st.sampled_from(BAD_UTF8)))
                rows.append((BAD, "invalid UTF-8"))
            else:
                text = draw(TEXTS if clean else TEXTS_OR_HUGE)
                values.append(text.encode())
                rows.append((OK, text))
        binary = pa.large_binary() if kind == "large_string" else pa.binary()
        column = pa.array(values, type=binary).view(pa.large_string() if kind == "large_string" else pa.string())
        if kind == "dictionary":
            column = column.dictionary_encode()
    names = _other_fields(draw, field)
    columns = [pa.array(range(n), pa.int64()) for _ in names]
    at = draw(st.integers(0, len(names)))
    names.insert(at, field)
    columns.insert(at, column)
    if kind == "missing":
        del names[at], columns[at]
    buf = io.BytesIO()
    pq.write_table(pa.table(columns, names=names) if names else pa.table({}), buf,
                   row_group_size=draw(st.integers(1, 8)),
                   compression=draw(st.sampled_from(["NONE", "snappy", "zstd"])),
                   use_dictionary=draw(st.booleans()))
    data = buf.getvalue()
    if kind == "missing":
        return Doc("parquet", data, field, error=f"no column {field!r}")
    if kind == "truncated":
        return Doc("parquet", data[:draw(st.integers(0, len(data) - 1))], field, error="not a readable Parquet file")
    if kind == "corrupt":
        return Doc("parquet", _mutate(draw, data), field, weak=True)
    return Doc("parquet", data, field, tuple(rows))


def _mutate(draw, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op, at = draw(st.integers(0, 2)), draw(st.integers(0, max(0, len(out) - 1)))
        if op == 0 and out:
            out[at] = draw(st.integers(0, 255))
        elif op == 1:
            del out[at:at + draw(st.integers(1, 16))]
        else:
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(out)


# clean=True: no damage to the file as a whole (so it reads), no rows of over 128 KiB; bad rows still occur
DOCS = {"jsonl": jsonl_docs, "text": text_docs, "csv": csv_docs, "parquet": parquet_docs}


# ---------------------------------------------------------------- checking what read_rows gives


def where(doc: Doc, path: Path, row: int) -> str:
    """How a row's error names it: the line for jsonl/text, the row (and its line) for csv, the row for parquet."""
    return {"jsonl": f"{path}:{row + 1}: ", "text": f"{path}:{row + 1}: ", "csv": f"{path}: row {row} (line ",
            "parquet": f"{path}: row {row}: "}[doc.fmt]


def assert_clear(msg: str, path: Path) -> None:
    """A DataError starts with the file, then the line or row at fault, or what is wrong with the whole file."""
    assert re.match(re.escape(str(path)) + r"(:\d+: |: row \d+[ :]|: line \d+: |: invalid UTF-8 after line \d+ "
                    r"|: no column |: not a readable Parquet file )", msg), msg


def _row_ok(doc: Doc, path: Path, row: int, value, expected: tuple) -> bool:
    """``value`` (a text or a RowError) is what row ``row`` must read as."""
    if row == 0 and doc.bom and doc.fmt in ("jsonl", "text"):
        # a BOM is not stripped from JSONL or text files (CSV strips it): row 0 may hold it, or be a
        # malformed-JSON row that says so (or read as expected, should the BOM ever be stripped)
        if doc.fmt == "text" and expected[0] == OK and value == "\ufeff" + expected[1]:
            return True
        if isinstance(value, RowError) and value.reason.startswith(where(doc, path, 0)) and "BOM" in value.reason:
            return True
    if expected[0] == OK:
        return value == expected[1]
    return (isinstance(value, RowError) and value.reason.startswith(where(doc, path, row))
            and expected[1] in value.reason)


def read_and_check(doc: Doc, path: Path, on_error: str) -> list | None:
    """Read ``path`` and check the outcome against ``doc``; the rows read, or None if a DataError."""
    try:
        rows = list(read_rows(path, text_field=doc.text_field, on_error=on_error))
    except DataError as exc:
        msg = str(exc)
        assert_clear(msg, path)
        if doc.weak:
            return None
        if doc.error is not None and any(words in msg for words in
                                         (doc.error if isinstance(doc.error, tuple) else [doc.error])):
            event(f"{on_error}: the file fails")
            return None
        # a bad row with on_error=fail: the first one, named by its line or row (in a CSV file with invalid
        # UTF-8 further on, a bad row can come first)
        assert on_error == "fail", msg
        named = [i for i in range(len(doc.rows)) if msg.startswith(where(doc, path, i))]
        assert len(named) == 1, msg
        assert _row_ok(doc, path, named[0], RowError(msg), doc.rows[named[0]]), (msg, doc.rows[named[0]])
        assert all(_row_ok(doc, path, i, e[1], e) for i, e in enumerate(doc.rows[:named[0]])), msg
        event(f"{on_error}: a row fails")
        return None
    assert [r for r, _ in rows] == list(range(len(rows)))
    assert all(isinstance(v, str) or (isinstance(v, RowError) and str(path) in v.reason) for _, v in rows)
    assert on_error == "skip" or not any(isinstance(v, RowError) for _, v in rows)
    if doc.weak:
        return rows
    event(f"{on_error}: rows ({'some bad' if any(e[0] == BAD for e in doc.rows) else 'all good'})")
    assert doc.error is None, f"expected a DataError with {doc.error!r}"
    assert len(rows) == len(doc.rows)
    for (row, value), expected in zip(rows, doc.rows, strict=True):
        assert _row_ok(doc, path, row, value, expected), (row, value, expected)
    return rows


def _write(doc: Doc, tmp_path: Path) -> Path:
    path = tmp_path / f"input{SUFFIX[doc.fmt]}"
    path.write_bytes(doc.data)
    return path


def _read_both_ways(doc: Doc, tmp_path: Path) -> None:
    path = _write(doc, tmp_path)
    with no_hang():
        for on_error in ("skip", "fail"):
            read_and_check(doc, path, on_error)


@fuzz(EXAMPLES["jsonl"])
@given(doc=jsonl_docs())
def test_jsonl_rows(doc, tmp_path):
    _read_both_ways(doc, tmp_path)


@fuzz(EXAMPLES["text"])
@given(doc=text_docs())
def test_text_rows(doc, tmp_path):
    _read_both_ways(doc, tmp_path)


@pytest.mark.parametrize("damage", list(CSV_DAMAGE))
def test_csv_rows(damage, tmp_path):
    @fuzz(CSV_DAMAGE[damage])
    @given(doc=csv_docs(damage=damage))
    def check(doc):
        _read_both_ways(doc, tmp_path)

    check()


@pytest.mark.parametrize("kind", list(PARQUET_KINDS))
def test_parquet_rows(kind, tmp_path):
    @fuzz(PARQUET_KINDS[kind])
    @given(doc=parquet_docs(kind=kind))
    def check(doc):
        _read_both_ways(doc, tmp_path)

    check()


# ---------------------------------------------------------------- through the tokenizer: make_batches


class Plan(NamedTuple):
    batches: list[list[int]]            # rows of each batch
    skipped: list[tuple[int, str]]      # (row, reason or pattern), in the order on_skip sees them
    error: tuple[int, str] | None       # the row that must fail and its reason (or pattern)
    done_before: int                    # rows before the window of the failing row (all batches come from them)


def plan(rows, ref, path, batch_size, max_length, bucket_window, on_error, on_long) -> Plan:
    """What make_batches must do, from the rows read and the tokenizer's own output for each text."""
    window = max(bucket_window, batch_size) if bucket_window > 0 else batch_size
    batches, skipped = [], []
    for start in range(0, len(rows), window):
        chunk = rows[start:start + window]
        if on_error == "fail":  # read_rows raises while the window is being read
            bad = [(row, v) for row, v in chunk if isinstance(v, RowError)]
            if bad:
                return Plan(batches, skipped, (bad[0][0], re.escape(bad[0][1].reason)), start)
        good = []
        for row, value in chunk:  # then bad and empty rows, before the tokenizer runs on the window
            if isinstance(value, str) and not value:
                value = RowError(f"{path}: row {row}: the text is empty")
            if not isinstance(value, RowError):
                good.append(row)
            elif on_error == "fail":
                return Plan(batches, skipped, (row, re.escape(value.reason)), start)
            else:
                skipped.append((row, re.escape(value.reason)))
        kept = []
        for row in good:  # then rows without tokens, and rows longer than max_length
            if ref[row][1] == 0:
                why = re.escape(f"{path}: row {row}: the text has no tokens")
                if on_error == "fail":
                    return Plan(batches, skipped, (row, why), start)
                skipped.append((row, why))
            elif ref[row][1] > max_length and on_long != "truncate":
                why = rf"{re.escape(str(path))}: row {row}: (at least )?\d+ tokens, longer than data\.max_length=" \
                      rf"{max_length} \(data\.on_long={on_long}\)"
                if on_long == "fail":
                    return Plan(batches, skipped, (row, why), start)
                skipped.append((row, why))
            else:
                kept.append(row)
        if bucket_window > 0:
            kept.sort(key=lambda r: -len(ref[r][0]))
        batches += [kept[i:i + batch_size] for i in range(0, len(kept), batch_size)]
    return Plan(batches, skipped, None, len(rows))


@st.composite
def batch_cases(draw):
    fmt = draw(st.sampled_from(["jsonl", "jsonl", "text", "csv", "parquet"]))
    doc = draw(DOCS[fmt](clean=True))  # whole files that read, with a few bad rows among the good ones
    return doc, dict(tok=draw(st.integers(0, 1)), batch_size=draw(st.integers(1, 5)),
                     max_length=draw(st.sampled_from([2, 3, 4, 6, 8, 12, 32])),
                     bucket_window=draw(st.sampled_from([0, 0, 1, 3, 8])),
                     on_error=draw(st.sampled_from(["fail", "skip"])),
                     on_long=draw(st.sampled_from(["truncate", "truncate", "skip", "fail"])),
                     padding_side=draw(st.sampled_from(["right", "left"])))


@fuzz(EXAMPLES["batches"])
@given(case=batch_cases())
def test_batches(case, tokenizers, tmp_path):
    doc, opt = case
    tok = tokenizers[opt["tok"] % len(tokenizers)]
    path = _write(doc, tmp_path)
    with no_hang():
        rows = read_and_check(doc, path, "skip")
        assert rows is not None
        L, B = opt["max_length"], opt["batch_size"]
        ref = {r: (tok(v, truncation=True, max_length=L)["input_ids"], len(tok(v)["input_ids"]))
               for r, v in rows if isinstance(v, str) and v}
        if any(full == 0 for _, full in ref.values()):
            event("a row without tokens")  # SmolLM2 has no token for some control characters (\x04, \x1d)
        want = plan(rows, ref, path, B, L, opt["bucket_window"], opt["on_error"], opt["on_long"])
        skipped, got, error = [], [], None
        try:
            for b in make_batches(read_rows(path, text_field=doc.text_field, on_error=opt["on_error"]), tok, B, L,
                                  padding_side=opt["padding_side"], source=str(path),
                                  bucket_window=opt["bucket_window"], on_error=opt["on_error"],
                                  on_long=opt["on_long"], on_skip=lambda r, why: skipped.append((r, why))):
                got.append(b)
        except DataError as exc:
            error = str(exc)
            assert_clear(error, path)
    event(f"{'fails' if want.error else 'batches'}, {'some' if want.skipped else 'no'} rows skipped")
    if want.error is None:
        assert error is None, error
        assert [b.rows.tolist() for b in got] == want.batches
    else:
        assert error is not None, f"expected a DataError for row {want.error[0]}"
        assert re.fullmatch(want.error[1], error), (want.error, error)
        assert all(r < want.done_before for b in got for r in b.rows.tolist())
        assert [b.rows.tolist() for b in got] == want.batches[:len(got)]
    assert len(skipped) == len(want.skipped), (skipped, want.skipped)
    for (r, why), (wr, pattern) in zip(skipped, want.skipped, strict=True):
        assert r == wr and re.fullmatch(pattern, why), ((r, why), (wr, pattern))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    for k, b in enumerate(got):
        assert b.index == k and 1 <= b.size <= B
        assert b.ids.shape == b.mask.shape == b.pos.shape and b.ids.shape[1] == int(b.lengths.max())
        for i, row in enumerate(b.rows.tolist()):
            ids, full = ref[row]
            n = int(b.lengths[i])
            assert 1 <= n <= L and n == len(ids)
            assert bool(b.truncated[i]) == (full > L)
            real = slice(b.ids.shape[1] - n, None) if opt["padding_side"] == "left" else slice(0, n)
            assert b.ids[i, real].tolist() == ids
            assert b.mask[i].sum() == n and b.mask[i, real].tolist() == [1] * n
            assert b.pos[i, real].tolist() == list(range(n))
            assert all(t == pad for t, m in zip(b.ids[i].tolist(), b.mask[i].tolist(), strict=True) if not m)


# ---------------------------------------------------------------- noise: random bytes and mutated documents


@st.composite
def noisy_inputs(draw):
    fmt = draw(st.sampled_from(["jsonl", "text", "csv", "parquet"]))
    how = draw(st.sampled_from(["bytes", "pieces", "mutated", "mutated"]))
    if how == "bytes":
        data = draw(st.binary(max_size=400))
    elif how == "pieces":
        data = b"\n".join(draw(st.lists(st.sampled_from(
            [b'{"text": "ok"}', b'{"text": ', b"\xff\xfe", b"[1, 2]", b'"s"', b'{"text": null}', b"", b"a,b",
             b"text", b'{"text": "\\u00e9"}', b"\r", b'"', b'"a\nb"', b"\x00", b"PAR1", b"\xef\xbb\xbf",
             b'{"text": "\\ud800"}']),
            max_size=12)))
    else:
        data = _mutate(draw, draw(DOCS[fmt]()).data)
    return fmt, data, draw(FIELDS), draw(st.sampled_from(["fail", "skip"]))


@fuzz(EXAMPLES["noise"])
@given(case=noisy_inputs())
def test_noise_reads_cleanly(case, tokenizer, tmp_path):
    fmt, data, field, on_error = case
    path = _write(Doc(fmt, data, field), tmp_path)
    skipped = []
    with no_hang():
        try:
            rows = list(read_rows(path, text_field=field, on_error=on_error))
            batches = list(make_batches(rows, tokenizer, 4, 16, source=str(path), on_error=on_error,
                                        on_skip=lambda r, why: skipped.append(r)))
        except DataError as exc:
            assert_clear(str(exc), path)
            return
    assert [r for r, _ in rows] == list(range(len(rows)))
    seen = sorted([r for b in batches for r in b.rows.tolist()] + skipped)
    assert seen == list(range(len(rows)))
    assert all(1 <= n <= 16 for b in batches for n in b.lengths.tolist())
    assert on_error == "skip" or not skipped


def test_random_bytes_through_the_job(tiny_models, tmp_path):
    import random

    rng = random.Random(3)
    data = tmp_path / "noise.jsonl"
    data.write_bytes(bytes(rng.randrange(256) for _ in range(3000)))
    proc = run_mpi(2, [str(ROOT / "jobs" / "infer.py"), f"model.path={tiny_models['gpt2']}", f"data.path={data}",
                       f"output.path={tmp_path / 'out.h5'}", "runtime.threads=1"], timeout=120, own_launch=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"error: {data}:1:" in proc.stderr
