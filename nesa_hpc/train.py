"""Split fine-tuning (``jobs/train.py``): the loss on rank 0, activation gradients back through the pipeline.

Every optimizer step is one GPipe round over ``train.grad_accum`` micro-batches:

1. rank 0 embeds each micro-batch, runs layers [0, k), applies the privacy transform exactly as at
   inference (noise-aware training) and sends Z on; each worker runs its block and sends on; the last
   worker returns the final hidden states (``split.head=owner``) or the logits (``split.head=last``);
2. rank 0 computes the causal-LM loss against the labels, which never leave it, and sends the gradient of
   what it received back to the last worker, clipped and noised when ``train.grad_privacy`` says so;
   every worker back-propagates through its block and sends the gradient of its input to the rank before
   it, as long as some rank before it has parameters to train;
3. the ranks agree on the global gradient norm (one ``allreduce``), clip, and each steps its own AdamW.

Every message is sent without blocking, so stage r works on micro-batch m while stage r+1 works on m-1,
and a rank holds the activations of at most ``train.grad_accum`` micro-batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, Settings, _bool, _choice, _int, _nonneg, _positive, _privacy, settings_from_cfg
from .control import StopFlag
from .data import DataError, RowError, pad_batch, position_ids, read_rows
from .lora import add_lora, base_name, lora_config, lora_targets, merge_lora, peft_name
from .models import Adapter
from .pipeline import NonFiniteError, adapter_dtype
from .privacy import Privacy, PrivacySpec, calibrate_clip, make_privacy
from .public_text import load_texts, public_texts
from .tasks import score_positions
from .topology import Topology

__all__ = ["TrainSpec", "TrainBatch", "train_spec", "run_train", "main", "load_examples", "epoch_batches",
           "lr_factor", "training_epsilon", "make_trainable", "MODES", "SCHEDULES"]

log = logging.getLogger("nesa_hpc")

MODES = ("lora", "full")
SCHEDULES = ("constant", "linear", "cosine")
LOSSES = ("causal", "completion")
EXPORTS = ("auto", "adapter", "merged", "none")


# --------------------------------------------------------------------------------------------- options

@dataclass(frozen=True)
class TrainSpec:
    """Validated ``train.*`` options (documented in conf/train.yaml)."""

    mode: str = "lora"
    layers: tuple[int, int] | None = None
    owner_trainable: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None
    epochs: int = 1
    max_steps: int | None = None
    grad_accum: int = 4
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    loss: str = "causal"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    out_dir: str = "train_out"
    owner_dir: str = ""
    completion_eos: bool = True
    resume: bool = False
    overwrite: bool = False
    save_every: int = 100
    keep_checkpoints: int = 2
    export: str = "auto"
    log_every: int = 10
    grad_privacy: PrivacySpec = field(default_factory=PrivacySpec)


def train_spec(cfg: DictConfig) -> TrainSpec:
    t = OmegaConf.to_container(cfg.train, resolve=True)
    lora = t.get("lora") or {}
    layers = t.get("layers")
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or len(layers) != 2:
            raise ConfigError(f"train.layers={layers!r} must be null or [start, stop) layer indices")
        layers = (_int("train.layers[0]", layers[0], 0), _int("train.layers[1]", layers[1], 1))
        if layers[1] <= layers[0]:
            raise ConfigError(f"train.layers={list(layers)} is empty: stop must be > start")
    targets = lora.get("target_modules")
    if targets is not None and (not isinstance(targets, (list, tuple)) or not targets
                                or not all(isinstance(x, str) and x for x in targets)):
        raise ConfigError(f"train.lora.target_modules={targets!r} must be null or a list of module names")
    gp = dict(t.get("grad_privacy") or {"mechanism": "none"})
    if gp.get("unit", "sequence") != "sequence":
        raise ConfigError("train.grad_privacy.unit must be sequence: a row's gradient message mixes all its tokens")
    gp["unit"] = "sequence"
    try:
        grad_privacy = _privacy(gp, 0)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("privacy.", "train.grad_privacy.")) from None
    if grad_privacy.mechanism == "dchi":
        raise ConfigError("train.grad_privacy.mechanism must be none, gaussian or sigma (dchi is for token embeddings)")
    if grad_privacy.clip == "auto":
        raise ConfigError("train.grad_privacy.clip must be a number (the L2 norm of one row's gradient of its summed "
                          "token loss); auto applies to activations only")
    mgn = t.get("max_grad_norm")
    spec = TrainSpec(
        mode=_choice("train.mode", t.get("mode", "lora"), MODES),
        layers=layers,
        owner_trainable=_bool("train.owner_trainable", t.get("owner_trainable", False)),
        lora_r=_int("train.lora.r", lora.get("r", 8), 1),
        lora_alpha=_positive("train.lora.alpha", lora.get("alpha", 16)),
        lora_dropout=_nonneg("train.lora.dropout", lora.get("dropout", 0.0)),
        lora_targets=None if targets is None else tuple(targets),
        epochs=_int("train.epochs", t.get("epochs", 1), 1),
        max_steps=_int("train.max_steps", t.get("max_steps"), 1, allow_none=True),
        grad_accum=_int("train.grad_accum", t.get("grad_accum", 4), 1),
        lr=_positive("train.lr", t.get("lr", 2e-4)),
        schedule=_choice("train.schedule", t.get("schedule", "cosine"), SCHEDULES),
        warmup_steps=_int("train.warmup_steps", t.get("warmup_steps", 0), 0),
        weight_decay=_nonneg("train.weight_decay", t.get("weight_decay", 0.0)),
        max_grad_norm=None if mgn is None else _positive("train.max_grad_norm", mgn),
        seed=_int("train.seed", t.get("seed", 0), 0),
        loss=_choice("train.loss", t.get("loss", "causal"), LOSSES),
        prompt_field=str(t.get("prompt_field", "prompt")),
        completion_field=str(t.get("completion_field", "completion")),
        out_dir=str(t.get("out_dir") or ""),
        owner_dir=str(t.get("owner_dir") or t.get("out_dir") or ""),
        completion_eos=_bool("train.completion_eos", t.get("completion_eos", True)),
        resume=_bool("train.resume", t.get("resume", False)),
        overwrite=_bool("train.overwrite", t.get("overwrite", False)),
        save_every=_int("train.save_every", t.get("save_every", 100), 1),
        keep_checkpoints=_int("train.keep_checkpoints", t.get("keep_checkpoints", 2), 1),
        export=_choice("train.export", t.get("export", "auto"), EXPORTS),
        log_every=_int("train.log_every", t.get("log_every", 10), 1),
        grad_privacy=grad_privacy,
    )
    if spec.export == "auto":
        spec = replace(spec, export="adapter" if spec.mode == "lora" else "merged")
    if not spec.out_dir:
        raise ConfigError("train.out_dir must name the folder for checkpoints and the exported model")
    if spec.lora_dropout != 0:
        raise ConfigError(f"train.lora.dropout={spec.lora_dropout}: only 0 is supported (dropout would draw from "
                          "an unseeded random state: split and unsplit training, and a resumed run, would differ)")
    if spec.export == "adapter" and spec.mode == "full":
        raise ConfigError("train.export=adapter needs train.mode=lora (full fine-tuning exports train.export=merged)")
    if spec.resume and spec.overwrite:
        raise ConfigError("train.resume=true and train.overwrite=true contradict each other")
    return spec


# ------------------------------------------------------------------------------------------------ data

@dataclass
class TrainBatch:
    """One padded training micro-batch (right padding). ``target`` (B, T) marks tokens the loss predicts."""

    rows: torch.Tensor     # (B,) int64 input rows (they key the noise)
    ids: torch.Tensor      # (B, T) int64: never leave rank 0
    mask: torch.Tensor     # (B, T) int64
    pos: torch.Tensor      # (B, T) int64
    target: torch.Tensor   # (B, T) bool

    @property
    def size(self) -> int:
        return int(self.rows.numel())

    @property
    def scored(self) -> torch.Tensor:
        """(B, T-1) bool: positions t whose next token t+1 is real (what the head computes logits for)."""
        return score_positions(self.mask)

    def weights(self) -> torch.Tensor:
        """(N,) float: for each scored position, 1 when its next token counts in the loss."""
        return self.target[:, 1:][self.scored].float()


def load_examples(settings: Settings, spec: TrainSpec, tokenizer) -> list[tuple[int, list[int], list[bool]]]:
    """(row, token ids, target flags) of every usable training row; rows that cannot teach anything (one
    token, or no completion token within ``data.max_length``) are skipped with a warning."""
    path = settings.data_path
    limit = settings.max_length
    if spec.loss == "causal":
        if path is None:
            items = list(enumerate(public_texts()))
            source = "the built-in public text"
        else:
            items = list(read_rows(path, settings.data_format, settings.text_field, settings.on_error))
            source = path
        pairs = [(r, t, None) for r, t in items]
    else:
        if path is None:
            raise ConfigError("train.loss=completion needs data.path (rows with train.prompt_field and "
                              "train.completion_field)")
        prompts = read_rows(path, settings.data_format, spec.prompt_field, settings.on_error)
        completions = read_rows(path, settings.data_format, spec.completion_field, settings.on_error)
        pairs = [(r, p, c) for (r, p), (_, c) in zip(prompts, completions, strict=True)]
        source = path
    out, skipped = [], []
    for row, text, completion in pairs:
        bad = next((x for x in (text, completion) if isinstance(x, RowError)), None)
        if bad is not None or not (text or completion):
            if settings.on_error == "fail":
                raise DataError(bad.reason if bad is not None else f"{source}: row {row}: the text is empty")
            skipped.append(row)
            continue
        ids = list(tokenizer(text)["input_ids"])
        target = [completion is None] * len(ids)
        if completion is not None:
            more = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
            if spec.completion_eos and tokenizer.eos_token_id is not None:
                more.append(tokenizer.eos_token_id)
            ids, target = ids + more, target + [True] * len(more)
        if len(ids) > limit and settings.on_long == "fail":
            raise DataError(f"{source}: row {row}: {len(ids)} tokens, longer than data.max_length={limit}")
        if len(ids) > limit and settings.on_long == "skip":
            skipped.append(row)
            continue
        ids, target = ids[:limit], target[:limit]
        if len(ids) < 2 or not any(target[1:]):
            skipped.append(row)
            continue
        out.append((row, ids, target))
    if skipped:
        log.warning("%s: %d rows skipped (empty, too long with data.on_long=skip, or nothing to predict within "
                    "data.max_length): rows %s%s", source, len(skipped), skipped[:10],
                    " ..." if len(skipped) > 10 else "")
    if not out:
        raise DataError(f"{source}: no usable training rows")
    return out


def epoch_batches(examples: list, epoch: int, seed: int, batch_size: int, pad_id: int) -> list[TrainBatch]:
    """The micro-batches of one epoch: rows shuffled by (seed, epoch), cut into ``batch_size`` rows."""
    order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    batches = []
    for start in range(0, len(order), batch_size):
        part = [examples[i] for i in order[start:start + batch_size]]
        ids, mask = pad_batch([seq for _, seq, _ in part], pad_id, "right")
        target = pad_batch([[int(t) for t in tgt] for _, _, tgt in part], 0, "right")[0].bool()
        batches.append(TrainBatch(torch.tensor([r for r, _, _ in part]), ids, mask, position_ids(mask), target))
    return batches


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of ``train.lr`` at optimizer step ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------- trainable params

def trainable_layers(rank: int, topo: Topology, spec: TrainSpec) -> list[int]:
    """Layers whose parameters this rank trains: its own block ∩ ``train.layers``; for rank 0 only with
    ``train.owner_trainable`` (its front layers and its tail)."""
    if rank == 0 and topo.world_size > 1 and not spec.owner_trainable:
        return []
    mine = list(topo.layers_of(rank)) + (list(topo.tail) if rank == 0 else [])
    lo, hi = spec.layers or (0, topo.num_layers)
    return [i for i in mine if lo <= i < hi]


def make_trainable(adapter: Adapter, layers: list[int], spec: TrainSpec) -> list[tuple[str, torch.nn.Parameter]]:
    """Attach LoRA (``mode=lora``) or unfreeze (``mode=full``) ``layers``; the named trainable parameters."""
    if spec.mode == "lora":
        add_lora(adapter, layers, spec)
    else:
        for i in layers:
            for p in adapter.layers[i].parameters():
                p.requires_grad_(True)
    return [(f"{adapter.layer_module(i)}.{n}", p) for i in layers
            for n, p in adapter.layers[i].named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------ ledger

def training_epsilon(multipliers: list[tuple[float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of Gaussian releases, ``multipliers`` = [(sigma / sensitivity, count), ...].

    Gaussian mechanisms compose exactly into one Gaussian mechanism whose noise multiplier z satisfies
    1/z^2 = sum count_i / z_i^2 (Dong, Roth and Su, "Gaussian Differential Privacy", 2019, Cor. 3.3);
    its epsilon comes from dp-accounting's analytic Gaussian (``get_epsilon_gaussian``)."""
    from dp_accounting import get_epsilon_gaussian

    precision = sum(n / (z * z) for z, n in multipliers if n)
    if precision == 0:
        return 0.0
    return float(get_epsilon_gaussian(1.0 / math.sqrt(precision), delta))


