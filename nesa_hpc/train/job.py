"""Split fine-tuning (``jobs/train.py``): the loss on rank 0, activation gradients back through the pipeline.

Every optimizer step runs ``train.grad_accum`` micro-batches through the same pipeline as inference
(:mod:`nesa_hpc.train.step` drives rank 0's side, :func:`nesa_hpc.engine.stage.serve` answers on the workers):

1. rank 0 embeds each micro-batch, runs layers [0, k), applies the privacy transform exactly as at
   inference (noise-aware training) and sends Z on; each worker runs its block and sends on; the last
   worker returns the final hidden states (``split.head=owner``) or the logits (``split.head=last``);
2. rank 0 computes the causal-LM loss against the labels, which never leave it, and sends the gradient of
   what it received back to the last worker, clipped and noised when ``train.grad_privacy`` says so;
   every worker back-propagates through its block and sends the gradient of its input to the rank before
   it, as long as some rank before it has parameters to train;
3. the ranks agree on the global gradient norm (one ``allreduce``), clip, and each steps its own AdamW.

Checkpoints and the export travel as :class:`~nesa_hpc.engine.messages.Save` /
:class:`~nesa_hpc.engine.messages.Export` messages along the pipeline, and ``Stop`` ends it, so a stopped job
exits with 75 on every rank. Rank 0's loop is :class:`~nesa_hpc.train.loop.TrainLoop`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError, Settings
from ..engine.control import StopFlag
from ..engine.job import (
    JobError,
    agree,
    all_ok,
    rank_modules,
    run_main,
    serve_worker,
    settle,
    share_exit_code,
    start_job,
    stopped_at_startup,
)
from ..engine.messages import Export, Save
from ..engine.owner import Owner
from ..engine.schedule import TrainingRole
from ..engine.stage import LocalPipe, Stage
from ..infer.tasks import make_task
from ..io import jsonfile
from ..models.lora import lora_targets
from ..models.weights import DTYPES, load_modules
from ..preflight import check_train_out
from ..privacy.denoiser import Denoiser
from ..privacy.mechanism import NOISE_KEYING
from .checkpoint import export, latest_checkpoint, load_rank
from .loop import TrainLoop, TrainPlan, owner_privacy, save_part
from .options import TrainSpec, epoch_batches, load_examples, lr_factor, train_spec
from .step import DENOISER, Trainer, gradient_flow, make_trainable, trainable_layers, training_epsilon

__all__ = ["run_train", "main", "train_spec", "load_examples", "epoch_batches", "lr_factor", "make_trainable",
           "training_epsilon", "TrainSpec"]

log = logging.getLogger("nesa_hpc")


def _key_digest(cfg: DictConfig) -> str:
    keep = OmegaConf.to_container(cfg, resolve=True)
    for key in ("resume", "overwrite", "export", "log_every", "save_every", "keep_checkpoints", "pipeline"):
        keep.get("train", {}).pop(key, None)  # none of these changes what is trained
    keep.pop("runtime", None)
    keep.pop("output", None)
    keep["noise_keying"] = NOISE_KEYING
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_train(cfg: DictConfig, comm=None, on_step=None, on_recv=None) -> dict:
    """Run one training job on every rank of ``comm``; returns the summary on rank 0 and
    ``{"exit_code": ...}`` on the others. ``on_step(trainer, step, loss)`` is called on every rank after the
    backward pass of each step, before clipping and the optimizer (tests read the gradients there);
    ``on_recv(source, message)`` sees every message a rank receives."""
    from mpi4py import MPI

    comm = comm or MPI.COMM_WORLD
    spec = all_ok(comm, lambda: train_spec(cfg))
    job = start_job(cfg, comm, head_task="score", costs=lambda head: training_costs(head, spec, cfg.split.k))
    stopped = stopped_at_startup(comm, "train.out_dir was touched", "train.resume=true")
    if stopped is not None:
        return stopped
    all_ok(comm, lambda: _check_model(job.adapter, job.settings, spec))
    agree(comm, lambda: _prepare_out_dir(spec, cfg))
    all_ok(comm, lambda: load_modules(job.adapter, job.folder, rank_modules(job.rank, job.topo, job.adapter, "score"),
                                      job.settings.model_dtype, job.device))
    params, denoiser, roles, counts = _trainable(job, spec)
    planned = agree(comm, lambda: _owner_plan(job.settings, spec, job.folder), share=False)
    sizes = comm.bcast((planned.steps_per_epoch, planned.total_steps, planned.rows) if job.rank == 0 else None)
    plan = planned or TrainPlan(*sizes)  # rank 0 keeps its rows and tokenizer
    transport = job.transport(on_recv) or LocalPipe(Stage.in_owner(roles.local_layers, job.adapter, job.device,
                                                                   roles.local))
    trainer = Trainer(job.rank, job.topo, job.adapter, spec, params, comm, roles.mine, job.device, plan.total_steps,
                      private=job.settings.privacy.adds_noise or spec.grad_privacy.adds_noise)
    start_step = _resume(job, trainer, spec, cfg)
    if job.rank == 0:
        _log_plan(job, spec, counts, denoiser)
    wire_dtype = DTYPES[job.settings.wire_dtype] if job.settings.wire_dtype else None
    stop = StopFlag()
    try:
        if job.rank != 0:
            return serve_worker(job, _worker_stage(job, trainer, spec, roles.mine, wire_dtype, on_step), transport)
        fwd, bwd = owner_privacy(job.settings, spec, trainer, plan.tokenizer,
                                 finished=start_step >= plan.total_steps)
        owner = Owner(job.topo, job.adapter, fwd, transport, job.device, wire_dtype, denoiser)
        summary = TrainLoop(trainer, owner, bwd, job.settings, spec, job.folder, plan, start_step, stop,
                            on_step).run()
        share_exit_code(comm, summary["exit_code"])
        return summary
    finally:
        stop.restore()
        if transport is not None:
            transport.close()


@dataclass
class _Roles:
    """This rank's part in training and, at world size 1, the part of the stage inside rank 0's process."""

    mine: TrainingRole
    local: TrainingRole | None
    local_layers: range


def _trainable(job, spec: TrainSpec) -> tuple[list, Denoiser | None, _Roles, list[int]]:
    """Every rank's trainable parameters (LoRA or full layers; rank 0's denoiser), the roles (where the
    loss's gradient flows: it reaches a stage when that stage or one before it trains) and the number of
    trainable parameters of each rank."""
    comm, rank, topo, adapter = job.comm, job.rank, job.topo, job.adapter
    params = all_ok(comm, lambda: make_trainable(adapter, trainable_layers(rank, topo, spec), spec))
    denoiser = all_ok(comm, lambda: _new_denoiser(adapter, topo, spec, job.device) if rank == 0 else None)
    if denoiser is not None:
        params = params + [(f"{DENOISER}{n}", p) for n, p in denoiser.named_parameters()]

    def trains(layers) -> bool:
        return any(p.requires_grad for i in layers for p in adapter.layers[i].parameters())

    # before the head: rank 0's front layers; everything a worker trains (the owner's tail and head come after)
    flags = comm.allgather(bool(params) if rank != 0 else trains(range(topo.k)))
    counts = comm.allgather(sum(p.numel() for _, p in params))
    if sum(counts) == 0:
        raise JobError("nothing to train: train.layers selects no layer a rank may train (rank 0's layers train "
                       "only with train.owner_trainable=true)")
    # world size 1: rank 0's in-process stage runs layers [k, L) (none for the owner-alone model), the
    # second of two stages
    local_layers = range(topo.num_layers, topo.num_layers) if spec.denoiser_alone else range(topo.k, topo.num_layers)
    if job.size == 1:
        flags = [flags[0], trains(local_layers)]
    grads = gradient_flow(flags)
    window = job.settings.inflight or topo.world_size
    local = TrainingRole(spec.pipeline, window, grads, position=1) if job.size == 1 else None
    return params, denoiser, _Roles(TrainingRole(spec.pipeline, window, grads, position=rank), local, local_layers), \
        counts


def _resume(job, trainer: Trainer, spec: TrainSpec, cfg: DictConfig) -> int:
    """The step a resumed run starts after (0 for a new run); every rank loads its part of the checkpoint."""
    comm = job.comm
    resume_from = agree(comm, lambda: _resume_point(spec, cfg))
    if resume_from is None:
        return 0
    all_ok(comm, lambda: load_rank(trainer, Path(resume_from)))
    start_step = json.loads((Path(resume_from) / "state.json").read_text())["step"] if job.rank == 0 else 0
    settle(comm)
    return comm.bcast(start_step, root=0)


def _log_plan(job, spec: TrainSpec, counts: list[int], denoiser: Denoiser | None) -> None:
    topo = job.topo
    job.log_layout("training")
    which = "all" if spec.layers is None else "none" if spec.layers == (0, 0) else \
        f"[{spec.layers[0]}, {spec.layers[1]})"
    log.info("%s on layers %s, train.pipeline=%s; trainable parameters per rank %s%s", spec.mode, which,
             spec.pipeline, counts, "" if denoiser is None else
             f" (rank 0: a denoiser of {denoiser.blocks} blocks, width {denoiser.width}"
             f"{', owner alone: the workers are not used' if denoiser.alone else ''})")
    if len(topo.tail) and not spec.owner_trainable and job.size > 1:
        log.warning("layers [%d, %d) run on rank 0 (owner tail) and stay frozen (train.owner_trainable=false); "
                    "set split.owner_tail=0 to give them to the workers", topo.tail.start, topo.tail.stop)


def _worker_stage(job, trainer: Trainer, spec: TrainSpec, role: TrainingRole, wire_dtype, on_step) -> Stage:
    """A worker's stage in training: its layers, its part of the schedule, its checkpoint and export parts,
    and the end of each step (the shared gradient norm, clipping, its optimizer)."""

    def step_end(step: int) -> None:
        if on_step is not None:
            on_step(trainer, step, None)
        trainer.finish_step()

    handlers = {Save: lambda step: save_part(trainer, spec, step),
                Export: lambda step: export(trainer, spec, job.folder)}
    return Stage.of_rank(job.rank, job.topo, job.adapter, job.device, make_task("score", False), wire_dtype, role,
                         handlers, step_end)


def _new_denoiser(adapter, topo, spec: TrainSpec, device) -> Denoiser | None:
    """Rank 0's new denoiser (``train.denoiser.blocks`` > 0), initialised from ``train.seed``."""
    if not spec.denoiser_blocks:
        return None
    if spec.denoiser_alone and topo.world_size > 1:
        raise ConfigError("train.denoiser.alone=true trains the owner-alone model, which sends nothing: run it with "
                          "one process (mpiexec -n 1)")
    hidden = adapter.config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        d = Denoiser(hidden, spec.denoiser_blocks, spec.denoiser_width or 4 * hidden, topo.k, spec.denoiser_alone)
    return d.to(device)


def training_costs(head_cost: float, spec: TrainSpec, k: int) -> tuple[float, tuple[float, float, float]]:
    """Stage costs of a training step for ``split.partition=balanced``, in layer forwards: a trained layer
    runs forward and backward (about 1 + 2); a frozen owner front only runs forward; the owner's frozen tail
    and head run forward and pass the gradient back to their input (about 1 + 1). Rank 0's layers train
    only with ``train.owner_trainable`` (its front only where ``train.layers`` reaches below ``split.k``)."""
    front = 3.0 if spec.owner_trainable and (spec.layers is None or spec.layers[0] < k) else 1.0
    tail = 3.0 if spec.owner_trainable else 2.0
    return 2.0 * head_cost, (front, 3.0, tail)


def _check_model(adapter, settings: Settings, spec: TrainSpec) -> None:
    if not adapter.has_head:
        raise ConfigError(f"training needs a causal language model; {type(adapter.model).__name__} has no LM head")
    if settings.model_adapters:
        raise ConfigError("model.adapters applies to jobs/infer.py; training starts from the model folder (merge an "
                          "adapter first: train.export=merged)")
    if settings.num_shards > 1:
        raise ConfigError("data.num_shards applies to jobs/infer.py; a training job reads every row")
    if settings.chat_template:
        raise ConfigError("data.chat_template applies to task=generate; format training rows yourself")
    if settings.on_nonfinite != "error":
        raise ConfigError(f"runtime.on_nonfinite={settings.on_nonfinite} applies to jobs/infer.py: a training step "
                          "cannot leave a row out, so NaN/Inf in training always ends the job with an error")
    if settings.bucket_window:
        raise ConfigError(f"data.bucket_window={settings.bucket_window}: training draws its micro-batches from the "
                          "shuffled rows (train.seed); set data.bucket_window=0")
    if spec.layers and spec.layers[1] > adapter.num_layers:
        raise ConfigError(f"train.layers={list(spec.layers)}: the model has {adapter.num_layers} layers")
    if spec.mode == "lora":
        lora_targets(adapter, spec)


def _prepare_out_dir(spec: TrainSpec, cfg: DictConfig) -> None:
    out = Path(spec.out_dir)
    check_train_out(out, spec.resume, spec.overwrite)
    if spec.resume:
        return
    if spec.overwrite:
        for folder in {out, Path(spec.owner_dir)}:
            for name in ("checkpoints", "adapter", "model", "denoiser"):
                shutil.rmtree(folder / name, ignore_errors=True)
            for name in ("train.json", "metrics.jsonl", "summary.json", "noise-key"):
                (folder / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(spec.owner_dir).exists():
        Path(spec.owner_dir).mkdir(parents=True, mode=0o700)  # rank 0's own files
    (out / "train.json").write_text(jsonfile.dumps({"config": OmegaConf.to_container(cfg, resolve=True),
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


def _owner_plan(settings: Settings, spec: TrainSpec, folder: str) -> TrainPlan:
    """Rank 0: read and tokenize the training rows; the plan (steps per epoch, total steps, rows), with the
    rows and the tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples = load_examples(settings, spec, tokenizer)
    batches = -(-len(examples) // settings.batch_size)
    per_epoch = -(-batches // spec.grad_accum)
    total = per_epoch * spec.epochs if spec.max_steps is None else spec.max_steps
    return TrainPlan(per_epoch, total, len(examples), examples, tokenizer)


def main(cfg: DictConfig) -> None:
    """Entry point body of ``jobs/train.py``: run, and end every rank cleanly on failure."""
    run_main(cfg, run_train)
