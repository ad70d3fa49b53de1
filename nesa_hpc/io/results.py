"""HDF5 results: one file per job, rows in input order, flushed after every committed batch."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from ..errors import UserError
from . import jsonfile

__all__ = ["ResultWriter", "InOrder", "OutputExistsError", "ResumeMismatch", "ResultWriteError", "read_results"]

_COMMON = {"row": (np.int64, ()), "n_tokens": (np.int32, ()), "truncated": (np.bool_, ()),
           "nonfinite": (np.bool_, ())}
_SKIPPED = {"skipped_row": (np.int64, ()), "skipped_reason": (h5py.string_dtype(), ())}


class OutputExistsError(FileExistsError):
    pass


def check_output_path(path: str | Path, overwrite: bool, name: str = "output.path",
                      replace: str = "output.overwrite=true") -> Path:
    """Refuse an existing file unless ``overwrite``; check the folder is writable. Nothing is written.
    ``name`` and ``replace`` are how the caller's user names the path and the switch that replaces it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{name} {path} already exists{leftover(path)}; pass {replace} to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{name} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{name} {path}: folder {parent} is not writable")
    return path


def leftover(path: Path | h5py.File) -> str:
    """What a user should know of an existing results file (a path, or the file open) before replacing or
    resuming it: whether it is the incomplete leftover of a run that stopped or failed, and how many rows it
    holds ("" if it is complete or not a results file)."""
    if isinstance(path, h5py.File):
        if "row" not in path or path.attrs.get("complete", True):
            return ""
        rows = len(path["row"])
        what = "committed no row" if rows == 0 else f"committed {rows} rows"
        return f" (an incomplete results file: its run stopped or failed and {what})"
    try:
        with h5py.File(path, "r") as f:
            return leftover(f)
    except OSError:
        return ""


class ResultWriteError(UserError):
    """The results file could not be written (disk full, I/O error)."""


class ResumeMismatch(UserError):
    """``output.resume=true`` on a file written with a different configuration."""


