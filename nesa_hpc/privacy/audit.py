"""The privacy audit behind ``jobs/audit.py``: what an attacker recovers from Z against the utility lost.

For every split point k and privacy level (an epsilon of ``privacy=gaussian``, or a sigma of
``privacy=sigma``) the audit runs the model in one process with the privacy transform at layer k, on
held-out rows (``audit.eval_path``, default: the shipped sample data), and measures

- utility relative to privacy off: perplexity ratio (causal LMs) and the cosine similarity of the
  mean-pooled final hidden states to the noise-free ones (the ``task=embed`` output);
- leakage as top-1 recovery of the token at each real position of Z, by four attackers who see only
  Z and know the model, the mechanism and sigma: nearest neighbour against the embedding matrix (k=0),
  the Bayes MAP decoder with the clipping in its candidates and the public unigram as its prior (k=0),
  the model's own final norm and LM head applied to Z (any k), and an MLP probe trained on *public*
  text (``audit.public_path``, default: the built-in standard-library prose) passed through the same
  mechanism, and a learned sequence inverter (a small transformer over a row's whole Z) trained the
  same way (the noise-aware attackers). ``best_recovery`` is the best of them: a lower bound on what
  an attacker can recover, never a guarantee;
- the floor: always guessing the public text's most frequent token;
- the bounds of the guarantee, p_prior being the frequency of the most common token of the held-out
  rows (the best guess of an attacker who knows the unigram distribution and not Z): the tight bound of
  mu-GDP, Phi(Phi^-1(p_prior) + mu) with mu = 2C / sigma (``bound_gdp``, see :func:`gdp_bound`), and
  the looser e^epsilon * p_prior + delta of (epsilon, delta)-DP (``bound``).

The grid of settings is shared among the MPI ranks (each rank runs the whole model); rank 0 writes
``audit.h5``, ``audit.csv``, ``audit.json`` and three PNG figures into ``audit.out_dir``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from ..infer.tasks import score_positions
from ..io.batch import make_batches
from ..io.public_text import load_texts
from ..io.read import sample_path
from .mechanism import PrivacySpec, make_privacy, percentile_clip, unit_norms

__all__ = ["run_audit", "AuditSettings", "COLUMNS"]

log = logging.getLogger("nesa_hpc")

COLUMNS = ("k", "mechanism", "unit", "epsilon", "delta", "sigma", "clip", "noise_to_signal", "perplexity",
           "perplexity_ratio", "cosine", "nn_recovery", "map_recovery", "head_recovery", "probe_recovery",
           "inverter_recovery", "best_recovery", "floor", "p_prior", "bound", "bound_gdp", "eval_tokens",
           "public_tokens", "unigram_perplexity", "owner_alone_perplexity")
ATTACKERS = ("nn_recovery", "map_recovery", "head_recovery", "probe_recovery", "inverter_recovery")


@dataclass(frozen=True)
class AuditSettings:
    ks: tuple[int, ...]
    mechanism: str
    levels: tuple[float | None, ...]  # epsilons (gaussian) or sigmas (sigma); None = privacy off
    delta: float
    clip_percentile: float
    public_path: str | None
    eval_path: str | None
    max_public_rows: int
    max_eval_rows: int
    max_length: int
    batch_size: int
    probe_hidden: int
    probe_epochs: int
    seed: int
    out_dir: str
    inverter_dim: int = 256
    inverter_layers: int = 2
    inverter_epochs: int = 30
    grad_levels: tuple[float, ...] = ()  # epsilons of train.grad_privacy to audit the gradient message at
    owner_alone: tuple[str, ...] = ()  # owner-alone denoiser folders: the baseline a private split has to beat


def audit_settings(cfg: DictConfig) -> AuditSettings:
    from ..config import ConfigError

    a = OmegaConf.to_container(cfg.audit, resolve=True)
    mechanism = a.get("mechanism", "gaussian")
    if mechanism not in ("gaussian", "sigma"):
        raise ConfigError(f"audit.mechanism={mechanism!r} must be gaussian or sigma")
    levels = a.get("epsilons") if mechanism == "gaussian" else a.get("sigmas")
    name = "audit.epsilons" if mechanism == "gaussian" else "audit.sigmas"
    if not levels or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in levels):
        raise ConfigError(f"{name} must be a non-empty list of positive numbers (got {levels!r})")
    ks = a.get("ks")
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in ks):
        raise ConfigError(f"audit.ks must be a non-empty list of split points >= 0 (got {ks!r})")
    delta = float(a.get("delta", 1e-5))
    if not 0 < delta < 1:
        raise ConfigError(f"audit.delta={delta} must be in (0, 1)")
    return AuditSettings(ks=tuple(ks), mechanism=mechanism, levels=(None, *sorted(levels, reverse=True)),
                         delta=delta, clip_percentile=float(a.get("clip_percentile", 90)),
                         public_path=a.get("public_path"), eval_path=a.get("eval_path"),
                         max_public_rows=int(a.get("max_public_rows", 400)),
                         max_eval_rows=int(a.get("max_eval_rows", 64)), max_length=int(a.get("max_length", 64)),
                         batch_size=int(a.get("batch_size", 16)), probe_hidden=int(a.get("probe_hidden", 256)),
                         probe_epochs=int(a.get("probe_epochs", 6)), seed=int(a.get("seed", 0)),
                         out_dir=str(a.get("out_dir", "audit_results")),
                         inverter_dim=int(a.get("inverter_dim", 256)), inverter_layers=int(a.get("inverter_layers", 2)),
                         inverter_epochs=int(a.get("inverter_epochs", 30)),
                         grad_levels=tuple(sorted((float(e) for e in a.get("grad_epsilons") or ()), reverse=True)),
                         owner_alone=tuple(str(p) for p in a.get("owner_alone") or ()))


class _Corpus:
    """Batches of one text set and, per split point, their layer-k states."""

    def __init__(self, texts: list[str], tokenizer, s: AuditSettings, first_row: int) -> None:
        rows = ((first_row + i, t) for i, t in enumerate(texts))
        self.batches = list(make_batches(rows, tokenizer, s.batch_size, s.max_length, "right"))
        self.ids = torch.cat([b.ids[b.mask.bool()] for b in self.batches])  # (N,) real tokens in order
        self.pos = torch.cat([b.pos[b.mask.bool()] for b in self.batches])
        self.states: dict[int, list[torch.Tensor]] = {}

    def at(self, adapter, k: int) -> list[torch.Tensor]:
        if k not in self.states:
            with torch.inference_mode():
                self.states[k] = [adapter.run_layers(range(k), adapter.embed(b.ids, b.pos), b.mask, b.pos)
                                  for b in self.batches]
        return self.states[k]


def _finish(adapter, corpus: _Corpus, zs: list[torch.Tensor], k: int, denoiser=None):
    """Run layers [k, L) (none for an owner-alone ``denoiser``) + the denoiser over them and the clean states at
    layer k + norm (+ head): total NLL, predicted-token count and pooled final states."""
    nll, count, pooled = 0.0, 0, []
    with torch.inference_mode():
        for b, z, c in zip(corpus.batches, zs, corpus.at(adapter, k) if denoiser is not None else zs, strict=True):
            h = z if denoiser is not None and denoiser.alone else \
                adapter.run_layers(range(k, adapter.num_layers), z, b.mask, b.pos)
            h = adapter.norm(h if denoiser is None else denoiser(h, c)).float()
            m = b.mask.unsqueeze(-1).float()
            pooled.append((h * m).sum(1) / m.sum(1).clamp(min=1))
            if adapter.has_head:
                sel = score_positions(b.mask)
                logits = adapter.logits(h[:, :-1][sel]).float()
                nll += float(F.cross_entropy(logits, b.ids[:, 1:][sel], reduction="sum"))
                count += int(sel.sum())
    return nll, count, torch.cat(pooled)


def owner_alone(adapter, corpus: _Corpus, counts: torch.Tensor, paths: tuple[str, ...]) -> dict:
    """What rank 0 predicts without sending anything, on ``corpus``: the perplexity of the public-text unigram
    (``counts``, add-one smoothed) and of each owner-alone denoiser in ``paths`` (``audit.owner_alone``:
    trained by ``jobs/train.py train.denoiser.alone=true``), by its split point."""
    from .denoiser import META, load_denoiser

    logp = torch.log((counts.double() + 1) / (counts.sum() + len(counts)))
    labels = torch.cat([b.ids[:, 1:][score_positions(b.mask)] for b in corpus.batches])
    out = {"unigram_perplexity": math.exp(-float(logp[labels].mean())), "owner_alone_perplexity": {}}
    for path in paths:
        meta = json.loads((Path(path).expanduser() / META).read_text()) if (Path(path).expanduser() / META).is_file() \
            else {}
        d = load_denoiser(path, adapter.config, int(meta.get("k", -1)))
        if not d.alone:
            raise ConfigError(f"audit.owner_alone: {path} uses the workers' answer (train.denoiser.alone=false); the "
                              "baseline is a denoiser trained with train.denoiser.alone=true")
        nll, count, _ = _finish(adapter, corpus, corpus.at(adapter, d.k), d.k, d)
        out["owner_alone_perplexity"][d.k] = math.exp(nll / count)
    return out


def _real(zs: list[torch.Tensor], corpus: _Corpus) -> torch.Tensor:
    return torch.cat([z[b.mask.bool()] for b, z in zip(corpus.batches, zs, strict=True)]).float()


class _Attacks:
    """The three attackers of one model; the vocabulary tables are built once."""

    def __init__(self, adapter, max_pos: int) -> None:
        self.adapter = adapter
        with torch.inference_mode():
            V = adapter.config.vocab_size
            # one-token rows: every vocabulary token at position 0, (V, H)
            self.table = adapter.embed(torch.arange(V).view(V, 1), torch.zeros(V, 1, dtype=torch.long))[:, 0].float()
            # what moving a token from position 0 to position p adds (learned absolute positions; 0 for RoPE)
            pos = torch.arange(max_pos).view(-1, 1)
            self.shift = (adapter.embed(torch.zeros_like(pos), pos) -
                          adapter.embed(torch.zeros_like(pos), torch.zeros_like(pos)))[:, 0].float()
        self.sq = (self.table ** 2).sum(-1)

    def nearest(self, z: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        z = z - self.shift[pos]
        out = []
        for chunk in z.split(512):
            out.append((self.sq.unsqueeze(0) - 2 * chunk @ self.table.T).argmin(-1))
        return torch.cat(out)

    def map_decode(self, z: torch.Tensor, pos: torch.Tensor, log_prior: torch.Tensor, sigma: float,
                   clip: float | None) -> torch.Tensor:
        """The Bayes (MAP) decoder at k=0 for the token unit: each position's Z is clip(e_v + p) plus
        N(0, sigma^2 I), so the most probable token given z is
        argmax_v log prior(v) - ||z - clip(e_v + p)||^2 / (2 sigma^2), with the candidates clipped exactly
        as the mechanism clips them (the prior: the public text's unigram distribution)."""
        out = torch.empty(len(z), dtype=torch.long)
        moving = bool(self.shift.abs().max() > 0)  # learned absolute positions: candidates depend on p
        for p in (pos.unique().tolist() if moving else [None]):
            at = (pos == p).nonzero().squeeze(1) if p is not None else torch.arange(len(z))
            cand = self.table + (self.shift[p] if p is not None else 0)
            if clip is not None:
                cand = cand * torch.clamp(clip / cand.norm(dim=-1, keepdim=True).clamp(min=1e-30), max=1.0)
            sq = (cand ** 2).sum(-1)
            for chunk in at.split(512):
                score = log_prior.unsqueeze(0) - (sq.unsqueeze(0) - 2 * z[chunk] @ cand.T) / (2 * sigma ** 2)
                out[chunk] = score.argmax(-1)
        return out

    def head(self, z: torch.Tensor) -> torch.Tensor | None:
        if not self.adapter.has_head:
            return None
        with torch.inference_mode():
            return torch.cat([self.adapter.logits(self.adapter.norm(c)).argmax(-1) for c in z.split(512)])


def _probe(train_z: torch.Tensor, train_ids: torch.Tensor, test_z: torch.Tensor, hidden: int, epochs: int,
           seed: int) -> torch.Tensor:
    """An MLP from one row of (noisy) Z to its token, trained on public rows; returns test predictions."""
    classes, target = torch.unique(train_ids, return_inverse=True)
    scale = train_z.pow(2).mean().sqrt().clamp(min=1e-12)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(train_z.shape[1], hidden), torch.nn.GELU(),
                              torch.nn.Linear(hidden, len(classes)))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    x = train_z / scale
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for idx in order.split(256):
                loss = F.cross_entropy(net(x[idx]), target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        return classes[net(test_z / scale).argmax(-1)]


def _inverter(train: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
              test: list[tuple[torch.Tensor, torch.Tensor]], dim: int, layers: int, epochs: int,
              seed: int) -> torch.Tensor:
    """The learned sequence inverter: a small transformer encoder that reads a row's whole (noisy) Z, every
    position with its neighbours on both sides, and predicts each position's token (the hidden-state
    inversion family of attacks). Trained on public rows pushed through the same mechanism: ``train`` is
    [(Z (B, T, H), mask (B, T), ids (B, T))], ``test`` [(Z, mask)]; returns the predicted token of every
    real test position, in order."""
    ids_all = torch.cat([ids[m.bool()] for _, m, ids in train])
    classes = torch.unique(ids_all)
    lookup = torch.full((int(classes.max()) + 1,), -1, dtype=torch.long)
    lookup[classes] = torch.arange(len(classes))
    scale = torch.cat([z[m.bool()] for z, m, _ in train]).float().pow(2).mean().sqrt().clamp(min=1e-12)
    H = train[0][0].shape[-1]
    T = max(z.shape[1] for z, _, _ in train + [(z, m, None) for z, m in test])
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    inp, pos_emb = torch.nn.Linear(H, dim), torch.nn.Embedding(T, dim)
    enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.1,
                                                                       batch_first=True), layers)
    out = torch.nn.Linear(dim, len(classes))
    modules = torch.nn.ModuleList([inp, pos_emb, enc, out])

    def forward(z, m):
        x = inp(z.float() / scale) + pos_emb(torch.arange(z.shape[1])).unsqueeze(0)
        return out(enc(x, src_key_padding_mask=~m.bool()))

    opt = torch.optim.AdamW(modules.parameters(), lr=1e-3, weight_decay=1e-2)
    with torch.enable_grad():
        modules.train()
        for _ in range(epochs):
            for i in torch.randperm(len(train), generator=gen).tolist():
                z, m, ids = train[i]
                logits = forward(z, m)[m.bool()]
                loss = F.cross_entropy(logits, lookup[ids[m.bool()]])
                opt.zero_grad()
                loss.backward()
                opt.step()
    modules.eval()
    with torch.no_grad():
        return torch.cat([classes[forward(z, m)[m.bool()].argmax(-1)] for z, m in test])


