"""One training step: who trains what, the owner's side of a step over the pipeline, the gradient message's
privacy, the end of a step on every rank, and the training ledger.

The owner drives a step through :class:`~nesa_hpc.engine.owner.Owner` in the order its part of the step's
schedule gives (:mod:`nesa_hpc.engine.schedule`, the same function the workers' stages follow): ``F`` runs
a micro-batch's front and sends Z on (:class:`~nesa_hpc.engine.messages.TrainForward`), ``L`` computes the
loss where the last worker's output comes back (:class:`~nesa_hpc.engine.messages.TrainOutput`) and sends
the gradient of that output back (:class:`~nesa_hpc.engine.messages.TrainGrad`), ``B`` back-propagates
rank 0's front with the gradient of Z from rank 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.job import settle
from ..engine.messages import Activations, TrainForward, TrainGrad, TrainOutput
from ..engine.owner import Owner, describe_stage
from ..engine.schedule import TrainingRole
from ..engine.stage import NonFiniteError, SavedBytes, head_logits, memory_guard
from ..engine.topology import Topology
from ..models.lora import add_lora
from ..privacy.mechanism import Privacy
from .options import TrainBatch, TrainSpec, lr_factor

__all__ = ["DENOISER", "trainable_layers", "make_trainable", "training_epsilon", "TrainLedger", "grad_message",
           "gradient_flow", "Trainer", "owner_step", "loss_sum"]


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

    def count(self, steps_done: int, per_epoch: int, accum: int, batch_size: int, rows: int, forward: bool,
              backward: bool) -> None:
        """The releases after ``steps_done`` steps: one per row and epoch begun, in each direction used."""
        full, within = divmod(steps_done, per_epoch)
        most = full + (1 if within else 0)
        self.forward_max = most if forward else 0
        self.backward_max = most if backward else 0
        done_rows = full * rows + min(rows, within * accum * batch_size)
        self.forward_total = done_rows if forward else 0
        self.backward_total = done_rows if backward else 0

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
                  release: int, scale: float, public_scale: float | None = None,
                  digests: list[bytes] | None = None) -> torch.Tensor:
    """Privatise the gradient message (N, D) whose position n belongs to row ``row_of[n]``: the gradient of
    the summed token loss (``g * scale``) is clipped per row to ``train.grad_privacy.clip``, noise keyed by
    (row, release, the row's content ``digests``) is added, and the result is divided by ``public_scale``
    (default ``scale``). The divisor is seen by whoever receives the message (it sets the noise's size), so it
    must be public: ``scale`` is the step's count of target tokens, which with ``train.loss=completion`` is
    private, and the caller passes the step's count of scored positions instead (the workers see the masks)."""
    if privacy is None or not privacy.spec.adds_noise:
        return g
    x = torch.nan_to_num(g.double(), nan=0.0, posinf=0.0, neginf=0.0) * scale
    if privacy.clip is not None:
        sq = torch.zeros(len(rows), dtype=torch.float64, device=x.device).index_add_(0, row_of, x.pow(2).sum(-1))
        factor = torch.clamp(privacy.clip / sq.sqrt().clamp(min=1e-30), max=1.0)
        x = x * factor[row_of].unsqueeze(-1)
    contents = digests if digests is not None else [b""] * len(rows)
    for i, (r, content) in enumerate(zip(rows.tolist(), contents, strict=True)):
        at = (row_of == i).nonzero().squeeze(-1)
        if len(at):
            x[at] += privacy.draw(r, release, len(at), x.shape[-1], content).to(device=x.device, dtype=x.dtype)
    return (x / (scale if public_scale is None else public_scale)).to(g.dtype)



def gradient_flow(trains_before_head: list[bool]) -> tuple[bool, ...]:
    """Per pipeline stage (rank 0 first), whether the loss's gradient flows back through it: some stage at
    or before it trains parameters that come before the head (``trains_before_head``, one flag per stage)."""
    flow, seen = [], False
    for f in trains_before_head:
        seen = seen or f
        flow.append(seen)
    return tuple(flow)


class Trainer:
    """One rank's part of training: its trainable parameters, optimizer and schedule, and the step's end."""

    def __init__(self, rank: int, topo: Topology, adapter, spec: TrainSpec, params, comm, role: TrainingRole,
                 device: torch.device, total_steps: int, private: bool) -> None:
        self.rank, self.topo, self.adapter, self.spec = rank, topo, adapter, spec
        self.params = params
        self.comm, self.role, self.device = comm, role, device
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
        self.private = private
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
        settle(self.comm)
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
        flat = grad_message(grad_privacy, g[real], row_of, b.rows, release, n_target, n_scored, b.digests())
        out = torch.zeros_like(g)
        out[real] = flat
        return out
    sel = b.scored.to(dev)
    row_of = torch.arange(b.size, device=dev).unsqueeze(1).expand_as(sel)[sel]
    return grad_message(grad_privacy, g, row_of, b.rows, release, n_target, n_scored, b.digests())


def owner_step(trainer: Trainer, owner: Owner, batches: list[TrainBatch], grad_privacy: Privacy | None,
               release: int, step: int) -> tuple[float, int]:
    """One optimizer step's forwards and backwards on rank 0, in the order of its part of the schedule;
    returns (mean token loss, target tokens)."""
    role = trainer.role
    n_target = int(sum(b.weights().sum() for b in batches))
    n_scored = int(sum(b.scored.sum() for b in batches))  # public: what the masks show (= n_target, causal loss)
    run = _OwnerStep(trainer, owner, batches, grad_privacy, release, step, n_target, n_scored)
    for action in role.order(len(batches)):
        {"F": run.forward, "L": run.loss, "B": run.backward}[action.op](action.micro)
    owner.flush()
    return run.loss_sum / max(n_target, 1), n_target


class _OwnerStep:
    """Rank 0's three actions of a training step (see :mod:`nesa_hpc.engine.schedule`) over its micro-batches."""

    def __init__(self, trainer: Trainer, owner: Owner, batches: list[TrainBatch], grad_privacy: Privacy | None,
                 release: int, step: int, n_target: int, n_scored: int) -> None:
        self.trainer, self.owner, self.batches, self.grad_privacy = trainer, owner, batches, grad_privacy
        self.release, self.step, self.n_target, self.n_scored = release, step, n_target, n_scored
        self.front_trains = trainer.role.grads[0]
        self.sends_grad = trainer.role.grads[-1]  # the last stage back-propagates: it gets the gradient
        self.saved: dict[int, tuple[torch.Tensor, int]] = {}  # micro-batch -> (Z, bytes saved for its backward)
        self.clean: dict[int, torch.Tensor | None] = {}  # micro-batch -> clean layer-k states (denoiser)
        self.own: dict[int, torch.Tensor] = {}  # micro-batch -> marks of rank 0's clean states (kept here)
        self.loss_sum = 0.0

    def forward(self, m: int) -> None:
        """``F``: embed, layers [0, k), privacy; Z goes to rank 1."""
        owner, b, stats = self.owner, self.batches[m], self.owner.stats
        dev = owner.device
        mask, pos = b.mask.to(dev), b.pos.to(dev)
        t0 = time.perf_counter()
        with torch.set_grad_enabled(self.front_trains), memory_guard(0, "embedding and layers [0, k)", b.ids.shape), \
                self.trainer.saved_bytes.counting() as counted:
            z, bad, self.clean[m], self.own[m] = owner.front(b.ids.to(dev), mask, pos, b.rows,
                                                             releases=self.release, digests=b.digests())  # (B, T, H)
        stats.computed(t0, f"F {m}", micro_batch=m)
        stats.batches += 1
        if self.front_trains:
            self.saved[m] = (z, counted[0])
            stats.peak_saved_bytes = max(stats.peak_saved_bytes, sum(n for _, n in self.saved.values()))
        data = Activations.pack(m, z.detach(), mask, pos, bad, owner.wire)
        owner.send(TrainForward.pack(m, data, len(self.batches), self.step))

    def loss(self, m: int) -> None:
        """``L``: the loss of micro-batch ``m`` on what the last worker returned; its gradient goes back."""
        owner, b, topo = self.owner, self.batches[m], self.owner.topo
        dev = owner.device
        msg = owner.recv(TrainOutput, m, strict=False)  # final states (B, T, H), or logits (N, V) with head=last
        t0 = time.perf_counter()
        x, bad = msg.output.to(dev, non_blocking=True), msg.nonfinite_at.to(dev)
        own = self.own.pop(m)
        bad = torch.where(own >= 0, own, bad)  # rank 0's own marks (of its clean states) never left it
        if (bad >= 0).any():
            stage = int(bad[bad >= 0].min())
            raise NonFiniteError(f"train: NaN/Inf in the activations of rows {b.rows[bad.cpu() >= 0].tolist()} at "
                                 f"step {self.step + 1}, first in {describe_stage(stage, topo)} (lower train.lr, or "
                                 "set train.max_grad_norm)")
        mask, pos = b.mask.to(dev), b.pos.to(dev)
        x = x.to(owner.dtype) if owner.head_here else x
        if self.sends_grad:
            x.requires_grad_(True)
        with torch.enable_grad(), memory_guard(0, "the head", tuple(b.ids.shape)):
            if owner.head_here:
                h = owner.back(x, mask, pos, bad, clean=self.clean.pop(m))[0]
                logits = head_logits(owner.adapter, h, mask)
            else:
                logits = x
            part = loss_sum(logits, b)
            if part.requires_grad:
                (part / self.n_target).backward()
        self.loss_sum += float(part.detach())
        if self.sends_grad:
            g = _privatised_grad(x.grad, b, mask, owner.head_here, self.grad_privacy, self.release, self.n_target,
                                 self.n_scored)
            owner.send(TrainGrad(m, g.to(owner.wire) if owner.head_here else g), dest=topo.last)
        owner.stats.computed(t0, f"L {m}", micro_batch=m)

    def backward(self, m: int) -> None:
        """``B``: back-propagate rank 0's front with the gradient of Z from rank 1."""
        grad = self.owner.recv(TrainGrad, m, source=1, strict=False).grad
        z, _ = self.saved.pop(m)
        t0 = time.perf_counter()
        z.backward(grad.to(device=z.device, dtype=z.dtype))
        self.owner.stats.computed(t0, f"B {m}", micro_batch=m)
