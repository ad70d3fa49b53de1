"""The benchmark behind ``jobs/bench.py``: same model, data and batch shapes for every contender."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from .config import settings_from_cfg
from .data import make_batches, read_rows, sample_path
from .runner import _model_folder
from .tasks import score_positions

__all__ = ["run_bench", "make_dataset", "baseline_score", "baseline_generate", "run_bench_generate", "baseline_train",
           "run_bench_train"]

ROOT = Path(__file__).resolve().parents[1]


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


def baseline_score(folder: str, data: Path, cfg: DictConfig, threads: int) -> dict:
    """Plain transformers in one process with ``threads`` threads, on the pipeline's own batches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    d = cfg.data
    batches = list(make_batches(read_rows(data), tokenizer, d.batch_size, d.max_length, d.padding_side,
                                bucket_window=d.bucket_window))
    nll_mean: dict[int, float] = {}
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            logits = model(b.ids, attention_mask=b.mask, position_ids=b.pos).logits  # (B, T, V)
            sel = score_positions(b.mask)
            nll = F.cross_entropy(logits[:, :-1][sel], b.ids[:, 1:][sel], reduction="none")
            row_of = torch.arange(b.size).unsqueeze(1).expand_as(sel)[sel]
            sums = torch.zeros(b.size, dtype=torch.float64).index_add_(0, row_of, nll.double())
            for r, s, n in zip(b.rows.tolist(), sums.tolist(), sel.sum(-1).tolist(), strict=True):
                nll_mean[r] = s / n
            tokens += b.tokens
    seconds = time.perf_counter() - start
    padded = sum(b.ids.numel() for b in batches)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "padding_waste": 1 - tokens / padded, "nll_mean": nll_mean}


def _mpiexec(cfg: DictConfig) -> str:
    if cfg.bench.mpiexec:
        return str(cfg.bench.mpiexec)
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else (shutil.which("mpiexec") or "mpiexec")


