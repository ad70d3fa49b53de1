"""Run several inference jobs one after another inside one MPI launch (start-up is paid once).

    mpiexec -n N python -m mpi4py tests/run_jobs.py jobs.json report.json

``jobs.json`` is a list of override lists for conf/infer.yaml; the report (written by rank 0) holds, per
job, null or the error every rank raised (errors that end all ranks together, such as a bad option).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from mpi4py import MPI

from nesa_hpc.infer.job import JobError, run

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    comm = MPI.COMM_WORLD
    report = []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for overrides in jobs:
            try:
                run(compose(config_name="infer", overrides=overrides), comm)
                report.append(None)
            except JobError as exc:
                report.append(str(exc))
    if comm.Get_rank() == 0:
        Path(sys.argv[2]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
