"""The attackers on Z: nearest neighbour and the Bayes MAP decoder against the embedding matrix, the model's own
final norm and LM head, an MLP probe and a learned sequence inverter (trained on public text through the same
mechanism)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["Attacks", "probe", "inverter"]


class Attacks:
    """The three attackers of one model that need no training; the vocabulary tables are built once."""

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
        """At k=0: the token whose embedding at its position is nearest to each row of ``z``."""
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
        as the mechanism clips them. ``log_prior`` is one distribution over the vocabulary for every position (V,)
        (the public text's unigram) or one per position (N, V) (the oracle-context attacker: the public LM given
        the true prefix)."""
        out = torch.empty(len(z), dtype=torch.long)
        moving = bool(self.shift.abs().max() > 0)  # learned absolute positions: candidates depend on p
        for p in (pos.unique().tolist() if moving else [None]):
            at = (pos == p).nonzero().squeeze(1) if p is not None else torch.arange(len(z))
            cand = self.table + (self.shift[p] if p is not None else 0)
            if clip is not None:
                cand = cand * torch.clamp(clip / cand.norm(dim=-1, keepdim=True).clamp(min=1e-30), max=1.0)
            sq = (cand ** 2).sum(-1)
            for chunk in at.split(512):
                prior = log_prior[chunk] if log_prior.dim() == 2 else log_prior.unsqueeze(0)
                score = prior - (sq.unsqueeze(0) - 2 * z[chunk] @ cand.T) / (2 * sigma ** 2)
                out[chunk] = score.argmax(-1)
        return out

    def head(self, z: torch.Tensor) -> torch.Tensor | None:
        """The model's final norm and LM head applied to ``z``: its top token (None for a model without a head)."""
        if not self.adapter.has_head:
            return None
        with torch.inference_mode():
            return torch.cat([self.adapter.logits(self.adapter.norm(c)).argmax(-1) for c in z.split(512)])


def probe(train_z: torch.Tensor, train_ids: torch.Tensor, test_z: torch.Tensor, hidden: int, epochs: int,
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


def inverter(train: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
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
