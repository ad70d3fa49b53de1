"""One point of the audit's grid: utility and leakage at split point k and one privacy level."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..mechanism import PrivacySpec, make_privacy
from .attackers import Attacks, inverter, probe
from .bounds import dp_bound, gdp_bound, gdp_bound_context
from .corpus import Corpus, finish, real_states
from .lm_filter import particle_decode
from .settings import AuditSettings

__all__ = ["ATTACKERS", "measure_point"]

ATTACKERS = ("nn_recovery", "map_recovery", "head_recovery", "probe_recovery", "inverter_recovery",
             "model_map_recovery", "particle_recovery")


def measure_point(adapter, attacks: Attacks, public: Corpus, held: Corpus, k: int, level: float | None,
                  s: AuditSettings, clean: dict) -> dict:
    """One row of the table: utility and token recovery at split point ``k`` with privacy ``level`` (None: off),
    against ``clean`` (the noise-free figures at ``k``, the clip and the priors)."""
    unit = "token" if k == 0 else "sequence"
    row = {"k": k, "unit": unit, "delta": s.delta, "mechanism": s.mechanism if level is not None else "none"}
    clip = clean["clip"]
    if level is None:
        eval_z, public_z = held.at(adapter, k), public.at(adapter, k)
        row.update(epsilon=math.inf, epsilon_row=math.inf, sigma=0.0, clip=clip)
    else:
        if s.mechanism == "gaussian":
            spec = PrivacySpec("gaussian", unit=unit, epsilon=level, delta=s.delta, clip="auto", seed=s.seed)
        else:
            spec = PrivacySpec("sigma", unit=unit, sigma=level, clip="auto", seed=s.seed)
        on_eval = make_privacy(spec, k, clip)
        # the attacker's own public data goes through the same mechanism with other noise
        on_public = make_privacy(PrivacySpec(**{**spec.__dict__, "seed": s.seed + 1}), k, clip)
        with torch.inference_mode():
            eval_z = [on_eval.apply(z, b.mask, b.rows) for b, z in zip(held.batches, held.at(adapter, k),
                                                                       strict=True)]
            public_z = [on_public.apply(z, b.mask, b.rows) for b, z in zip(public.batches, public.at(adapter, k),
                                                                           strict=True)]
        row.update(epsilon=level if s.mechanism == "gaussian" else math.nan, sigma=on_eval.sigma, clip=clip)
        row["epsilon_row"] = _row_epsilon(on_eval, held, unit, level, s) if s.mechanism == "gaussian" else math.nan
    nll, count, pooled = finish(adapter, held, eval_z, k)
    row["perplexity"] = math.exp(nll / count) if count else math.nan
    row["perplexity_ratio"] = row["perplexity"] / clean["perplexity"] if count else math.nan
    row["cosine"] = float(F.cosine_similarity(pooled, clean["pooled"], dim=-1).mean())
    z_eval, z_public = real_states(eval_z, held), real_states(public_z, public)
    signal = float(real_states(held.at(adapter, k), held).norm(dim=-1).mean())
    row["noise_to_signal"] = row["sigma"] * math.sqrt(z_eval.shape[1]) / signal
    ids = held.ids
    row["nn_recovery"] = float((attacks.nearest(z_eval, held.pos) == ids).float().mean()) if k == 0 else math.nan
    if k == 0 and row["sigma"] > 0:
        guess = attacks.map_decode(z_eval, held.pos, clean["log_prior"], row["sigma"], clip)
        row["map_recovery"] = float((guess == ids).float().mean())
    else:  # without noise the MAP decoder is the nearest neighbour
        row["map_recovery"] = row["nn_recovery"]
    # the DP adversary's reference, not counted in best_recovery: it is told every token's true prefix (k=0 and a
    # model with an LM head only; without noise it is the nearest neighbour, as the MAP decoder is)
    context = clean["context_log_prior"]
    if k > 0 or context is None:
        row["oracle_context_recovery"] = math.nan
    elif row["sigma"] > 0:
        guess = attacks.map_decode(z_eval, held.pos, context, row["sigma"], clip)
        row["oracle_context_recovery"] = float((guess == ids).float().mean())
    else:
        row["oracle_context_recovery"] = row["nn_recovery"]
    guess = attacks.head(z_eval)
    row["head_recovery"] = float((guess == ids).float().mean()) if guess is not None else math.nan
    pred = probe(z_public, public.ids, z_eval, s.probe_hidden, s.probe_epochs, s.seed)
    row["probe_recovery"] = float((pred == ids).float().mean())
    pred = inverter([(z, b.mask, b.ids) for b, z in zip(public.batches, public_z, strict=True)],
                     [(z, b.mask) for b, z in zip(held.batches, eval_z, strict=True)], s.inverter_dim,
                     s.inverter_layers, s.inverter_epochs, s.seed)
    row["inverter_recovery"] = float((pred == ids).float().mean())
    # k > 0: the model-aware MAP decoder, which runs the public layers [0, k) itself (at k=0 map_recovery is the
    # Bayes decoder already); NaN for an encoder, whose layers are not causal
    decoder = attacks.model_map(k, public, s.shortlist) if k > 0 else None
    row["model_map_recovery"], row["model_map_seconds"] = math.nan, math.nan
    if decoder is not None:
        start = time.perf_counter()
        guess = decoder.decode(eval_z, held, row["sigma"], clip if level is not None else None, clean["log_prior"],
                               s.model_map_lm)
        row["model_map_recovery"] = float((guess == ids).float().mean())
        row["model_map_seconds"] = time.perf_counter() - start
    # k=0: the LM-prior particle filter (the public model's distribution given each particle's prefix as the prior;
    # without noise it is the nearest neighbour too); NaN for a model without a causal LM
    row["particle_recovery"], row["particle_seconds"] = math.nan, math.nan
    if k == 0 and s.particles and adapter.has_head and attacks.causal:
        if row["sigma"] > 0:
            start = time.perf_counter()
            guess = particle_decode(attacks, eval_z, held, row["sigma"], clip, clean["log_prior"], s.particles,
                                    s.seed)
            row["particle_recovery"] = float((guess == ids).float().mean())
            row["particle_seconds"] = time.perf_counter() - start
        else:
            row["particle_recovery"] = row["nn_recovery"]
    row["best_recovery"] = max(row[a] for a in ATTACKERS if not math.isnan(row[a]))
    row["floor"], row["p_prior"] = clean["floor"], clean["p_prior"]
    eps = row["epsilon"]
    row["bound"] = math.nan if math.isnan(eps) else dp_bound(eps, row["p_prior"], s.delta)
    mu = 2 * clip / row["sigma"] if row["sigma"] > 0 else math.inf  # no noise: the bounds are 1
    row["bound_gdp"] = gdp_bound(row["p_prior"], mu)
    kappa = clean["kappa"]
    row["p_context"] = float(kappa.mean()) if kappa is not None else math.nan
    row["bound_gdp_context"] = gdp_bound_context(kappa.numpy(), mu) if kappa is not None else math.nan
    row["eval_tokens"], row["public_tokens"] = len(ids), len(public.ids)
    return row


def _row_epsilon(privacy, held: Corpus, unit: str, level: float, s: AuditSettings) -> float:
    """ε of a whole row (of the held-out rows' mean length n) at ``audit.delta``: at k=0 (token unit) its n
    token releases compose, and n Gaussian releases of noise multiplier m are one of multiplier m / √n
    (exact); at k > 0 the row is the unit."""
    if unit != "token":
        return level
    from dp_accounting import get_epsilon_gaussian

    tokens = round(len(held.ids) / sum(b.size for b in held.batches))
    return float(get_epsilon_gaussian(privacy.ledger().noise_multiplier / math.sqrt(tokens), s.delta))
