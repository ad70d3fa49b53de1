"""Split inference over MPI: score, embed or continue (generate) every row of a dataset, results in HDF5.

    mpiexec -n 3 python jobs/infer.py task=score data.path=rows.jsonl output.path=out.h5 split.k=2
    srun --mpi=pmi2 python jobs/infer.py task=embed model=minilm output.path=emb.h5
    mpiexec -n 2 python jobs/infer.py task=generate data.chat_template=true task.max_new_tokens=64 output.path=gen.h5

Every rank composes the same config (conf/infer.yaml); rank 0 is the data owner.
"""

# Catch SIGTERM/SIGUSR1 before anything slow is imported: a stop during start-up ends the job cleanly (exit 75).
from nesa_hpc.engine import stopsignal

stopsignal.install()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from nesa_hpc.overrides import check_overrides  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="infer")
def infer(cfg: DictConfig) -> None:
    from nesa_hpc.preflight import check_paths

    check_paths(cfg, "infer")  # rank 0's files and the model folder, before torch and transformers load
    from nesa_hpc.engine.openmp import prepare_openmp

    prepare_openmp(cfg)  # OpenMP reads its settings when torch loads it
    from nesa_hpc.infer.job import main  # torch and transformers load only after these checks

    main(cfg)


if __name__ == "__main__":
    check_overrides("infer")  # a bad key or value: one line and exit 2, before Hydra's own handling
    infer()
