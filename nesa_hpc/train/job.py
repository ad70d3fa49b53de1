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

Checkpoints and the export travel as ``SAVE`` / ``EXPORT`` messages along the pipeline, and ``STOP`` ends
it, so a stopped job exits with 75 on every rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError, Settings
from ..engine.control import StopFlag
from ..engine.job import (
    EXIT_STOPPED,
    JobError,
    agree,
    all_ok,
    gather_stats,
    rank_modules,
    rank_stats,
    run_main,
    share_exit_code,
    start_job,
    stop_requested,
)
from ..engine.messages import Export, Save
from ..engine.owner import Owner
from ..engine.schedule import TrainingRole
from ..engine.stage import LocalPipe, NonFiniteError, Stage, serve
from ..infer.tasks import make_task
from ..io.public_text import load_texts
from ..models.lora import lora_targets
from ..models.weights import DTYPES, load_modules
from ..privacy.denoiser import Denoiser, save_denoiser
from ..privacy.mechanism import Privacy, PrivacySpec, calibrate_clip, make_privacy, noise_key, read_key, write_key
from .checkpoint import checkpoint_root, export, latest_checkpoint, load_rank, save_rank
from .options import TrainBatch, TrainSpec, epoch_batches, load_examples, lr_factor, train_spec
from .step import (
    DENOISER,
    Trainer,
    TrainLedger,
    gradient_flow,
    ledger_counts,
    make_trainable,
    owner_step,
    trainable_layers,
    training_epsilon,
)

__all__ = ["run_train", "main", "train_spec", "load_examples", "epoch_batches", "lr_factor", "make_trainable",
           "training_epsilon", "TrainSpec"]

log = logging.getLogger("nesa_hpc")


