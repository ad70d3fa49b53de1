"""What every benchmark shares: datasets, the one-process baselines and their ceiling, launching jobs under
mpiexec, the per-rank time lines and the JSON report."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import settings_from_cfg
from ..engine.job import model_folder
from ..io import jsonfile
from ..io.read import read_rows, sample_path

__all__ = ["ROOT", "CEILING", "make_dataset", "generate_threads", "setup", "baselines", "num", "share",
           "print_rank_stats", "write", "run_job", "launch", "override", "ranks"]

ROOT = Path(__file__).resolve().parents[2]
CEILING = "cores x the one-thread baseline (1 process, torch.set_num_threads(1)), measured in this run"


def make_dataset(path: Path, tokenizer, rows: int, lo: int, hi: int, seed: int) -> None:
    """``rows`` texts of lo..hi tokens each (uniform), cut from the shipped sample sentences."""
    rng = random.Random(seed)
    sentences = [t for _, t in read_rows(sample_path())]
    with open(path, "w") as fh:
        for _ in range(rows):
            target = rng.randint(lo, hi)
            words: list[int] = []
            while len(words) < target:
                words += tokenizer(" " + rng.choice(sentences), add_special_tokens=False)["input_ids"]
            fh.write(json.dumps({"text": tokenizer.decode(words[:target])}) + "\n")


def setup(cfg: DictConfig, stem: str, rows: int, lo: int, hi: int) -> tuple[Path, str, object, Path, int]:
    """Output folder, model folder, tokenizer, a generated dataset and the core count of one bench."""
    out_dir, folder, tokenizer, cores = setup_model(cfg)
    data = out_dir / f"{stem}_{rows}rows_{lo}-{hi}.jsonl"
    make_dataset(data, tokenizer, rows, lo, hi, cfg.bench.seed)
    return out_dir, folder, tokenizer, data, cores


def setup_model(cfg: DictConfig) -> tuple[Path, str, object, int]:
    """Output folder (created), model folder, its tokenizer and the cores the bench divides."""
    from transformers import AutoTokenizer

    out_dir = Path(cfg.bench.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = str(model_folder(settings_from_cfg(cfg)))
    return out_dir, folder, AutoTokenizer.from_pretrained(folder), cfg.bench.cores or len(os.sched_getaffinity(0))


def baselines(fn: Callable[..., dict], key: str, folder: str, data: Path, cfg: DictConfig, cores: int, what: str,
              unit: str = "tokens/s") -> tuple[list[tuple[int, dict]], float]:
    """``[(threads, result)]`` of the baseline at ``cores`` threads and (with more than one core) at one
    thread, and the ceiling: ``cores`` x the one-thread result."""
    base = fn(folder, data, cfg, cores)
    print(f"baseline ({what}, 1 process, {cores} threads): {base[key]:.1f} {unit}", flush=True)
    runs = [(cores, base)] + ([(1, fn(folder, data, cfg, 1))] if cores > 1 else [])
    one = runs[-1][1][key]
    print(f"one thread: {one:.1f} {unit}; ceiling = {cores} x {one:.1f} = {cores * one:.1f} {unit} ({CEILING})",
          flush=True)
    return runs, cores * one


def num(x: float | None, fmt: str = ".1f") -> str:
    """``x`` formatted, or ``n/a`` for a figure that was not measured."""
    return "n/a" if x is None else format(x, fmt)


def share(rows: list[dict], key: str, ceiling: float) -> None:
    """Set each row's ``share_of_ceiling``: its ``key`` over the ceiling."""
    for r in rows:
        r["share_of_ceiling"] = r[key] / ceiling if ceiling > 0 else None


def print_rank_stats(rows: list[dict]) -> None:
    """One line per rank of every pipeline run: where its time went."""
    print("where the time goes (per rank: compute, wait for input, wait to send):")
    for r in rows:
        if r["name"].startswith("transformers"):
            continue
        stats = r.get("rank_stats")
        if not stats:
            print(f"  {r['name']}: n/a (no rank_stats)")
            continue
        print(f"  {r['name']}:")
        for s in stats:
            extra = f", peak activations {num(s['peak_activation_mb'], '.0f')} MB" if "peak_activation_mb" in s else ""
            print(f"    rank {s.get('rank', '?')}: compute {num(s.get('compute_s'))} s, wait for input "
                  f"{num(s.get('wait_input_s'))} s, wait to send {num(s.get('wait_send_s'))} s{extra}")
    print(flush=True)


def write(out_dir: Path, name: str, report: dict) -> dict:
    """Write ``report`` as strict JSON to ``out_dir / name`` and return it."""
    (out_dir / name).write_text(jsonfile.dumps(report, indent=1))
    print(f"wrote {out_dir / name}")
    return report


def _mpiexec(cfg: DictConfig) -> str:
    if cfg.bench.mpiexec:
        return str(cfg.bench.mpiexec)
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else (shutil.which("mpiexec") or "mpiexec")


def run_job(cfg: DictConfig, n: int, script: str, overrides: list[str], what: str) -> None:
    """``mpiexec -n n python jobs/<script> overrides...``; raises with the job's stderr when it fails."""
    cmd = [_mpiexec(cfg), "-n", str(n), sys.executable, str(ROOT / "jobs" / script), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{what} at {n} ranks failed:\n{proc.stderr[-3000:]}")


def launch(cfg: DictConfig, n: int, threads: int, folder: str, data: Path, out: Path,
           extra: Sequence[str] = ()) -> None:
    """``jobs/infer.py`` at ``n`` ranks of ``threads`` threads on ``data``, writing ``out``, with the bench's
    model, split, data and runtime options (``extra`` overrides last)."""
    overrides = [f"model.path={folder}", f"data.path={data}", f"output.path={out}", "output.overwrite=true",
                 f"runtime.threads={threads}", f"split.k={cfg.split.k}", f"split.head={cfg.split.head}",
                 f"split.partition={override(cfg.split.partition)}", f"data.batch_size={cfg.data.batch_size}",
                 f"data.max_length={cfg.data.max_length}", f"data.bucket_window={cfg.data.bucket_window}",
                 f"data.padding_side={cfg.data.padding_side}", f"model.dtype={cfg.model.dtype}", *extra]
    for key in ("wire_dtype", "inflight"):
        if cfg.runtime.get(key) is not None:
            overrides.append(f"runtime.{key}={cfg.runtime[key]}")
    run_job(cfg, n, "infer.py", overrides, "pipeline")


def generate_threads(cfg: DictConfig, n: int, cores: int) -> tuple[int, list[str]]:
    """Threads per rank of a ``task=generate`` pipeline run at ``n`` ranks on ``cores`` cores, and the
    overrides that say so: with ``runtime.turns`` (default on: the bench's ranks share one node's CPU) the
    ranks take turns with every core each, else each rank gets its share of the cores."""
    turns = cfg.runtime.get("turns")
    turns = True if turns is None else bool(turns)
    threads = cores if turns else max(1, cores // n)
    return threads, [f"runtime.turns={str(turns).lower()}"]


def override(value: object) -> str:
    """A config value as a command-line override (a list as ``[a,b]``)."""
    return f"[{','.join(str(v) for v in value)}]" if OmegaConf.is_list(value) else str(value)


def ranks(cfg: DictConfig, default: tuple[int, ...] = (1, 2, 3, 4)) -> list[int]:
    """``bench.ranks``, or ``default`` when it is null."""
    value = cfg.bench.get("ranks")
    return list(default) if value is None else [int(n) for n in value]
