"""What the last worker learns about the labels from training's gradient message (``audit.grad_epsilons``)."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from ...infer.tasks import score_positions
from ..mechanism import PrivacySpec, make_privacy, percentile_clip
from .bounds import dp_bound, gdp_bound
from .corpus import Corpus
from .settings import AuditSettings

__all__ = ["GRAD_COLUMNS", "gradient_audit"]

log = logging.getLogger("nesa_hpc")

GRAD_COLUMNS = ("head", "epsilon", "delta", "sigma", "clip", "transpose_recovery", "bayes_recovery", "best_recovery",
                "floor", "p_prior", "bound", "bound_gdp", "labels")


def _label_grads(adapter, corpus: Corpus):
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


def gradient_audit(adapter, public: Corpus, held: Corpus, s: AuditSettings) -> list[dict]:
    """What the last worker learns about the labels from training's gradient message, per head placement and
    ``audit.grad_epsilons`` (train.grad_privacy=gaussian, clip C_g = the ``audit.clip_percentile`` of
    per-row message norms on public text)."""
    from ...train.step import grad_message

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
            spec = PrivacySpec("gaussian", epsilon=level, delta=s.delta, clip=clip, seed=s.seed + 7) if level else None
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
            row["bound"] = dp_bound(level, p_prior, s.delta) if level else 1.0
            row["bound_gdp"] = gdp_bound(p_prior, 2 * clip / priv.sigma) if priv else 1.0
            rows.append(row)
            log.info("audit gradient message, head on %s, epsilon %s: label recovery at least %.3f (transpose %.3f, "
                     "bayes %.3f), bound %.3f (GDP)", head, level, row["best_recovery"], row["transpose_recovery"],
                     row["bayes_recovery"], row["bound_gdp"])
    return rows
