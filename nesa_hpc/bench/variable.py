"""``task=generate`` with ``bench.generate.workload=variable``: prompts of up to ``bench.generate.max_words``
words, each with its own max tokens (geometric with mean ``bench.generate.tokens_mean``, clipped to
``[1, bench.generate.tokens_cap]``), as an OpenAI batch file. Measured in one invocation:

- transformers static ``generate``: left-padded batches of ``data.batch_size`` in input order, each run to
  its largest max tokens, one process with ``cores`` threads (rows cut at their own max when counted);
- transformers continuous batching, per-request max tokens, one process at one thread and at ``cores``
  threads (each in its own subprocess);
- with ``bench.generate.at_once``: ``cores`` one-thread continuous-batching processes running the whole
  workload at the same time (their tokens/s added): what the cores give together when each runs the strongest
  one-thread baseline, memory bandwidth and caches shared as the pipeline's ranks share them;
- the pipeline at each of ``bench.ranks`` (default 2 and 3): by turns, every rank with all ``cores`` threads
  on one lane of ``runtime.inflight`` x ``data.batch_size`` rows (``runtime.turns``, on by default on one
  node), or with ``runtime.turns=false`` one lane per rank and ``cores / ranks`` threads each.

The ceiling is ``cores`` x the one-thread continuous-batching figure."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..io.read import read_rows, sample_path
from .common import generate_threads, launch, num, override, print_rank_stats, ranks, setup_model, share, write
from .generate import baseline_generate, read_generated

__all__ = ["CB_CEILING", "make_variable_workload", "run_bench_variable"]

CB_CEILING = ("cores x the one-thread transformers continuous-batching figure (1 process, "
              "torch.set_num_threads(1)), measured in this run")


def make_variable_workload(path: Path, rows: int, min_words: int, max_words: int, tokens_mean: float,
                           tokens_cap: int, seed: int) -> list[int]:
    """Write ``rows`` OpenAI batch lines (``/v1/completions``, greedy) to ``path`` and return each row's max
    tokens. A prompt is ``min_words``..``max_words`` words (uniform) cut from the shipped sample sentences; its
    ``max_tokens`` is drawn from a geometric distribution with mean ``tokens_mean`` (support 1, 2, ...),
    clipped to ``tokens_cap``."""
    rng = random.Random(seed)
    draw = np.random.default_rng(seed)
    sentences = [t for _, t in read_rows(sample_path())]
    caps = []
    with open(path, "w") as fh:
        for i in range(rows):
            target = rng.randint(min_words, max_words)
            words: list[str] = []
            while len(words) < target:
                words += rng.choice(sentences).split()
            cap = int(min(tokens_cap, draw.geometric(1.0 / tokens_mean)))
            caps.append(cap)
            body = {"model": "bench", "prompt": " ".join(words[:target]), "max_tokens": cap, "temperature": 0}
            fh.write(json.dumps({"custom_id": f"row-{i}", "method": "POST", "url": "/v1/completions",
                                 "body": body}) + "\n")
    return caps


def _cb_spec(cfg: DictConfig, folder: str, data: Path, threads: int, out: Path) -> dict:
    g = cfg.bench.generate
    return {"folder": folder, "data": str(data), "max_length": cfg.data.max_length, "threads": threads,
            "attn": g.cb_attn, "max_batch_tokens": g.cb_max_batch_tokens, "num_blocks": g.cb_num_blocks,
            "out": str(out)}


def _cb_result(proc: subprocess.Popen, out: Path, what: str) -> dict:
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"continuous batching ({what}) failed:\n{stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["tokens"] = {int(r): t for r, t in result["tokens"].items()}
    return result


def _cb_process(spec: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nesa_hpc.bench.continuous", json.dumps(spec)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _continuous(cfg: DictConfig, folder: str, data: Path, threads: int, out: Path) -> dict:
    """One continuous-batching run in a fresh process (see :mod:`nesa_hpc.bench.continuous`)."""
    return _cb_result(_cb_process(_cb_spec(cfg, folder, data, threads, out)), out, f"{threads} threads")


def _continuous_at_once(cfg: DictConfig, folder: str, data: Path, cores: int, out_dir: Path) -> dict:
    """``cores`` one-thread continuous-batching processes on the whole workload, timed from one common start
    (each waits, model loaded and cache allocated, until all are ready): their generated tokens added, over the
    longest one's seconds."""
    go = out_dir / "bench_generate_cb_go"
    go.unlink(missing_ok=True)
    specs = [{**_cb_spec(cfg, folder, data, 1, out_dir / f"bench_generate_cb_at_once_{i}.json"),
              "ready": str(out_dir / f"bench_generate_cb_ready_{i}"), "go": str(go)} for i in range(cores)]
    for spec in specs:
        Path(spec["ready"]).unlink(missing_ok=True)
    procs = [_cb_process(spec) for spec in specs]
    while not all(Path(s["ready"]).exists() for s in specs):
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    go.touch()
    runs = [_cb_result(p, Path(s["out"]), f"{cores} processes at once") for p, s in zip(procs, specs, strict=True)]
    for path in (go, *(Path(s["ready"]) for s in specs)):
        path.unlink(missing_ok=True)
    seconds = max(r["seconds"] for r in runs)
    generated = sum(r["generated"] for r in runs)
    return {"seconds": seconds, "generated": generated, "generated_per_s": generated / seconds,
            "each_per_s": [r["generated_per_s"] for r in runs], "tokens": runs[0]["tokens"]}


