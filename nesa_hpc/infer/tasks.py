"""What the owner computes from the final hidden states: per-row scores or pooled embeddings.

Each task has two halves. ``head_stage`` runs where the head lives (rank 0 with ``split.head=owner``,
the last worker with ``split.head=last``) and sees only hidden states and the mask. ``finish`` runs on
rank 0 with the token ids, so labels never leave rank 0 whichever placement is chosen.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..io.batch import Batch
from ..models.adapter import Adapter

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
    """Log-likelihood of each row against its true next tokens; with ``continuation``, of the completion's
    tokens only (rows from ``data.prompt_field`` / ``data.completion_field``), and whether greedy decoding
    would produce them (``is_greedy``). ``token_logprobs`` / ``top_logprobs`` also keep per-token values."""

    name = "score"

    def __init__(self, head_on_owner: bool, token_logprobs: bool = False, top_logprobs: int = 0,
                 continuation: bool = False) -> None:
        self.head_on_owner = head_on_owner
        self.token_logprobs = token_logprobs
        self.top_logprobs = top_logprobs
        self.continuation = continuation

    def head_stage(self, adapter, h, mask):
        sel = score_positions(mask)
        hs = adapter.norm(h[:, :-1][sel])  # (N, H): only positions that predict a real token
        if self.head_on_owner:
            return [hs]
        # head on the last worker: it has no labels, so it returns the logits of every scored position
        return [torch.cat([adapter.logits(c) for c in hs.split(_CHUNK)]).float()] if len(hs) else \
            [torch.zeros(0, adapter.config.vocab_size, device=h.device)]  # (N, V)

    def finish(self, adapter, batch, outputs):
        sel = score_positions(batch.mask)  # (B, T-1)
        labels = batch.ids[:, 1:][sel]  # (N,)
        row_of = torch.arange(batch.size).unsqueeze(1).expand_as(sel)[sel]  # (N,)
        (x,) = outputs  # on the device rank 0 computes on (or where the transport left it)
        if batch.prompt_tokens is not None:
            # a target counts when it is a completion token: its index among the row's real tokens (its
            # position id) is at least the number of prompt tokens
            keep = (batch.pos[:, 1:] >= batch.prompt_tokens.unsqueeze(1))[sel].nonzero().squeeze(1)  # (N',)
            x, labels, row_of = x[keep.to(x.device)], labels[keep], row_of[keep]
        n, k = len(labels), self.top_logprobs
        logprob = torch.empty(n, dtype=torch.float32)
        greedy = torch.empty(n, dtype=torch.bool)
        top_ids, top_vals = torch.empty(n, k, dtype=torch.int32), torch.empty(n, k, dtype=torch.float32)
        targets = labels.to(x.device)
        for start in range(0, n, _CHUNK):
            stop = start + _CHUNK
            logits = adapter.logits(x[start:stop]) if self.head_on_owner else x[start:stop]
            logp = F.log_softmax(logits.float(), dim=-1)  # (c, V)
            logprob[start:stop] = logp.gather(1, targets[start:stop].unsqueeze(1)).squeeze(1).cpu()
            if self.continuation:
                greedy[start:stop] = (logits.argmax(-1) == targets[start:stop]).cpu()
            if k:
                vals, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
                top_vals[start:stop], top_ids[start:stop] = vals.cpu(), ids.to(torch.int32).cpu()
        nll = -logprob
        nll_sum = torch.zeros(batch.size, dtype=torch.float64).index_add_(0, row_of, nll.double())
        n_tokens = torch.zeros(batch.size, dtype=torch.long).index_add_(0, row_of, torch.ones_like(row_of))
        with np.errstate(invalid="ignore", divide="ignore"):
            nll_mean = nll_sum.numpy() / n_tokens.numpy()
        out = {"n_tokens": n_tokens.numpy().astype(np.int32), "nll_sum": nll_sum.numpy(), "nll_mean": nll_mean}
        counts = n_tokens.tolist()
        if self.continuation:
            wrong = torch.zeros(batch.size, dtype=torch.long).index_add_(0, row_of, (~greedy).long())
            out["is_greedy"] = (wrong == 0).numpy()
            out["n_prompt_tokens"] = batch.prompt_tokens.numpy().astype(np.int32)
        if self.token_logprobs:
            out["token_logprobs"] = _per_row(logprob.numpy(), counts)
        if k:
            out["top_logprob_ids"] = _per_row(top_ids.numpy(), counts)
            out["top_logprobs"] = _per_row(top_vals.numpy(), counts)
        return out

    def columns(self, hidden_size):
        import h5py

        cols = {"nll_sum": (np.float64, ()), "nll_mean": (np.float64, ())}
        if self.continuation:
            cols.update(is_greedy=(np.bool_, ()), n_prompt_tokens=(np.int32, ()))
        if self.token_logprobs:
            cols["token_logprobs"] = (h5py.vlen_dtype(np.float32), ())
        if self.top_logprobs:
            cols.update(top_logprob_ids=(h5py.vlen_dtype(np.int32), ()), top_logprobs=(h5py.vlen_dtype(np.float32), ()))
        return cols


def _per_row(values: np.ndarray, counts: list[int]) -> np.ndarray:
    """Split per-position ``values`` (N, ...) into one flat array per row (an object array of B arrays)."""
    out = np.empty(len(counts), dtype=object)
    start = 0
    for i, c in enumerate(counts):
        out[i] = np.ascontiguousarray(values[start:start + c]).reshape(-1)
        start += c
    return out


class EmbedTask(Task):
    """Final hidden states (what ``AutoModel(...).last_hidden_state`` returns) pooled over real tokens."""

    name = "embed"

    def __init__(self, pooling: str = "mean", normalize: bool = False, requests: bool = False) -> None:
        if pooling not in ("mean", "cls", "last"):
            raise ConfigError(f"task.pooling={pooling!r} must be 'mean', 'cls' or 'last'")
        self.pooling = pooling
        self.normalize = normalize
        self.requests = requests  # /v1/embeddings batch lines: keep each row's custom_id, url and model

    def head_stage(self, adapter, h, mask):
        h = adapter.norm(h).float()  # (B, T, H)
        m = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        if self.pooling == "mean":
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        elif self.pooling == "cls":  # the first real token (a BERT [CLS]), whichever side the padding is on
            pooled = h[torch.arange(h.shape[0]), mask.argmax(-1)]
        else:
            T = mask.shape[1]
            last = T - 1 - mask.flip(-1).argmax(-1)  # index of the last real token
            pooled = h[torch.arange(h.shape[0]), last]
        if self.normalize:
            pooled = F.normalize(pooled, dim=-1)
        return [pooled]  # (B, H)

    def finish(self, adapter, batch, outputs):
        extra = request_columns(batch) if self.requests else {}
        return {**extra, "n_tokens": batch.lengths.numpy().astype(np.int32),
                "embedding": outputs[0].float().cpu().numpy()}

    def columns(self, hidden_size):
        return {"embedding": (np.float32, (hidden_size,)), **(request_dtypes() if self.requests else {})}


class GenerateTask(Task):
    """Autoregressive generation (the loop lives in :mod:`nesa_hpc.infer.generate`): the head turns the last
    position's state into next-token logits; ``finish`` writes the generated tokens and text."""

    name = "generate"

    def head_stage(self, adapter, h, mask):
        return [adapter.logits(adapter.norm(h[:, -1])).float()]  # (B, V) logits of the last position

    def __init__(self, requests: bool = False, logprobs: bool = False, top_logprobs: int = 0) -> None:
        self.requests = requests  # OpenAI batch lines: keep each row's custom_id and endpoint
        self.logprobs = logprobs or top_logprobs > 0  # task.logprobs: each generated token's log-probability
        self.top_logprobs = top_logprobs              # task.top_logprobs: the N most likely at each step

    def finish(self, adapter, batch, outputs):
        (res,) = outputs  # a nesa_hpc.infer.generate.GroupResult
        ids = np.empty(batch.size, dtype=object)
        for i, t in enumerate(res.tokens):
            ids[i] = np.asarray(t, dtype=np.int32)
        extra = request_columns(batch) if self.requests else {}
        reqs = batch.requests or [None] * batch.size
        if self.logprobs:
            extra["generated_logprobs"] = _ragged(res.logprobs, np.float32)
            if self.requests:  # what each request asked: -1 none, else the alternatives per token
                extra["request_logprobs"] = np.array([-1 if r is None or r.logprobs is None else r.logprobs
                                                      for r in reqs], dtype=np.int32)
                # an echoed request's prompt: its token ids and, from the second on, their log-probabilities
                scored = [r is not None and r.echo and r.logprobs is not None for r in reqs]
                extra["prompt_ids"] = _ragged([batch.ids[i][batch.mask[i].bool()].tolist() if s else []
                                               for i, s in enumerate(scored)], np.int32)
                extra["prompt_logprobs"] = _ragged(res.prompt_logprobs, np.float32)
                if self.top_logprobs:
                    extra.update(prompt_top_logprob_ids=_ragged(res.prompt_top_ids, np.int32),
                                 prompt_top_logprobs=_ragged(res.prompt_top_logprobs, np.float32))
        if self.requests:
            extra["echo_prompt"] = np.array([r.text if r is not None and r.echo else "" for r in reqs], dtype=object)
        if self.top_logprobs:
            extra.update(generated_top_logprob_ids=_ragged(res.top_ids, np.int32),
                         generated_top_logprobs=_ragged(res.top_logprobs, np.float32))
        return {**extra, "n_tokens": batch.lengths.numpy().astype(np.int32),
                "n_prompt_tokens": batch.lengths.numpy().astype(np.int32),
                "n_generated": np.array([len(t) for t in res.tokens], dtype=np.int32),
                "generated_ids": ids, "generated_text": np.array(res.texts, dtype=object),
                "finish_reason": np.array(res.reasons, dtype=object),
                "n_releases": np.asarray(res.releases, dtype=np.int32)}

    def columns(self, hidden_size):
        import h5py

        cols = {"n_prompt_tokens": (np.int32, ()), "n_generated": (np.int32, ()),
                "generated_ids": (h5py.vlen_dtype(np.int32), ()), "generated_text": (h5py.string_dtype(), ()),
                "finish_reason": (h5py.string_dtype(), ()), "n_releases": (np.int32, ())}
        if self.requests:
            cols.update(request_dtypes(), echo_prompt=(h5py.string_dtype(), ()))
        if self.logprobs:
            cols["generated_logprobs"] = (h5py.vlen_dtype(np.float32), ())
            if self.requests:
                cols.update(request_logprobs=(np.int32, ()), prompt_ids=(h5py.vlen_dtype(np.int32), ()),
                            prompt_logprobs=(h5py.vlen_dtype(np.float32), ()))
                if self.top_logprobs:
                    cols.update(prompt_top_logprob_ids=(h5py.vlen_dtype(np.int32), ()),
                                prompt_top_logprobs=(h5py.vlen_dtype(np.float32), ()))
        if self.top_logprobs:
            cols.update(generated_top_logprob_ids=(h5py.vlen_dtype(np.int32), ()),
                        generated_top_logprobs=(h5py.vlen_dtype(np.float32), ()))
        return cols