@dataclass
class TrainLedger:
    """Releases made by the job, per direction: ``forward`` (Z to rank 1) and ``backward`` (the gradient
    message to the last worker). Every row is released once per epoch in each direction it travels."""

    forward_max: int = 0
    backward_max: int = 0
    forward_total: int = 0
    backward_total: int = 0

    def epsilon(self, fwd: Privacy, bwd: Privacy | None, owner_trainable: bool) -> float:
        """Worst-case epsilon of a row at ``privacy.delta``: inf when a direction travels unprotected
        (or the forward mechanism makes no (epsilon, delta) claim: nan). With ``train.owner_trainable``
        every release of every row depends on every row seen before (through the owner's weights), so
        all the job's releases count against each row."""
        if self.forward_max == 0 and self.backward_max == 0:
            return 0.0
        parts = []
        for privacy, most, total in ((fwd, self.forward_max, self.forward_total),
                                     (bwd, self.backward_max, self.backward_total)):
            if not most:
                continue
            if privacy is None or not privacy.spec.adds_noise:
                return math.inf
            if privacy.spec.mechanism != "gaussian":
                return math.nan
            parts.append((privacy.sigma / (2 * privacy.clip), total if owner_trainable else most))
        return training_epsilon(parts, fwd.spec.delta if fwd.spec.delta is not None else bwd.spec.delta)