def _launch(cfg: DictConfig, n: int, threads: int, folder: str, data: Path, out: Path, extra: list[str] = ()) -> None:
    overrides = [f"model.path={folder}", f"data.path={data}", f"output.path={out}", "output.overwrite=true",
                 f"runtime.threads={threads}", f"split.k={cfg.split.k}", f"split.head={cfg.split.head}",
                 f"split.partition={_override(cfg.split.partition)}", f"data.batch_size={cfg.data.batch_size}",
                 f"data.max_length={cfg.data.max_length}", f"data.bucket_window={cfg.data.bucket_window}",
                 f"data.padding_side={cfg.data.padding_side}", f"model.dtype={cfg.model.dtype}", *extra]
    for key in ("wire_dtype", "inflight"):
        if cfg.runtime.get(key) is not None:
            overrides.append(f"runtime.{key}={cfg.runtime[key]}")
    cmd = [_mpiexec(cfg), "-n", str(n), sys.executable, str(ROOT / "jobs" / "infer.py"), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline at {n} ranks failed:\n{proc.stderr[-3000:]}")


def _pipeline(cfg: DictConfig, n: int, threads: int, folder: str, data: Path, out: Path,
              extra: list[str] = ()) -> dict:
    _launch(cfg, n, threads, folder, data, out, extra)
    with h5py.File(out) as f:
        a = f.attrs
        nll = dict(zip(f["row"][()].tolist(), f["nll_mean"][()].tolist(), strict=True))
        return {"seconds": float(a["seconds"]), "tokens": int(a["tokens"]),
                "tokens_per_s": float(a["tokens"]) / float(a["seconds"]),
                "padding_waste": float(a["padding_waste"]), "rank_stats": json.loads(a["rank_stats"]),
                "layers_per_rank": json.loads(a["layers_per_rank"]), "nll_mean": nll}


def _override(value) -> str:
    return f"[{','.join(str(v) for v in value)}]" if OmegaConf.is_list(value) else str(value)


def run_bench(cfg: DictConfig) -> dict:
    from transformers import AutoTokenizer

    b = cfg.bench
    if b.get("train"):
        return run_bench_train(cfg)
    if cfg.task.name == "generate":
        return run_bench_generate(cfg)
    if cfg.task.name != "score":
        raise SystemExit("jobs/bench.py measures task=score or task=generate")
    out_dir = Path(b.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = str(_model_folder(settings_from_cfg(cfg)))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = out_dir / f"bench_{b.rows}rows_{b.min_tokens}-{b.max_tokens}.jsonl"
    make_dataset(data, tokenizer, b.rows, b.min_tokens, b.max_tokens, b.seed)
    cores = b.cores or len(os.sched_getaffinity(0))
    print(f"model {folder}; {b.rows} rows of {b.min_tokens}-{b.max_tokens} tokens; batch {cfg.data.batch_size}; "
          f"bucket window {cfg.data.bucket_window}; split.k={cfg.split.k}; partition {cfg.split.partition}; "
          f"{cores} cores", flush=True)
    base = baseline_score(folder, data, cfg, cores)
    print(f"baseline (transformers, 1 process, {cores} threads): {base['tokens_per_s']:.1f} tokens/s", flush=True)
    rows = [{"name": f"transformers 1 proc x {cores} thr", "ranks": 1, "threads": cores,
             "tokens_per_s": base["tokens_per_s"], "ratio": 1.0, "padding_waste": base["padding_waste"],
             "peak_rss_mb": [], "max_abs_nll_diff": 0.0}]
    for n in b.ranks:
        threads = max(1, cores // n)
        res = _pipeline(cfg, n, threads, folder, data, out_dir / f"bench_n{n}.h5")
        diff = max(abs(res["nll_mean"][r] - v) for r, v in base["nll_mean"].items())
        rows.append({"name": f"nesa_hpc {n} ranks x {threads} thr", "ranks": n, "threads": threads,
                     "tokens_per_s": res["tokens_per_s"], "ratio": res["tokens_per_s"] / base["tokens_per_s"],
                     "padding_waste": res["padding_waste"], "layers_per_rank": res["layers_per_rank"],
                     "peak_rss_mb": [s["peak_rss_mb"] for s in res["rank_stats"]],
                     "idle_share": [s["idle_share"] for s in res["rank_stats"]], "max_abs_nll_diff": diff})
        print(f"{rows[-1]['name']}: {res['tokens_per_s']:.1f} tokens/s ({rows[-1]['ratio']:.2f}x)", flush=True)
    rss = []
    for count in b.rss_rows:
        small = out_dir / f"rss_{count}rows.jsonl"
        make_dataset(small, tokenizer, count, 16, 32, b.seed)
        res = _pipeline(cfg, 2, max(1, cores // 2), folder, small, out_dir / f"rss_{count}.h5")
        rss.append({"rows": count, "peak_rss_mb": [s["peak_rss_mb"] for s in res["rank_stats"]]})
    _print_table(rows, rss)
    report = {"config": OmegaConf.to_container(cfg.bench), "model": folder, "batch_size": cfg.data.batch_size,
              "bucket_window": cfg.data.bucket_window, "split_k": cfg.split.k, "cores": cores,
              "partition": _override(cfg.split.partition), "results": rows, "rss_check": rss}
    (out_dir / "bench.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out_dir / 'bench.json'}")
    return report


def _print_table(rows: list[dict], rss: list[dict]) -> None:
    print()
    print(f"| {'run':34s} | {'layers per rank':18s} | tokens/s | ratio | padding | max |dNLL| | peak RSS MB per rank |")
    print(f"|{'-' * 36}|{'-' * 20}|---------:|------:|--------:|----------:|----------------------|")
    for r in rows:
        layers = ",".join(str(x) for x in r.get("layers_per_rank", [])) or "all"
        rss_text = ", ".join(f"{x:.0f}" for x in r["peak_rss_mb"]) or "-"
        print(f"| {r['name']:34s} | {layers:18s} | {r['tokens_per_s']:8.1f} | {r['ratio']:5.2f} | "
              f"{100 * r['padding_waste']:6.1f}% | {r['max_abs_nll_diff']:9.1e} | {rss_text} |")
    for r in rss:
        print(f"rank memory at 2 ranks, {r['rows']} rows: peak RSS {r['peak_rss_mb']} MB")
    print(flush=True)



def baseline_generate(folder: str, data: Path, cfg: DictConfig, threads: int) -> dict:
    """transformers ``generate`` (greedy) in one process with ``threads`` threads, on the pipeline's own
    left-padded batches; counts each row's tokens up to and including its first EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .generate import eos_token_ids

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = sorted(eos_token_ids(tokenizer, folder, model.config))
    d = cfg.data
    batches = list(make_batches(read_rows(data), tokenizer, d.batch_size, d.max_length, "left",
                                bucket_window=d.bucket_window))
    tokens: dict[int, list[int]] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            out = model.generate(b.ids, attention_mask=b.mask, do_sample=False, max_new_tokens=cfg.task.max_new_tokens,
                                 eos_token_id=eos, pad_token_id=eos[0] if eos else 0)
            for r, seq in zip(b.rows.tolist(), out[:, b.ids.shape[1]:].tolist(), strict=True):
                end = next((i + 1 for i, t in enumerate(seq) if t in eos), len(seq))
                tokens[r] = seq[:end]
    seconds = time.perf_counter() - start
    generated = sum(len(t) for t in tokens.values())
    return {"seconds": seconds, "generated": generated, "generated_per_s": generated / seconds, "tokens": tokens}


def run_bench_generate(cfg: DictConfig) -> dict:
    """Generated tokens/s of transformers ``generate`` in one process against the pipeline at N ranks:
    same prompts, batch size and ``task.max_new_tokens``, greedy, in one invocation."""
    from transformers import AutoTokenizer

    b = cfg.bench
    out_dir = Path(b.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = str(_model_folder(settings_from_cfg(cfg)))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    g = b.generate
    data = out_dir / f"prompts_{g.rows}rows_{g.min_tokens}-{g.max_tokens}.jsonl"
    make_dataset(data, tokenizer, g.rows, g.min_tokens, g.max_tokens, b.seed)
    cores = b.cores or len(os.sched_getaffinity(0))
    max_new = cfg.task.max_new_tokens
    print(f"model {folder}; {g.rows} prompts of {g.min_tokens}-{g.max_tokens} tokens; batch {cfg.data.batch_size}; "
          f"max_new_tokens {max_new}; split.k={cfg.split.k}; partition {cfg.split.partition}; {cores} cores",
          flush=True)
    base = baseline_generate(folder, data, cfg, cores)
    print(f"baseline (transformers generate, 1 process, {cores} threads): {base['generated_per_s']:.1f} "
          "generated tokens/s", flush=True)
    rows = [{"name": f"transformers generate 1 proc x {cores} thr", "ranks": 1, "threads": cores,
             "generated": base["generated"], "generated_per_s": base["generated_per_s"], "ratio": 1.0,
             "same_tokens": 1.0}]
    for n in b.ranks:
        threads = max(1, cores // n)
        out = out_dir / f"bench_generate_n{n}.h5"
        _launch(cfg, n, threads, folder, data, out, [f"task.max_new_tokens={max_new}", "task=generate"])
        with h5py.File(out) as f:
            got = {int(r): [int(t) for t in ids] for r, ids in zip(f["row"][()], f["generated_ids"][()], strict=True)}
            seconds = float(f.attrs["seconds"])
            stats = json.loads(f.attrs["rank_stats"])
            layers = json.loads(f.attrs["layers_per_rank"])
        generated = sum(len(t) for t in got.values())
        same = sum(got[r] == t for r, t in base["tokens"].items()) / len(base["tokens"])
        rate = generated / seconds
        rows.append({"name": f"nesa_hpc {n} ranks x {threads} thr", "ranks": n, "threads": threads,
                     "generated": generated, "generated_per_s": rate, "ratio": rate / base["generated_per_s"],
                     "layers_per_rank": layers, "idle_share": [s["idle_share"] for s in stats],
                     "peak_rss_mb": [s["peak_rss_mb"] for s in stats], "same_tokens": same})
        print(f"{rows[-1]['name']}: {rate:.1f} generated tokens/s ({rows[-1]['ratio']:.2f}x)", flush=True)
    print()
    print(f"| {'run':40s} | {'layers per rank':18s} | generated | tokens/s | ratio | rows equal to baseline |")
    print(f"|{'-' * 42}|{'-' * 20}|----------:|---------:|------:|-----------------------:|")
    for r in rows:
        layers = ",".join(str(x) for x in r.get("layers_per_rank", [])) or "all"
        print(f"| {r['name']:40s} | {layers:18s} | {r['generated']:9d} | {r['generated_per_s']:8.1f} | "
              f"{r['ratio']:5.2f} | {100 * r['same_tokens']:21.0f}% |")
    print(flush=True)
    report = {"config": OmegaConf.to_container(cfg.bench), "model": folder, "batch_size": cfg.data.batch_size,
              "max_new_tokens": max_new, "split_k": cfg.split.k, "cores": cores, "inflight": cfg.runtime.inflight,
              "partition": _override(cfg.split.partition), "results": rows}
    (out_dir / "bench_generate.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out_dir / 'bench_generate.json'}")
    return report


def _train_spec(cfg: DictConfig, num_layers: int):
    from .train import TrainSpec

    return TrainSpec(layers=(cfg.split.k, num_layers), grad_accum=cfg.bench.train_grad_accum,
                     max_steps=cfg.bench.train_steps, out_dir="unused")


def baseline_train(folder: str, data: Path, cfg: DictConfig, threads: int) -> dict:
    """LoRA training of the unsplit transformers model in one process with ``threads`` threads: the same
    rows, micro-batches, trainable layers, optimizer and schedule as ``jobs/train.py``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import settings_from_cfg as settings_of
    from .models import make_adapter
    from .train import epoch_batches, load_examples, lr_factor, make_trainable

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
    examples = load_examples(settings_of(settings), spec, tokenizer)
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


def run_bench_train(cfg: DictConfig) -> dict:
    """Training tokens/s (forward + backward + AdamW) of the unsplit model in one process against
    ``jobs/train.py`` at N ranks, same steps, in one invocation. The workers hold every layer after
    ``split.k`` (no owner tail: rank 0's layers stay frozen), so both train the same parameters."""
    from transformers import AutoConfig, AutoTokenizer

    b = cfg.bench
    out_dir = Path(b.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = str(_model_folder(settings_from_cfg(cfg)))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    need = b.train_steps * b.train_grad_accum * cfg.data.batch_size
    rows = max(b.rows, need)
    data = out_dir / f"train_{rows}rows_{b.min_tokens}-{b.max_tokens}.jsonl"
    make_dataset(data, tokenizer, rows, b.min_tokens, b.max_tokens, b.seed)
    cores = b.cores or len(os.sched_getaffinity(0))
    layers = AutoConfig.from_pretrained(folder).num_hidden_layers
    print(f"model {folder}; LoRA training of layers [{cfg.split.k}, {layers}); {b.train_steps} steps of "
          f"{b.train_grad_accum} x {cfg.data.batch_size} rows of {b.min_tokens}-{b.max_tokens} tokens; {cores} cores",
          flush=True)
    base = baseline_train(folder, data, cfg, cores)
    print(f"baseline (transformers + peft LoRA, 1 process, {cores} threads): {base['tokens_per_s']:.1f} tokens/s",
          flush=True)
    table = [{"name": f"transformers 1 proc x {cores} thr", "ranks": 1, "threads": cores,
              "tokens_per_s": base["tokens_per_s"], "ratio": 1.0, "max_abs_loss_diff": 0.0}]
    for n in b.ranks:
        threads = max(1, cores // n)
        run = out_dir / f"train_n{n}"
        overrides = [f"model.path={folder}", f"data.path={data}", f"data.batch_size={cfg.data.batch_size}",
                     f"data.max_length={cfg.data.max_length}", f"split.k={cfg.split.k}", f"split.head={cfg.split.head}",
                     f"split.partition={_override(cfg.split.partition)}", "split.owner_tail=0",
                     f"runtime.threads={threads}", f"train.max_steps={b.train_steps}",
                     f"train.grad_accum={b.train_grad_accum}",
                     f"train.layers=[{cfg.split.k},{layers}]", f"train.out_dir={run}", "train.overwrite=true",
                     "train.export=none", "train.save_every=1000000"]
        cmd = [_mpiexec(cfg), "-n", str(n), sys.executable, str(ROOT / "jobs" / "train.py"), *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"training at {n} ranks failed:\n{proc.stderr[-3000:]}")
        summary = json.loads((run / "summary.json").read_text())
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        diff = max(abs(a - c) for a, c in zip(losses, base["losses"], strict=True))
        table.append({"name": f"nesa_hpc {n} ranks x {threads} thr", "ranks": n, "threads": threads,
                      "tokens_per_s": summary["tokens_per_s"], "ratio": summary["tokens_per_s"] / base["tokens_per_s"],
                      "max_abs_loss_diff": diff})
        print(f"{table[-1]['name']}: {summary['tokens_per_s']:.1f} tokens/s ({table[-1]['ratio']:.2f}x)", flush=True)
    print()
    print(f"| {'run':34s} | tokens/s | ratio | max |d loss| |")
    print(f"|{'-' * 36}|---------:|------:|-------------:|")
    for r in table:
        print(f"| {r['name']:34s} | {r['tokens_per_s']:8.1f} | {r['ratio']:5.2f} | {r['max_abs_loss_diff']:12.1e} |")
    print(flush=True)
    report = {"config": OmegaConf.to_container(cfg.bench), "model": folder, "batch_size": cfg.data.batch_size,
              "split_k": cfg.split.k, "cores": cores, "partition": _override(cfg.split.partition), "results": table}
    (out_dir / "bench_train.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out_dir / 'bench_train.json'}")
    return report