GRAD_COLUMNS = ("head", "epsilon", "delta", "sigma", "clip", "transpose_recovery", "bayes_recovery", "best_recovery",
                "floor", "p_prior", "bound", "bound_gdp", "labels")


def _label_grads(adapter, corpus: _Corpus):
    """Per batch of ``corpus``: the final states of the scored positions (N, H) (what the last worker sends
    back; no owner tail), their labels (N,), row of each position (N,), and the gradient messages of the
    summed token loss: w.r.t. those states (head on the owner) and w.r.t. the logits (head on the last
    worker, softmax - one-hot)."""
    out = []
    for b, h in zip(corpus.batches, corpus.at(adapter, adapter.num_layers), strict=True):
        sel = score_positions(b.mask)
        hs = h[:, :-1][sel].detach().float().clone().requires_grad_(True)
        labels = b.ids[:, 1:][sel]
        row_of = torch.arange(b.size).unsqueeze(1).expand_as(sel)[sel]
        with torch.enable_grad():
            logits = adapter.logits(adapter.norm(hs)).float()
            loss = F.cross_entropy(logits, labels, reduction="sum")
            (g_state,) = torch.autograd.grad(loss, hs)
        p = torch.softmax(logits.detach(), -1)
        g_logit = p - F.one_hot(labels, p.shape[-1]).float()
        out.append({"h": hs.detach(), "labels": labels, "row_of": row_of, "rows": b.rows, "owner": g_state,
                    "last": g_logit, "p": p})
    return out