def _grad_message(privacy: Privacy | None, g: torch.Tensor, row_of: torch.Tensor, rows: torch.Tensor,
                  release: int, scale: float) -> torch.Tensor:
    """Privatise the gradient message (N, D) whose position n belongs to row ``row_of[n]``: the gradient of
    the summed token loss (``g * scale``) is clipped per row to ``train.grad_privacy.clip``, noise keyed by
    (row, release) is added, and the result is scaled back."""
    if privacy is None or not privacy.spec.adds_noise:
        return g
    x = g.double() * scale
    if privacy.clip is not None:
        sq = torch.zeros(len(rows), dtype=torch.float64, device=x.device).index_add_(0, row_of, x.pow(2).sum(-1))
        factor = torch.clamp(privacy.clip / sq.sqrt().clamp(min=1e-30), max=1.0)
        x = x * factor[row_of].unsqueeze(-1)
    for i, r in enumerate(rows.tolist()):
        at = (row_of == i).nonzero().squeeze(-1)
        if len(at):
            x[at] += privacy._draw(r, release, len(at), x.shape[-1]).to(device=x.device, dtype=x.dtype)
    return (x / scale).to(g.dtype)


# -------------------------------------------------------------------------------------------- the steps

def _loss_sum(logits: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
    labels = batch.ids[:, 1:][batch.scored].to(logits.device)
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return (ce * batch.weights().to(ce.device)).sum()


def _head_logits(adapter: Adapter, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, V) logits of the positions that predict a real token."""
    return adapter.logits(adapter.norm(h[:, :-1][score_positions(mask)]))


@dataclass
class _Roles:
    """Who sends gradients where: ``needs[r]`` = some rank <= r trains parameters that come before the head."""

    needs: list[bool]

    @classmethod
    def of(cls, flags: list[bool]) -> _Roles:
        needs, seen = [], False
        for f in flags:
            seen = seen or f
            needs.append(seen)
        return cls(needs)


class Stage:
    """One rank's part of training: its model slice, trainable parameters, optimizer and the step loop."""

    def __init__(self, rank: int, topo: Topology, adapter: Adapter, spec: TrainSpec, params, transport,
                 comm, roles: _Roles, device: torch.device, total_steps: int) -> None:
        self.rank, self.topo, self.adapter, self.spec = rank, topo, adapter, spec
        self.params = params
        self.transport, self.comm, self.roles, self.device = transport, comm, roles, device
        self.opt = torch.optim.AdamW([p for _, p in params], lr=spec.lr, weight_decay=spec.weight_decay) \
            if params else None
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, total_steps, spec.warmup_steps, spec.schedule)) if params else None
        self.dtype = adapter_dtype(adapter)
        # with a privacy mechanism, rank 0's gradients (of its own layers, trained on the raw rows) are clipped
        # by their own norm and kept out of the shared one: nothing computed from them leaves rank 0
        self.private = False

    # -- shared end of a step: global gradient norm, clipping, optimizer
    def finish_step(self) -> float:
        local = sum(float(p.grad.double().pow(2).sum()) for _, p in self.params if p.grad is not None)
        apart = self.private and self.rank == 0 and self.topo.world_size > 1
        shared = self.comm.allreduce(0.0 if apart else local) if self.comm is not None else local
        total = math.sqrt(local if apart else shared)
        if self.params:
            if self.spec.max_grad_norm is not None:
                coef = min(1.0, self.spec.max_grad_norm / (total + 1e-6))
                if coef < 1.0:
                    for _, p in self.params:
                        if p.grad is not None:
                            p.grad.mul_(coef)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
        return total

    # -- workers
    def worker_step(self, micro: int) -> None:
        from .transport import Kind

        r, topo, t = self.rank, self.topo, self.transport
        is_last = r == topo.last
        train_here = self.roles.needs[r]
        send_back = self.roles.needs[r - 1]
        saved, pending = [], []
        for _ in range(micro):
            msg = t.recv(r - 1)
            _expect(msg, Kind.TRAIN_FWD, r, r - 1)
            h, mask, pos = (x.to(self.device) for x in msg.tensors)
            h, mask, pos = h.to(self.dtype), mask.long(), pos.long()
            with torch.set_grad_enabled(train_here):
                if send_back:
                    h.requires_grad_(True)
                out = self.adapter.run_layers(topo.layers_of(r), h, mask, pos)
                if is_last and topo.head_rank() == r:
                    out = _head_logits(self.adapter, out, mask).float()
            if is_last:
                pending.append(t.send(0, Kind.TRAIN_OUT, msg.batch_id, [out.detach()]))
            else:
                pending.append(t.send(r + 1, Kind.TRAIN_FWD, msg.batch_id,
                                      [out.detach(), mask.to(torch.int8), pos.to(torch.int32)]))
            saved.append((h, out))
        if train_here:
            source = 0 if is_last else r + 1
            for h, out in saved:
                msg = t.recv(source)
                _expect(msg, Kind.TRAIN_BWD, r, source)
                out.backward(msg.tensors[0].to(device=out.device, dtype=out.dtype))
                if send_back:
                    pending.append(t.send(r - 1, Kind.TRAIN_BWD, msg.batch_id, [h.grad]))
        for p in pending:
            p.wait()

    # -- the owner
    def owner_step(self, batches: list[TrainBatch], privacy: Privacy, grad_privacy: Privacy | None,
                   release: int) -> tuple[float, int]:
        """One optimizer step's forward and backward on rank 0; returns (mean token loss, target tokens)."""
        from .transport import Kind

        topo, a, t, dev = self.topo, self.adapter, self.transport, self.device
        n_target = int(sum(b.weights().sum() for b in batches))
        front_trains = self.roles.needs[0]
        alone = topo.world_size == 1
        pending, zs, loss = [], [], 0.0
        for m, b in enumerate(batches):
            mask, pos = b.mask.to(dev), b.pos.to(dev)
            with torch.set_grad_enabled(front_trains):
                h = a.run_layers(range(topo.k), a.embed(b.ids.to(dev), pos), mask, pos)
                z = privacy.apply(h, mask, b.rows, release=release)
            if alone:
                with torch.enable_grad():
                    part = _loss_sum(_head_logits(a, a.run_layers(range(topo.k, topo.num_layers), z, mask, pos),
                                                  mask), b)
                    if self.params:
                        (part / n_target).backward()
                loss += float(part.detach())
                continue
            pending.append(t.send(1, Kind.TRAIN_FWD, m, [z.detach(), mask.to(torch.int8), pos.to(torch.int32)]))
            zs.append(z)
        if not alone:
            sends_grad = self.roles.needs[topo.last]
            for m, b in enumerate(batches):
                msg = t.recv(topo.last)
                _expect(msg, Kind.TRAIN_OUT, 0, topo.last)
                x = msg.tensors[0].to(dev)
                mask, pos = b.mask.to(dev), b.pos.to(dev)
                if topo.head_rank() == 0:
                    x = x.to(self.dtype)
                if sends_grad:
                    x.requires_grad_(True)
                with torch.enable_grad():
                    if topo.head_rank() == 0:
                        logits = _head_logits(a, a.run_layers(topo.tail, x, mask, pos), mask)
                    else:
                        logits = x
                    part = _loss_sum(logits, b)
                    if part.requires_grad:
                        (part / n_target).backward()
                loss += float(part.detach())
                if sends_grad:
                    g = x.grad
                    if topo.head_rank() == 0:
                        real = mask.bool()
                        row_of = torch.arange(b.size, device=dev).unsqueeze(1).expand_as(real)[real]
                        flat = _grad_message(grad_privacy, g[real], row_of, b.rows, release, n_target)
                        g = torch.zeros_like(g)
                        g[real] = flat
                    else:
                        sel = b.scored.to(dev)
                        row_of = torch.arange(b.size, device=dev).unsqueeze(1).expand_as(sel)[sel]
                        g = _grad_message(grad_privacy, g, row_of, b.rows, release, n_target)
                    pending.append(t.send(topo.last, Kind.TRAIN_BWD, m, [g]))
            if front_trains:
                for z in zs:
                    msg = t.recv(1)
                    _expect(msg, Kind.TRAIN_BWD, 0, 1)
                    z.backward(msg.tensors[0].to(device=z.device, dtype=z.dtype))
        for p in pending:
            p.wait()
        return loss / max(n_target, 1), n_target


