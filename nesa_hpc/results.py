"""HDF5 results: one file per job, rows in input order, flushed after every committed batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

__all__ = ["ResultWriter", "InOrder", "OutputExistsError", "ResumeMismatch", "read_results"]

_COMMON = {"row": (np.int64, ()), "n_tokens": (np.int32, ()), "truncated": (np.bool_, ())}


class OutputExistsError(FileExistsError):
    pass


def check_output_path(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing file unless ``overwrite``; check the folder is writable. Nothing is written."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output.path {path} already exists; pass output.overwrite=true to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"output.path {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"output.path {path}: folder {parent} is not writable")
    return path


class ResumeMismatch(ValueError):
    """``output.resume=true`` on a file written with a different configuration."""


class ResultWriter:
    """Appends per-row columns batch by batch; ``complete`` becomes True only in :meth:`close`.

    With ``resume=True`` and an existing file, the file is reopened instead: its ``resume_key``
    attribute must equal ``attrs["resume_key"]`` (else :class:`ResumeMismatch` names what differs), and
    appending continues after the rows it holds (:attr:`rows`). A file cut short by a kill between two
    datasets' writes is trimmed back to the rows every dataset holds.
    """

    def __init__(self, path: str | Path, columns: dict[str, tuple[type, tuple[int, ...]]], attrs: dict,
                 overwrite: bool = False, resume: bool = False) -> None:
        self.columns = {**_COMMON, **columns}
        self.path = Path(path)
        if resume and self.path.exists():
            self._reopen(attrs)
            return
        self.path = check_output_path(path, overwrite)
        if self.path.exists():
            self.path.unlink()
        self.file = h5py.File(self.path, "w")
        for name, (dtype, shape) in self.columns.items():
            chunk_rows = max(1, min(1024, (1 << 20) // max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)))
            self.file.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                     chunks=(chunk_rows, *shape))
        for key, value in attrs.items():
            self.file.attrs[key] = _attr(value)
        self.file.attrs["complete"] = False
        self.rows = 0
        self.resumed_rows = 0
        self.file.flush()

    def _reopen(self, attrs: dict) -> None:
        try:
            self.file = h5py.File(self.path, "r+")
        except OSError as exc:
            raise ResumeMismatch(f"output.path {self.path}: cannot reopen the file to resume ({exc}); move it "
                                 "away or pass output.overwrite=true") from None
        try:
            old = json.loads(self.file.attrs.get("resume_key", "{}"))
            new = attrs.get("resume_key", {})
            new = json.loads(new) if isinstance(new, str) else new
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff:
                parts = ", ".join(f"{k}: file has {old.get(k)!r}, this run {new.get(k)!r}" for k in diff)
                raise ResumeMismatch(f"output.path {self.path} was written with a different configuration "
                                     f"({parts}); resume with the same settings or pass output.overwrite=true")
            missing = [n for n in self.columns if n not in self.file]
            if missing:
                raise ResumeMismatch(f"output.path {self.path} lacks datasets {missing}: not a result file of "
                                     "this task")
            n = min(len(self.file[name]) for name in self.columns)
            if not np.array_equal(self.file["row"][:n], np.arange(n)):
                raise ResumeMismatch(f"output.path {self.path}: its `row` dataset is not 0..{n - 1} in order")
            for name in self.columns:  # a kill between two datasets' writes leaves them uneven
                self.file[name].resize(n, axis=0)
        except BaseException:
            self.file.close()
            raise
        for key, value in attrs.items():
            if key != "resume_key":
                self.file.attrs[key] = _attr(value)
        self.file.attrs["complete"] = False
        self.rows = self.resumed_rows = n
        self.file.flush()

    def append(self, values: dict[str, np.ndarray]) -> None:
        """Write one batch of rows (every column, same length) and flush."""
        n = len(values["row"])
        missing = set(self.columns) - set(values)
        if missing:
            raise KeyError(f"batch lacks columns {sorted(missing)}")
        for name in self.columns:
            ds = self.file[name]
            ds.resize(self.rows + n, axis=0)
            ds[self.rows:self.rows + n] = values[name]
        self.rows += n
        self.file.flush()

    def totals(self) -> dict:
        """Whole-file totals (rows committed by this run and any run it resumed): rows, tokens and, for
        scores, the dataset perplexity exp(sum nll_sum / sum n_tokens)."""
        out = {"rows": self.rows, "tokens": int(self.file["n_tokens"][()].sum())}
        if "nll_sum" in self.file:
            n = int(self.file["n_tokens"][()].sum())
            out["perplexity"] = float(np.exp(self.file["nll_sum"][()].sum() / n)) if n else float("nan")
            out["tokens"] = n
        return out

    def close(self, attrs: dict | None = None, complete: bool = True) -> None:
        for key, value in (attrs or {}).items():
            self.file.attrs[key] = _attr(value)
        self.file.attrs["complete"] = bool(complete)
        self.file.flush()
        self.file.close()

    def abort(self) -> None:
        """Close without marking complete (rows written so far stay readable)."""
        if self.file.id.valid:
            self.file.flush()
            self.file.close()


def _attr(value):
    if value is None:
        return "null"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return value


def read_results(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Load every dataset and root attribute of a results file."""
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f.keys()}, dict(f.attrs)


class InOrder:
    """Hands rows to ``write`` in input order when batches finish out of order (length bucketing).

    Rows are numbered 0, 1, 2, ... in input order; a finished batch's rows wait here until every earlier
    row has been written, so memory holds at most one bucketing window plus the batches in flight.
    """

    def __init__(self, write, first_row: int = 0) -> None:
        self.write = write
        self.next_row = first_row
        self.waiting: dict[int, tuple[dict[str, np.ndarray], int]] = {}

    def add(self, cols: dict[str, np.ndarray]) -> None:
        for i, r in enumerate(cols["row"].tolist()):
            self.waiting[r] = (cols, i)
        run = []
        while self.next_row in self.waiting:
            run.append(self.waiting.pop(self.next_row))
            self.next_row += 1
        if run:
            self.write({name: np.stack([c[name][i] for c, i in run]) for name in run[0][0]})

    @property
    def pending(self) -> int:
        return len(self.waiting)
