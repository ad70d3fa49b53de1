"""The benchmark behind ``jobs/bench.py``: same model, data and batch shapes for every contender.

Every table also shows the **ceiling**: ``cores`` x the one-thread baseline (one process,
``torch.set_num_threads(1)``), measured in the same run. The ratio to the ``cores``-thread baseline moves
with how well one process scales with threads on the machine; the share of the ceiling does not. For the
variable-length generation workload the one-thread baseline is transformers' continuous batching.

Modules: :mod:`.common` (datasets, launching, reports), :mod:`.score`, :mod:`.generate` (fixed workload),
:mod:`.variable` (variable-length workload), :mod:`.continuous` (the continuous-batching baseline, run in its
own process), :mod:`.train` (training throughput and activation memory). See ``docs/benchmarks.md``."""

from __future__ import annotations

from omegaconf import DictConfig

from .common import make_dataset
from .generate import baseline_generate, run_bench_generate
from .score import baseline_score, run_bench_score
from .train import baseline_train, run_bench_train, run_bench_train_memory
from .variable import make_variable_workload, run_bench_variable

__all__ = ["run_bench", "make_dataset", "make_variable_workload", "baseline_score", "run_bench_score",
           "baseline_generate", "run_bench_generate", "run_bench_variable", "baseline_train", "run_bench_train",
           "run_bench_train_memory"]

WORKLOADS = ("fixed", "variable")


def run_bench(cfg: DictConfig) -> dict:
    """The benchmark the config asks for: training (``bench.train``, ``bench.train_memory``), else by
    ``task``: score, or generate with ``bench.generate.workload`` fixed or variable."""
    b = cfg.bench
    if b.get("train") or b.get("train_memory"):
        report = run_bench_train(cfg) if b.get("train") else {}
        if b.get("train_memory"):
            report["memory"] = run_bench_train_memory(cfg)
        return report
    if cfg.task.name == "generate":
        workload = b.generate.get("workload", "fixed")
        if workload not in WORKLOADS:
            raise SystemExit(f"bench.generate.workload={workload!r} must be one of {', '.join(WORKLOADS)}")
        return run_bench_variable(cfg) if workload == "variable" else run_bench_generate(cfg)
    if cfg.task.name != "score":
        raise SystemExit("jobs/bench.py measures task=score or task=generate")
    return run_bench_score(cfg)
