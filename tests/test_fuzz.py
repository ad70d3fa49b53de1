"""Random bytes as the input file: a clean answer (rows, or a DataError naming the file), never a crash."""

from __future__ import annotations

import pytest
from conftest import ROOT, run_mpi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from nesa_hpc.data import DataError, make_batches, read_rows


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=400),
                      st.lists(st.sampled_from([b'{"text": "ok"}', b'{"text": ', b"\xff\xfe", b"[1, 2]", b'"s"',
                                                b'{"text": null}', b"", b"a,b", b'{"text": "\\u00e9"}', b"\r"]),
                               max_size=12).map(b"\n".join)),
       fmt=st.sampled_from(["jsonl", "text", "csv", "parquet"]), on_error=st.sampled_from(["fail", "skip"]))
def test_random_input_reads_cleanly(data, fmt, on_error, tokenizer, tmp_path):
    path = tmp_path / f"input.{ {'text': 'txt'}.get(fmt, fmt) }"
    path.write_bytes(data)
    skipped = []
    try:
        rows = read_rows(path, on_error=on_error)
        batches = list(make_batches(rows, tokenizer, 4, 16, source=str(path), on_error=on_error,
                                    on_skip=lambda r, why: skipped.append(r)))
    except DataError as exc:
        assert str(path) in str(exc)
        return
    seen = sorted([r for b in batches for r in b.rows.tolist()] + skipped)
    assert seen == list(range(len(seen)))
    assert all(1 <= n <= 16 for b in batches for n in b.lengths.tolist())
    assert on_error == "skip" or not skipped


def test_random_bytes_through_the_job(tiny_models, tmp_path):
    import random

    rng = random.Random(3)
    data = tmp_path / "noise.jsonl"
    data.write_bytes(bytes(rng.randrange(256) for _ in range(3000)))
    proc = run_mpi(2, [str(ROOT / "jobs" / "infer.py"), f"model.path={tiny_models['gpt2']}", f"data.path={data}",
                       f"output.path={tmp_path / 'out.h5'}", "runtime.threads=1"], timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"error: {data}:1:" in proc.stderr
