"""A barrier whose waiting ranks sleep instead of spinning (tests run 3-4 ranks on 2 cores).

MPICH's blocking collectives poll at full speed: ranks waiting while rank 0 computes a single-process
reference would take most of the cores from it. The helper scripts meet here after each case instead.
"""

from __future__ import annotations

import time


def quiet_barrier(comm, nap: float = 0.002) -> None:
    """``comm.Barrier()``, polled with short sleeps."""
    if comm.Get_size() == 1:
        return
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(nap)