def _key_digest(cfg: DictConfig) -> str:
    keep = OmegaConf.to_container(cfg, resolve=True)
    for key in ("resume", "overwrite", "export", "log_every", "save_every", "keep_checkpoints", "pipeline"):
        keep.get("train", {}).pop(key, None)  # none of these changes what is trained
    keep.pop("runtime", None)
    keep.pop("output", None)
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
    rank, size, settings, adapter, topo, folder = job.rank, job.size, job.settings, job.adapter, job.topo, job.folder
    if signal_name := stop_requested(comm):
        if rank == 0:
            log.warning("stopped by %s during start-up, before train.out_dir was touched; rerun (with "
                        "train.resume=true) to start", signal_name)
        return {"exit_code": EXIT_STOPPED, "stopped_by": signal_name}
    all_ok(comm, lambda: _check_model(adapter, settings, spec))
    agree(comm, lambda: _prepare_out_dir(spec, cfg))
    all_ok(comm, lambda: load_modules(adapter, folder, rank_modules(rank, topo, adapter, "score"),
                                      settings.model_dtype, job.device))
    layers = trainable_layers(rank, topo, spec)
    params = all_ok(comm, lambda: make_trainable(adapter, layers, spec))
    denoiser = all_ok(comm, lambda: _new_denoiser(adapter, topo, spec, job.device) if rank == 0 else None)
    if denoiser is not None:
        params = params + [(f"{DENOISER}{n}", p) for n, p in denoiser.named_parameters()]
    # front = parameters before the head: the owner's tail and head come after the workers
    front = bool(params) if rank != 0 else any(p.requires_grad for i in range(topo.k)
                                               for p in adapter.layers[i].parameters())
    flags = comm.allgather(front)
    counts = comm.allgather(sum(p.numel() for _, p in params))
    if sum(counts) == 0:
        raise JobError("nothing to train: train.layers selects no layer a rank may train (rank 0's layers train "
                       "only with train.owner_trainable=true)")
    local_layers = range(topo.num_layers, topo.num_layers) if spec.denoiser_alone else \
        range(topo.k, topo.num_layers)  # world size 1: what rank 0's in-process stage runs
    if size == 1:  # the in-process stage is the second of two stages
        flags = [front, any(p.requires_grad for i in local_layers for p in adapter.layers[i].parameters())]
    grads = gradient_flow(flags)
    window = settings.inflight or topo.world_size
    role = TrainingRole(spec.pipeline, window, grads, position=rank)
    planned = agree(comm, lambda: _owner_plan(settings, spec, folder), share=False)
    plan = comm.bcast(planned[0] if rank == 0 else None, root=0)
    transport = job.transport(on_recv) or LocalPipe(Stage.in_owner(
        local_layers, adapter, job.device, TrainingRole(spec.pipeline, window, grads, position=1)))
    trainer = Trainer(rank, topo, adapter, spec, params, comm, role, job.device, plan["total_steps"],
                      private=settings.privacy.adds_noise or spec.grad_privacy.adds_noise)
    start_step = 0
    resume_from = agree(comm, lambda: _resume_point(spec, cfg))
    if resume_from is not None:
        all_ok(comm, lambda: load_rank(trainer, Path(resume_from)))
        start_step = json.loads((Path(resume_from) / "state.json").read_text())["step"] if rank == 0 else 0
        start_step = comm.bcast(start_step, root=0)
    if rank == 0:
        job.log_layout("training")
        which = "all" if spec.layers is None else "none" if spec.layers == (0, 0) else \
            f"[{spec.layers[0]}, {spec.layers[1]})"
        log.info("%s on layers %s, train.pipeline=%s; trainable parameters per rank %s%s", spec.mode, which,
                 spec.pipeline, counts, "" if denoiser is None else
                 f" (rank 0: a denoiser of {denoiser.blocks} blocks, width {denoiser.width}"
                 f"{', owner alone: the workers are not used' if denoiser.alone else ''})")
        if len(topo.tail) and not spec.owner_trainable and size > 1:
            log.warning("layers [%d, %d) run on rank 0 (owner tail) and stay frozen (train.owner_trainable=false); "
                        "set split.owner_tail=0 to give them to the workers", topo.tail.start, topo.tail.stop)
    wire_dtype = DTYPES[settings.wire_dtype] if settings.wire_dtype else None
    stop = StopFlag()
    start = time.perf_counter()
    try:
        if rank == 0:
            examples, tokenizer = planned[1:]
            fwd, bwd = _owner_privacy(settings, spec, trainer, tokenizer,
                                      finished=start_step >= plan["total_steps"])
            owner = Owner(topo, adapter, fwd, transport, job.device, wire_dtype, denoiser)
            summary = _owner_loop(trainer, owner, bwd, settings, spec, folder, plan, examples, tokenizer,
                                  start_step, stop, on_step)
            share_exit_code(comm, summary["exit_code"])
            return summary

        def step_end(step: int) -> None:
            if on_step is not None:
                on_step(trainer, step, None)
            trainer.finish_step()

        handlers = {Save: lambda step: _save_part(trainer, spec, step),
                    Export: lambda step: export(trainer, spec, folder)}
        stage = Stage.of_rank(rank, topo, adapter, job.device, make_task("score", False), wire_dtype, role,
                              handlers, step_end)
        stats = serve(stage, transport)
        gather_stats(comm, rank_stats(rank, stats, transport, time.perf_counter() - start))
        return {"exit_code": share_exit_code(comm, None)}
    finally:
        stop.restore()
        if transport is not None:
            transport.close()


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


def _save_part(trainer: Trainer, spec: TrainSpec, step: int) -> None:
    """This rank's part of the checkpoint of ``step``; returns once every rank has written its part."""
    save_rank(trainer, checkpoint_root(spec) / f"step-{step:08d}")
    trainer.comm.barrier()


