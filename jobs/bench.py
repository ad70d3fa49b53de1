"""Throughput benchmark: monolithic transformers in one process vs the split pipeline at N ranks.

    python jobs/bench.py                              # SmolLM2-135M, 256 rows of 16-256 tokens, N = 1..4
    python jobs/bench.py bench.ranks=[2] data.batch_size=16 bench.rss_rows=[256,2048]
    python jobs/bench.py task=generate data.batch_size=16 task.max_new_tokens=64   # generated tokens/s
    python jobs/bench.py bench.train=true 'bench.ranks=[2,3]' 'bench.train_pipelines=[gpipe,1f1b]' \
        data.max_length=128                                                        # training tokens/s
    python jobs/bench.py bench.train_memory=true 'bench.ranks=[2,3]' data.max_length=128 \
        bench.memory_grad_accum=16                   # peak activation MB per rank, gpipe vs 1f1b (3 ranks)

Prints a table and writes ``<bench.out_dir>/bench.json`` (``bench_generate.json`` for ``task=generate``,
``bench_train.json`` for ``bench.train=true``, ``bench_train_memory.json`` for ``bench.train_memory=true``).
Ratios are against the baseline measured in the same invocation (these machines are shared and noisy). The
ceiling is ``cores`` x the one-thread baseline (one process, ``torch.set_num_threads(1)``), also measured in
the same invocation; ``share_of_ceiling`` is each figure's share of it. Per-rank compute / wait-for-input /
wait-to-send seconds follow each table.
"""

import hydra
from omegaconf import DictConfig

from nesa_hpc.bench import run_bench
from nesa_hpc.overrides import check_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def bench(cfg: DictConfig) -> None:
    run_bench(cfg)


if __name__ == "__main__":
    check_overrides("bench")  # a bad key or value: one line and exit 2, before Hydra's own handling
    bench()
