"""The benchmark behind ``jobs/bench.py``: same model, data and batch shapes for every contender.

Every table also shows the **ceiling**: ``cores`` x the one-thread baseline (one process,
``torch.set_num_threads(1)``), measured in the same run. The ratio to the ``cores``-thread baseline moves
with how well one process scales with threads on the machine; the share of the ceiling does not."""

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
from .engine.job import model_folder
from .infer.tasks import score_positions
from .io.data import make_batches, read_rows, sample_path

__all__ = ["run_bench", "make_dataset", "baseline_score", "baseline_generate", "run_bench_generate", "baseline_train",
           "run_bench_train", "run_bench_train_memory"]

ROOT = Path(__file__).resolve().parents[1]
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


def _setup(cfg: DictConfig, stem: str, rows: int, lo: int, hi: int):
    """Output folder, model folder, tokenizer, a generated dataset and the core count of one bench."""
    from transformers import AutoTokenizer

    b = cfg.bench
    out_dir = Path(b.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = str(model_folder(settings_from_cfg(cfg)))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = out_dir / f"{stem}_{rows}rows_{lo}-{hi}.jsonl"
    make_dataset(data, tokenizer, rows, lo, hi, b.seed)
    return out_dir, folder, tokenizer, data, b.cores or len(os.sched_getaffinity(0))


def _baselines(fn, key: str, folder: str, data: Path, cfg: DictConfig, cores: int, what: str,
               unit: str = "tokens/s"):
    """``[(threads, result)]`` of the baseline at ``cores`` threads and (with more than one core) at one
    thread, and the ceiling: ``cores`` x the one-thread result."""
    base = fn(folder, data, cfg, cores)
    print(f"baseline ({what}, 1 process, {cores} threads): {base[key]:.1f} {unit}", flush=True)
    runs = [(cores, base)] + ([(1, fn(folder, data, cfg, 1))] if cores > 1 else [])
    one = runs[-1][1][key]
    print(f"one thread: {one:.1f} {unit}; ceiling = {cores} x {one:.1f} = {cores * one:.1f} {unit} ({CEILING})",
          flush=True)
    return runs, cores * one


def _num(x, fmt: str = ".1f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _share(rows: list[dict], key: str, ceiling: float) -> None:
    for r in rows:
        r["share_of_ceiling"] = r[key] / ceiling if ceiling > 0 else None


def _print_rank_stats(rows: list[dict]) -> None:
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
            extra = f", peak activations {_num(s['peak_activation_mb'], '.0f')} MB" if "peak_activation_mb" in s else ""
            print(f"    rank {s.get('rank', '?')}: compute {_num(s.get('compute_s'))} s, wait for input "
                  f"{_num(s.get('wait_input_s'))} s, wait to send {_num(s.get('wait_send_s'))} s{extra}")
    print(flush=True)


def _write(out_dir: Path, name: str, report: dict) -> dict:
    (out_dir / name).write_text(json.dumps(report, indent=1))
    print(f"wrote {out_dir / name}")
    return report


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


def _run_job(cfg: DictConfig, n: int, script: str, overrides: list[str], what: str) -> None:
    cmd = [_mpiexec(cfg), "-n", str(n), sys.executable, str(ROOT / "jobs" / script), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{what} at {n} ranks failed:\n{proc.stderr[-3000:]}")


def _launch(cfg: DictConfig, n: int, threads: int, folder: str, data: Path, out: Path, extra: list[str] = ()) -> None:
    overrides = [f"model.path={folder}", f"data.path={data}", f"output.path={out}", "output.overwrite=true",
                 f"runtime.threads={threads}", f"split.k={cfg.split.k}", f"split.head={cfg.split.head}",
                 f"split.partition={_override(cfg.split.partition)}", f"data.batch_size={cfg.data.batch_size}",
                 f"data.max_length={cfg.data.max_length}", f"data.bucket_window={cfg.data.bucket_window}",
                 f"data.padding_side={cfg.data.padding_side}", f"model.dtype={cfg.model.dtype}", *extra]
    for key in ("wire_dtype", "inflight"):
        if cfg.runtime.get(key) is not None:
            overrides.append(f"runtime.{key}={cfg.runtime[key]}")
    _run_job(cfg, n, "infer.py", overrides, "pipeline")


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
    b = cfg.bench
    if b.get("train") or b.get("train_memory"):
        report = run_bench_train(cfg) if b.get("train") else {}
        if b.get("train_memory"):
            report["memory"] = run_bench_train_memory(cfg)
        return report
    if cfg.task.name == "generate":
        return run_bench_generate(cfg)
    if cfg.task.name != "score":
        raise SystemExit("jobs/bench.py measures task=score or task=generate")
    out_dir, folder, tokenizer, data, cores = _setup(cfg, "bench", b.rows, b.min_tokens, b.max_tokens)
    print(f"model {folder}; {b.rows} rows of {b.min_tokens}-{b.max_tokens} tokens; batch {cfg.data.batch_size}; "
          f"bucket window {cfg.data.bucket_window}; split.k={cfg.split.k}; partition {cfg.split.partition}; "
          f"{cores} cores", flush=True)
    runs, ceiling = _baselines(baseline_score, "tokens_per_s", folder, data, cfg, cores, "transformers")
    base = runs[0][1]

    def diff(nll: dict) -> float:
        return max(abs(nll[r] - v) for r, v in base["nll_mean"].items())

    rows = [{"name": f"transformers 1 proc x {t} thr", "ranks": 1, "threads": t, "tokens_per_s": x["tokens_per_s"],
             "ratio": x["tokens_per_s"] / base["tokens_per_s"], "padding_waste": x["padding_waste"],
             "peak_rss_mb": [], "max_abs_nll_diff": diff(x["nll_mean"])}
            for t, x in runs]
    for n in b.ranks:
        threads = max(1, cores // n)
        res = _pipeline(cfg, n, threads, folder, data, out_dir / f"bench_n{n}.h5")
        rows.append({"name": f"nesa_hpc {n} ranks x {threads} thr", "ranks": n, "threads": threads,
                     "tokens_per_s": res["tokens_per_s"], "ratio": res["tokens_per_s"] / base["tokens_per_s"],
                     "padding_waste": res["padding_waste"], "layers_per_rank": res["layers_per_rank"],
                     "peak_rss_mb": [s["peak_rss_mb"] for s in res["rank_stats"]],
                     "idle_share": [s["idle_share"] for s in res["rank_stats"]], "rank_stats": res["rank_stats"],
                     "max_abs_nll_diff": diff(res["nll_mean"])})
        print(f"{rows[-1]['name']}: {res['tokens_per_s']:.1f} tokens/s ({rows[-1]['ratio']:.2f}x, "
              f"{res['tokens_per_s'] / ceiling:.0%} of ceiling)", flush=True)
    _share(rows, "tokens_per_s", ceiling)
    rss = []
    for count in b.rss_rows:
        small = out_dir / f"rss_{count}rows.jsonl"
        make_dataset(small, tokenizer, count, 16, 32, b.seed)
        res = _pipeline(cfg, 2, max(1, cores // 2), folder, small, out_dir / f"rss_{count}.h5")
        rss.append({"rows": count, "peak_rss_mb": [s["peak_rss_mb"] for s in res["rank_stats"]]})
    _print_table(rows, rss, cores, ceiling)
    report = {"config": OmegaConf.to_container(cfg.bench), "model": folder, "batch_size": cfg.data.batch_size,
              "bucket_window": cfg.data.bucket_window, "split_k": cfg.split.k, "cores": cores,
              "partition": _override(cfg.split.partition), "one_thread_tokens_per_s": ceiling / cores,
              "ceiling_tokens_per_s": ceiling, "ceiling_definition": CEILING, "results": rows, "rss_check": rss}
    return _write(out_dir, "bench.json", report)


def _print_table(rows: list[dict], rss: list[dict], cores: int, ceiling: float) -> None:
    print()
    print(f"ceiling: {ceiling:.1f} tokens/s = {cores} x one-thread baseline")
    print(f"| {'run':34s} | {'layers per rank':18s} | tokens/s | ratio | of ceiling | padding | max |dNLL| "
          "| peak RSS MB per rank |")
    print(f"|{'-' * 36}|{'-' * 20}|---------:|------:|-----------:|--------:|----------:|----------------------|")
    for r in rows:
        layers = ",".join(str(x) for x in r.get("layers_per_rank", [])) or "all"
        rss_text = ", ".join(f"{x:.0f}" for x in r["peak_rss_mb"]) or "-"
        print(f"| {r['name']:34s} | {layers:18s} | {r['tokens_per_s']:8.1f} | {r['ratio']:5.2f} | "
              f"{_num(r['share_of_ceiling'], '10.0%')} | {100 * r['padding_waste']:6.1f}% | "
              f"{r['max_abs_nll_diff']:9.1e} | {rss_text} |")
    for r in rss:
        print(f"rank memory at 2 ranks, {r['rows']} rows: peak RSS {r['peak_rss_mb']} MB")
    print(flush=True)
    _print_rank_stats(rows)


def baseline_generate(folder: str, data: Path, cfg: DictConfig, threads: int) -> dict:
    """transformers ``generate`` (greedy) in one process with ``threads`` threads, on the pipeline's own
    left-padded batches; counts each row's tokens up to and including its first EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .infer.generate import eos_token_ids

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
    b, g = cfg.bench, cfg.bench.generate
    out_dir, folder, _, data, cores = _setup(cfg, "prompts", g.rows, g.min_tokens, g.max_tokens)
    max_new = cfg.task.max_new_tokens
    print(f"model {folder}; {g.rows} prompts of {g.min_tokens}-{g.max_tokens} tokens; batch {cfg.data.batch_size}; "
          f"max_new_tokens {max_new}; split.k={cfg.split.k}; partition {cfg.split.partition}; {cores} cores",
          flush=True)
    runs, ceiling = _baselines(baseline_generate, "generated_per_s", folder, data, cfg, cores,
                               "transformers generate", "generated tokens/s")
    base = runs[0][1]

    def same(got: dict) -> float:
        return sum(got[r] == t for r, t in base["tokens"].items()) / len(base["tokens"])

    rows = [{"name": f"transformers generate 1 proc x {t} thr", "ranks": 1, "threads": t, "generated": x["generated"],
             "generated_per_s": x["generated_per_s"], "ratio": x["generated_per_s"] / base["generated_per_s"],
             "same_tokens": same(x["tokens"])} for t, x in runs]
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
        rate = generated / seconds
        rows.append({"name": f"nesa_hpc {n} ranks x {threads} thr", "ranks": n, "threads": threads,
                     "generated": generated, "generated_per_s": rate, "ratio": rate / base["generated_per_s"],
                     "layers_per_rank": layers, "idle_share": [s["idle_share"] for s in stats],
                     "peak_rss_mb": [s["peak_rss_mb"] for s in stats], "rank_stats": stats, "same_tokens": same(got)})
        print(f"{rows[-1]['name']}: {rate:.1f} generated tokens/s ({rows[-1]['ratio']:.2f}x, "
              f"{rate / ceiling:.0%} of ceiling)", flush=True)
    _share(rows, "generated_per_s", ceiling)
    print()
    print(f"ceiling: {ceiling:.1f} generated tokens/s = {cores} x one-thread baseline")
    print(f"| {'run':40s} | {'layers per rank':18s} | generated | tokens/s | ratio | of ceiling "
          "| rows equal to baseline |")
    print(f"|{'-' * 42}|{'-' * 20}|----------:|---------:|------:|-----------:|-----------------------:|")
    for r in rows:
        layers = ",".join(str(x) for x in r.get("layers_per_rank", [])) or "all"
        print(f"| {r['name']:40s} | {layers:18s} | {r['generated']:9d} | {r['generated_per_s']:8.1f} | "
              f"{r['ratio']:5.2f} | {_num(r['share_of_ceiling'], '10.0%')} | {100 * r['same_tokens']:21.0f}% |")
    print(flush=True)
    _print_rank_stats(rows)
    report = {"config": OmegaConf.to_container(cfg.bench), "model": folder, "batch_size": cfg.data.batch_size,
              "max_new_tokens": max_new, "split_k": cfg.split.k, "cores": cores, "inflight": cfg.runtime.inflight,
              "partition": _override(cfg.split.partition), "one_thread_tokens_per_s": ceiling / cores,
              "ceiling_tokens_per_s": ceiling, "ceiling_definition": CEILING, "results": rows}
    return _write(out_dir, "bench_generate.json", report)


def _train_spec(cfg: DictConfig, num_layers: int):
    from .train.job import TrainSpec

    return TrainSpec(layers=(cfg.split.k, num_layers), grad_accum=cfg.bench.train_grad_accum,
                     max_steps=cfg.bench.train_steps, out_dir="unused")


def baseline_train(folder: str, data: Path, cfg: DictConfig, threads: int) -> dict:
    """LoRA training of the unsplit transformers model in one process with ``threads`` threads: the same
    rows, micro-batches, trainable layers, optimizer and schedule as ``jobs/train.py``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models.adapter import make_adapter
    from .train.job import epoch_batches, load_examples, lr_factor, make_trainable

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
                 f"split.partition={_override(cfg.split.partition)}", "train.owner_trainable=true",
                 f"runtime.threads={threads}", f"train.max_steps={steps}", f"train.grad_accum={accum}",
                 f"train.layers=[{cfg.split.k},{layers}]", f"train.out_dir={run}", "train.overwrite=true",
                 "train.export=none", "train.save_every=1000000"]
    _run_job(cfg, n, "train.py", overrides + ([f"train.pipeline={pipeline}"] if pipeline else []), "training")
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
    out_dir, folder, _, data, cores = _setup(cfg, "train", rows, b.min_tokens, b.max_tokens)
    layers = AutoConfig.from_pretrained(folder).num_hidden_layers
    pipelines = list(b.train_pipelines)
    if not _has_train_pipeline():
        print(f"note: jobs/train.py has no train.pipeline option yet; bench.train_pipelines={pipelines} ignored, "
              "each rank count runs the engine's own schedule once", flush=True)
        pipelines = [None]
    print(f"model {folder}; LoRA training of layers [{cfg.split.k}, {layers}); {b.train_steps} steps of "
          f"{b.train_grad_accum} x {cfg.data.batch_size} rows of {b.min_tokens}-{b.max_tokens} tokens; {cores} cores",
          flush=True)
    runs, ceiling = _baselines(baseline_train, "tokens_per_s", folder, data, cfg, cores, "transformers + peft LoRA")
    base = runs[0][1]

    def row(name: str, ranks: int, threads: int, rate: float, losses: list[float], **more) -> dict:
        return {"name": name, "ranks": ranks, "threads": threads, "tokens_per_s": rate,
                "ratio": rate / base["tokens_per_s"], **more,
                "max_abs_loss_diff": max(abs(a - c) for a, c in zip(losses, base["losses"], strict=True))}

    table = [row(f"transformers 1 proc x {t} thr", 1, t, x["tokens_per_s"], x["losses"], pipeline=None)
             for t, x in runs]
    for n in b.ranks:
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
    _share(table, "tokens_per_s", ceiling)
    print()
    print(f"ceiling: {ceiling:.1f} tokens/s = {cores} x one-thread baseline")
    print(f"| {'run':40s} | tokens/s | ratio | of ceiling | max |d loss| |")
    print(f"|{'-' * 42}|---------:|------:|-----------:|-------------:|")
    for r in table:
        print(f"| {r['name']:40s} | {r['tokens_per_s']:8.1f} | {r['ratio']:5.2f} | "
              f"{_num(r['share_of_ceiling'], '10.0%')} | {r['max_abs_loss_diff']:12.1e} |")
    print(flush=True)
    _print_rank_stats(table)
    report = {"config": OmegaConf.to_container(cfg.bench), "model": folder, "batch_size": cfg.data.batch_size,
              "split_k": cfg.split.k, "cores": cores, "partition": _override(cfg.split.partition),
              "one_thread_tokens_per_s": ceiling / cores, "ceiling_tokens_per_s": ceiling,
              "ceiling_definition": CEILING, "results": table}
    return _write(out_dir, "bench_train.json", report)


def run_bench_train_memory(cfg: DictConfig) -> dict:
    """Peak activation memory per rank (bytes saved for backward, from summary.json's ``rank_stats``) of
    ``jobs/train.py`` with ``train.pipeline=gpipe`` against ``1f1b``: the largest of ``bench.ranks``,
    ``bench.memory_steps`` steps of ``bench.memory_grad_accum`` micro-batches."""
    from transformers import AutoConfig

    b = cfg.bench
    n, accum, steps = max(b.ranks), b.memory_grad_accum, b.memory_steps
    rows = max(b.rows, steps * accum * cfg.data.batch_size)
    out_dir, folder, _, data, cores = _setup(cfg, "train", rows, b.min_tokens, b.max_tokens)
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
        print(f"| {r:4d} | {_num(g):>24s} | {_num(o):>23s} | {_num(ratio, '.2f'):>12s} |")
    print(f"run time: gpipe {_num(seconds['gpipe'])} s, 1f1b {_num(seconds['1f1b'])} s", flush=True)
    report = {"config": OmegaConf.to_container(cfg.bench), "model": folder, "ranks": n, "threads": threads,
              "grad_accum": accum, "steps": steps, "batch_size": cfg.data.batch_size,
              "peak_activation_mb": peaks, "seconds": seconds}
    return _write(out_dir, "bench_train_memory.json", report)