def _all_rank_stats(trainer: Trainer, owner: Owner, elapsed: float) -> list[dict]:
    """Rank 0's figures and the workers' (gathered once the pipeline has stopped)."""
    transport = owner.transport if owner.local is None else None
    return [rank_stats(0, owner.all_stats(), transport, elapsed)] + gather_stats(trainer.comm, None)


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
            for name in ("checkpoints", "adapter", "model", "denoiser"):
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


def _owner_privacy(settings: Settings, spec: TrainSpec, stage: Trainer, tokenizer,
                   finished: bool = False) -> tuple[Privacy, Privacy | None]:
    """The forward transform (as at inference) and the gradient message's; OS keys are kept in
    ``<train.owner_dir>/noise-key`` (0600) until training ends, so a resumed run draws the same noise."""
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
            key = read_key(path)
        elif spec.resume and latest_checkpoint(spec) is not None and not finished:
            raise ConfigError(f"train.resume=true with OS-seeded noise needs {path}, written by the first run")
        else:
            key = noise_key(None)
            path.unlink(missing_ok=True)  # a run that stopped before its first checkpoint: its key is unused
            write_key(path, key)
    else:
        key = noise_key(p.seed)
    fwd = make_privacy(p, stage.topo.k, clip, key)
    bwd = None
    if spec.grad_privacy.adds_noise:
        g = spec.grad_privacy
        bwd = make_privacy(PrivacySpec(**{**g.__dict__, "seed": None}), 0, None,
                           hashlib.blake2b(key + b":gradient-message", digest_size=32).digest())
    return fwd, bwd


