"""One training step: who trains what, the owner's side of a step over the pipeline (GPipe or 1F1B), the
gradient message's privacy, the end of a step on every rank, and the training ledger.

The owner drives a step through :class:`~nesa_hpc.engine.owner.Owner`: its front runs each micro-batch's forward
and sends Z on (``TRAIN_FWD``), the loss runs where the last worker's output comes back (``TRAIN_OUT``),
and the gradient of that output goes back (``TRAIN_BWD``); the workers answer with their
:class:`~nesa_hpc.engine.stage.Stage` verbs in the order :func:`~nesa_hpc.engine.stage.train_schedule` gives. With
``train.pipeline=1f1b`` the owner keeps at most ``max(runtime.inflight, world size)`` micro-batches in
flight and starts the next forward as each result comes back, so activation memory is bounded by the
number of stages; ``gpipe`` sends every forward of the step first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.owner import Owner, describe_stage
from ..engine.stage import NonFiniteError, SavedBytes, data_message, head_logits, memory_guard
from ..engine.topology import Topology
from ..engine.transport import Kind
from ..models.lora import add_lora
from ..privacy.mechanism import Privacy
from .options import TrainBatch, TrainSpec, lr_factor

__all__ = ["DENOISER", "trainable_layers", "make_trainable", "training_epsilon", "TrainLedger", "grad_message", "Roles",
           "Trainer", "owner_step", "ledger_counts", "loss_sum"]


DENOISER = "denoiser."  # the names of rank 0's denoiser parameters among a trainer's parameters


def trainable_layers(rank: int, topo: Topology, spec: TrainSpec) -> list[int]:
    """Layers whose parameters this rank trains: its own block ∩ ``train.layers``; for rank 0 only with
    ``train.owner_trainable`` (its front layers and its tail)."""
    if rank == 0 and topo.world_size > 1 and not spec.owner_trainable:
        return []
    mine = list(topo.layers_of(rank)) + (list(topo.tail) if rank == 0 else [])
    lo, hi = spec.layers or (0, topo.num_layers)
    return [i for i in mine if lo <= i < hi]


def make_trainable(adapter, layers: list[int], spec: TrainSpec) -> list[tuple[str, torch.nn.Parameter]]:
    """Attach LoRA (``mode=lora``) or unfreeze (``mode=full``) ``layers``; the named trainable parameters."""
    if spec.mode == "lora":
        add_lora(adapter, layers, spec)
    else:
        for i in layers:
            for p in adapter.layers[i].parameters():
                p.requires_grad_(True)
    return [(f"{adapter.layer_module(i)}.{n}", p) for i in layers
            for n, p in adapter.layers[i].named_parameters() if p.requires_grad]



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


def grad_message(privacy: Privacy | None, g: torch.Tensor, row_of: torch.Tensor, rows: torch.Tensor,
                  release: int, scale: float, public_scale: float | None = None) -> torch.Tensor:
    """Privatise the gradient message (N, D) whose position n belongs to row ``row_of[n]``: the gradient of
    the summed token loss (``g * scale``) is clipped per row to ``train.grad_privacy.clip``, noise keyed by
    (row, release) is added, and the result is divided by ``public_scale`` (default ``scale``). The
    divisor is seen by whoever receives the message (it sets the noise's size), so it must be public:
    ``scale`` is the step's count of target tokens, which with ``train.loss=completion`` is private, and the
    caller passes the step's count of scored positions instead (the workers see the masks)."""
    if privacy is None or not privacy.spec.adds_noise:
        return g
    x = torch.nan_to_num(g.double(), nan=0.0, posinf=0.0, neginf=0.0) * scale
    if privacy.clip is not None:
        sq = torch.zeros(len(rows), dtype=torch.float64, device=x.device).index_add_(0, row_of, x.pow(2).sum(-1))
        factor = torch.clamp(privacy.clip / sq.sqrt().clamp(min=1e-30), max=1.0)
        x = x * factor[row_of].unsqueeze(-1)
    for i, r in enumerate(rows.tolist()):
        at = (row_of == i).nonzero().squeeze(-1)
        if len(at):
            x[at] += privacy.draw(r, release, len(at), x.shape[-1]).to(device=x.device, dtype=x.dtype)
    return (x / (scale if public_scale is None else public_scale)).to(g.dtype)



@dataclass
class Roles:
    """Who sends gradients where: ``needs[r]`` = some rank <= r trains parameters that come before the head."""

    needs: list[bool]

    @classmethod
    def of(cls, flags: list[bool]) -> Roles:
        needs, seen = [], False
        for f in flags:
            seen = seen or f
            needs.append(seen)
        return cls(needs)


class Trainer:
    """One rank's part of training: its trainable parameters, optimizer and schedule, and the step's end."""

    def __init__(self, rank: int, topo: Topology, adapter, spec: TrainSpec, params, comm, roles: Roles,
                 device: torch.device, total_steps: int) -> None:
        self.rank, self.topo, self.adapter, self.spec = rank, topo, adapter, spec
        self.params = params
        self.comm, self.roles, self.device = comm, roles, device
        groups = [{"params": [p for n, p in params if not n.startswith(DENOISER)]},
                  {"params": [p for n, p in params if n.startswith(DENOISER)], "lr": spec.denoiser_lr or spec.lr}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr,
                                     weight_decay=spec.weight_decay) if params else None
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, total_steps, spec.warmup_steps, spec.schedule)) if params else None
        # with a privacy mechanism, the gradients of rank 0's own weights (its layers [0, k) and tail, its
        # denoiser: trained on the raw rows) are clipped by their own norm and kept out of the shared one, which
        # the workers learn: nothing computed from them leaves rank 0. At world size 1 the same split is made
        # inside the one process, so it trains as a split job does.
        self.private = False
        own = [adapter.layer_module(i) + "." for i in [*range(topo.k), *topo.tail]] if rank == 0 else []
        self.own = {n for n, _ in params if rank == 0 and (topo.world_size > 1 or n.startswith(DENOISER)
                                                            or n.startswith(tuple(own)))}
        self.saved_bytes = SavedBytes(adapter.model)  # the trainable parameters exist by now

    # -- shared end of a step: global gradient norm, clipping, optimizer
    def finish_step(self) -> float:
        """Clip and step; returns the norm that was clipped (rank 0 under privacy: of everything it trains)."""
        apart = self.own if self.private else set()
        sq = {True: 0.0, False: 0.0}
        for n, p in self.params:
            if p.grad is not None:
                sq[n in apart] += float(p.grad.double().pow(2).sum())
        shared = self.comm.allreduce(sq[False]) if self.comm is not None else sq[False]
        norms = {True: math.sqrt(sq[True]), False: math.sqrt(shared)}
        if self.params:
            if self.spec.max_grad_norm is not None:
                for n, p in self.params:
                    coef = min(1.0, self.spec.max_grad_norm / (norms[n in apart] + 1e-6))
                    if coef < 1.0 and p.grad is not None:
                        p.grad.mul_(coef)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
        return math.sqrt(sq[True] + shared) if apart else norms[False]


