"""Run several inference or training jobs one after another inside one MPI launch (start-up is paid once).

    mpiexec -n N python -m mpi4py tests/run_jobs.py jobs.json report.json

``jobs.json`` is a list of jobs: a list of overrides for conf/infer.yaml (jobs/infer.py), or
``{"config": "train", "overrides": [...]}`` for conf/train.yaml (jobs/train.py). The report (written by
rank 0) holds, per job, null or the error every rank raised (errors that end all ranks together, such as a
bad option; or overrides that Hydra refuses to compose, which the entry scripts refuse the same way).
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


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    comm = MPI.COMM_WORLD
    report = []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for job in jobs:
            name, overrides = ("infer", job) if isinstance(job, list) else (job["config"], job["overrides"])
            try:
                cfg = compose(config_name=name, overrides=overrides)
            except HydraException as exc:  # the same on every rank
                report.append(f"{exc} ({exc.__cause__})" if exc.__cause__ else str(exc))
                continue
            try:
                RUN[name](cfg, comm)
                report.append(None)
            except JobError as exc:
                report.append(str(exc))
    if comm.Get_rank() == 0:
        Path(sys.argv[2]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