def _row_norms(g: torch.Tensor, row_of: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64).index_add_(0, row_of, g.double().pow(2).sum(-1)).sqrt()


def _label_attack(adapter, item: dict, m: torch.Tensor, head: str, sigma: float,
                  log_prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two attackers on one micro-batch's gradient message ``m`` who know the model, the mechanism and their
    own final states (hence the softmax p): 'transpose' reads -m through the head (state messages:
    -W J m, the head's Jacobian applied to the message; logit messages: -m); 'bayes' is the Gaussian
    posterior decoder: the message is alpha * (base - onehot(y) through the head) + N(0, sigma^2), base
    being the part the worker can predict (J^T W^T p, or p), alpha the per-row clip factor fitted by least
    squares, so log p(y | m) = log prior(y) + alpha * <alpha base - m, e_y through the head> / sigma^2
    (for state messages without the small ||J^T W_y||^2 term) + const."""
    p, row_of = item["p"], item["row_of"]
    n = int(row_of.max()) + 1 if len(row_of) else 0
    if head == "last":
        base = p
        transpose = (-m).argmax(-1)
    else:
        hs = item["h"].clone().requires_grad_(True)
        with torch.enable_grad():
            logits = adapter.logits(adapter.norm(hs)).float()
            (base,) = torch.autograd.grad((logits * p).sum(), hs)  # J^T W^T p: the message's label-free part

        def through_head(v):
            _, tangent = torch.autograd.functional.jvp(lambda x: adapter.logits(adapter.norm(x)).float(),
                                                       item["h"], v)
            return tangent
        transpose = through_head(-m).argmax(-1)
    num = torch.zeros(n, dtype=torch.float64).index_add_(0, row_of, (m.double() * base.double()).sum(-1))
    den = torch.zeros(n, dtype=torch.float64).index_add_(0, row_of, base.double().pow(2).sum(-1)).clamp(min=1e-30)
    alpha = (num / den).clamp(0.0, 1.0).float()[row_of].unsqueeze(-1)  # a clip factor is in [0, 1]
    left = alpha * base - m  # about alpha * (one-hot's part)
    score = left if head == "last" else through_head(left)
    if sigma > 0:
        score = log_prior.unsqueeze(0) + alpha * score / sigma ** 2
    return transpose, score.argmax(-1)


def _gradient_audit(adapter, public: _Corpus, held: _Corpus, s: AuditSettings) -> list[dict]:
    """What the last worker learns about the labels from training's gradient message, per head placement and
    ``audit.grad_epsilons`` (train.grad_privacy=gaussian, clip C_g = the ``audit.clip_percentile`` of
    per-row message norms on public text)."""
    from ..train.step import grad_message
    from .mechanism import PrivacySpec as Spec

    held_g, public_g = _label_grads(adapter, held), _label_grads(adapter, public)
    labels = torch.cat([it["labels"] for it in held_g])
    pub_labels = torch.cat([it["labels"] for it in public_g])
    counts = torch.bincount(pub_labels, minlength=adapter.config.vocab_size).double()
    top = int(counts.argmax())
    log_prior = torch.log((counts + 1) / (counts.sum() + len(counts))).float()  # the public labels' unigram
    floor = float((labels == top).float().mean())
    p_prior = float(torch.bincount(labels).max() / len(labels))
    rows = []
    for head in ("owner", "last"):
        norms = torch.cat([_row_norms(it[head], it["row_of"], it["rows"].numel()) for it in public_g])
        clip = percentile_clip(norms, s.clip_percentile)
        for level in (None, *s.grad_levels):
            spec = Spec("gaussian", epsilon=level, delta=s.delta, clip=clip, seed=s.seed + 7) if level else None
            priv = make_privacy(spec, 0) if spec else None
            found = {"transpose": [], "bayes": []}
            for it in held_g:
                m = grad_message(priv, it[head], it["row_of"], it["rows"], 0, 1.0) if priv else it[head]
                t, b = _label_attack(adapter, it, m, head, priv.sigma if priv else 0.0, log_prior)
                found["transpose"].append(t)
                found["bayes"].append(b)
            row = {"head": head, "epsilon": level if level else math.inf, "delta": s.delta,
                   "sigma": priv.sigma if priv else 0.0, "clip": clip, "floor": floor, "p_prior": p_prior,
                   "labels": len(labels)}
            for name, guesses in found.items():
                row[f"{name}_recovery"] = float((torch.cat(guesses) == labels).float().mean())
            row["best_recovery"] = max(row["transpose_recovery"], row["bayes_recovery"])
            row["bound"] = 1.0 if not level or level > 50 else min(1.0, math.exp(level) * p_prior + s.delta)
            row["bound_gdp"] = gdp_bound(p_prior, 2 * clip / priv.sigma) if priv else 1.0
            rows.append(row)
            log.info("audit gradient message, head on %s, epsilon %s: label recovery at least %.3f (transpose %.3f, "
                     "bayes %.3f), bound %.3f (GDP)", head, level, row["best_recovery"], row["transpose_recovery"],
                     row["bayes_recovery"], row["bound_gdp"])
    return rows


def gdp_bound(p_prior: float, mu: float) -> float:
    """The tight bound on reconstruction success of a mu-GDP mechanism (one Gaussian release of L2
    sensitivity 2C and std sigma is mu-GDP with mu = 2C / sigma; R releases compose to mu * sqrt(R)):
    Phi(Phi^-1(p_prior) + mu), where p_prior is the attacker's best success without the release
    (Hayes, Mahloujifar & Balle, "Bounding data reconstruction attacks with the hypothesis testing
    interpretation of differential privacy", NeurIPS 2023: success <= 1 - f(p_prior) for an f-DP
    mechanism, and f(a) = Phi(Phi^-1(1 - a) - mu) for mu-GDP)."""
    from scipy.stats import norm

    return float(norm.cdf(norm.ppf(p_prior) + mu))


def _point(adapter, attacks: _Attacks, public: _Corpus, held: _Corpus, k: int, level: float | None,
           s: AuditSettings, clean: dict) -> dict:
    unit = "token" if k == 0 else "sequence"
    row = {"k": k, "unit": unit, "delta": s.delta, "mechanism": s.mechanism if level is not None else "none"}
    clip = clean["clip"]
    if level is None:
        eval_z, public_z = held.at(adapter, k), public.at(adapter, k)
        row.update(epsilon=math.inf, sigma=0.0, clip=clip)
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
    nll, count, pooled = _finish(adapter, held, eval_z, k)
    row["perplexity"] = math.exp(nll / count) if count else math.nan
    row["perplexity_ratio"] = row["perplexity"] / clean["perplexity"] if count else math.nan
    row["cosine"] = float(F.cosine_similarity(pooled, clean["pooled"], dim=-1).mean())
    z_eval, z_public = _real(eval_z, held), _real(public_z, public)
    signal = float(_real(held.at(adapter, k), held).norm(dim=-1).mean())
    row["noise_to_signal"] = row["sigma"] * math.sqrt(z_eval.shape[1]) / signal
    ids = held.ids
    row["nn_recovery"] = float((attacks.nearest(z_eval, held.pos) == ids).float().mean()) if k == 0 else math.nan
    if k == 0 and row["sigma"] > 0:
        guess = attacks.map_decode(z_eval, held.pos, clean["log_prior"], row["sigma"], clip)
        row["map_recovery"] = float((guess == ids).float().mean())
    else:  # without noise the MAP decoder is the nearest neighbour
        row["map_recovery"] = row["nn_recovery"]
    guess = attacks.head(z_eval)
    row["head_recovery"] = float((guess == ids).float().mean()) if guess is not None else math.nan
    pred = _probe(z_public, public.ids, z_eval, s.probe_hidden, s.probe_epochs, s.seed)
    row["probe_recovery"] = float((pred == ids).float().mean())
    pred = _inverter([(z, b.mask, b.ids) for b, z in zip(public.batches, public_z, strict=True)],
                     [(z, b.mask) for b, z in zip(held.batches, eval_z, strict=True)], s.inverter_dim,
                     s.inverter_layers, s.inverter_epochs, s.seed)
    row["inverter_recovery"] = float((pred == ids).float().mean())
    row["best_recovery"] = max(row[a] for a in ATTACKERS if not math.isnan(row[a]))
    row["floor"], row["p_prior"] = clean["floor"], clean["p_prior"]
    eps = row["epsilon"]
    if math.isnan(eps):
        row["bound"] = math.nan
    else:
        row["bound"] = 1.0 if eps > 50 else min(1.0, math.exp(eps) * row["p_prior"] + s.delta)
    row["bound_gdp"] = gdp_bound(row["p_prior"], 2 * clip / row["sigma"]) if row["sigma"] > 0 else 1.0
    row["eval_tokens"], row["public_tokens"] = len(ids), len(public.ids)
    return row


def run_audit(cfg: DictConfig, comm=None) -> list[dict] | None:
    """Every rank evaluates its share of the (k, level) grid; rank 0 gathers and writes the report."""
    from mpi4py import MPI
    from transformers import AutoTokenizer

    from ..config import settings_from_cfg
    from ..engine.job import model_folder, setup_logging
    from ..models.weights import build_adapter, load_modules

    comm = comm or MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    setup_logging(rank)
    s = audit_settings(cfg)
    settings = settings_from_cfg(cfg)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    folder = model_folder(settings)
    adapter = build_adapter(folder)
    bad = [k for k in s.ks if k > adapter.num_layers]
    if bad:
        raise ConfigError(f"audit.ks={list(s.ks)}: the model has {adapter.num_layers} layers, so k <= "
                         f"{adapter.num_layers}")
    modules = [*adapter.embed_modules, *adapter.stage_modules,
               *(adapter.head_modules if adapter.has_head else ())]
    load_modules(adapter, folder, modules + [adapter.layer_module(i) for i in range(adapter.num_layers)],
                 settings.model_dtype)
    if settings.model_adapters:
        from ..models.lora import apply_adapters, check_adapter_use

        check_adapter_use(settings.model_adapters, *apply_adapters(adapter, settings.model_adapters,
                                                                    range(adapter.num_layers)))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    start = time.perf_counter()
    public = _Corpus(load_texts(s.public_path, s.max_public_rows), tokenizer, s, first_row=1_000_000)
    held = _Corpus(load_texts(s.eval_path or sample_path(), s.max_eval_rows), tokenizer, s, first_row=0)
    attacks = _Attacks(adapter, s.max_length)
    counts = torch.bincount(public.ids, minlength=adapter.config.vocab_size)
    top = int(counts.argmax())
    held_counts = torch.bincount(held.ids, minlength=adapter.config.vocab_size)
    base = {"floor": float((held.ids == top).float().mean()), "p_prior": float(held_counts.max() / len(held.ids)),
            # the MAP decoder's prior: the public text's unigram distribution (add-one smoothed)
            "log_prior": torch.log((counts.double() + 1) / (counts.sum() + len(counts))).float()}
    alone = owner_alone(adapter, held, counts, s.owner_alone)  # every rank: a bad folder ends them all alike
    grid = [(k, level) for k in s.ks for level in s.levels]
    mine = grid[rank::size]
    clean_by_k: dict[int, dict] = {}
    rows = []
    for k, level in mine:
        if k not in clean_by_k:
            nll, count, pooled = _finish(adapter, held, held.at(adapter, k), k)
            unit = "token" if k == 0 else "sequence"
            # the clip calibration of privacy.clip=auto, on the public states already computed
            norms = torch.cat([unit_norms(z.float(), b.mask, unit)
                               for b, z in zip(public.batches, public.at(adapter, k), strict=True)])
            clip = percentile_clip(norms, s.clip_percentile)
            clean_by_k[k] = {"perplexity": math.exp(nll / count) if count else math.nan, "pooled": pooled,
                             "clip": clip, **base}
        rows.append(_point(adapter, attacks, public, held, k, level, s, clean_by_k[k]))
        rows[-1].update(unigram_perplexity=alone["unigram_perplexity"],
                        owner_alone_perplexity=alone["owner_alone_perplexity"].get(k, math.nan))
        r = rows[-1]
        log.info("audit k=%d %s=%s: perplexity x%.3g, cosine %.3f, recovery at least %.3f (nn %.3f map %.3f head "
                 "%.3f probe %.3f inverter %.3f), bounds %.3f (GDP) %.3f (e^eps)", k,
                 "epsilon" if s.mechanism == "gaussian" else "sigma", level, r["perplexity_ratio"], r["cosine"],
                 r["best_recovery"], r["nn_recovery"], r["map_recovery"], r["head_recovery"], r["probe_recovery"],
                 r["inverter_recovery"], r["bound_gdp"], r["bound"])
    # the last rank audits the gradient message too (rank 0 writes the files)
    grad_rows = _gradient_audit(adapter, public, held, s) if s.grad_levels and rank == size - 1 else []
    grad_rows = comm.bcast(grad_rows, root=size - 1)
    gathered = comm.gather(rows, root=0)
    if rank != 0:
        return None
    table = sorted((r for part in gathered for r in part),
                   key=lambda r: (r["k"], -r["epsilon"] if s.mechanism == "gaussian" else r["sigma"]))
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model_path": folder, "model_adapters": settings.model_adapters or "none", "mechanism": s.mechanism,
            "delta": s.delta,
            "clip_percentile": s.clip_percentile, "public_text": s.public_path or "built-in (stdlib docstrings)",
            "eval_text": s.eval_path or str(sample_path()), "probe": f"MLP H-{s.probe_hidden}-|V_public|, "
            f"{s.probe_epochs} epochs", "inverter": f"transformer encoder d={s.inverter_dim}, "
            f"{s.inverter_layers} layers, {s.inverter_epochs} epochs",
            "owner_alone": " ".join(s.owner_alone) or "none", "unigram_perplexity": alone["unigram_perplexity"],
            "seconds": round(time.perf_counter() - start, 1), "world_size": size}
    _write(out, table, meta, grad_rows)
    _plot(out, table, meta)
    log.info("audit: %d settings in %.0f s -> %s", len(table), meta["seconds"], out)
    return table


def _write(out: Path, table: list[dict], meta: dict, grad_rows: list[dict] = ()) -> None:
    import h5py

    if grad_rows:
        with open(out / "audit_gradient.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=GRAD_COLUMNS)
            w.writeheader()
            for r in grad_rows:
                w.writerow({c: r[c] for c in GRAD_COLUMNS})

    with open(out / "audit.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in table:
            w.writerow({c: r[c] for c in COLUMNS})
    (out / "audit.json").write_text(json.dumps({"meta": meta, "rows": table, "gradient": list(grad_rows)}, indent=1))
    with h5py.File(out / "audit.h5", "w") as f:
        for c in COLUMNS:
            values = [r[c] for r in table]
            f[c] = np.array(values, dtype=h5py.string_dtype()) if isinstance(values[0], str) else np.array(values)
        for key, value in meta.items():
            f.attrs[key] = value


def _plot(out: Path, table: list[dict], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gaussian = meta["mechanism"] == "gaussian"
    xkey = "epsilon" if gaussian else "sigma"
    kind = "(eps, delta)-DP Gaussian" if gaussian else "Gaussian noise, no formal claim"
    caption = (f"{kind}, delta={meta['delta']:g}, C = percentile {meta['clip_percentile']:g} of unit norms on "
               "public text; unit: token at k=0, sequence at k>0.\nAttackers see Z and know the model and public "
               "text (probe trained on it "
               "through the same mechanism).")
    ks = sorted({r["k"] for r in table})
    noisy = [r for r in table if r["mechanism"] != "none"]

    def series(k, key):
        pts = sorted((r[xkey], r[key]) for r in noisy if r["k"] == k)
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    clean = {r["k"]: r["perplexity"] for r in table if r["mechanism"] == "none"}
    for i, k in enumerate(ks):
        x, y = series(k, "perplexity_ratio")
        ax[0].plot(x, y, marker="o", color=f"C{i}", label=f"k={k}")
        alone = next((r["owner_alone_perplexity"] for r in table if r["k"] == k), math.nan)
        if not math.isnan(alone) and k in clean:
            ax[0].axhline(alone / clean[k], color=f"C{i}", ls="--", lw=1, label=f"owner alone, k={k}")
        x, y = series(k, "cosine")
        ax[1].plot(x, y, marker="o", label=f"k={k}")
    for a, title in zip(ax, ("perplexity / perplexity without noise", "cosine to noise-free embedding"),
                        strict=True):
        a.set_xscale("log")
        a.set_xlabel(xkey)
        a.set_title(title)
        a.legend()
    if table and clean:
        ax[0].axhline(table[0]["unigram_perplexity"] / next(iter(clean.values())), color="grey", ls=":", lw=1,
                      label="public unigram (owner alone)")
        ax[0].legend(fontsize=7)
    ax[0].set_yscale("log")
    fig.text(0.01, 0.01, caption, fontsize=7)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out / "audit_utility.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 4), squeeze=False)
    for a, k in zip(ax[0], ks, strict=True):
        for key, label, color in (("nn_recovery", "nearest neighbour", "C0"),
                                  ("map_recovery", "Bayes MAP decoder (clip-aware)", "C3"),
                                  ("head_recovery", "final norm + LM head", "C1"),
                                  ("probe_recovery", "MLP probe (noise-aware)", "C2"),
                                  ("inverter_recovery", "sequence inverter (noise-aware)", "C4")):
            x, y = series(k, key)
            if not all(math.isnan(v) for v in y):
                a.plot(x, y, marker="o", color=color, label=label)
        x, y = series(k, "floor")
        a.plot(x, y, "k--", label="floor (most frequent token)")
        if gaussian:
            x, y = series(k, "bound")
            a.plot(x, y, "r:", label="DP bound e^eps p + delta")
            x, y = series(k, "bound_gdp")
            a.plot(x, y, "m-.", label="GDP bound Phi(Phi^-1(p) + mu)")
        a.set_xscale("log")
        a.set_ylim(-0.02, 1.02)
        a.set_xlabel(xkey)
        a.set_title(f"token recovery, k={k}")
        a.legend(fontsize=7)
    fig.text(0.01, 0.01, caption, fontsize=7)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out / "audit_leakage.png", dpi=110)
    plt.close(fig)

    fig, a = plt.subplots(figsize=(6.5, 4.8))
    for i, k in enumerate(ks):
        pts = sorted((r for r in noisy if r["k"] == k), key=lambda r: r[xkey])
        best = [r["best_recovery"] for r in pts]
        a.plot([r["perplexity_ratio"] for r in pts], best, marker="o", color=f"C{i}", label=f"k={k}")
        alone = next((r["owner_alone_perplexity"] for r in table if r["k"] == k), math.nan)
        if not math.isnan(alone) and k in clean:  # to the right of it, the owner does better alone
            a.axvline(alone / clean[k], color=f"C{i}", ls="--", lw=1, label=f"owner alone, k={k}")
        for r, b in zip(pts, best, strict=True):
            a.annotate(f"{r[xkey]:g}", (r["perplexity_ratio"], b), fontsize=6, xytext=(3, 3),
                       textcoords="offset points")
    if table and clean:
        a.axvline(table[0]["unigram_perplexity"] / next(iter(clean.values())), color="grey", ls=":", lw=1,
                  label="public unigram (owner alone)")
    a.set_xscale("log")
    a.set_xlabel("perplexity ratio (utility lost)")
    a.set_ylabel("token recovery (best attacker: at least this)")
    a.set_title(f"leakage-utility frontier (points labelled by {xkey})")
    a.legend()
    fig.text(0.01, 0.01, caption, fontsize=6)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out / "audit_frontier.png", dpi=110)
    plt.close(fig)


def main(cfg: DictConfig) -> None:
    """Entry point body for ``jobs/audit.py``: a bad option ends every rank with one message."""
    import sys

    from mpi4py import MPI

    from ..config import ConfigError

    comm = MPI.COMM_WORLD
    try:
        run_audit(cfg, comm)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        logging.getLogger("nesa_hpc").error("error: %s", exc)
        sys.stderr.flush()
        comm.Abort(2)
