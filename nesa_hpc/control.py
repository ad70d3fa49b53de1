"""Job control on rank 0: stop signals, skipped-row hand-off and progress reporting."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable

from .results import InOrder

__all__ = ["StopFlag", "SkipLog", "Progress"]

log = logging.getLogger("nesa_hpc")


class StopFlag:
    """SIGTERM / SIGUSR1 (Slurm before a time limit or preemption) set a flag instead of killing the rank:
    rank 0 then stops feeding batches, drains the pipeline, flushes and exits with EXIT_STOPPED."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def __call__(self) -> bool:
        return self.signal is not None

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


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
    """A tqdm bar on a terminal; otherwise a log line every ``every`` seconds.

    ``count`` (rows to do, or None when unknown) runs in a background thread, so counting a large input
    file never delays the first batch; the total appears in the bar and log lines once known.
    """

    def __init__(self, every: float, count: Callable[[], int | None]) -> None:
        self.every, self.total = every, None
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
            self.bar.set_postfix_str(f"{rate:.0f} tok/s")
        elif now - self.last >= self.every:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            log.info("progress: %d%s rows, %d tokens, %.0f tokens/s", self.rows, of, self.tokens, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
