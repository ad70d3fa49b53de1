"""Settings of the OpenMP runtime that must be in place before torch loads it (the entry scripts call
:func:`prepare_openmp` before their first torch import)."""

from __future__ import annotations

import os

__all__ = ["TURNS_SPINCOUNT", "prepare_openmp"]

# libgomp's idle worker threads spin this many times before they sleep (its own default, 300000, kept a
# finished rank's worker on a core while the next rank started its turn: 4-6% slower generation by turns on
# a 2-core VM, docs/benchmarks.md)
TURNS_SPINCOUNT = "50000"


def prepare_openmp(cfg) -> None:
    """When the ranks may take turns with every core (``task=generate`` and ``runtime.turns`` not false), cap
    how long OpenMP worker threads spin after a parallel region (``GOMP_SPINCOUNT``), unless it is set
    already: a rank hands all the cores to the next one at every step, and its idle workers should not keep
    one of them busy. Has no effect once torch is loaded, and none on one-thread ranks."""
    if cfg.task.name == "generate" and cfg.runtime.get("turns") is not False:
        os.environ.setdefault("GOMP_SPINCOUNT", TURNS_SPINCOUNT)
