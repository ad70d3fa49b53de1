"""``task=score``: scored tokens/s of plain transformers in one process against the pipeline at N ranks, with
the max |NLL| difference per row and an optional rank-0 memory check."""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ..infer.tasks import score_positions
from ..io.batch import make_batches
from ..io.read import read_rows
from .common import (
    CEILING,
    baselines,
    launch,
    make_dataset,
    num,
    override,
    print_rank_stats,
    ranks,
    setup,
    share,
    write,
)

__all__ = ["baseline_score", "run_bench_score"]


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


def _pipeline(cfg: DictConfig, n: int, threads: int, folder: str, data: Path, out: Path) -> dict:
    launch(cfg, n, threads, folder, data, out)
    with h5py.File(out) as f:
        a = f.attrs
        nll = dict(zip(f["row"][()].tolist(), f["nll_mean"][()].tolist(), strict=True))
        return {"seconds": float(a["seconds"]), "tokens": int(a["tokens"]),
                "tokens_per_s": float(a["tokens"]) / float(a["seconds"]),
                "padding_waste": float(a["padding_waste"]), "rank_stats": json.loads(a["rank_stats"]),
                "layers_per_rank": json.loads(a["layers_per_rank"]), "nll_mean": nll}


def run_bench_score(cfg: DictConfig) -> dict:
    """Scored tokens/s of transformers in one process (at ``cores`` threads and at one) against the pipeline
    at each of ``bench.ranks``; writes ``bench.json``."""
    b = cfg.bench
    out_dir, folder, tokenizer, data, cores = setup(cfg, "bench", b.rows, b.min_tokens, b.max_tokens)
    print(f"model {folder}; {b.rows} rows of {b.min_tokens}-{b.max_tokens} tokens; batch {cfg.data.batch_size}; "
          f"bucket window {cfg.data.bucket_window}; split.k={cfg.split.k}; partition {cfg.split.partition}; "
          f"{cores} cores", flush=True)
    runs, ceiling = baselines(baseline_score, "tokens_per_s", folder, data, cfg, cores, "transformers")
    base = runs[0][1]

    def diff(nll: dict) -> float:
        return max(abs(nll[r] - v) for r, v in base["nll_mean"].items())

    rows = [{"name": f"transformers 1 proc x {t} thr", "ranks": 1, "threads": t, "tokens_per_s": x["tokens_per_s"],
             "ratio": x["tokens_per_s"] / base["tokens_per_s"], "padding_waste": x["padding_waste"],
             "peak_rss_mb": [], "max_abs_nll_diff": diff(x["nll_mean"])}
            for t, x in runs]
    for n in ranks(cfg):
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
    share(rows, "tokens_per_s", ceiling)
    rss = _rss_check(cfg, out_dir, folder, tokenizer, cores)
    _print_table(rows, rss, cores, ceiling)
    report = {"config": OmegaConf.to_container(cfg.bench), "model": folder, "batch_size": cfg.data.batch_size,
              "bucket_window": cfg.data.bucket_window, "split_k": cfg.split.k, "cores": cores,
              "partition": override(cfg.split.partition), "one_thread_tokens_per_s": ceiling / cores,
              "ceiling_tokens_per_s": ceiling, "ceiling_definition": CEILING, "results": rows, "rss_check": rss}
    return write(out_dir, "bench.json", report)


def _rss_check(cfg: DictConfig, out_dir: Path, folder: str, tokenizer, cores: int) -> list[dict]:
    """Peak RSS per rank at 2 ranks for each of ``bench.rss_rows`` rows of 16-32 tokens."""
    rss = []
    for count in cfg.bench.rss_rows:
        small = out_dir / f"rss_{count}rows.jsonl"
        make_dataset(small, tokenizer, count, 16, 32, cfg.bench.seed)
        res = _pipeline(cfg, 2, max(1, cores // 2), folder, small, out_dir / f"rss_{count}.h5")
        rss.append({"rows": count, "peak_rss_mb": [s["peak_rss_mb"] for s in res["rank_stats"]]})
    return rss


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
              f"{num(r['share_of_ceiling'], '10.0%')} | {100 * r['padding_waste']:6.1f}% | "
              f"{r['max_abs_nll_diff']:9.1e} | {rss_text} |")
    for r in rss:
        print(f"rank memory at 2 ranks, {r['rows']} rows: peak RSS {r['peak_rss_mb']} MB")
    print(flush=True)
    print_rank_stats(rows)
