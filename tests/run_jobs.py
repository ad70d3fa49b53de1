"""Run several inference or training jobs one after another inside one MPI launch (start-up is paid once).

    mpiexec -n N python -m mpi4py tests/run_jobs.py jobs.json report.json

``jobs.json`` is a list of jobs: a list of overrides for conf/infer.yaml (jobs/infer.py), or
``{"config": "train", "overrides": [...]}`` for conf/train.yaml (jobs/train.py). The report (written by
rank 0) holds, per job, null or rank 0's error, when every rank raised one (errors that end all ranks
together, such as a bad option, which jobs/*.py print once, on rank 0, and exit 2; or overrides that Hydra
refuses to compose, which the entry scripts refuse the same way); a job that failed on some ranks only is
reported as such.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from mpi4py import MPI

from nesa_hpc.infer.job import JobError, run
from nesa_hpc.train.job import run_train

CONF = str(Path(__file__).resolve().parents[1] / "conf")
RUN = {"infer": run, "train": run_train}


def main(argv: list[str] | None = None, comm=None) -> None:
    """Run the spec ``argv[0]`` on every rank of ``comm`` (default ``MPI.COMM_WORLD``); report to ``argv[1]``."""
    argv = argv or sys.argv[1:]
    jobs = json.loads(Path(argv[0]).read_text())
    comm = comm or MPI.COMM_WORLD
    report = []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for job in jobs:
            name, overrides = ("infer", job) if isinstance(job, list) else (job["config"], job["overrides"])
            error = None
            try:
                cfg = compose(config_name=name, overrides=overrides)
            except HydraException as exc:  # the same on every rank
                error = f"{exc} ({exc.__cause__})" if exc.__cause__ else str(exc)
            else:
                try:
                    RUN[name](cfg, comm)
                except JobError as exc:
                    error = str(exc)
            errors = comm.gather(error, root=0)
            if comm.Get_rank() == 0:
                failed = [r for r, e in enumerate(errors) if e is not None]
                if failed and len(failed) < len(errors):
                    error = f"only ranks {failed} failed: {errors}"
                report.append(error)
    if comm.Get_rank() == 0:
        Path(argv[1]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
