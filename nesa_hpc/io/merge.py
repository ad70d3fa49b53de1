"""Combine the result files of a sharded job (``data.num_shards > 1``) into one file in global input order."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from ..errors import UserError
from . import jsonfile
from .results import check_output_path

__all__ = ["MergeError", "merge_shards", "SHARD_KEYS"]

# resume_key entries that differ between the shards of one job; every other entry must match
SHARD_KEYS = ("num_shards", "shard", "shard_rows")
# attributes of a shard file that describe that shard only
_PER_SHARD_ATTRS = ("num_shards", "shard", "shard_rows", "seconds", "rank_stats", "peak_rss_mb", "padding_waste",
                    "stopped_by")
_COPY_ROWS = 1 << 16


class MergeError(UserError):
    """The shard files do not make one complete, consistent result; the message names the file."""


def _json(value):
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def _read_shard(path: Path) -> dict:
    try:
        f = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as exc:
        raise MergeError(f"{path}: cannot open as an HDF5 file ({exc})") from None
    with f:
        attrs = dict(f.attrs)
        if "resume_key" not in attrs or "row" not in f:
            raise MergeError(f"{path}: not a nesa_hpc result file (no resume_key attribute or row dataset)")
        if "shard" not in attrs:
            raise MergeError(f"{path}: not a shard: it was written without data.num_shards > 1")
        if not bool(attrs.get("complete", False)):
            raise MergeError(f"{path}: shard {attrs['shard']} is incomplete (complete=False, next_row="
                             f"{attrs.get('next_row')}); rerun that shard with output.resume=true first")
        start, stop = (int(x) for x in _json(attrs["shard_rows"]))
        datasets = {name: (f[name].dtype, f[name].shape[1:], f[name].chunks) for name in f.keys()}
        return {"path": path, "attrs": attrs, "key": _json(attrs["resume_key"]), "shard": int(attrs["shard"]),
                "num_shards": int(attrs["num_shards"]), "start": start, "stop": stop, "datasets": datasets,
                "rows": f["row"][()], "skipped": f["skipped_row"][()]}


def _check(shards: list[dict]) -> None:
    """Same job, every shard exactly once, and every input row of every shard exactly once."""
    first = shards[0]
    common = {k: v for k, v in first["key"].items() if k not in SHARD_KEYS}
    for s in shards[1:]:
        other = {k: v for k, v in s["key"].items() if k not in SHARD_KEYS}
        diff = sorted(k for k in set(common) | set(other) if common.get(k) != other.get(k))
        if diff:
            parts = ", ".join(f"{k}: {common.get(k)!r} vs {other.get(k)!r}" for k in diff)
            raise MergeError(f"{s['path']} was written with other settings than {first['path']} ({parts})")
        if s["num_shards"] != first["num_shards"]:
            raise MergeError(f"{s['path']} is shard {s['shard']} of {s['num_shards']}, but {first['path']} is "
                             f"shard {first['shard']} of {first['num_shards']}")
        if s["datasets"].keys() != first["datasets"].keys() or any(
                s["datasets"][n][:2] != first["datasets"][n][:2] for n in s["datasets"]):
            raise MergeError(f"{s['path']}: its datasets differ from those of {first['path']}")
    seen: dict[int, Path] = {}
    for s in shards:
        if s["shard"] in seen:
            raise MergeError(f"shard {s['shard']} appears twice: {seen[s['shard']]} and {s['path']}")
        seen[s["shard"]] = s["path"]
    missing = sorted(set(range(first["num_shards"])) - set(seen))
    if missing:
        raise MergeError(f"shards {missing} of data.num_shards={first['num_shards']} are missing (got "
                         f"{', '.join(str(s['path']) for s in shards)})")
    expected_start = 0
    for s in sorted(shards, key=lambda s: s["shard"]):
        if s["start"] != expected_start:
            raise MergeError(f"{s['path']}: shard {s['shard']} covers input rows [{s['start']}, {s['stop']}), "
                             f"but the previous shard ends at row {expected_start}")
        expected_start = s["stop"]
        _check_rows(s)


def _check_rows(s: dict) -> None:
    """The shard's written and skipped rows are exactly its input rows [start, stop), in order."""
    rows, skipped, path = s["rows"], s["skipped"], s["path"]
    for name, values in (("row", rows), ("skipped_row", skipped)):
        if len(values) and np.any(np.diff(values) <= 0):
            i = int(np.argmax(np.diff(values) <= 0))
            what = "twice" if values[i] == values[i + 1] else "out of order"
            raise MergeError(f"{path}: input row {int(values[i + 1])} appears {what} in `{name}`")
    both = np.intersect1d(rows, skipped)
    if len(both):
        raise MergeError(f"{path}: input row {int(both[0])} is both in `row` and in `skipped_row`")
    have = np.union1d(rows, skipped)
    outside = have[(have < s["start"]) | (have >= s["stop"])]
    if len(outside):
        raise MergeError(f"{path}: input row {int(outside[0])} lies outside the shard's rows "
                         f"[{s['start']}, {s['stop']})")
    if len(have) != s["stop"] - s["start"]:
        gap = np.setdiff1d(np.arange(s["start"], s["stop"]), have)
        raise MergeError(f"{path}: input row {int(gap[0])} is missing ({len(gap)} rows of [{s['start']}, "
                         f"{s['stop']}) are neither in `row` nor in `skipped_row`)")


