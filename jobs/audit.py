"""Privacy audit: token recovery by three attackers against the utility lost, per split point and epsilon.

    mpiexec -n 2 python jobs/audit.py                         # SmolLM2, k in {0, 2, 8}, epsilons 1e5..10
    python jobs/audit.py audit.ks=[0] audit.mechanism=sigma audit.sigmas=[0.01,0.1]

Writes ``<audit.out_dir>/audit.{h5,csv,json}`` and ``audit_{utility,leakage,frontier}.png``.
"""

import hydra
from omegaconf import DictConfig

from nesa_hpc.overrides import check_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="audit")
def audit(cfg: DictConfig) -> None:
    from nesa_hpc.privacy.audit.run import main  # torch and transformers load only after the overrides are checked

    main(cfg)


if __name__ == "__main__":
    check_overrides("audit")  # a bad key or value: one line and exit 2, before Hydra's own handling
    audit()
