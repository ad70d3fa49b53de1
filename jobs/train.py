"""Split fine-tuning over MPI: the loss on rank 0, gradients back through the pipeline, LoRA or full weights.

    mpiexec -n 3 python jobs/train.py data.path=train.jsonl train.out_dir=ft train.epochs=2
    mpiexec -n 3 python jobs/train.py privacy=gaussian privacy.epsilon=100 privacy.clip=auto split.k=0 \
        privacy.unit=token train.grad_privacy.mechanism=gaussian train.grad_privacy.epsilon=10 \
        train.grad_privacy.clip=1.0
    mpiexec -n 3 python jobs/infer.py model.adapters=ft/adapter ...      # use the result

Every rank composes the same config (conf/train.yaml); rank 0 is the data owner.
"""

# Catch SIGTERM/SIGUSR1 before anything slow is imported: a stop during start-up ends the job cleanly (exit 75).
from nesa_hpc.engine import stopsignal

stopsignal.install()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from nesa_hpc.overrides import check_overrides  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def train(cfg: DictConfig) -> None:
    from nesa_hpc.preflight import check_paths

    check_paths(cfg, "train")  # rank 0's files and the model folder, before torch and transformers load
    from nesa_hpc.train.job import main  # torch and transformers load only after these checks

    main(cfg)


if __name__ == "__main__":
    check_overrides("train")  # a bad key or value: one line and exit 2, before Hydra's own handling
    train()