def _expect(msg, kind: int, rank: int, source: int) -> None:
    if msg.kind != kind:
        raise RuntimeError(f"rank {rank}: expected message kind {kind} from rank {source}, got {msg.kind}")


# ------------------------------------------------------------------------------------ checkpoints, export

def _ckpt_root(spec: TrainSpec) -> Path:
    return Path(spec.out_dir) / "checkpoints"


def latest_checkpoint(spec: TrainSpec) -> Path | None:
    """The newest complete checkpoint (its ``state.json`` is written last)."""
    root = _ckpt_root(spec)
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def _rank_dir(stage: Stage, folder: Path) -> Path:
    """Where a rank keeps its part of a checkpoint: rank 0's (trained on the raw data with
    ``train.owner_trainable``) goes under ``train.owner_dir``."""
    return Path(stage.spec.owner_dir) / "checkpoints" / folder.name if stage.rank == 0 else folder


def save_rank(stage: Stage, folder: Path) -> None:
    from safetensors.torch import save_file

    folder = _rank_dir(stage, folder)
    folder.mkdir(parents=True, exist_ok=True)
    r = stage.rank
    if stage.params:
        save_file({n: p.detach().cpu().contiguous() for n, p in stage.params}, str(folder / f"rank-{r}.safetensors"))
        torch.save({"optimizer": stage.opt.state_dict(), "scheduler": stage.sched.state_dict()},
                   folder / f"rank-{r}.optim.pt")