def merge_shards(paths: list[str | Path], output: str | Path, overwrite: bool = False) -> dict:
    """Check the shard files and write one result file with every row in global input order.

    The datasets of the merged file equal those of the same job run unsharded; its attributes are the
    first shard's, with totals recomputed over all rows, ``resume_key`` without the shard entries,
    ``merged_from`` listing the shard files, ``seconds`` summed (``shard_seconds`` per shard), ``rank_stats``
    and ``peak_rss_mb`` of every shard's ranks (each entry with its ``shard``), and ``padding_waste``
    averaged over shards weighted by rows.
    Returns the totals written.
    """
    if not paths:
        raise MergeError("no shard files given")
    output = check_output_path(output, overwrite, "output", "--overwrite")
    shards = [_read_shard(Path(p)) for p in paths]
    _check(shards)
    shards.sort(key=lambda s: s["shard"])
    if any(output.resolve() == s["path"].resolve() for s in shards):
        raise MergeError(f"{output}: the merged file cannot be one of the shard files")
    first = shards[0]
    tmp = output.with_name(f".{output.name}.merging")
    try:
        with h5py.File(tmp, "w") as out:
            for name, (dtype, shape, chunks) in first["datasets"].items():
                out.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                   chunks=chunks or True)
            for s in shards:
                with h5py.File(s["path"], "r") as f:
                    for name in first["datasets"]:
                        _append(out[name], f[name])
            totals = _totals(out, shards)
            attrs = {k: v for k, v in first["attrs"].items() if k not in _PER_SHARD_ATTRS}
            key = {k: v for k, v in first["key"].items() if k not in SHARD_KEYS}
            stats = [dict(r, shard=s["shard"]) for s in shards for r in _json(s["attrs"].get("rank_stats", "[]"))]
            rows = [len(s["rows"]) for s in shards]
            waste = sum(float(s["attrs"].get("padding_waste", 0.0)) * n for s, n in zip(shards, rows, strict=True))
            attrs.update(totals, resume_key=jsonfile.dumps(key), next_row=shards[-1]["stop"], complete=True,
                         merged_from=jsonfile.dumps([str(s["path"]) for s in shards]),
                         seconds=sum(float(s["attrs"].get("seconds", 0.0)) for s in shards),
                         shard_seconds=jsonfile.dumps([float(s["attrs"].get("seconds", 0.0)) for s in shards]),
                         rank_stats=jsonfile.dumps(stats),
                         peak_rss_mb=jsonfile.dumps([r["peak_rss_mb"] for r in stats]),
                         padding_waste=waste / max(1, sum(rows)))
            for k, v in attrs.items():
                out.attrs[k] = v
        tmp.replace(output)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"rows": totals["rows"], "skipped": totals["skipped"], "shards": len(shards), "output": str(output)}


def _append(target: h5py.Dataset, source: h5py.Dataset) -> None:
    n = len(source)
    at = len(target)
    target.resize(at + n, axis=0)
    for i in range(0, n, _COPY_ROWS):
        target[at + i:at + min(n, i + _COPY_ROWS)] = source[i:i + _COPY_ROWS]


def _totals(out: h5py.File, shards: list[dict]) -> dict:
    n_tokens = int(out["n_tokens"][()].sum())
    totals = {"rows": len(out["row"]), "skipped": len(out["skipped_row"]), "tokens": n_tokens}
    if "nll_sum" in out:
        totals["perplexity"] = float(np.exp(out["nll_sum"][()].sum() / n_tokens)) if n_tokens else float("nan")
    if "epsilon_spent" in out:  # the privacy ledger's worst row over every shard
        eps = out["epsilon_spent"][()]
        totals["privacy_epsilon_spent"] = float(eps.max()) if len(eps) else 0.0
        totals["privacy_releases"] = max(int(s["attrs"].get("privacy_releases", 0)) for s in shards)
    return totals
