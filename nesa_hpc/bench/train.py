"""``bench.train=true``: LoRA training tokens/s of the unsplit model in one process against ``jobs/train.py``
at N ranks; ``bench.train_memory=true``: peak activation memory per rank, gpipe against 1f1b."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ..config import settings_from_cfg
from .common import CEILING, ROOT, baselines, num, override, print_rank_stats, ranks, run_job, setup, share, write

__all__ = ["baseline_train", "run_bench_train", "run_bench_train_memory"]


def _train_spec(cfg: DictConfig, num_layers: int):
    from ..train.job import TrainSpec

    return TrainSpec(layers=(cfg.split.k, num_layers), grad_accum=cfg.bench.train_grad_accum,
                     max_steps=cfg.bench.train_steps, out_dir="unused")


def baseline_train(folder: str, data: Path, cfg: DictConfig, threads: int) -> dict:
    """LoRA training of the unsplit transformers model in one process with ``threads`` threads: the same
    rows, micro-batches, trainable layers, optimizer and schedule as ``jobs/train.py``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models.adapter import make_adapter
    from ..train.job import epoch_batches, load_examples, lr_factor, make_trainable

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = make_adapter(model)
    spec = _train_spec(cfg, adapter.num_layers)
    params = [p for _, p in make_trainable(adapter, list(range(*spec.layers)), spec)]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    steps = spec.max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, spec.warmup_steps, spec.schedule))
    settings = OmegaConf.merge(cfg, {"data": {"path": str(data)}})
    examples = load_examples(settings_from_cfg(settings), spec, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = epoch_batches(examples, 0, spec.seed, cfg.data.batch_size, pad)
    losses, tokens = [], 0
    start = time.perf_counter()
    for step in range(steps):
        part = batches[step * spec.grad_accum:(step + 1) * spec.grad_accum]
        n_target = sum(float(b.weights().sum()) for b in part)
        loss = 0.0
        for b in part:
            logits = model(b.ids, attention_mask=b.mask, position_ids=b.pos).logits
            ce = F.cross_entropy(logits[:, :-1][b.scored], b.ids[:, 1:][b.scored], reduction="none")
            total = (ce * b.weights()).sum()
            (total / n_target).backward()
            loss += float(total.detach())
            tokens += int(b.mask.sum())
        torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss / n_target)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "losses": losses}


def _has_train_pipeline() -> bool:
    """Whether ``jobs/train.py`` takes ``train.pipeline`` (gpipe | 1f1b)."""
    return "pipeline" in (OmegaConf.load(ROOT / "conf" / "train.yaml").get("train") or {})


def _train(cfg: DictConfig, n: int, threads: int, folder: str, data: Path, run: Path, layers: int, steps: int,
           accum: int, pipeline: str | None) -> tuple[dict, list[float]]:
    """``jobs/train.py`` at ``n`` ranks; its summary.json (``rank_stats`` may be absent) and per-step losses."""
    overrides = [f"model.path={folder}", f"data.path={data}", f"data.batch_size={cfg.data.batch_size}",
                 f"data.max_length={cfg.data.max_length}", f"split.k={cfg.split.k}", f"split.head={cfg.split.head}",
                 f"split.partition={override(cfg.split.partition)}", "train.owner_trainable=true",
                 f"runtime.threads={threads}", f"train.max_steps={steps}", f"train.grad_accum={accum}",
                 f"train.layers=[{cfg.split.k},{layers}]", f"train.out_dir={run}", "train.overwrite=true",
                 "train.export=none", "train.save_every=1000000"]
    run_job(cfg, n, "train.py", overrides + ([f"train.pipeline={pipeline}"] if pipeline else []), "training")
    summary = json.loads((run / "summary.json").read_text())  # train.owner_dir defaults to train.out_dir
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return summary, losses


