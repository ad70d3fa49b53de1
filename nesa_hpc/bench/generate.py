"""``task=generate`` with ``bench.generate.workload=fixed``: generated tokens/s of transformers ``generate`` in
one process against the pipeline at N ranks, every row asking for ``task.max_new_tokens``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import h5py
import torch
from omegaconf import DictConfig, OmegaConf

from ..io.batch import make_batches
from ..io.inputs import RowFields
from ..io.read import read_rows
from .common import (
    CEILING,
    baselines,
    generate_threads,
    launch,
    num,
    override,
    print_rank_stats,
    ranks,
    setup,
    share,
    write,
)

__all__ = ["until_eos", "baseline_generate", "read_generated", "run_bench_generate"]


def until_eos(seq: list[int], eos: Iterable[int], cap: int) -> list[int]:
    """The first ``cap`` tokens of ``seq``, cut after the first EOS: what a row generates when it ends at EOS
    or at its own max tokens."""
    stop = set(eos)
    seq = seq[:cap]
    return seq[:next((i + 1 for i, t in enumerate(seq) if t in stop), len(seq))]


def baseline_generate(folder: str, data: Path, cfg: DictConfig, threads: int,
                      caps: dict[int, int] | None = None) -> dict:
    """transformers ``generate`` (greedy) in one process with ``threads`` threads on left-padded batches of
    ``data.batch_size``; counts each row's tokens up to and including its first EOS.

    Without ``caps``: the pipeline's own batches of the JSONL ``data`` (bucketed by ``data.bucket_window``),
    ``task.max_new_tokens`` per row. With ``caps`` (row -> max tokens): ``data`` is an OpenAI batch file,
    batches keep input order, each batch runs to its largest cap and each row is cut at its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..infer.generate import eos_token_ids

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = sorted(eos_token_ids(tokenizer, folder, model.config))
    d = cfg.data
    rows = read_rows(data) if caps is None else read_rows(data, "openai_batch", fields=RowFields(openai=True))
    batches = list(make_batches(rows, tokenizer, d.batch_size, d.max_length, "left",
                                bucket_window=d.bucket_window if caps is None else 0))
    tokens: dict[int, list[int]] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            limits = [caps[r] if caps else cfg.task.max_new_tokens for r in b.rows.tolist()]
            out = model.generate(b.ids, attention_mask=b.mask, do_sample=False, max_new_tokens=max(limits),
                                 eos_token_id=eos, pad_token_id=eos[0] if eos else 0)
            for r, cap, seq in zip(b.rows.tolist(), limits, out[:, b.ids.shape[1]:].tolist(), strict=True):
                tokens[r] = until_eos(seq, eos, cap)
    seconds = time.perf_counter() - start
    generated = sum(len(t) for t in tokens.values())
    return {"seconds": seconds, "generated": generated, "generated_per_s": generated / seconds, "tokens": tokens}


def read_generated(out: Path) -> dict:
    """A ``task=generate`` results file: each row's generated ids, the run's seconds, rank stats and layers."""
    with h5py.File(out) as f:
        got = {int(r): [int(t) for t in ids] for r, ids in zip(f["row"][()], f["generated_ids"][()], strict=True)}
        a = f.attrs
        return {"tokens": got, "seconds": float(a["seconds"]), "rank_stats": json.loads(a["rank_stats"]),
                "layers_per_rank": json.loads(a["layers_per_rank"]), "turns": bool(a.get("turns", False))}


def run_bench_generate(cfg: DictConfig) -> dict:
    """Generated tokens/s of transformers ``generate`` in one process against the pipeline at N ranks:
    same prompts, batch size and ``task.max_new_tokens``, greedy, in one invocation."""
    g = cfg.bench.generate
    out_dir, folder, _, data, cores = setup(cfg, "prompts", g.rows, g.min_tokens, g.max_tokens)
    max_new = cfg.task.max_new_tokens
    print(f"model {folder}; {g.rows} prompts of {g.min_tokens}-{g.max_tokens} tokens; batch {cfg.data.batch_size}; "
          f"max_new_tokens {max_new}; split.k={cfg.split.k}; partition {cfg.split.partition}; {cores} cores",
          flush=True)
    runs, ceiling = baselines(baseline_generate, "generated_per_s", folder, data, cfg, cores,
                              "transformers generate", "generated tokens/s")
    base = runs[0][1]

    def same(got: dict) -> float:
        return sum(got[r] == t for r, t in base["tokens"].items()) / len(base["tokens"])

    rows = [{"name": f"transformers generate 1 proc x {t} thr", "ranks": 1, "threads": t, "generated": x["generated"],
             "generated_per_s": x["generated_per_s"], "ratio": x["generated_per_s"] / base["generated_per_s"],
             "same_tokens": same(x["tokens"])} for t, x in runs]
    for n in ranks(cfg):
        threads, turns = generate_threads(cfg, n, cores)
        out = out_dir / f"bench_generate_n{n}.h5"
        launch(cfg, n, threads, folder, data, out, [f"task.max_new_tokens={max_new}", "task=generate", *turns])
        res = read_generated(out)
        generated = sum(len(t) for t in res["tokens"].values())
        rate = generated / res["seconds"]
        stats = res["rank_stats"]
        name = f"nesa_hpc {n} ranks x {threads} thr" + (", by turns" if res["turns"] else "")
        rows.append({"name": name, "ranks": n, "threads": threads, "turns": res["turns"],
                     "generated": generated, "generated_per_s": rate, "ratio": rate / base["generated_per_s"],
                     "layers_per_rank": res["layers_per_rank"], "idle_share": [s["idle_share"] for s in stats],
                     "peak_rss_mb": [s["peak_rss_mb"] for s in stats], "rank_stats": stats,
                     "same_tokens": same(res["tokens"])})
        print(f"{rows[-1]['name']}: {rate:.1f} generated tokens/s ({rows[-1]['ratio']:.2f}x, "
              f"{rate / ceiling:.0%} of ceiling)", flush=True)
    share(rows, "generated_per_s", ceiling)
    _print_table(rows, cores, ceiling)
    report = {"config": OmegaConf.to_container(cfg.bench), "model": folder, "workload": "fixed",
              "batch_size": cfg.data.batch_size, "max_new_tokens": max_new, "split_k": cfg.split.k, "cores": cores,
              "inflight": cfg.runtime.inflight, "partition": override(cfg.split.partition),
              "one_thread_tokens_per_s": ceiling / cores, "ceiling_tokens_per_s": ceiling,
              "ceiling_definition": CEILING, "results": rows}
    return write(out_dir, "bench_generate.json", report)


def _print_table(rows: list[dict], cores: int, ceiling: float) -> None:
    print()
    print(f"ceiling: {ceiling:.1f} generated tokens/s = {cores} x one-thread baseline")
    print(f"| {'run':52s} | {'layers per rank':18s} | generated | tokens/s | ratio | of ceiling "
          "| rows equal to baseline |")
    print(f"|{'-' * 54}|{'-' * 20}|----------:|---------:|------:|-----------:|-----------------------:|")
    for r in rows:
        layers = ",".join(str(x) for x in r.get("layers_per_rank", [])) or "all"
        print(f"| {r['name']:52s} | {layers:18s} | {r['generated']:9d} | {r['generated_per_s']:8.1f} | "
              f"{r['ratio']:5.2f} | {num(r['share_of_ceiling'], '10.0%')} | {100 * r['same_tokens']:21.0f}% |")
    print(flush=True)
    print_rank_stats(rows)
