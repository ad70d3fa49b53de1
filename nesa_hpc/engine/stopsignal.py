"""The stop signals, caught from the first line of a job's entry script.

``jobs/infer.py`` and ``jobs/train.py`` call :func:`install` before importing anything slow (Hydra,
torch, transformers, MPI), so a SIGTERM or SIGUSR1 (Slurm before a time limit, or at preemption) that
arrives while a rank imports, loads weights or connects only sets a flag, like one that arrives later:
the job then stops cleanly with exit 75. Only the standard library is imported here.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["SIGNALS", "install", "received", "restore", "ignore"]

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_state: dict = {"signal": None, "previous": None}


def _handle(signum, frame) -> None:
    if _state["signal"] is None:  # the first one counts; a second while draining changes nothing
        _state["signal"] = signal.Signals(signum).name


def install() -> None:
    """Catch SIGTERM and SIGUSR1 from now on (idempotent; main thread only)."""
    if _state["previous"] is None and threading.current_thread() is threading.main_thread():
        _state["previous"] = {sig: signal.signal(sig, _handle) for sig in SIGNALS}


def received() -> str | None:
    """The name of the first stop signal received since :func:`install`, or None."""
    return _state["signal"]


def restore() -> None:
    """Give the signals their previous handlers back and forget what was received."""
    previous = _state["previous"]
    if previous is not None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _state.update(signal=None, previous=None)


def ignore() -> None:
    """Ignore the stop signals from now on: the rank's part of the job is over and its exit code decided,
    so one that arrives while the process finalises (MPI, the interpreter's teardown, where Python's own
    handlers are gone) must not turn a finished rank into one killed by the signal."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