def load_rank(stage: Stage, folder: Path) -> None:
    from safetensors.torch import load_file

    if not stage.params:
        return
    folder = _rank_dir(stage, folder)
    path = folder / f"rank-{stage.rank}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"train.resume: {path} is missing (the checkpoint belongs to another layout)")
    tensors = load_file(str(path))
    names = {n for n, _ in stage.params}
    if set(tensors) != names:
        raise ValueError(f"train.resume: {path} holds other parameters than rank {stage.rank} trains now "
                         f"(world size, split or train.* options changed since the checkpoint)")
    with torch.no_grad():
        for n, p in stage.params:
            p.copy_(tensors[n].to(p.device))
    state = torch.load(folder / f"rank-{stage.rank}.optim.pt", map_location=stage.device, weights_only=True)
    stage.opt.load_state_dict(state["optimizer"])
    stage.sched.load_state_dict(state["scheduler"])


def export_adapter(stage: Stage, comm, folder: Path, model_folder: str, layers: list[int]) -> None:
    """peft's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors`` (gathered on rank 0)."""
    from safetensors.torch import save_file

    mine = {peft_name(n): p.detach().cpu().contiguous() for n, p in stage.params if "lora_" in n}
    parts = comm.gather(mine, root=0) if comm is not None else [mine]
    if stage.rank != 0:
        return
    tensors = {k: v for part in parts for k, v in part.items()}
    folder.mkdir(parents=True, exist_ok=True)
    lora_config(stage.adapter, stage.spec, layers, model_folder).save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def export_merged(stage: Stage, comm, folder: Path, model_folder: str, modules: list[str]) -> None:
    """A Hugging Face model folder: LoRA merged into the weights, one safetensors shard per rank written by
    that rank, the index, config and tokenizer files written by rank 0."""
    from safetensors.torch import save_file

    adapter, rank = stage.adapter, stage.rank
    size = comm.Get_size() if comm is not None else 1
    merge_lora(adapter)
    tied = bool(getattr(adapter.config, "tie_word_embeddings", False))
    tensors = {}
    for module in modules:
        for n, p in adapter.model.get_submodule(module).named_parameters():
            full = base_name(f"{module}.{n}")
            if "lora_" in full or (tied and full in adapter.tied):
                continue
            tensors[full] = p.detach().cpu().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    shard = f"model-{rank + 1:05d}-of-{size:05d}.safetensors"
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    names = {n: shard for n in tensors}
    sizes = sum(t.numel() * t.element_size() for t in tensors.values())
    parts = comm.gather((names, sizes), root=0) if comm is not None else [(names, sizes)]
    if rank != 0:
        return
    weight_map = {k: v for part, _ in parts for k, v in part.items()}
    index = {"metadata": {"total_size": sum(s for _, s in parts)}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for f in Path(model_folder).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, folder / f.name)


# ---------------------------------------------------------------------------------------------- the job

