"""Bad rows get a clear answer: fail naming file and line, or skip and record the reason."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import ROOT, run_mpi
from transformers import AutoTokenizer

from nesa_hpc.io.batch import make_batches
from nesa_hpc.io.read import DataError, RowError, read_rows
from nesa_hpc.io.results import ResultWriter, ResumeMismatch

INFER = str(ROOT / "jobs" / "infer.py")


def _bad_file(tmp_path):
    lines = [json.dumps({"text": "a good first row"}).encode(),
             b'{"text": "broken',                                   # 1: malformed JSON
             json.dumps({"body": "no text field"}).encode(),        # 2: missing field
             json.dumps({"text": 42}).encode(),                     # 3: not a string
             b'{"text": "bad \xff utf8"}',                          # 4: invalid UTF-8
             json.dumps({"text": ""}).encode(),                     # 5: empty text
             json.dumps({"text": "word " * 200}).encode(),          # 6: too long for max_length=32
             json.dumps({"text": "a good last row"}).encode()]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_reader_yields_row_errors_when_skipping(tmp_path):
    path = _bad_file(tmp_path)
    rows = list(read_rows(path, on_error="skip"))
    assert [r for r, _ in rows] == list(range(8))
    reasons = {r: v.reason for r, v in rows if isinstance(v, RowError)}
    assert set(reasons) == {1, 2, 3, 4}
    assert f"{path}:2: malformed JSON" in reasons[1]
    assert "missing field 'text'" in reasons[2] and "must be a string, got int" in reasons[3]
    assert "invalid UTF-8" in reasons[4]
    with pytest.raises(DataError, match=f"{path}:2: malformed JSON"):
        list(read_rows(path))


def test_make_batches_skips_empty_and_long_rows(tmp_path, minilm_path):
    tok = AutoTokenizer.from_pretrained(minilm_path)
    rows = [(0, "fine"), (1, ""), (2, "word " * 100), (3, "also fine")]
    skipped = []
    batches = list(make_batches(iter(rows), tok, 4, 32, on_error="skip", on_long="skip",
                                on_skip=lambda r, why: skipped.append((r, why))))
    assert [b.rows.tolist() for b in batches] == [[0, 3]]
    assert [r for r, _ in skipped] == [1, 2]
    assert "the text is empty" in skipped[0][1] and "longer than data.max_length=32" in skipped[1][1]
    with pytest.raises(DataError, match="row 2: 102 tokens, longer than data.max_length=32"):
        list(make_batches(iter(rows[2:]), tok, 4, 32, on_long="fail"))
    with pytest.raises(DataError, match="row 1: the text is empty"):
        list(make_batches(iter(rows), tok, 4, 32))


def test_job_skips_bad_rows_and_records_why(tiny_models, tmp_path):
    out = tmp_path / "out.h5"
    proc = run_mpi(2, [INFER, f"model.path={tiny_models['llama']}", f"data.path={_bad_file(tmp_path)}",
                       f"output.path={out}", "data.on_error=skip", "data.on_long=skip", "data.max_length=32",
                       "runtime.threads=1"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 rows skipped" in proc.stderr and "skipping row 1:" in proc.stderr
    with h5py.File(out) as f:
        assert f["row"][()].tolist() == [0, 7]
        assert f["skipped_row"][()].tolist() == [1, 2, 3, 4, 5, 6]
        reasons = [r.decode() for r in f["skipped_reason"][()]]
        assert "malformed JSON" in reasons[0] and "longer than data.max_length=32" in reasons[5]
        assert f.attrs["complete"] == True and f.attrs["skipped"] == 6 and f.attrs["next_row"] == 8  # noqa: E712


@pytest.mark.parametrize("content, expected", [
    (b"", "has no usable rows"),
    (b'{"text": "fine"}\n{"text": "word word word word word word word word word word"}\n',
     "row 1: 12 tokens, longer than data.max_length=8 (data.on_long=fail)"),
])
def test_job_fails_cleanly(content, expected, tiny_models, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(content)
    proc = run_mpi(2, [INFER, f"model.path={tiny_models['gpt2']}", f"data.path={data}",
                       f"output.path={tmp_path / 'out.h5'}", "data.on_long=fail", "data.max_length=8",
                       "runtime.threads=1"], timeout=120, own_launch=bool(content))  # a row refused mid-run
    assert proc.returncode != 0                                     # ends every rank with an MPI abort
    assert expected in proc.stderr, proc.stderr[-3000:]


def test_reopen_trims_rows_past_next_row(tmp_path):
    path = tmp_path / "out.h5"
    cols = {"nll_sum": (np.float64, ())}
    key = {"resume_key": {"task": "score"}}
    w = ResultWriter(path, cols, key)
    w.commit({"row": np.array([0, 1]), "n_tokens": np.array([3, 4]), "truncated": np.array([False, False]),
              "nonfinite": np.array([False, False]), "nll_sum": np.array([1.0, 2.0])}, [(2, "bad")], 3)
    w.abort()
    with h5py.File(path, "r+") as f:  # as if killed after writing row 3 but before next_row moved
        for name, value in (("row", 3), ("n_tokens", 5), ("truncated", False), ("nonfinite", False),
                            ("nll_sum", 3.0)):
            f[name].resize(3, axis=0)
            f[name][2] = value
    again = ResultWriter(path, cols, key, resume=True)
    assert (again.next_row, again.rows, again.skipped) == (3, 2, 1)
    again.abort()
    with h5py.File(path) as f:
        assert f["row"][()].tolist() == [0, 1] and f["skipped_row"][()].tolist() == [2]
    with pytest.raises(ResumeMismatch, match="task: file has 'score', this run 'embed'"):
        ResultWriter(path, cols, {"resume_key": {"task": "embed"}}, resume=True)
