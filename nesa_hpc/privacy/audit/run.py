"""The audit job: every rank evaluates its share of the (k, level) grid, rank 0 writes the report.

The start-up is agreed between the ranks as a split job's (:func:`~nesa_hpc.engine.job.all_ok`,
:func:`~nesa_hpc.engine.job.agree`): an error one rank sees ends every rank with one message.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from ...config import Settings, settings_from_cfg
from ...engine.job import JobError, agree, all_ok, model_folder, settle, setup_logging
from ...errors import ConfigError
from ...io.public_text import load_texts
from ...io.read import sample_path
from ...models.weights import build_adapter, load_modules
from ..mechanism import percentile_clip, unit_norms
from .attackers import Attacks
from .corpus import Corpus, context_log_prior, finish, owner_alone
from .gradient import gradient_audit
from .point import measure_point
from .report import plot, write
from .settings import AuditSettings, audit_settings

__all__ = ["run_audit", "main"]

log = logging.getLogger("nesa_hpc")


def run_audit(cfg: DictConfig, comm=None) -> list[dict] | None:
    """Every rank evaluates its share of the (k, level) grid; rank 0 gathers and writes the report."""
    from mpi4py import MPI
    from transformers import AutoTokenizer

    comm = comm or MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    setup_logging(rank)
    s, settings, folder, adapter = _start(cfg, comm)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    start = time.perf_counter()
    public = Corpus(load_texts(s.public_path, s.max_public_rows), tokenizer, s, first_row=1_000_000)
    held = Corpus(load_texts(s.eval_path or sample_path(), s.max_eval_rows), tokenizer, s, first_row=0)
    attacks = Attacks(adapter, s.max_length)
    counts = torch.bincount(public.ids, minlength=adapter.config.vocab_size)
    base = _priors(adapter, held, counts, adapter.config.vocab_size)
    alone = owner_alone(adapter, held, counts, s.owner_alone)  # every rank: a bad folder ends them all alike
    grid = [(k, level) for k in s.ks for level in s.levels]
    rows = _audit_points(adapter, attacks, public, held, grid[rank::size], s, base, alone)
    # the last rank audits the gradient message too (rank 0 writes the files)
    grad_rows = gradient_audit(adapter, public, held, s) if s.grad_levels and rank == size - 1 else []
    settle(comm)
    grad_rows = comm.bcast(grad_rows, root=size - 1)
    gathered = comm.gather(rows, root=0)
    if rank != 0:
        return None
    table = sorted((r for part in gathered for r in part),
                   key=lambda r: (r["k"], -r["epsilon"] if s.mechanism == "gaussian" else r["sigma"]))
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = _meta(s, settings, folder, alone, round(time.perf_counter() - start, 1), size)
    write(out, table, meta, grad_rows)
    plot(out, table, meta)
    log.info("audit: %d settings in %.0f s -> %s", len(table), meta["seconds"], out)
    return table


def _start(cfg: DictConfig, comm) -> tuple[AuditSettings, Settings, str, object]:
    """The options, the model folder and the whole model with its weights (and ``model.adapters``) on every rank,
    agreed: an error one rank sees ends every rank. The options and the split points are checked on rank 0 (every
    rank composes the same config), the model is read on every rank."""
    s = agree(comm, lambda: audit_settings(cfg))
    settings = agree(comm, lambda: settings_from_cfg(cfg))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    folder = agree(comm, lambda: model_folder(settings))
    adapter = all_ok(comm, lambda: build_adapter(folder))
    agree(comm, lambda: _check_ks(s, adapter.num_layers))
    all_ok(comm, lambda: _load_weights(adapter, folder, settings))
    return s, settings, folder, adapter


def _check_ks(s: AuditSettings, num_layers: int) -> None:
    if any(k > num_layers for k in s.ks):
        raise ConfigError(f"audit.ks={list(s.ks)}: the model has {num_layers} layers, so k <= {num_layers}")


def _load_weights(adapter, folder: str, settings: Settings) -> None:
    """Every layer's weights (each rank runs the whole model), ``model.adapters`` merged."""
    modules = [*adapter.embed_modules, *adapter.stage_modules,
               *(adapter.head_modules if adapter.has_head else ())]
    load_modules(adapter, folder, modules + [adapter.layer_module(i) for i in range(adapter.num_layers)],
                 settings.model_dtype)
    if settings.model_adapters:
        from ...models.lora import apply_adapters, check_adapter_use

        check_adapter_use(settings.model_adapters, *apply_adapters(adapter, settings.model_adapters,
                                                                    range(adapter.num_layers)))


def _priors(adapter, held: Corpus, counts: torch.Tensor, vocab_size: int) -> dict:
    """What an attacker knows without Z: the floor (always the public text's most frequent token), p_prior (the
    held-out rows' most common token's frequency), the MAP decoder's log prior and, for an attacker with context,
    every held-out token's distribution given its true prefix and its top probability kappa."""
    top = int(counts.argmax())
    held_counts = torch.bincount(held.ids, minlength=vocab_size)
    # the MAP decoder's prior: the public text's unigram distribution (add-one smoothed)
    log_prior = torch.log((counts.double() + 1) / (counts.sum() + len(counts))).float()
    if adapter.has_head:
        context = context_log_prior(adapter, held, log_prior)
        kappa = context.max(-1).values.exp().double()
    else:  # an encoder without an LM head: no public LM to give the context
        context, kappa = None, None
    return {"floor": float((held.ids == top).float().mean()), "p_prior": float(held_counts.max() / len(held.ids)),
            "log_prior": log_prior, "context_log_prior": context, "kappa": kappa}