def _key_digest(cfg: DictConfig) -> str:
    keep = OmegaConf.to_container(cfg, resolve=True)
    for key in ("resume", "overwrite", "export", "log_every", "save_every", "keep_checkpoints"):
        keep.get("train", {}).pop(key, None)  # none of these changes what is trained
    keep.pop("runtime", None)
    keep.pop("output", None)
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_train(cfg: DictConfig, comm=None, on_step=None, on_recv=None) -> dict:
    """Run one training job on every rank of ``comm``; returns the summary on rank 0 and
    ``{"exit_code": ...}`` on the others. ``on_step(stage, step, loss)`` is called on every rank after the
    backward pass of each step, before clipping and the optimizer (tests read the gradients there);
    ``on_recv(source, message)`` sees every message a rank receives."""
    from mpi4py import MPI

    from .placement import node_local_rank, pick_device
    from .runner import (
        JobError,
        _agree,
        _all_ok,
        _make_transport,
        _model_folder,
        _rank_modules,
        _setup_logging,
        _threads,
    )
    from .topology import make_topology
    from .weights import build_adapter, load_modules

    comm = comm or MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    _setup_logging(rank)
    settings = _all_ok(comm, lambda: settings_from_cfg(cfg))
    spec = _all_ok(comm, lambda: train_spec(cfg))
    torch.set_num_threads(_threads(settings, comm))
    local_rank, local_size = node_local_rank(comm)
    kind = settings.owner_device if rank == 0 else settings.device
    device = _all_ok(comm, lambda: pick_device(kind, local_rank, local_size))
    _setup_logging(rank, device)
    folder = _agree(comm, lambda: _model_folder(settings))
    adapter = _all_ok(comm, lambda: build_adapter(folder))
    _all_ok(comm, lambda: _check_model(adapter, settings, spec))
    topo = _all_ok(comm, lambda: make_topology(adapter.num_layers, settings.k, size, settings.head,
                                               settings.partition, adapter.head_cost("score"), settings.owner_tail))
    _agree(comm, lambda: _prepare_out_dir(spec, cfg))
    modules = _rank_modules(rank, topo, adapter, "score")
    _all_ok(comm, lambda: load_modules(adapter, folder, modules, settings.model_dtype, device))
    layers = trainable_layers(rank, topo, spec)
    params = _all_ok(comm, lambda: make_trainable(adapter, layers, spec))
    # front = parameters before the head: the owner's tail and head come after the workers
    front = bool(params) if rank != 0 else any(p.requires_grad for i in range(topo.k)
                                               for p in adapter.layers[i].parameters())
    flags = comm.allgather(front)
    counts = comm.allgather(sum(p.numel() for _, p in params))
    if sum(counts) == 0:
        raise JobError("nothing to train: train.layers selects no layer a rank may train (rank 0's layers train "
                       "only with train.owner_trainable=true)")
    roles = _Roles.of(flags)
    planned = _agree(comm, lambda: _owner_plan(settings, spec, folder), share=False)
    plan = comm.bcast(planned[0] if rank == 0 else None, root=0)
    hosts = comm.allgather(socket.gethostname())
    transport = _make_transport(comm, settings, device, local_rank, local_size, on_recv, hosts) \
        if size > 1 else None
    stage = Stage(rank, topo, adapter, spec, params, transport, comm, roles, device, plan["total_steps"])
    stage.private = settings.privacy.adds_noise or spec.grad_privacy.adds_noise
    start_step = 0
    resume_from = _agree(comm, lambda: _resume_point(spec, cfg))
    if resume_from is not None:
        _all_ok(comm, lambda: load_rank(stage, Path(resume_from)))
        start_step = json.loads((Path(resume_from) / "state.json").read_text())["step"] if rank == 0 else 0
        start_step = comm.bcast(start_step, root=0)
    if rank == 0:
        log.info("training %s: %d layers, world size %d, split.k=%d, head on %s; %s on %s; trainable parameters per "
                 "rank %s", folder, topo.num_layers, size, topo.k, "rank 0" if topo.head == "owner" else
                 f"rank {topo.last}", spec.mode, "layers " + (f"[{spec.layers[0]}, {spec.layers[1]})" if spec.layers
                                                           else "all"), counts)
        for line in topo.describe():
            log.info("  %s", line)
        if len(topo.tail) and not spec.owner_trainable and size > 1:
            log.warning("layers [%d, %d) run on rank 0 (owner tail) and stay frozen (train.owner_trainable=false); "
                        "set split.owner_tail=0 to give them to the workers", topo.tail.start, topo.tail.stop)
    stop = StopFlag()
    try:
        if rank == 0:
            summary = _owner_loop(stage, settings, spec, folder, plan, *planned[1:], start_step, stop, on_step)
        else:
            summary = _worker_loop(stage, spec, folder, on_step)
    finally:
        stop.restore()
        if transport is not None:
            transport.close()
    return summary


def _check_model(adapter: Adapter, settings: Settings, spec: TrainSpec) -> None:
    if not adapter.has_head:
        raise ConfigError(f"training needs a causal language model; {type(adapter.model).__name__} has no LM head")
    if settings.model_adapters:
        raise ConfigError("model.adapters applies to jobs/infer.py; training starts from the model folder (merge an "
                          "adapter first: train.export=merged)")
    if settings.num_shards > 1:
        raise ConfigError("data.num_shards applies to jobs/infer.py; a training job reads every row")
    if settings.chat_template:
        raise ConfigError("data.chat_template applies to task=generate; format training rows yourself")
    if spec.layers and spec.layers[1] > adapter.num_layers:
        raise ConfigError(f"train.layers={list(spec.layers)}: the model has {adapter.num_layers} layers")
    if spec.mode == "lora":
        lora_targets(adapter, spec)


