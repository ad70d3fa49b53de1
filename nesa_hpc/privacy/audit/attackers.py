"""The attackers on Z: nearest neighbour and the Bayes MAP decoder against the embedding matrix, the model's own
final norm and LM head, an MLP probe and a learned sequence inverter (trained on public text through the same
mechanism), and at k > 0 the model-aware MAP decoder (:class:`ModelMap`), which runs the public layers [0, k)
itself."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...models.adapter import DECODER_MODEL_TYPES
from .corpus import real_states

__all__ = ["Attacks", "ModelMap", "probe", "inverter"]


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
        self._model_map: dict[int, ModelMap] = {}

    def model_map(self, k: int, public, shortlist: int) -> ModelMap | None:
        """The model-aware MAP decoder at split point ``k`` > 0 (built once per k; its tables cost about as
        much as two candidate passes over the vocabulary), or None for a model whose layers are not causal (an
        encoder's state at t also depends on the tokens after t, so a left-to-right decoder does not apply)."""
        if not self.causal:
            return None
        if k not in self._model_map:
            self._model_map[k] = ModelMap(self.adapter, k, public, shortlist)
        return self._model_map[k]

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
        for p in (pos.unique().tolist() if self.moving else [None]):
            at = (pos == p).nonzero().squeeze(1) if p is not None else torch.arange(len(z))
            cand, sq = self.candidates(p, clip)
            for chunk in at.split(512):
                prior = log_prior[chunk] if log_prior.dim() == 2 else log_prior.unsqueeze(0)
                score = prior - (sq.unsqueeze(0) - 2 * z[chunk] @ cand.T) / (2 * sigma ** 2)
                out[chunk] = score.argmax(-1)
        return out

    @property
    def causal(self) -> bool:
        """Whether the model's layers are causal (a decoder): a state at t depends on tokens up to t only, so
        the left-to-right decoders apply."""
        return self.adapter.model_type in DECODER_MODEL_TYPES

    @property
    def moving(self) -> bool:
        """Whether a token's state at k=0 depends on its position (learned absolute positions; not with RoPE)."""
        return bool(self.shift.abs().max() > 0)

    def candidates(self, p: int | None, clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every vocabulary token's Z at k=0 without noise at position ``p`` (None: any, when not
        :attr:`moving`), clipped as the token unit clips it (``clip`` None: no clip), and its squared norm:
        (V, H), (V,)."""
        cand = self.table + (self.shift[p] if p is not None else 0)
        if clip is not None:
            cand = cand * torch.clamp(clip / cand.norm(dim=-1, keepdim=True).clamp(min=1e-30), max=1.0)
        return cand, (cand ** 2).sum(-1)

    def head(self, z: torch.Tensor) -> torch.Tensor | None:
        """The model's final norm and LM head applied to ``z``: its top token (None for a model without a head)."""
        if not self.adapter.has_head:
            return None
        with torch.inference_mode():
            return torch.cat([self.adapter.logits(self.adapter.norm(c)).argmax(-1) for c in z.split(512)])


class _Prefix:
    """Layers [0, k) over one row's decoded prefix, held as a KV cache: a step runs only the next position's
    candidates, as one batch, so a row of T tokens costs T candidate-batch forwards. With ``lm``, also the rest of
    the model over the prefix (its own cache), for the LM's next-token distribution."""

    def __init__(self, adapter, k: int, lm: bool = False) -> None:
        self.adapter, self.layers, self.t = adapter, range(k), 0
        self.cache, self.pending = None, None
        self.upper = adapter.new_cache() if lm else None

    def states(self, cand: torch.Tensor) -> torch.Tensor:
        """The exact layer-k state of each candidate token (M,) at position t after the prefix: (M, H)."""
        M = len(cand)
        cache = self.adapter.new_cache() if self.cache is None else \
            self.cache.take_rows(torch.zeros(M, dtype=torch.long))
        pos = torch.full((M, 1), self.t)
        with torch.inference_mode():
            h = self.adapter.embed(cand.view(M, 1), pos)  # (M, 1, H)
            h = self.adapter.run_layers(self.layers, h, torch.ones(M, self.t + 1, dtype=torch.long), pos, cache)
        self.pending = (cache, h)
        return h[:, 0].float()

    def keep(self, i: int) -> torch.Tensor | None:
        """Append candidate ``i`` of the last :meth:`states` to the prefix; with ``lm``, return the LM's
        log-probabilities of the token after it (V,)."""
        cache, h = self.pending
        self.cache, self.pending = cache.take_rows(torch.tensor([i])), None
        self.t += 1
        if self.upper is None:
            return None
        a = self.adapter
        pos = torch.full((1, 1), self.t - 1)
        with torch.inference_mode():
            top = a.run_layers(range(self.layers.stop, a.num_layers), h[i:i + 1],
                               torch.ones(1, self.t, dtype=torch.long), pos, self.upper)
            return F.log_softmax(a.logits(a.norm(top))[0, 0].float(), dim=-1)


class ModelMap:
    """The model-aware MAP decoder at split point k > 0: it knows the public layers [0, k), the clip C and sigma
    of the sequence unit (a row's states scaled as a whole to Frobenius norm <= C, then N(0, sigma^2) on every real
    position) and the public unigram. Greedy, left to right: at position t it shortlists ``shortlist`` candidate
    tokens by a proxy, computes each candidate's exact layer-k state after the tokens it has decoded (layers
    [0, k) over a KV cache of the prefix), scores them by the mechanism's log-likelihood
    -||z_t - c s_t(v)||^2 / (2 sigma^2) plus the log prior, and keeps the best. At t = 0 it needs no shortlist:
    every token's state as a row's first token is a table.

    The proxy for t >= 1 is each token's state at position 1 after the public rows' most common first token,
    shifted by the mean difference to the states of public text, or its state as a row's first token (some tokens,
    " the" in SmolLM2, take a first token's state in context), whichever is nearer to z_t, scored with the proxy's
    own spread added to sigma^2. The clip scale c of a row (unknown to the attacker) is 1 when ||Z||^2 - n H sigma^2
    is clearly below C^2 (the row was not clipped), else C / ||S|| with ||S||^2 estimated as the decoded prefix's
    squared norm plus the candidate's, plus the public mean per remaining position."""

    def __init__(self, adapter, k: int, public, shortlist: int) -> None:
        if k < 1:
            raise ValueError(f"the model-aware MAP decoder is for split points k > 0 ({k=}); at k=0 use map_decode")
        self.adapter, self.k, self.shortlist = adapter, k, shortlist
        firsts = torch.cat([b.ids[:, 0] for b in public.batches])
        self.first = int(firsts.mode().values)
        self.alone = self._table(None)  # (V, H): every token as a row's first token (exact at t = 0)
        after = self._table(self.first)  # (V, H): every token at position 1 after a common first token
        states = real_states(public.at(adapter, k), public)
        later = public.pos > 0
        resid = states[later] - after[public.ids[later]]
        self.proxy = after + resid.mean(0)
        self.proxy_sq, self.alone_sq = (self.proxy ** 2).sum(-1), (self.alone ** 2).sum(-1)
        self.tau2 = float((resid - resid.mean(0)).pow(2).mean())  # the proxy's spread per dimension
        self.later_sq = float(states[later].pow(2).sum(-1).mean())  # a position's mean ||s_t||^2, t >= 1

    def _table(self, first: int | None, chunk: int = 1024) -> torch.Tensor:
        """Every vocabulary token's layer-k state as a row's first token (``first`` None) or after ``first``."""
        V = self.adapter.config.vocab_size
        out = []
        for ids in torch.arange(V).split(chunk):
            prefix = _Prefix(self.adapter, self.k)
            if first is not None:
                prefix.states(torch.tensor([first]))
                prefix.keep(0)
            out.append(prefix.states(ids))
        return torch.cat(out)

    def decode(self, zs: list[torch.Tensor], corpus, sigma: float, clip: float | None, log_prior: torch.Tensor,
               lm_weight: float = 0.0) -> torch.Tensor:
        """The decoded token of every real position of ``corpus`` (rows in order) from its batches' Z ``zs``.
        ``clip`` None: Z was not clipped; ``sigma`` 0: Z is the clean states (the nearest candidate wins)."""
        out = []
        for b, z in zip(corpus.batches, zs, strict=True):
            for r in range(b.size):
                n = int(b.mask[r].sum())
                out.append(self._row(z[r, :n].float(), sigma, clip, log_prior, lm_weight))
        return torch.cat(out)

    def _scale(self, z: torch.Tensor, sigma: float, clip: float | None) -> float | None:
        """1 when the row was certainly not clipped (or there is no clip), else None (estimate it per step)."""
        if clip is None:
            return 1.0
        n, H = z.shape
        clean_sq = float(z.double().pow(2).sum()) - n * H * sigma ** 2  # estimates ||c S||^2
        spread = math.sqrt(2 * n * H) * sigma ** 2 + 2 * sigma * math.sqrt(max(clean_sq, 0.0))
        return 1.0 if clean_sq + 4 * spread < clip ** 2 * (1 - 1e-6) else None

    def _row(self, z: torch.Tensor, sigma: float, clip: float | None, log_prior: torch.Tensor,
             lm_weight: float) -> torch.Tensor:
        """One row's tokens from its Z (n, H)."""
        n = len(z)
        fixed = self._scale(z, sigma, clip)
        prefix = _Prefix(self.adapter, self.k, lm=lm_weight > 0)
        # both tables against every position at once: (V, n) each (a table is read once per row, not per position)
        on_proxy, on_alone = self.proxy @ z.T, self.alone @ z.T
        prior, done_sq, out = log_prior, 0.0, []
        for t in range(n):
            if t == 0:  # exact over the whole vocabulary: a first token's state is its own
                cand, sq, dot = torch.arange(len(self.alone)), self.alone_sq, on_alone[:, 0]
            else:
                c = fixed or min(1.0, clip / math.sqrt(done_sq + (n - t) * self.later_sq))
                d = torch.minimum(c ** 2 * self.proxy_sq - 2 * c * on_proxy[:, t],
                                  c ** 2 * self.alone_sq - 2 * c * on_alone[:, t])
                score = -d / (2 * (sigma ** 2 + c ** 2 * self.tau2)) + prior
                cand = score.topk(min(self.shortlist, len(score))).indices
                states = prefix.states(cand)
                sq, dot = states.pow(2).sum(-1), states @ z[t]
            c = torch.full_like(sq, fixed) if fixed else \
                torch.clamp(clip / (done_sq + sq + (n - t - 1) * self.later_sq).sqrt(), max=1.0)
            d = c ** 2 * sq - 2 * c * dot
            score = -d / (2 * sigma ** 2) + prior[cand] if sigma > 0 else -d
            best = int(score.argmax())
            if t == 0:
                prefix.states(cand[best:best + 1])
            lm = prefix.keep(0 if t == 0 else best)
            if lm is not None:
                prior = torch.logaddexp(lm + math.log(lm_weight), log_prior + math.log1p(-lm_weight)) \
                    if lm_weight < 1 else lm
            done_sq += float(sq[best])
            out.append(int(cand[best]))
        return torch.tensor(out)


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