def _audit_points(adapter, attacks: Attacks, public: Corpus, held: Corpus, points: list[tuple[int, float | None]],
                  s: AuditSettings, base: dict, alone: dict) -> list[dict]:
    """The table rows of this rank's ``points``, each logged."""
    clean_by_k: dict[int, dict] = {}
    rows = []
    for k, level in points:
        if k not in clean_by_k:
            clean_by_k[k] = _clean(adapter, public, held, k, s, base)
        row = measure_point(adapter, attacks, public, held, k, level, s, clean_by_k[k])
        row.update(unigram_perplexity=alone["unigram_perplexity"],
                   owner_alone_perplexity=alone["owner_alone_perplexity"].get(k, math.nan))
        rows.append(row)
        _log_point(row, k, level, s)
    return rows


def _clean(adapter, public: Corpus, held: Corpus, k: int, s: AuditSettings, base: dict) -> dict:
    """The noise-free figures at split point ``k`` (perplexity, pooled final states) and the clip."""
    nll, count, pooled = finish(adapter, held, held.at(adapter, k), k)
    unit = "token" if k == 0 else "sequence"
    # the clip calibration of privacy.clip=auto, on the public states already computed
    norms = torch.cat([unit_norms(z.float(), b.mask, unit)
                       for b, z in zip(public.batches, public.at(adapter, k), strict=True)])
    clip = percentile_clip(norms, s.clip_percentile)
    return {"perplexity": math.exp(nll / count) if count else math.nan, "pooled": pooled, "clip": clip, **base}


def _log_point(r: dict, k: int, level: float | None, s: AuditSettings) -> None:
    model_map = "n/a" if math.isnan(r["model_map_recovery"]) else \
        f"{r['model_map_recovery']:.3f} in {r['model_map_seconds']:.0f} s"
    particle = "n/a" if math.isnan(r["particle_recovery"]) else f"{r['particle_recovery']:.3f}" + \
        ("" if math.isnan(r["particle_seconds"]) else f" in {r['particle_seconds']:.0f} s")
    log.info("audit k=%d %s=%s per %s: perplexity x%.3g, cosine %.3f, recovery at least %.3f (nn %.3f map %.3f "
             "head %.3f probe %.3f inverter %.3f model-aware map %s particle filter %s; with the true prefix %.3f), "
             "bounds %.3f (GDP, no context) %.3f (GDP, with context) %.3f (e^eps)", k,
             "epsilon" if s.mechanism == "gaussian" else "sigma", level, r["unit"], r["perplexity_ratio"], r["cosine"],
             r["best_recovery"], r["nn_recovery"], r["map_recovery"], r["head_recovery"], r["probe_recovery"],
             r["inverter_recovery"], model_map, particle, r["oracle_context_recovery"],
             r["bound_gdp"], r["bound_gdp_context"], r["bound"])


def _meta(s: AuditSettings, settings: Settings, folder: str, alone: dict, seconds: float, size: int) -> dict:
    """The report's description of the run (audit.json's ``meta``, audit.h5's attributes)."""
    return {"model_path": folder, "model_adapters": settings.model_adapters or "none", "mechanism": s.mechanism,
            "delta": s.delta,
            "clip_percentile": s.clip_percentile, "public_text": s.public_path or "built-in (stdlib docstrings)",
            "eval_text": s.eval_path or str(sample_path()), "probe": f"MLP H-{s.probe_hidden}-|V_public|, "
            f"{s.probe_epochs} epochs", "inverter": f"transformer encoder d={s.inverter_dim}, "
            f"{s.inverter_layers} layers, {s.inverter_epochs} epochs",
            "model_map": f"greedy, {s.shortlist} candidates per position, prior: "
            + (f"{s.model_map_lm:g} LM + {1 - s.model_map_lm:g} unigram" if s.model_map_lm else "public unigram"),
            "particle_filter": f"{s.particles} particles per row, prior: the public LM given each particle's "
            "prefix (k=0)" if s.particles else "off",
            "owner_alone": " ".join(s.owner_alone) or "none", "unigram_perplexity": alone["unigram_perplexity"],
            "seconds": seconds, "world_size": size}


def main(cfg: DictConfig, comm=None) -> None:
    """Entry point body for ``jobs/audit.py`` on every rank of ``comm`` (default ``MPI.COMM_WORLD``): a bad
    option ends every rank with one message."""
    import sys

    from mpi4py import MPI

    comm = comm or MPI.COMM_WORLD
    try:
        run_audit(cfg, comm)
    except JobError as exc:  # seen and reported alike on every rank
        if comm.Get_rank() == 0:
            log.error("error: %s", exc)
        sys.stderr.flush()
        sys.exit(2)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        log.error("error: %s", exc)
        sys.stderr.flush()
        comm.Abort(2)