def loss_sum(logits: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
    """The summed cross-entropy of the positions whose next token counts in the loss."""
    labels = batch.ids[:, 1:][batch.scored].to(logits.device)
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return (ce * batch.weights().to(ce.device)).sum()


def _privatised_grad(g: torch.Tensor, b: TrainBatch, mask: torch.Tensor, head_here: bool, grad_privacy,
                     release: int, n_target: int, n_scored: int) -> torch.Tensor:
    """The gradient message of one micro-batch: (B, T, H) states' gradient (head on the owner) or the
    (N, V) logits' gradient (head on the last worker), clipped and noised per row by ``grad_privacy`` and
    divided by the step's public count of scored positions ``n_scored``."""
    dev = g.device
    if head_here:
        real = mask.bool()
        row_of = torch.arange(b.size, device=dev).unsqueeze(1).expand_as(real)[real]
        flat = grad_message(grad_privacy, g[real], row_of, b.rows, release, n_target, n_scored)
        out = torch.zeros_like(g)
        out[real] = flat
        return out
    sel = b.scored.to(dev)
    row_of = torch.arange(b.size, device=dev).unsqueeze(1).expand_as(sel)[sel]
    return grad_message(grad_privacy, g, row_of, b.rows, release, n_target, n_scored)


def owner_step(trainer: Trainer, owner: Owner, batches: list[TrainBatch], grad_privacy: Privacy | None,
               release: int, step: int, window: int, sends_grad: bool) -> tuple[float, int]:
    """One optimizer step's forwards and backwards on rank 0; returns (mean token loss, target tokens).

    ``window``: micro-batches in flight (1F1B); ``sends_grad``: the stage before the loss trains (or passes
    a gradient on), so it gets the gradient of its output."""
    topo, a, dev, stats = owner.topo, owner.adapter, owner.device, owner.stats
    n_target = int(sum(b.weights().sum() for b in batches))
    n_scored = int(sum(b.scored.sum() for b in batches))  # public: what the masks show (= n_target, causal loss)
    front_trains = trainer.roles.needs[0]
    micro = len(batches)
    plan = torch.tensor([micro, step], dtype=torch.int32)
    window = micro if trainer.spec.pipeline == "gpipe" else max(window, owner.stages)
    saved: dict[int, tuple[torch.Tensor, int]] = {}  # micro-batch -> (Z, bytes saved for its backward)
    loss, sent = 0.0, 0

    def forward(m: int) -> None:
        b = batches[m]
        mask, pos = b.mask.to(dev), b.pos.to(dev)
        t0 = time.perf_counter()
        with torch.set_grad_enabled(front_trains), memory_guard(0, "embedding and layers [0, k)", b.ids.shape), \
                trainer.saved_bytes.counting() as counted:
            z, bad = owner.front(b.ids.to(dev), mask, pos, b.rows, release=release, key=m)  # (B, T, H)
        stats.compute_s += time.perf_counter() - t0
        stats.batches += 1
        if front_trains:
            saved[m] = (z, counted[0])
            stats.peak_saved_bytes = max(stats.peak_saved_bytes, sum(n for _, n in saved.values()))
        owner.send(Kind.TRAIN_FWD, m, [*data_message(z.detach(), mask, pos, bad, owner.wire), plan])

    while sent < min(window, micro):
        forward(sent)
        sent += 1
    for m, b in enumerate(batches):
        msg = owner.recv(Kind.TRAIN_OUT, m, strict=False)  # final states (B, T, H), or logits (N, V) with head=last
        t0 = time.perf_counter()
        x, bad = (t.to(dev, non_blocking=True) for t in msg.tensors)
        if (bad >= 0).any():
            stage = int(bad[bad >= 0].min())
            raise NonFiniteError(f"train: NaN/Inf in the activations of rows {b.rows[bad.cpu() >= 0].tolist()} at "
                                 f"step {step + 1}, first in {describe_stage(stage, topo)} (lower train.lr, or set "
                                 "train.max_grad_norm)")
        mask, pos = b.mask.to(dev), b.pos.to(dev)
        x = x.to(owner.dtype) if owner.head_here else x
        if sends_grad:
            x.requires_grad_(True)
        with torch.enable_grad(), memory_guard(0, "the head", tuple(b.ids.shape)):
            logits = head_logits(a, owner.back(x, mask, pos, bad, key=m)[0], mask) if owner.head_here else x
            part = loss_sum(logits, b)
            if part.requires_grad:
                (part / n_target).backward()
        loss += float(part.detach())
        if sends_grad:
            g = _privatised_grad(x.grad, b, mask, owner.head_here, grad_privacy, release, n_target, n_scored)
            owner.send(Kind.TRAIN_BWD, m, [g.to(owner.wire) if owner.head_here else g], dest=topo.last)
        stats.compute_s += time.perf_counter() - t0
        if sent < micro:
            forward(sent)
            sent += 1
        if front_trains:
            grad = owner.recv(Kind.TRAIN_BWD, m, source=1, strict=False).tensors[0]
            z, _ = saved.pop(m)
            t0 = time.perf_counter()
            z.backward(grad.to(device=z.device, dtype=z.dtype))
            stats.compute_s += time.perf_counter() - t0
    owner.flush()
    return loss / max(n_target, 1), n_target


def ledger_counts(ledger: TrainLedger, steps_done: int, per_epoch: int, accum: int, batch_size: int, rows: int,
                   forward: bool, backward: bool) -> None:
    """Most releases of one row after ``steps_done`` steps: one per epoch begun (in each direction used)."""
    full, within = divmod(steps_done, per_epoch)
    most = full + (1 if within else 0)
    ledger.forward_max = most if forward else 0
    ledger.backward_max = most if backward else 0
    done_rows = full * rows + min(rows, within * accum * batch_size)
    ledger.forward_total = done_rows if forward else 0
    ledger.backward_total = done_rows if backward else 0


