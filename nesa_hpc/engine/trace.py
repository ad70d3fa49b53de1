"""A timeline of every rank's work (``runtime.trace``): what each rank computed and when it waited.

With ``runtime.trace=PATH`` every rank records spans as it works (its compute per message or lane step, its
waits for input and for sends to complete) and at the end of the job rank 0 writes them all to ``PATH`` in
the Chrome trace-event format (JSON), which Perfetto (https://ui.perfetto.dev) and ``chrome://tracing`` open:
one process per rank, times in microseconds since the job's first span. Ranks on one host share a clock;
across hosts the timeline is as good as the hosts' clock synchronisation (spans of one rank are exact).

Without the option nothing is recorded (each recording point is one check of a module flag).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

__all__ = ["start", "span", "take", "write"]

_events: list[tuple] | None = None  # (name, category, start, end, args) in time.perf_counter() seconds
_offset = 0.0                       # time.time() - time.perf_counter(): spans on the wall clock


def start() -> None:
    """Record spans from now on in this process."""
    global _events, _offset
    _events = []
    _offset = time.time() - time.perf_counter()


def span(name: str, category: str, t0: float, t1: float, **args) -> None:
    """Record one span from ``t0`` to ``t1`` (``time.perf_counter()`` seconds), when recording."""
    if _events is not None:
        _events.append((name, category, t0, t1, args))


def take() -> list[dict] | None:
    """This process's spans as trace events on the wall clock (microseconds), or None when not recording."""
    if _events is None:
        return None
    return [{"name": name, "cat": cat, "ph": "X", "ts": (t0 + _offset) * 1e6, "dur": (t1 - t0) * 1e6,
             "args": args} for name, cat, t0, t1, args in _events]


def write(path: str | Path, ranks: list[tuple[int, str, list[dict]]]) -> None:
    """Write every rank's events ``(rank, host, events)`` to ``path`` (Chrome trace-event JSON), times from the
    first event; written to a temporary file first, then moved into place."""
    first = min((e["ts"] for _, _, events in ranks for e in events), default=0.0)
    out = []
    for rank, host, events in ranks:
        out.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                    "args": {"name": f"rank {rank} ({host})"}})
        out.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        for e in events:
            out.append({**e, "ts": round(e["ts"] - first, 1), "dur": round(e["dur"], 1), "pid": rank, "tid": 0})
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"traceEvents": out, "displayTimeUnit": "ms"}, allow_nan=False))
    tmp.replace(path)
