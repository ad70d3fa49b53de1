"""The audit's text sets (public and held-out rows) with their layer-k states, the rest of the model run over
(noisy) states, and what rank 0 predicts alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...infer.tasks import score_positions
from ...io.batch import make_batches
from .settings import AuditSettings

__all__ = ["Corpus", "finish", "owner_alone", "real_states", "context_log_prior"]


class Corpus:
    """Batches of one text set and, per split point, their layer-k states."""

    def __init__(self, texts: list[str], tokenizer, s: AuditSettings, first_row: int) -> None:
        rows = ((first_row + i, t) for i, t in enumerate(texts))
        self.batches = list(make_batches(rows, tokenizer, s.batch_size, s.max_length, "right"))
        self.ids = torch.cat([b.ids[b.mask.bool()] for b in self.batches])  # (N,) real tokens in order
        self.pos = torch.cat([b.pos[b.mask.bool()] for b in self.batches])
        self.states: dict[int, list[torch.Tensor]] = {}

    def at(self, adapter, k: int) -> list[torch.Tensor]:
        """Per batch, the clean states after layers [0, k) (computed once per k)."""
        if k not in self.states:
            with torch.inference_mode():
                self.states[k] = [adapter.run_layers(range(k), adapter.embed(b.ids, b.pos), b.mask, b.pos)
                                  for b in self.batches]
        return self.states[k]


def finish(adapter, corpus: Corpus, zs: list[torch.Tensor], k: int, denoiser=None):
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


def context_log_prior(adapter, corpus: Corpus, log_unigram: torch.Tensor) -> torch.Tensor:
    """What an attacker who knows each token's true prefix expects there, for every real token of ``corpus`` in
    order: the public LM's (the model's own, noise-free) log-probabilities given the row's tokens before it, and
    ``log_unigram`` for a row's first token: (N, V)."""
    out = []
    with torch.inference_mode():
        for b, z in zip(corpus.batches, corpus.at(adapter, 0), strict=True):
            h = adapter.norm(adapter.run_layers(range(adapter.num_layers), z, b.mask, b.pos))
            lp = torch.empty(*b.ids.shape, len(log_unigram))
            lp[:, 0] = log_unigram
            lp[:, 1:] = F.log_softmax(adapter.logits(h[:, :-1]).float(), dim=-1)
            out.append(lp[b.mask.bool()])
    return torch.cat(out)


def owner_alone(adapter, corpus: Corpus, counts: torch.Tensor, paths: tuple[str, ...]) -> dict:
    """What rank 0 predicts without sending anything, on ``corpus``: the perplexity of the public-text unigram
    (``counts``, add-one smoothed) and of each owner-alone denoiser in ``paths`` (``audit.owner_alone``:
    trained by ``jobs/train.py train.denoiser.alone=true``), by its split point."""
    from ..denoiser import META, load_denoiser

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
        nll, count, _ = finish(adapter, corpus, corpus.at(adapter, d.k), d.k, d)
        out["owner_alone_perplexity"][d.k] = math.exp(nll / count)
    return out


def real_states(zs: list[torch.Tensor], corpus: Corpus) -> torch.Tensor:
    """The states ``zs`` of ``corpus``'s batches at its real (unpadded) positions, in order, as float: (N, H)."""
    return torch.cat([z[b.mask.bool()] for b, z in zip(corpus.batches, zs, strict=True)]).float()

