"""One MPI launch that runs the suite's MPI jobs one after another, so that start-up (Python, torch and
transformers imported on every rank: about 6 s of CPU a rank) is paid once per session, not once per job.

    mpiexec -n 4 python -m mpi4py tests/mpi_pool.py FOLDER

Rank 0 waits for ``FOLDER/N.json`` (N = 0, 1, ...: the requests in order), every rank takes it, and the
first ``world`` ranks run it on a communicator of their own, exactly as ``mpiexec -n world`` would (the
other ranks sleep meanwhile). A request is either

- ``{"world": n, "script": "tests/mpi_check.py", "argv": [...]}``: a test driver's ``main(argv, comm)``, or
- ``{"world": n, "job": "infer" | "train" | "audit", "overrides": [...], "cwd": "..."}``: the job that
  ``jobs/infer.py``, ``jobs/train.py`` or ``jobs/audit.py`` would run, through the same function (its exit
  status, the one line of a user error, the abort of every rank on an unexpected failure).

Each rank's stdout and stderr during the request go to ``FOLDER/N.rR.log``; rank 0 then writes
``FOLDER/N.out.json`` with the exit status and the ranks' output. A failure that ends the job with an MPI
abort ends this launch too, as it would end a job of its own: ``conftest.Pool`` starts a new one for the
next request. ``{"stop": true}`` ends the launch.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from mpi4py import MPI

from nesa_hpc.engine.job import run_main, settle
from nesa_hpc.infer.job import run as run_infer
from nesa_hpc.privacy.audit.run import main as audit_main
from nesa_hpc.train.job import run_train

ROOT = Path(__file__).resolve().parents[1]
# what jobs/infer.py, jobs/train.py and jobs/audit.py run once Hydra has composed their config
JOBS = {"infer": lambda cfg, comm: run_main(cfg, run_infer, comm),
        "train": lambda cfg, comm: run_main(cfg, run_train, comm),
        "audit": audit_main}


def _request(folder: Path, n: int) -> dict:
    path = folder / f"{n}.json"
    nap = 0.001
    while not path.exists():
        time.sleep(nap)
        nap = min(2 * nap, 0.02)
    return json.loads(path.read_text())


def _script(path: str):
    """A test driver, imported once per launch."""
    name = Path(path).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _run(request: dict, comm) -> int:
    """Run one request on ``comm``; return its exit status."""
    if "script" in request:
        _script(request["script"]).main(request["argv"], comm)
        return 0
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=request["job"], overrides=request["overrides"])
    try:
        JOBS[request["job"]](cfg, comm)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def main() -> None:
    folder = Path(sys.argv[1])
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    sys.path.insert(0, str(ROOT / "tests"))
    real_out, real_err = sys.stdout, sys.stderr
    n = 0
    while True:
        request = _request(folder, n) if rank == 0 else None
        settle(world)  # the other ranks sleep until rank 0 has the request
        request = world.bcast(request, root=0)
        if request.get("stop"):
            break
        size = request["world"]
        comm = world.Split(0 if rank < size else MPI.UNDEFINED, rank)
        if comm != MPI.COMM_NULL:
            log = open(folder / f"{n}.r{rank}.log", "w", buffering=1)
            sys.stdout = sys.stderr = log
            os.chdir(request.get("cwd") or ROOT)
            try:
                code = _run(request, comm)
            finally:
                sys.stdout, sys.stderr = real_out, real_err
                logging.getLogger("nesa_hpc").handlers[:] = [logging.StreamHandler(real_err)]
                log.close()
                os.chdir(ROOT)
            settle(comm)
            if rank == 0:
                text = "".join((folder / f"{n}.r{r}.log").read_text() for r in range(size))
                done = folder / f"{n}.out.tmp"
                done.write_text(json.dumps({"returncode": code, "output": text}))
                done.rename(folder / f"{n}.out.json")
            comm.Free()
        gc.collect()
        settle(world)  # the ranks outside this request's world sleep until it is over
        n += 1


if __name__ == "__main__":
    main()
