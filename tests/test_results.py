"""Unit tests for nesa_hpc.io.results: the HDF5 results file written batch by batch."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from nesa_hpc.io.results import OutputExistsError, ResultWriter, check_output_path, read_results

COLUMNS = {"nll": (np.float64, ()), "embedding": (np.float32, (4,))}


def _batch(start: int, n: int) -> dict[str, np.ndarray]:
    rows = np.arange(start, start + n, dtype=np.int64)
    return {
        "row": rows,
        "n_tokens": (rows + 3).astype(np.int32),
        "truncated": rows % 2 == 0,
        "nonfinite": np.zeros(len(rows), dtype=bool),
        "nll": rows * 0.5,
        "embedding": np.stack([rows + j for j in range(4)], axis=1).astype(np.float32),
    }


def test_datasets_dtypes_and_shapes(tmp_path):
    path = tmp_path / "out.h5"
    writer = ResultWriter(path, COLUMNS, {"task": "embed"})
    try:
        with h5py.File(path, "r") as f:
            assert set(f.keys()) == {"row", "n_tokens", "truncated", "nonfinite", "nll", "embedding",
                                     "skipped_row", "skipped_reason"}
            assert f["skipped_row"].dtype == np.int64 and f.attrs["next_row"] == 0
            assert f["row"].dtype == np.int64
            assert f["n_tokens"].dtype == np.int32
            assert f["truncated"].dtype == np.bool_
            assert f["nll"].dtype == np.float64
            assert f["embedding"].dtype == np.float32
            assert f["row"].shape == (0,)
            assert f["embedding"].shape == (0, 4)
            assert f["embedding"].maxshape == (None, 4)
            assert f["nll"].maxshape == (None,)
            assert bool(f.attrs["complete"]) is False
            assert f.attrs["task"] == "embed"
    finally:
        writer.close()


def test_append_across_batches_and_complete_flag(tmp_path):
    path = tmp_path / "out.h5"
    writer = ResultWriter(path, COLUMNS, {"task": "embed", "world_size": 3})
    writer.append(_batch(0, 3))
    writer.append(_batch(3, 2))
    assert writer.rows == 5
    # flushed after every batch: another reader sees the rows, not yet complete
    data, attrs = read_results(path)
    assert data["row"].tolist() == [0, 1, 2, 3, 4]
    assert bool(attrs["complete"]) is False
    writer.close(attrs={"perplexity": 12.5})

    data, attrs = read_results(path)
    expected = {k: np.concatenate([_batch(0, 3)[k], _batch(3, 2)[k]]) for k in _batch(0, 1)}
    assert set(data) == set(expected) | {"skipped_row", "skipped_reason"}
    assert len(data["skipped_row"]) == 0 and attrs["next_row"] == 5
    for name, values in expected.items():
        np.testing.assert_array_equal(data[name], values)
        assert data[name].dtype == values.dtype
    assert data["embedding"].shape == (5, 4)
    assert bool(attrs["complete"]) is True
    assert attrs["task"] == "embed"
    assert attrs["world_size"] == 3
    assert attrs["perplexity"] == pytest.approx(12.5)


def test_close_without_complete(tmp_path):
    path = tmp_path / "out.h5"
    writer = ResultWriter(path, {}, {})
    writer.append({"row": np.array([0]), "n_tokens": np.array([1]), "truncated": np.array([False]),
                   "nonfinite": np.array([False])})
    writer.close(complete=False)
    data, attrs = read_results(path)
    assert bool(attrs["complete"]) is False
    assert data["row"].tolist() == [0]


def test_abort_keeps_rows_written_so_far(tmp_path):
    path = tmp_path / "out.h5"
    writer = ResultWriter(path, COLUMNS, {"task": "embed"})
    writer.append(_batch(0, 4))
    writer.abort()
    writer.abort()  # a second abort is harmless
    data, attrs = read_results(path)
    assert data["row"].tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(data["embedding"], _batch(0, 4)["embedding"])
    assert bool(attrs["complete"]) is False


def test_abort_after_close_keeps_complete(tmp_path):
    path = tmp_path / "out.h5"
    writer = ResultWriter(path, COLUMNS, {})
    writer.append(_batch(0, 1))
    writer.close()
    writer.abort()
    _, attrs = read_results(path)
    assert bool(attrs["complete"]) is True


def test_append_missing_column(tmp_path):
    writer = ResultWriter(tmp_path / "out.h5", COLUMNS, {})
    try:
        batch = _batch(0, 2)
        del batch["nll"]
        with pytest.raises(KeyError, match="nll"):
            writer.append(batch)
        assert writer.rows == 0
    finally:
        writer.close()


def test_existing_path_without_overwrite(tmp_path):
    path = tmp_path / "out.h5"
    path.write_bytes(b"precious results")
    with pytest.raises(OutputExistsError, match="already exists") as exc:
        ResultWriter(path, COLUMNS, {})
    assert str(path) in str(exc.value)
    assert path.read_bytes() == b"precious results"
    assert issubclass(OutputExistsError, FileExistsError)


def test_existing_path_with_overwrite(tmp_path):
    path = tmp_path / "out.h5"
    first = ResultWriter(path, COLUMNS, {"run": 1})
    first.append(_batch(0, 5))
    first.close()
    second = ResultWriter(path, COLUMNS, {"run": 2}, overwrite=True)
    second.append(_batch(10, 1))
    second.close()
    data, attrs = read_results(path)
    assert data["row"].tolist() == [10]
    assert attrs["run"] == 2


def test_missing_folder(tmp_path):
    path = tmp_path / "missing" / "out.h5"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ResultWriter(path, COLUMNS, {})
    assert not path.parent.exists()


def test_check_output_path_writes_nothing(tmp_path):
    path = tmp_path / "out.h5"
    assert check_output_path(path, overwrite=False) == path
    assert not path.exists()


def test_attrs_json_encoding(tmp_path):
    path = tmp_path / "out.h5"
    attrs = {"ranges": [[0, 2], [2, 6]], "settings": {"k": 2, "head": "owner"}, "counts": (1, 2),
             "nothing": None, "name": "x", "flag": True}
    writer = ResultWriter(path, {}, attrs)
    writer.close(attrs={"timings": {"total_s": 1.5}})
    _, got = read_results(path)
    for key in ("ranges", "settings", "counts", "timings"):
        assert isinstance(got[key], str), key
    assert json.loads(got["ranges"]) == [[0, 2], [2, 6]]
    assert json.loads(got["settings"]) == {"k": 2, "head": "owner"}
    assert json.loads(got["counts"]) == [1, 2]
    assert json.loads(got["timings"]) == {"total_s": 1.5}
    assert got["nothing"] == "null"
    assert got["name"] == "x"
    assert bool(got["flag"]) is True


def test_read_results_empty_file(tmp_path):
    path = tmp_path / "out.h5"
    ResultWriter(path, COLUMNS, {}).close()
    data, attrs = read_results(path)
    assert data["row"].shape == (0,)
    assert data["embedding"].shape == (0, 4)
    assert bool(attrs["complete"]) is True


def test_large_row_columns_get_valid_chunks(tmp_path):
    # a row bigger than the 1 MiB chunk budget still gets at least one row per chunk
    path = tmp_path / "out.h5"
    writer = ResultWriter(path, {"big": (np.float32, (300_000,))}, {})
    try:
        assert writer.file["big"].chunks == (1, 300_000)
        assert writer.file["row"].chunks[0] == 1024
    finally:
        writer.close()