def _row(system: str, ranks_: int, threads: int, res: dict, base: dict, **more) -> dict:
    """One table row: generated tokens, tokens/s and the share of rows equal to the static baseline."""
    same = sum(res["tokens"].get(r) == t for r, t in base["tokens"].items()) / len(base["tokens"])
    return {"name": f"{system} {ranks_} x {threads}", "system": system, "ranks": ranks_, "threads": threads,
            "generated": res["generated"], "seconds": res["seconds"], "generated_per_s": res["generated_per_s"],
            "same_tokens": same, **more}


def _baseline_rows(cfg: DictConfig, folder: str, data: Path, caps: dict[int, int], cores: int,
                   out_dir: Path) -> tuple[list[dict], float, dict, dict]:
    """Static ``generate`` at ``cores`` threads, continuous batching at one and at ``cores`` threads: their
    table rows, the ceiling, the continuous-batching settings in effect and the static run (the baseline)."""
    static = baseline_generate(folder, data, cfg, cores, caps)
    print(f"transformers generate (static), 1 process x {cores} thr: {static['generated_per_s']:.1f} tokens/s",
          flush=True)
    rows = [_row("transformers generate (static)", 1, cores, static, static)]
    runs = {}
    for threads in sorted({1, cores}):
        runs[threads] = _continuous(cfg, folder, data, threads, out_dir / f"bench_generate_cb_{threads}thr.json")
        res = runs[threads]
        print(f"transformers continuous batching, 1 process x {threads} thr: {res['generated_per_s']:.1f} "
              f"tokens/s ({res['steps']} forwards, {res['forward_share']:.0%} of the time inside them)", flush=True)
        rows.append(_row("transformers continuous batching", 1, threads, res, static, steps=res["steps"],
                         forward_share=res["forward_share"]))
    ceiling = cores * runs[1]["generated_per_s"]
    print(f"ceiling = {cores} x {runs[1]['generated_per_s']:.1f} = {ceiling:.1f} tokens/s ({CB_CEILING})", flush=True)
    if cfg.bench.generate.at_once and cores > 1:
        both = _continuous_at_once(cfg, folder, data, cores, out_dir)
        print(f"transformers continuous batching, {cores} processes x 1 thr at once: {both['generated_per_s']:.1f} "
              f"tokens/s together (each {', '.join(f'{v:.1f}' for v in both['each_per_s'])})", flush=True)
        rows.append(_row(f"transformers CB, {cores} procs at once", cores, 1, both, static,
                         each_per_s=both["each_per_s"]))
    settings = {**runs[1]["settings"], "requested_attn_implementation": cfg.bench.generate.cb_attn}
    return rows, ceiling, settings, static


def _pipeline_rows(cfg: DictConfig, folder: str, data: Path, caps: dict[int, int], base: dict,
                   out_dir: Path, cores: int) -> list[dict]:
    """The pipeline at each of ``bench.ranks`` (default 2, 3), greedy: by turns with ``cores`` threads per rank
    (``runtime.turns``, default), else a share of the cores each."""
    rows = []
    extra = ["task=generate", "data.format=openai_batch", f"task.max_new_tokens={max(caps.values())}",
             "task.temperature=0"]
    for n in ranks(cfg, (2, 3)):
        out = out_dir / f"bench_generate_variable_n{n}.h5"
        threads, turns = generate_threads(cfg, n, cores)
        launch(cfg, n, threads, folder, data, out, extra + turns)
        res = read_generated(out)
        generated = sum(len(t) for t in res["tokens"].values())
        res.update(generated=generated, generated_per_s=generated / res["seconds"])
        stats = res["rank_stats"]
        system = "nesa_hpc, by turns" if res["turns"] else "nesa_hpc"
        rows.append(_row(system, n, threads, res, base, layers_per_rank=res["layers_per_rank"], rank_stats=stats,
                         turns=res["turns"], idle_share=[s.get("idle_share") for s in stats],
                         peak_rss_mb=[s.get("peak_rss_mb") for s in stats]))
        print(f"{system}, {n} ranks x {threads} thr: {res['generated_per_s']:.1f} tokens/s", flush=True)
    return rows