def _owner_loop(stage: Trainer, owner: Owner, bwd: Privacy | None, settings: Settings, spec: TrainSpec,
                folder: str, plan: dict, examples: list, tok, start_step: int, stop: StopFlag, on_step) -> dict:
    topo = stage.topo
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    fwd = owner.privacy
    ledger = TrainLedger()
    own = Path(spec.owner_dir)
    own.mkdir(parents=True, exist_ok=True)
    metrics_path = own / "metrics.jsonl"
    if start_step:
        state = json.loads((latest_checkpoint(spec) / "state.json").read_text())
        ledger = TrainLedger(**state["ledger"])
        log.info("resuming after step %d of %d (%s)", start_step, plan["total_steps"], latest_checkpoint(spec))
        _truncate_metrics(metrics_path, start_step)
    elif metrics_path.exists():
        metrics_path.unlink()
    per_epoch, total = plan["steps_per_epoch"], plan["total_steps"]
    # rank 0's weights trained on the raw rows (its layers, or a denoiser the gradient message passes through)
    # make every release depend on every row seen before
    mixes = spec.owner_trainable or (owner.denoiser is not None and stage.role.grads[-1] and topo.world_size > 1)
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
            epoch_cache[epoch] = epoch_batches(examples, epoch, spec.seed, settings.batch_size, pad,
                                               settings.padding_side)
        batches = epoch_cache[epoch][within * spec.grad_accum:(within + 1) * spec.grad_accum]
        loss, n_target = owner_step(stage, owner, batches, bwd if topo.world_size > 1 else None, epoch, step)
        fwd.releases.clear()
        if not math.isfinite(loss):
            raise NonFiniteError(f"train: the loss is {loss} at step {step + 1} (lower train.lr, or set "
                                 "train.max_grad_norm)")
        if on_step is not None:
            on_step(stage, step, loss)
        lr = stage.sched.get_last_lr()[0] if stage.sched else spec.lr * lr_factor(step, total, spec.warmup_steps,
                                                                                   spec.schedule)
        norm = stage.finish_step()
        ledger_counts(ledger, step + 1, per_epoch, spec.grad_accum, settings.batch_size, plan["rows"],
                       topo.world_size > 1, stage.role.grads[-1] and topo.world_size > 1)
        tokens = int(sum(int(b.mask.sum()) for b in batches))
        tokens_run += tokens
        eps = ledger.epsilon(fwd, bwd, mixes)
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
            _save(stage, owner, spec, step, ledger)
            last_saved = step
    if step > last_saved:
        _save(stage, owner, spec, step, ledger)
    elapsed = time.perf_counter() - t_start
    summary = {"steps": step, "total_steps": total, "rows": plan["rows"], "seconds": round(elapsed, 3),
               "tokens_per_s": round(tokens_run / elapsed, 1) if elapsed > 0 else 0.0,
               "final_loss": losses[-1] if losses else None, "epsilon_spent": ledger.epsilon(fwd, bwd, mixes),
               "forward_releases_per_row": ledger.forward_max, "backward_releases_per_row": ledger.backward_max,
               "privacy_mechanism": fwd.mechanism, "privacy_sigma": fwd.sigma, "privacy_clip": fwd.clip,
               "grad_privacy_mechanism": bwd.mechanism if bwd else "none", "grad_privacy_sigma": bwd.sigma if bwd
               else 0.0, "grad_privacy_clip": bwd.clip if bwd else None, "exit_code": 0}
    if stopped:
        owner.stop()
        summary.update(exit_code=EXIT_STOPPED, stopped_by=stopped)
        summary["rank_stats"] = _all_rank_stats(stage, owner, elapsed)
        log.warning("stopped by %s after step %d; rerun with train.resume=true to continue", stopped, step)
        return summary
    owner.send(Export(step))
    exported = export(stage, spec, folder)
    owner.stop()
    summary["exported"] = exported
    if owner.denoiser is not None:
        trained = {"steps": step, "alone": spec.denoiser_alone, "privacy_mechanism": fwd.mechanism,
                   "privacy_sigma": fwd.sigma, "privacy_clip": fwd.clip, "privacy_unit": settings.privacy.unit,
                   "epsilon_spent": summary["epsilon_spent"], "data": settings.data_path or "built-in public text",
                   "final_loss": summary["final_loss"]}
        summary["denoiser"] = str(save_denoiser(owner.denoiser, own / "denoiser", stage.adapter.config, trained))
        log.info("denoiser (%d blocks, width %d) -> %s: use it with split.denoiser=%s", owner.denoiser.blocks,
                 owner.denoiser.width, summary["denoiser"], summary["denoiser"])
    if exported and stage.private and spec.owner_trainable:
        summary["export_covered"] = False
        log.warning("the export %s holds rank 0's layers, trained on the raw rows: it is not covered by the privacy "
                    "guarantee (written to train.owner_dir; share it only as you would the data)", exported)
    summary["rank_stats"] = _all_rank_stats(stage, owner, elapsed)
    (own / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (own / "noise-key").unlink(missing_ok=True)
    log.info("done: %d steps in %.1f s (%.0f tokens/s), final loss %.4f, epsilon spent %s%s", step, elapsed,
             summary["tokens_per_s"], summary["final_loss"] if losses else float("nan"),
             _fmt_eps(summary["epsilon_spent"]), f" -> {exported}" if exported else "")
    return summary


def _fmt_eps(eps: float) -> str:
    if math.isnan(eps):
        return "n/a (no formal claim)"
    return "inf (a message travels unprotected)" if math.isinf(eps) else f"{eps:.4g}"


def _save(stage: Trainer, owner: Owner, spec: TrainSpec, step: int, ledger: TrainLedger) -> None:
    owner.send(Save(step))
    _save_part(stage, spec, step)
    folder = checkpoint_root(spec) / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)  # rank 0's own part may have gone to train.owner_dir
    state = {"step": step, "ledger": ledger.__dict__}
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, folder / "state.json")
    done = sorted(p for p in checkpoint_root(spec).glob("step-*") if (p / "state.json").is_file())
    for old in done[:-spec.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint: step %d -> %s", step, folder)


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def main(cfg: DictConfig) -> None:
    """Entry point body of ``jobs/train.py``: run, and end every rank cleanly on failure."""
    run_main(cfg, run_train)
