"""What the owner computes from the final hidden states: per-row scores or pooled embeddings.

Each task has two halves. ``head_stage`` runs where the head lives (rank 0 with ``split.head=owner``,
the last worker with ``split.head=last``) and sees only hidden states and the mask. ``finish`` runs on
rank 0 with the token ids, so labels never leave rank 0 whichever placement is chosen.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import Batch
from .errors import ConfigError
from .models import Adapter

__all__ = ["Task", "ScoreTask", "EmbedTask", "GenerateTask", "make_task", "TASKS"]

TASKS = ("score", "embed", "generate")
_CHUNK = 256  # positions per LM-head chunk: bounds the (chunk, vocab) logits buffer


def score_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: position t predicts token t+1 when both are real tokens."""
    m = mask.bool()
    return m[:, :-1] & m[:, 1:]


class Task:
    name: str

    def head_stage(self, adapter: Adapter, h: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Runs where the head lives on (B, T, H) hidden states; returns what ``finish`` needs."""
        raise NotImplementedError

    def finish(self, adapter: Adapter | None, batch: Batch, outputs: list[torch.Tensor]) -> dict[str, np.ndarray]:
        """Runs on rank 0; returns per-row result columns for ``batch``."""
        raise NotImplementedError

    def columns(self, hidden_size: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Task-specific per-row datasets: name -> (dtype, per-row shape)."""
        raise NotImplementedError


class ScoreTask(Task):
    """Log-likelihood of each row against its true next tokens."""

    name = "score"

    def __init__(self, head_on_owner: bool) -> None:
        self.head_on_owner = head_on_owner

    def head_stage(self, adapter, h, mask):
        sel = score_positions(mask)
        hs = adapter.norm(h[:, :-1][sel])  # (N, H): only positions that predict a real token
        if self.head_on_owner:
            return [hs]
        # head on the last worker: it has no labels, so it returns the logits of every scored position
        return [torch.cat([adapter.logits(c) for c in hs.split(_CHUNK)]).float()] if len(hs) else \
            [torch.zeros(0, adapter.config.vocab_size, device=h.device)]  # (N, V)

    def finish(self, adapter, batch, outputs):
        sel = score_positions(batch.mask)
        labels = batch.ids[:, 1:][sel]  # (N,)
        (x,) = outputs  # on the device rank 0 computes on (or where the transport left it)
        nll = torch.empty(len(labels), dtype=torch.float32)
        targets = labels.to(x.device)
        for start in range(0, len(labels), _CHUNK):
            stop = start + _CHUNK
            logits = adapter.logits(x[start:stop]) if self.head_on_owner else x[start:stop]
            nll[start:stop] = F.cross_entropy(logits.float(), targets[start:stop], reduction="none").cpu()
        row_of = torch.arange(batch.size).unsqueeze(1).expand_as(sel)[sel]
        nll_sum = torch.zeros(batch.size, dtype=torch.float64).index_add_(0, row_of, nll.double())
        n_tokens = sel.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            nll_mean = nll_sum.numpy() / n_tokens.numpy()
        return {"n_tokens": n_tokens.numpy().astype(np.int32), "nll_sum": nll_sum.numpy(),
                "nll_mean": nll_mean}

    def columns(self, hidden_size):
        return {"nll_sum": (np.float64, ()), "nll_mean": (np.float64, ())}


class EmbedTask(Task):
    """Final hidden states (what ``AutoModel(...).last_hidden_state`` returns) pooled over real tokens."""

    name = "embed"

    def __init__(self, pooling: str = "mean", normalize: bool = False) -> None:
        if pooling not in ("mean", "last"):
            raise ConfigError(f"task.pooling={pooling!r} must be 'mean' or 'last'")
        self.pooling = pooling
        self.normalize = normalize

    def head_stage(self, adapter, h, mask):
        h = adapter.norm(h).float()  # (B, T, H)
        m = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        if self.pooling == "mean":
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            T = mask.shape[1]
            last = T - 1 - mask.flip(-1).argmax(-1)  # index of the last real token
            pooled = h[torch.arange(h.shape[0]), last]
        if self.normalize:
            pooled = F.normalize(pooled, dim=-1)
        return [pooled]  # (B, H)

    def finish(self, adapter, batch, outputs):
        return {"n_tokens": batch.lengths.numpy().astype(np.int32), "embedding": outputs[0].float().cpu().numpy()}

    def columns(self, hidden_size):
        return {"embedding": (np.float32, (hidden_size,))}


class GenerateTask(Task):
    """Autoregressive generation (the loop lives in :mod:`nesa_hpc.generate`): the head turns the last
    position's state into next-token logits; ``finish`` writes the generated tokens and text."""

    name = "generate"

    def head_stage(self, adapter, h, mask):
        return [adapter.logits(adapter.norm(h[:, -1])).float()]  # (B, V) logits of the last position

    def finish(self, adapter, batch, outputs):
        (res,) = outputs  # a nesa_hpc.generate.GroupResult
        ids = np.empty(batch.size, dtype=object)
        for i, t in enumerate(res.tokens):
            ids[i] = np.asarray(t, dtype=np.int32)
        return {"n_tokens": batch.lengths.numpy().astype(np.int32),
                "n_prompt_tokens": batch.lengths.numpy().astype(np.int32),
                "n_generated": np.array([len(t) for t in res.tokens], dtype=np.int32),
                "generated_ids": ids, "generated_text": np.array(res.texts, dtype=object),
                "finish_reason": np.array(res.reasons, dtype=object),
                "n_releases": np.asarray(res.releases, dtype=np.int32)}

    def columns(self, hidden_size):
        import h5py

        return {"n_prompt_tokens": (np.int32, ()), "n_generated": (np.int32, ()),
                "generated_ids": (h5py.vlen_dtype(np.int32), ()), "generated_text": (h5py.string_dtype(), ()),
                "finish_reason": (h5py.string_dtype(), ()), "n_releases": (np.int32, ())}


def make_task(name: str, head_on_owner: bool, pooling: str = "mean", normalize: bool = False) -> Task:
    if name == "score":
        return ScoreTask(head_on_owner)
    if name == "embed":
        return EmbedTask(pooling, normalize)
    if name == "generate":
        return GenerateTask()
    raise ConfigError(f"task={name!r} is not one of {TASKS}")
