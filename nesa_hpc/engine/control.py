"""Job control on rank 0: stop signals, skipped-row hand-off and progress reporting."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

from ..io.results import InOrder
from . import stopsignal

__all__ = ["StopFlag", "SkipLog", "Progress"]

log = logging.getLogger("nesa_hpc")


class StopFlag:
    """SIGTERM / SIGUSR1 (Slurm before a time limit or preemption) set a flag instead of killing the rank:
    rank 0 then stops feeding batches, drains the pipeline, flushes and exits with EXIT_STOPPED.

    The signals are caught from the first line of the entry scripts (:mod:`nesa_hpc.engine.stopsignal`), so one
    that arrived during start-up counts too; a job run from Python (tests) is caught from here on."""

    def __init__(self) -> None:
        self._installed_here = stopsignal.received() is None and stopsignal._state["previous"] is None
        stopsignal.install()

    @property
    def signal(self) -> str | None:
        return stopsignal.received()

    def __call__(self) -> bool:
        return stopsignal.received() is not None

    def restore(self) -> None:
        """Restore the previous handlers if this flag installed them (a job run from Python, e.g. a test);
        an entry script's handlers stay until the process exits."""
        if self._installed_here:
            stopsignal.restore()


class SkipLog:
    """Rows the reader thread skipped, handed to the in-order writer on the main thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: list[tuple[int, str]] = []
        self.count = 0

    def add(self, row: int, reason: str) -> None:
        with self.lock:
            self.rows.append((row, reason))
            self.count += 1
            if self.count <= 20:
                log.warning("skipping row %d: %s", row, reason)
            elif self.count == 21:
                log.warning("more rows skipped; every one is listed in skipped_row / skipped_reason")

    def drain_into(self, ordered: InOrder) -> None:
        with self.lock:
            rows, self.rows = self.rows, []
        for row, reason in rows:
            ordered.skip(row, reason)


class Progress:
    """A tqdm bar on a terminal; otherwise a log line every ``every`` seconds: rows done, ``unit`` (tokens
    read, or for generation tokens generated) and their rate.

    ``count`` (rows to do, or None when unknown) runs in a background thread, so counting a large input
    file never delays the first batch; the total appears in the bar and log lines once known.
    """

    def __init__(self, every: float, count: Callable[[], int | None], unit: str = "tokens") -> None:
        self.every, self.total, self.unit = every, None, unit
        self.rows = self.tokens = 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="row", dynamic_ncols=True, file=sys.stderr)
        threading.Thread(target=self._count, args=(count,), name="nesa-count", daemon=True).start()

    def _count(self, count: Callable[[], int | None]) -> None:
        total = count()
        if total is not None:
            self.total = total
            if self.bar is not None:
                self.bar.total = total

    def update(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(rows)
            self.bar.set_postfix_str(f"{rate:.0f} {self.unit}/s")
        elif now - self.last >= self.every:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            log.info("progress: %d%s rows, %d %s, %.0f %s/s", self.rows, of, self.tokens, self.unit, rate, self.unit)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