class ResultWriter:
    """Writes per-row columns as batches commit; ``complete`` becomes True only in :meth:`close`.

    Besides the task's columns the file holds ``skipped_row`` / ``skipped_reason`` (rows left out by
    ``data.on_error=skip`` or ``data.on_long=skip``) and the root attribute ``next_row``: every input
    row before it is either in ``row`` or in ``skipped_row``. With ``resume=True`` and an existing file,
    the file is reopened instead: its ``resume_key`` attribute must equal ``attrs["resume_key"]`` (else
    :class:`ResumeMismatch` names what differs), rows a kill left beyond ``next_row`` are trimmed, and
    writing continues from ``next_row``. A shard's file holds the rows from ``first_row`` on (its first
    input row), and ``next_row`` counts from there.
    """

    def __init__(self, path: str | Path, columns: dict[str, tuple[type, tuple[int, ...]]], attrs: dict,
                 overwrite: bool = False, resume: bool = False, first_row: int = 0,
                 verify: Callable[[dict[int, bytes]], None] | None = None) -> None:
        self.columns = {**_COMMON, **columns}
        self.verify = verify  # on resume: called with the committed rows' `row_digest`, before the file is changed
        self.path = Path(path)
        self.reopened = bool(resume and self.path.exists())
        if self.reopened:
            self._reopen(attrs, first_row)
            return
        self.path = check_output_path(path, overwrite)
        if self.path.exists():
            self.path.unlink()
        self.file = h5py.File(self.path, "w")
        for name, (dtype, shape) in {**self.columns, **_SKIPPED}.items():
            chunk_rows = max(1, min(1024, (1 << 20) // max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)))
            self.file.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                     chunks=(chunk_rows, *shape))
        for key, value in attrs.items():
            self.file.attrs[key] = _attr(value)
        self.file.attrs["run_id"] = uuid.uuid4().hex  # this file's own id (kept on resume): export ids use it
        self.file.attrs["complete"] = False
        self.file.attrs["next_row"] = first_row
        self.rows = self.skipped = 0
        self.next_row = first_row
        self.resumed_rows = 0
        self.was_complete = False
        self.file.flush()

    def _reopen(self, attrs: dict, first_row: int) -> None:
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
                raise ResumeMismatch(f"output.path {self.path}{leftover(self.file)} was written with a different "
                                     f"configuration ({parts}); resume with the same settings or pass "
                                     "output.overwrite=true")
            missing = [n for n in {**self.columns, **_SKIPPED} if n not in self.file]
            if missing or "next_row" not in self.file.attrs:
                raise ResumeMismatch(f"output.path {self.path} is not a nesa_hpc result file of this task "
                                     f"(missing {missing or 'the next_row attribute'})")
            next_row = int(self.file.attrs["next_row"])
            n = min(len(self.file[name]) for name in self.columns)
            rows = self.file["row"][:n]
            if n and np.any(np.diff(rows) <= 0):
                raise ResumeMismatch(f"output.path {self.path}: its `row` dataset is not in input order")
            # a kill between a commit's writes and its `next_row` update leaves rows past next_row: drop them
            n = int(np.searchsorted(rows, next_row))
            if self.verify is not None and n and "row_digest" in self.file:
                self.verify(dict(zip(rows[:n].tolist(), map(bytes, self.file["row_digest"][:n]), strict=True)))
            for name in self.columns:
                self.file[name].resize(n, axis=0)
            m = min(len(self.file[name]) for name in _SKIPPED)
            m = int(np.searchsorted(self.file["skipped_row"][:m], next_row))
            for name in _SKIPPED:
                self.file[name].resize(m, axis=0)
        except BaseException:
            self.file.close()
            raise
        self.was_complete = bool(self.file.attrs.get("complete", False))
        for key, value in attrs.items():
            if key != "resume_key":
                self.file.attrs[key] = _attr(value)
        self.file.attrs["complete"] = False
        self.rows, self.skipped, self.next_row = n, m, next_row
        self.resumed_rows = next_row - first_row
        self.file.flush()

    def commit(self, values: dict[str, np.ndarray] | None, skipped: list[tuple[int, str]], next_row: int) -> None:
        """Write one run of rows (task columns and/or skipped rows), then advance ``next_row`` and flush.

        A failed write (disk full, quota, I/O error) raises :class:`ResultWriteError`; ``next_row`` is
        only advanced after the rows are written, so a resumed run redoes the rows of the failed commit.
        """
        try:
            self._commit(values, skipped, next_row)
        except (OSError, RuntimeError) as exc:  # h5py reports a failed write or flush as either
            raise ResultWriteError(f"output.path {self.path}: cannot write rows up to input row {next_row - 1} "
                                   f"({exc}); rows committed before stay readable, and output.resume=true "
                                   "continues once there is room") from None

    def _commit(self, values, skipped, next_row) -> None:
        if values is not None and len(values["row"]):
            missing = set(self.columns) - set(values)
            if missing:
                raise KeyError(f"batch lacks columns {sorted(missing)}")
            n = len(values["row"])
            for name in self.columns:
                ds = self.file[name]
                ds.resize(self.rows + n, axis=0)
                if h5py.check_vlen_dtype(ds.dtype) not in (None, str, bytes):
                    # variable-length arrays one by one: h5py reads equal-length ones as a 2-D block
                    for j, v in enumerate(values[name]):
                        ds[self.rows + j] = v
                else:
                    ds[self.rows:self.rows + n] = values[name]
            self.rows += n
        if skipped:
            n = len(skipped)
            for name, data in (("skipped_row", [r for r, _ in skipped]), ("skipped_reason", [w for _, w in skipped])):
                ds = self.file[name]
                ds.resize(self.skipped + n, axis=0)
                ds[self.skipped:self.skipped + n] = data
            self.skipped += n
        # the rows reach the disk before `next_row` moves past them: a write that fails (disk full) or a
        # kill in between leaves next_row behind, and reopening trims whatever lies beyond it
        self.file.flush()
        self.file.attrs["next_row"] = next_row
        self.file.flush()
        self.next_row = next_row

    def set_attrs(self, attrs: dict) -> None:
        """Record root attributes now (flushed)."""
        for key, value in attrs.items():
            self.file.attrs[key] = _attr(value)
        self.file.flush()

    def append(self, values: dict[str, np.ndarray]) -> None:
        """Write rows that directly follow everything written so far (no skipped rows) and flush."""
        self.commit(values, [], int(values["row"][-1]) + 1 if len(values["row"]) else self.next_row)

    def totals(self) -> dict:
        """Whole-file totals (rows committed by this run and any run it resumed): rows, skipped, tokens
        and, for scores, the dataset perplexity exp(sum nll_sum / sum n_tokens)."""
        n = int(self.file["n_tokens"][()].sum())
        out = {"rows": self.rows, "skipped": self.skipped, "tokens": n}
        if "nll_sum" in self.file:
            out["perplexity"] = float(np.exp(self.file["nll_sum"][()].sum() / n)) if n else float("nan")
        return out

    def close(self, attrs: dict | None = None, complete: bool = True) -> None:
        for key, value in (attrs or {}).items():
            self.file.attrs[key] = _attr(value)
        self.file.attrs["complete"] = bool(complete)
        self.file.flush()
        self.file.close()

    def abort(self) -> None:
        """Close without marking complete (rows written so far stay readable); never raises, since it
        runs on the way out of another error (a full disk makes the final flush fail too)."""
        if self.file.id.valid:
            try:
                self.file.flush()
            except (OSError, RuntimeError):
                pass
            try:
                self.file.close()
            except (OSError, RuntimeError):
                pass

    def discard(self) -> None:
        """Close, and delete the file if this run created it and wrote no row (a failed start-up)."""
        self.abort()
        if self.resumed_rows == 0 and self.rows == 0 and self.skipped == 0 and self.path.exists():
            self.path.unlink()


def _attr(value):
    if value is None:
        return "null"
    if isinstance(value, (dict, list, tuple)):
        return jsonfile.dumps(value)
    return value


def _gather(items: list, dtype) -> np.ndarray:
    """Stack per-row values; values of a variable-length column (token ids, strings) go into an object array."""
    if dtype is not None and np.dtype(dtype) == object:
        out = np.empty(len(items), dtype=object)
        for i, x in enumerate(items):
            out[i] = x
        return out
    return np.stack(items)


def read_results(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Load every dataset and root attribute of a results file."""
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f.keys()}, dict(f.attrs)


class InOrder:
    """Commits rows to a :class:`ResultWriter` in input order when batches finish out of order.

    Rows are numbered 0, 1, 2, ... in input order; a finished (or skipped) row waits here until every
    earlier row is finished or skipped, so memory holds at most one bucketing window plus the batches in
    flight. Rows before ``keep_from`` (already in the file when resuming) are passed over, not written.
    """

    _SKIP = object()

    def __init__(self, writer: ResultWriter, first_row: int = 0, keep_from: int = 0) -> None:
        self.writer = writer
        self.next_row = first_row
        self.keep_from = keep_from
        self.waiting: dict[int, tuple] = {}

    def add(self, cols: dict[str, np.ndarray]) -> None:
        for i, r in enumerate(cols["row"].tolist()):
            self.waiting[r] = (cols, i)
        self._flush()

    def skip(self, row: int, reason: str) -> None:
        self.waiting[row] = (self._SKIP, reason)
        self._flush()

    def _flush(self) -> None:
        done, skipped = [], []
        while self.next_row in self.waiting:
            item = self.waiting.pop(self.next_row)
            if self.next_row >= self.keep_from:
                if item[0] is self._SKIP:
                    skipped.append((self.next_row, item[1]))
                else:
                    done.append(item)
            self.next_row += 1
        if done or skipped:
            kinds = getattr(self.writer, "columns", {})
            values = {name: _gather([c[name][i] for c, i in done], kinds.get(name, (None,))[0])
                      for name in done[0][0]} if done else None
            self.writer.commit(values, skipped, self.next_row)

    @property
    def pending(self) -> int:
        return len(self.waiting)
