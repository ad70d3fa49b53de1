"""The LM-prior sequence decoder at k=0: a particle filter whose prior is the public model's own next-token
distribution given each particle's prefix, and whose likelihood is the token unit's mechanism."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["particle_decode"]


def particle_decode(attacks, zs: list[torch.Tensor], corpus, sigma: float, clip: float | None,
                    log_unigram: torch.Tensor, particles: int, seed: int) -> torch.Tensor:
    """The decoded token of every real position of ``corpus`` (rows in order) from its batches' noisy Z at k=0
    ``zs``: each position's Z is clip(e_v + p) + N(0, sigma^2 I), token by token.

    Per row, ``particles`` prefixes are followed left to right (fully adapted: at position t each particle's
    posterior over the next token is prior x likelihood, with the prior the model's own distribution given the
    particle's prefix (``log_unigram`` at a row's first token); the particles are resampled in proportion to each
    posterior's mass, then each draws its token from its posterior). The token decoded at t is the most probable
    under the filter's mixture of those posteriors, i.e. given the row's Z up to t. Rows of a batch and their
    particles run as one batch through the model with a KV cache: a batch of R rows of at most T tokens costs T
    forwards of R x ``particles`` one-token sequences."""
    adapter, P = attacks.adapter, particles
    gen = torch.Generator().manual_seed(seed)
    fixed = None if attacks.moving else attacks.candidates(None, clip)
    out = []
    with torch.inference_mode():
        for b, z in zip(corpus.batches, zs, strict=True):
            R, T = b.ids.shape
            guess = torch.zeros(R, T, dtype=torch.long)
            cache, prior = adapter.new_cache(), log_unigram.expand(R * P, -1)
            for t in range(int(b.mask.sum(1).max())):
                cand, sq = fixed or attacks.candidates(t, clip)
                like = -(sq.unsqueeze(0) - 2 * z[:, t].float() @ cand.T) / (2 * sigma ** 2)  # (R, V)
                logq = (prior.view(R, P, -1) + like.unsqueeze(1)).view(R * P, -1)  # prior x likelihood per particle
                mass = torch.logsumexp(logq, -1).view(R, P)  # each particle's predictive weight of z_t
                post = (logq - mass.view(-1, 1)).exp()  # each particle's posterior over the token at t
                w = torch.softmax(mass, -1)  # (R, P): the particles reweighted by z_t (uniform before)
                guess[:, t] = (w.view(-1, 1) * post).view(R, P, -1).sum(1).argmax(-1)
                parent = torch.multinomial(w, P, replacement=True, generator=gen)  # (R, P)
                rows = (parent + torch.arange(R).view(-1, 1) * P).view(-1)
                token = torch.multinomial(post[rows], 1, generator=gen)  # (R*P, 1)
                if t + 1 == T:
                    break
                if t > 0:
                    cache = cache.take_rows(rows)
                pos = torch.full((R * P, 1), t)
                h = adapter.run_layers(range(adapter.num_layers), adapter.embed(token, pos),
                                       torch.ones(R * P, t + 1, dtype=torch.long), pos, cache)
                prior = F.log_softmax(adapter.logits(adapter.norm(h))[:, 0].float(), dim=-1)
            out.append(guess[b.mask.bool()])
    return torch.cat(out)