def run_bench_train(cfg: DictConfig) -> dict:
    """Training tokens/s (forward + backward + AdamW) of the unsplit model in one process against
    ``jobs/train.py`` at N ranks with each of ``bench.train_pipelines``, same steps, in one invocation. Both
    train layers [split.k, L): ``train.layers`` restricts the split job to them, and with
    ``train.owner_trainable=true`` rank 0 trains the tail layers the balanced partition gives it (rank 0's
    front stays frozen)."""
    from transformers import AutoConfig

    b = cfg.bench
    rows = max(b.rows, b.train_steps * b.train_grad_accum * cfg.data.batch_size)
    out_dir, folder, _, data, cores = setup(cfg, "train", rows, b.min_tokens, b.max_tokens)
    layers = AutoConfig.from_pretrained(folder).num_hidden_layers
    pipelines = list(b.train_pipelines)
    if not _has_train_pipeline():
        print(f"note: jobs/train.py has no train.pipeline option yet; bench.train_pipelines={pipelines} ignored, "
              "each rank count runs the engine's own schedule once", flush=True)
        pipelines = [None]
    print(f"model {folder}; LoRA training of layers [{cfg.split.k}, {layers}); {b.train_steps} steps of "
          f"{b.train_grad_accum} x {cfg.data.batch_size} rows of {b.min_tokens}-{b.max_tokens} tokens; {cores} cores",
          flush=True)
    runs, ceiling = baselines(baseline_train, "tokens_per_s", folder, data, cfg, cores, "transformers + peft LoRA")
    base = runs[0][1]

    def row(name: str, ranks: int, threads: int, rate: float, losses: list[float], **more) -> dict:
        return {"name": name, "ranks": ranks, "threads": threads, "tokens_per_s": rate,
                "ratio": rate / base["tokens_per_s"], **more,
                "max_abs_loss_diff": max(abs(a - c) for a, c in zip(losses, base["losses"], strict=True))}

    table = [row(f"transformers 1 proc x {t} thr", 1, t, x["tokens_per_s"], x["losses"], pipeline=None)
             for t, x in runs]
    for n in ranks(cfg):
        threads = max(1, cores // n)
        for pipe in pipelines:
            run = out_dir / f"train_n{n}_{pipe or 'default'}"
            summary, losses = _train(cfg, n, threads, folder, data, run, layers, b.train_steps, b.train_grad_accum,
                                     pipe)
            rate = summary["tokens_per_s"]
            table.append(row(f"nesa_hpc {n} ranks x {threads} thr {pipe or 'default'}", n, threads, rate, losses,
                             pipeline=pipe, rank_stats=summary.get("rank_stats")))
            print(f"{table[-1]['name']}: {rate:.1f} tokens/s ({table[-1]['ratio']:.2f}x, "
                  f"{rate / ceiling:.0%} of ceiling)", flush=True)
    share(table, "tokens_per_s", ceiling)
    print()
    print(f"ceiling: {ceiling:.1f} tokens/s = {cores} x one-thread baseline")
    print(f"| {'run':40s} | tokens/s | ratio | of ceiling | max |d loss| |")
    print(f"|{'-' * 42}|---------:|------:|-----------:|-------------:|")
    for r in table:
        print(f"| {r['name']:40s} | {r['tokens_per_s']:8.1f} | {r['ratio']:5.2f} | "
              f"{num(r['share_of_ceiling'], '10.0%')} | {r['max_abs_loss_diff']:12.1e} |")
    print(flush=True)
    print_rank_stats(table)
    report = {"config": OmegaConf.to_container(cfg.bench), "model": folder, "batch_size": cfg.data.batch_size,
              "split_k": cfg.split.k, "cores": cores, "partition": override(cfg.split.partition),
              "one_thread_tokens_per_s": ceiling / cores, "ceiling_tokens_per_s": ceiling,
              "ceiling_definition": CEILING, "results": table}
    return write(out_dir, "bench_train.json", report)


def run_bench_train_memory(cfg: DictConfig) -> dict:
    """Peak activation memory per rank (bytes saved for backward, from summary.json's ``rank_stats``) of
    ``jobs/train.py`` with ``train.pipeline=gpipe`` against ``1f1b``: the largest of ``bench.ranks``,
    ``bench.memory_steps`` steps of ``bench.memory_grad_accum`` micro-batches."""
    from transformers import AutoConfig

    b = cfg.bench
    n, accum, steps = max(ranks(cfg)), b.memory_grad_accum, b.memory_steps
    rows = max(b.rows, steps * accum * cfg.data.batch_size)
    out_dir, folder, _, data, cores = setup(cfg, "train", rows, b.min_tokens, b.max_tokens)
    layers = AutoConfig.from_pretrained(folder).num_hidden_layers
    threads = max(1, cores // n)
    print(f"activation memory: {n} ranks x {threads} thr, {steps} steps of {accum} x {cfg.data.batch_size} rows, "
          f"gpipe vs 1f1b", flush=True)
    if not _has_train_pipeline():
        print("n/a: jobs/train.py has no train.pipeline option yet (gpipe | 1f1b); nothing compared", flush=True)
        return {"ranks": n, "grad_accum": accum, "steps": steps, "peak_activation_mb": None}
    peaks, seconds = {}, {}
    for pipe in ("gpipe", "1f1b"):
        summary, _ = _train(cfg, n, threads, folder, data, out_dir / f"memory_n{n}_{pipe}", layers, steps, accum, pipe)
        stats = {s.get("rank"): s for s in summary.get("rank_stats") or []}
        peaks[pipe] = [stats.get(r, {}).get("peak_activation_mb") for r in range(n)]
        seconds[pipe] = summary.get("seconds")
    print()
    print("| rank | gpipe peak activation MB | 1f1b peak activation MB | gpipe / 1f1b |")
    print("|-----:|-------------------------:|------------------------:|-------------:|")
    for r, (g, o) in enumerate(zip(peaks["gpipe"], peaks["1f1b"], strict=True)):
        ratio = g / o if g is not None and o else None
        print(f"| {r:4d} | {num(g):>24s} | {num(o):>23s} | {num(ratio, '.2f'):>12s} |")
    print(f"run time: gpipe {num(seconds['gpipe'])} s, 1f1b {num(seconds['1f1b'])} s", flush=True)
    report = {"config": OmegaConf.to_container(cfg.bench), "model": folder, "ranks": n, "threads": threads,
              "grad_accum": accum, "steps": steps, "batch_size": cfg.data.batch_size,
              "peak_activation_mb": peaks, "seconds": seconds}
    return write(out_dir, "bench_train_memory.json", report)