def _prepare_out_dir(spec: TrainSpec, cfg: DictConfig) -> None:
    out = Path(spec.out_dir)
    has_state = (out / "train.json").is_file()
    if spec.resume:
        if not has_state:
            raise FileNotFoundError(f"train.resume=true: {out} holds no training run (no train.json)")
        return
    if has_state and not spec.overwrite:
        raise FileExistsError(f"train.out_dir={out} already holds a training run; resume it with train.resume=true "
                              "or replace it with train.overwrite=true")
    if spec.overwrite:
        for folder in {out, Path(spec.owner_dir)}:
            for name in ("checkpoints", "adapter", "model"):
                shutil.rmtree(folder / name, ignore_errors=True)
            for name in ("train.json", "metrics.jsonl", "summary.json", "noise-key"):
                (folder / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(spec.owner_dir).exists():
        Path(spec.owner_dir).mkdir(parents=True, mode=0o700)  # rank 0's own files
    (out / "train.json").write_text(json.dumps({"config": OmegaConf.to_container(cfg, resolve=True),
                                                "key": _key_digest(cfg)}, indent=2, default=str))


def _resume_point(spec: TrainSpec, cfg: DictConfig) -> str | None:
    if not spec.resume:
        return None
    saved = json.loads((Path(spec.out_dir) / "train.json").read_text())
    if saved.get("key") != _key_digest(cfg):
        raise ConfigError(f"train.resume=true: the options differ from the run in {spec.out_dir} (only runtime.*, "
                          "output.*, train.export, train.log_every, train.save_every and train.keep_checkpoints "
                          "may change)")
    ckpt = latest_checkpoint(spec)
    return None if ckpt is None else str(ckpt)


def _owner_plan(settings: Settings, spec: TrainSpec, folder: str) -> tuple[dict, list, object]:
    """Rank 0: read and tokenize the training rows; the plan (steps per epoch, total steps, rows), the rows
    and the tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples = load_examples(settings, spec, tokenizer)
    batches = -(-len(examples) // settings.batch_size)
    per_epoch = -(-batches // spec.grad_accum)
    total = per_epoch * spec.epochs if spec.max_steps is None else spec.max_steps
    return {"steps_per_epoch": per_epoch, "total_steps": total, "rows": len(examples)}, examples, tokenizer


def _owner_privacy(settings: Settings, spec: TrainSpec, stage: Stage, tokenizer,
                   finished: bool = False) -> tuple[Privacy, Privacy | None]:
    """The forward transform (as at inference) and the gradient message's; OS keys are kept in
    ``<train.owner_dir>/noise-key`` (0600) until training ends, so a resumed run draws the same noise."""
    from .privacy import _noise_key

    p = settings.privacy
    clip = None
    if p.adds_noise and p.clip == "auto":
        texts = load_texts(p.calibration_path)
        clip = calibrate_clip(stage.adapter, tokenizer, stage.topo.k, p.unit, p.clip_percentile, texts,
                              max_length=settings.max_length, device=stage.device)
        log.info("privacy.clip=auto: C = %.4g (percentile %g of %s norms at layer %d)", clip, p.clip_percentile,
                 p.unit, stage.topo.k)
    path = Path(spec.owner_dir) / "noise-key"
    key = None
    if p.seed is None and (p.adds_noise or spec.grad_privacy.adds_noise):
        if spec.resume and path.is_file():
            key = path.read_bytes()
        elif spec.resume and latest_checkpoint(spec) is not None and not finished:
            raise ValueError(f"train.resume=true with OS-seeded noise needs {path}, written by the first run")
        else:
            key = _noise_key(None)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key)
    else:
        key = _noise_key(p.seed)
    fwd = make_privacy(p, stage.topo.k, clip, key)
    bwd = None
    if spec.grad_privacy.adds_noise:
        g = spec.grad_privacy
        bwd = make_privacy(PrivacySpec(**{**g.__dict__, "seed": None}), 0, None,
                           hashlib.blake2b(key + b":gradient-message", digest_size=32).digest())
    return fwd, bwd


def _owner_loop(stage: Stage, settings: Settings, spec: TrainSpec, folder: str, plan: dict, examples: list,
                tok, start_step: int, stop: StopFlag, on_step) -> dict:
    comm, topo = stage.comm, stage.topo
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    fwd, bwd = _owner_privacy(settings, spec, stage, tok, finished=start_step >= plan["total_steps"])
    ledger = TrainLedger()
    owner = Path(spec.owner_dir)
    owner.mkdir(parents=True, exist_ok=True)
    metrics_path = owner / "metrics.jsonl"
    if start_step:
        state = json.loads((latest_checkpoint(spec) / "state.json").read_text())
        ledger = TrainLedger(**state["ledger"])
        log.info("resuming after step %d of %d (%s)", start_step, plan["total_steps"], latest_checkpoint(spec))
        _truncate_metrics(metrics_path, start_step)
    elif metrics_path.exists():
        metrics_path.unlink()
    per_epoch, total = plan["steps_per_epoch"], plan["total_steps"]
    t_start = time.perf_counter()
    tokens_run, last_log, last_saved = 0, t_start, start_step
    losses = []
    epoch_cache: dict[int, list[TrainBatch]] = {}
    step = start_step
    stopped = None
    while step < total:
        if stop():
            stopped = stop.signal
            break
        epoch, within = divmod(step, per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = epoch_batches(examples, epoch, spec.seed, settings.batch_size, pad)
        batches = epoch_cache[epoch][within * spec.grad_accum:(within + 1) * spec.grad_accum]
        comm.bcast({"op": "step", "micro": len(batches), "step": step}, root=0)
        loss, n_target = stage.owner_step(batches, fwd, bwd, epoch)
        fwd.releases.clear()
        if not math.isfinite(loss):
            raise NonFiniteError(f"train: the loss is {loss} at step {step + 1} (lower train.lr, or set "
                                     "train.max_grad_norm)")
        if on_step is not None:
            on_step(stage, step, loss)
        lr = stage.sched.get_last_lr()[0] if stage.sched else spec.lr * lr_factor(step, total, spec.warmup_steps,
                                                                                   spec.schedule)
        norm = stage.finish_step()
        _ledger_counts(ledger, step + 1, per_epoch, spec.grad_accum, settings.batch_size, plan["rows"],
                       topo.world_size > 1, stage.roles.needs[topo.last] and topo.world_size > 1)
        tokens = int(sum(int(b.mask.sum()) for b in batches))
        tokens_run += tokens
        eps = ledger.epsilon(fwd, bwd, spec.owner_trainable)
        step += 1
        losses.append(loss)
        now = time.perf_counter()
        rate = tokens_run / max(now - t_start, 1e-9)
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": norm,
                                 "target_tokens": n_target, "tokens": tokens, "tokens_per_s": rate,
                                 "epsilon_spent": eps}) + "\n")
        if step % spec.log_every == 0 or step == total or now - last_log >= settings.log_every:
            last_log = now
            log.info("step %d/%d epoch %d: loss %.4f, lr %.3g, grad norm %.3g, %.0f tokens/s, epsilon spent %s",
                     step, total, epoch, loss, lr, norm, rate, _fmt_eps(eps))
        if step % spec.save_every == 0 and step < total:
            _save(stage, spec, step, ledger, losses)
            last_saved = step
    if step > last_saved:
        _save(stage, spec, step, ledger, losses)
    elapsed = time.perf_counter() - t_start
    summary = {"steps": step, "total_steps": total, "rows": plan["rows"], "seconds": round(elapsed, 3),
               "tokens_per_s": round(tokens_run / elapsed, 1) if elapsed > 0 else 0.0,
               "final_loss": losses[-1] if losses else None, "epsilon_spent": ledger.epsilon(fwd, bwd,
                                                                                             spec.owner_trainable),
               "forward_releases_per_row": ledger.forward_max, "backward_releases_per_row": ledger.backward_max,
               "privacy_mechanism": fwd.mechanism, "privacy_sigma": fwd.sigma, "privacy_clip": fwd.clip,
               "grad_privacy_mechanism": bwd.mechanism if bwd else "none", "grad_privacy_sigma": bwd.sigma if bwd
               else 0.0, "grad_privacy_clip": bwd.clip if bwd else None, "exit_code": 0}
    if stopped:
        comm.bcast({"op": "end"}, root=0)
        summary.update(exit_code=_exit_stopped(), stopped_by=stopped)
        log.warning("stopped by %s after step %d; rerun with train.resume=true to continue", stopped, step)
        return summary
    comm.bcast({"op": "export"}, root=0)
    exported = _export(stage, spec, folder)
    comm.bcast({"op": "end"}, root=0)
    summary["exported"] = exported
    (owner / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (owner / "noise-key").unlink(missing_ok=True)
    log.info("done: %d steps in %.1f s (%.0f tokens/s), final loss %.4f, epsilon spent %s%s", step, elapsed,
             summary["tokens_per_s"], summary["final_loss"] if losses else float("nan"),
             _fmt_eps(summary["epsilon_spent"]), f" -> {exported}" if exported else "")
    return summary


def _exit_stopped() -> int:
    from .runner import EXIT_STOPPED

    return EXIT_STOPPED


def _fmt_eps(eps: float) -> str:
    if math.isnan(eps):
        return "n/a (no formal claim)"
    return "inf (a message travels unprotected)" if math.isinf(eps) else f"{eps:.4g}"


def _ledger_counts(ledger: TrainLedger, steps_done: int, per_epoch: int, accum: int, batch_size: int, rows: int,
                   forward: bool, backward: bool) -> None:
    """Most releases of one row after ``steps_done`` steps: one per epoch begun (in each direction used)."""
    full, within = divmod(steps_done, per_epoch)
    most = full + (1 if within else 0)
    ledger.forward_max = most if forward else 0
    ledger.backward_max = most if backward else 0
    done_rows = full * rows + min(rows, within * accum * batch_size)
    ledger.forward_total = done_rows if forward else 0
    ledger.backward_total = done_rows if backward else 0


def _save(stage: Stage, spec: TrainSpec, step: int, ledger: TrainLedger, losses: list[float]) -> None:
    folder = _ckpt_root(spec) / f"step-{step:08d}"
    stage.comm.bcast({"op": "save", "step": step}, root=0)
    save_rank(stage, folder)
    stage.comm.barrier()
    state = {"step": step, "ledger": ledger.__dict__}
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, folder / "state.json")
    done = sorted(p for p in _ckpt_root(spec).glob("step-*") if (p / "state.json").is_file())
    for old in done[:-spec.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint: step %d -> %s", step, folder)


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _worker_loop(stage: Stage, spec: TrainSpec, folder: str, on_step) -> dict:
    comm = stage.comm
    while True:
        cmd = comm.bcast(None, root=0)
        op = cmd["op"]
        if op == "step":
            stage.worker_step(cmd["micro"])
            if on_step is not None:
                on_step(stage, cmd["step"], None)
            stage.finish_step()
        elif op == "save":
            save_rank(stage, _ckpt_root(spec) / f"step-{cmd['step']:08d}")
            comm.barrier()
        elif op == "export":
            _export(stage, spec, folder)
        elif op == "end":
            return {"exit_code": 0}
        else:
            raise RuntimeError(f"rank {stage.rank}: unknown command {op!r} from rank 0")


def _export(stage: Stage, spec: TrainSpec, folder: str) -> str | None:
    from .runner import _rank_modules

    out = Path(spec.out_dir)
    if spec.export == "none":
        return None
    if spec.export == "adapter":
        export_adapter(stage, stage.comm, out / "adapter", folder, _all_layers(stage))
        return str(out / "adapter")
    export_merged(stage, stage.comm, out / "model", folder,
                  _rank_modules(stage.rank, stage.topo, stage.adapter, "score"))
    return str(out / "model")


def _layer_pos(adapter: Adapter) -> int:
    return len(adapter.layer_module(0).split(".")) - 1


def _all_layers(stage: Stage) -> list[int]:
    """Every layer any rank trains (gathered), for the adapter's ``layers_to_transform``."""
    pos = _layer_pos(stage.adapter)
    mine = sorted({int(n.split(".")[pos]) for n, _ in stage.params})
    gathered = stage.comm.allgather(mine) if stage.comm is not None else [mine]
    return sorted({i for part in gathered for i in part})


def main(cfg: DictConfig) -> None:
    """Entry point body for ``jobs/train.py``: run, and end every rank cleanly on failure."""
    from .runner import main as run_job

    run_job(cfg, run_train)