def _ragged(rows: list[list], dtype) -> np.ndarray:
    """Per row a 1-D array (an HDF5 variable-length value)."""
    out = np.empty(len(rows), dtype=object)
    for i, values in enumerate(rows):
        out[i] = np.asarray(values, dtype=dtype)
    return out


def request_dtypes() -> dict:
    """The datasets of an OpenAI batch request: its ``custom_id``, ``endpoint`` (url) and ``body.model``."""
    import h5py

    return {name: (h5py.string_dtype(), ()) for name in ("custom_id", "endpoint", "request_model")}


def request_columns(batch) -> dict:
    """Per row of ``batch``: its request's ``custom_id``, ``endpoint`` and ``body.model`` ("" for none)."""
    reqs = batch.requests or [None] * batch.size
    return {"custom_id": np.array([r.custom_id if r else "" for r in reqs], dtype=object),
            "endpoint": np.array([r.endpoint if r else "" for r in reqs], dtype=object),
            "request_model": np.array([r.model if r else "" for r in reqs], dtype=object)}


def make_task(name: str, head_on_owner: bool, pooling: str = "mean", normalize: bool = False,
              settings=None) -> Task:
    """The task ``name``; ``settings`` (:class:`~nesa_hpc.config.Settings`) adds its row and output options."""
    if name == "score":
        if settings is None:
            return ScoreTask(head_on_owner)
        return ScoreTask(head_on_owner, settings.token_logprobs, settings.top_logprobs,
                         settings.completion_field is not None or settings.convention == "lm_eval")
    if name == "embed":
        return EmbedTask(pooling, normalize, settings is not None and settings.data_format == "openai_batch")
    if name == "generate":
        if settings is None:
            return GenerateTask()
        return GenerateTask(settings.data_format == "openai_batch", settings.token_logprobs, settings.top_logprobs)
    raise ConfigError(f"task={name!r} is not one of {TASKS}")