def _print_table(rows: list[dict], cores: int, ceiling: float) -> None:
    print()
    print(f"ceiling: {ceiling:.1f} generated tokens/s = {cores} x one-thread continuous batching")
    print(f"| {'system':34s} | ranks x threads | generated | tokens/s | of ceiling | rows equal to baseline |")
    print(f"|{'-' * 36}|----------------:|----------:|---------:|-----------:|-----------------------:|")
    for r in rows:
        print(f"| {r['system']:34s} | {r['ranks']:>7d} x {r['threads']:<5d} | {r['generated']:9d} | "
              f"{r['generated_per_s']:8.1f} | {num(r['share_of_ceiling'], '10.0%')} | "
              f"{100 * r['same_tokens']:21.0f}% |")
    print(flush=True)
    print_rank_stats(rows)


def run_bench_variable(cfg: DictConfig) -> dict:
    """The variable-length generation benchmark; writes ``bench_generate.json``."""
    g = cfg.bench.generate
    out_dir, folder, tokenizer, cores = setup_model(cfg)
    data = out_dir / f"prompts_variable_{g.rows}rows_seed{cfg.bench.seed}.jsonl"
    caps = dict(enumerate(make_variable_workload(data, g.rows, g.min_words, g.max_words, g.tokens_mean,
                                                 g.tokens_cap, cfg.bench.seed)))
    prompt_tokens = [len(tokenizer(json.loads(line)["body"]["prompt"])["input_ids"])
                     for line in data.read_text().splitlines()]
    workload = {"kind": "variable", "file": str(data), "format": "openai_batch", "rows": g.rows,
                "prompt_words": [g.min_words, g.max_words], "prompt_tokens_min": min(prompt_tokens),
                "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens), "prompt_tokens_max": max(prompt_tokens),
                "max_tokens_distribution": f"geometric(p=1/{g.tokens_mean}) on 1, 2, ..., clipped to {g.tokens_cap}",
                "max_tokens_mean": sum(caps.values()) / len(caps), "max_tokens_max": max(caps.values()),
                "max_tokens_sum": sum(caps.values())}
    print(f"model {folder}; {g.rows} prompts of {workload['prompt_tokens_min']}-{workload['prompt_tokens_max']} "
          f"tokens; max tokens per row mean {workload['max_tokens_mean']:.1f}, max {workload['max_tokens_max']}; "
          f"batch {cfg.data.batch_size}; split.k={cfg.split.k}; partition {cfg.split.partition}; {cores} cores",
          flush=True)
    rows, ceiling, cb_settings, static = _baseline_rows(cfg, folder, data, caps, cores, out_dir)
    rows += _pipeline_rows(cfg, folder, data, caps, static, out_dir, cores)
    share(rows, "generated_per_s", ceiling)
    at_once = next((r["generated_per_s"] for r in rows if "each_per_s" in r), None)  # the at-once row
    for r in rows:
        r["share_of_at_once"] = r["generated_per_s"] / at_once if at_once else None
    _print_table(rows, cores, ceiling)
    if at_once:
        print(f"{cores} one-thread continuous-batching processes at once: {at_once:.1f} tokens/s together, "
              f"{at_once / ceiling:.0%} of the ceiling; the pipeline's runs against it: "
              + ", ".join(f"{r['ranks']} ranks {r['share_of_at_once']:.0%}" for r in rows
                          if r["system"].startswith("nesa_hpc")),
              flush=True)
    report = {"config": OmegaConf.to_container(cfg.bench), "model": folder, "workload": workload,
              "batch_size": cfg.data.batch_size, "split_k": cfg.split.k, "partition": override(cfg.split.partition),
              "cores": cores, "inflight": cfg.runtime.inflight, "continuous_batching": cb_settings,
              "one_thread_tokens_per_s": ceiling / cores, "ceiling_tokens_per_s": ceiling,
              "ceiling_definition": CB_CEILING, "at_once_tokens_per_s": at_once, "results": rows}
    return write(out_dir, "bench_generate.json", report)
