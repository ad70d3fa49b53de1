"""Rank 0's training loop (:class:`TrainLoop`): the steps over each epoch's micro-batches, the metrics, the
checkpoints, the export and the summary; and the privacy transforms of training (:func:`owner_privacy`)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, Settings
from ..engine.control import StopFlag
from ..engine.job import EXIT_STOPPED, gather_stats, rank_stats, settle
from ..engine.messages import Export, Save
from ..engine.owner import Owner
from ..engine.stage import NonFiniteError
from ..io import jsonfile
from ..privacy.denoiser import save_denoiser
from ..privacy.mechanism import Privacy, PrivacySpec, auto_clip, make_privacy, noise_key, read_key, write_key
from .checkpoint import checkpoint_root, export, latest_checkpoint, save_rank
from .options import TrainBatch, TrainSpec, epoch_batches, lr_factor
from .step import Trainer, TrainLedger, owner_step

__all__ = ["TrainPlan", "TrainLoop", "owner_privacy", "save_part"]

log = logging.getLogger("nesa_hpc")


@dataclass
class TrainPlan:
    """The run's size (every rank knows it) and, on rank 0, its rows and tokenizer."""

    steps_per_epoch: int
    total_steps: int
    rows: int
    examples: list | None = None
    tokenizer: object = None


def owner_privacy(settings: Settings, spec: TrainSpec, stage: Trainer, tokenizer,
                   finished: bool = False) -> tuple[Privacy, Privacy | None]:
    """The forward transform (as at inference) and the gradient message's; OS keys are kept in
    ``<train.owner_dir>/noise-key`` (0600) until training ends, so a resumed run draws the same noise."""
    p = settings.privacy
    clip = auto_clip(p, stage.adapter, tokenizer, stage.topo.k, settings.max_length, stage.device)
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


def save_part(trainer: Trainer, spec: TrainSpec, step: int) -> None:
    """This rank's part of the checkpoint of ``step``; returns once every rank has written its part."""
    save_rank(trainer, checkpoint_root(spec) / f"step-{step:08d}")
    settle(trainer.comm)


class TrainLoop:
    """Rank 0's training loop: ``run`` takes steps until the plan's last (or a stop signal), logging each
    (:meth:`record`), saving checkpoints (:meth:`save`), then exports and writes the summary (:meth:`finish`)."""

    def __init__(self, trainer: Trainer, owner: Owner, grad_privacy: Privacy | None, settings: Settings,
                 spec: TrainSpec, folder: str, plan: TrainPlan, start_step: int, stop: StopFlag, on_step) -> None:
        self.trainer, self.owner, self.bwd, self.settings, self.spec = trainer, owner, grad_privacy, settings, spec
        self.folder, self.plan, self.step, self.stop, self.on_step = folder, plan, start_step, stop, on_step
        self.topo = trainer.topo
        tok = plan.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.own = Path(spec.owner_dir)
        self.own.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.own / "metrics.jsonl"
        self.ledger = TrainLedger()
        if start_step:
            state = json.loads((latest_checkpoint(spec) / "state.json").read_text())
            self.ledger = TrainLedger(**state["ledger"])
            log.info("resuming after step %d of %d (%s)", start_step, plan.total_steps, latest_checkpoint(spec))
            _truncate_metrics(self.metrics_path, start_step)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        # rank 0's weights trained on the raw rows (its layers, or a denoiser the gradient message passes
        # through) make every release depend on every row seen before
        self.mixes = spec.owner_trainable or (owner.denoiser is not None and trainer.role.grads[-1]
                                              and self.topo.world_size > 1)
        self.losses: list[float] = []
        self.tokens_run = 0
        self.epochs: dict[int, list[TrainBatch]] = {}
        self.t_start = self.last_log = time.perf_counter()

    def run(self) -> dict:
        total, last_saved, stopped = self.plan.total_steps, self.step, None
        while self.step < total:
            if self.stop():
                stopped = self.stop.signal
                break
            self.record(*self.train_step())
            if self.step % self.spec.save_every == 0 and self.step < total:
                self.save()
                last_saved = self.step
        if self.step > last_saved:
            self.save()
        return self.finish(stopped)

    def _batches(self, step: int) -> tuple[int, list[TrainBatch]]:
        """(epoch, micro-batches) of ``step``: each epoch's rows shuffled by ``train.seed``."""
        epoch, within = divmod(step, self.plan.steps_per_epoch)
        if epoch not in self.epochs:
            self.epochs.clear()
            self.epochs[epoch] = epoch_batches(self.plan.examples, epoch, self.spec.seed, self.settings.batch_size,
                                               self.pad, self.settings.padding_side)
        accum = self.spec.grad_accum
        return epoch, self.epochs[epoch][within * accum:(within + 1) * accum]

    def train_step(self) -> tuple:
        """One optimizer step; returns what :meth:`record` writes."""
        trainer, spec, step, world = self.trainer, self.spec, self.step, self.topo.world_size
        epoch, batches = self._batches(step)
        loss, n_target = owner_step(trainer, self.owner, batches, self.bwd if world > 1 else None, epoch, step)
        self.owner.privacy.releases.clear()
        if not math.isfinite(loss):
            raise NonFiniteError(f"train: the loss is {loss} at step {step + 1} (lower train.lr, or set "
                                 "train.max_grad_norm)")
        if self.on_step is not None:
            self.on_step(trainer, step, loss)
        total = self.plan.total_steps
        lr = trainer.sched.get_last_lr()[0] if trainer.sched else \
            spec.lr * lr_factor(step, total, spec.warmup_steps, spec.schedule)
        norm = trainer.finish_step()
        self.ledger.count(step + 1, self.plan.steps_per_epoch, spec.grad_accum, self.settings.batch_size,
                          self.plan.rows, world > 1, trainer.role.grads[-1] and world > 1)
        tokens = int(sum(int(b.mask.sum()) for b in batches))
        self.tokens_run += tokens
        self.step += 1
        self.losses.append(loss)
        return epoch, loss, lr, norm, n_target, tokens

    def record(self, epoch: int, loss: float, lr: float, norm: float, n_target: int, tokens: int) -> None:
        """A line of ``metrics.jsonl`` per step; a log line every ``train.log_every`` steps (or
        ``runtime.log_every`` seconds) and at the last step."""
        now = time.perf_counter()
        rate = self.tokens_run / max(now - self.t_start, 1e-9)
        eps = self.epsilon()
        with open(self.metrics_path, "a") as fh:
            fh.write(jsonfile.dumps({"step": self.step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": norm,
                                 "target_tokens": n_target, "tokens": tokens, "tokens_per_s": rate,
                                 "epsilon_spent": eps}) + "\n")
        total = self.plan.total_steps
        if self.step % self.spec.log_every == 0 or self.step == total or now - self.last_log >= self.settings.log_every:
            self.last_log = now
            log.info("step %d/%d epoch %d: loss %.4f, lr %.3g, grad norm %.3g, %.0f tokens/s, epsilon spent %s",
                     self.step, total, epoch, loss, lr, norm, rate, _fmt_eps(eps))

    def epsilon(self) -> float:
        return self.ledger.epsilon(self.owner.privacy, self.bwd, self.mixes)

    def save(self) -> None:
        """A checkpoint of this step: every rank's part (``Save`` along the pipeline), then ``state.json``."""
        spec, step = self.spec, self.step
        self.owner.send(Save(step))
        save_part(self.trainer, spec, step)
        folder = checkpoint_root(spec) / f"step-{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)  # rank 0's own part may have gone to train.owner_dir
        state = {"step": step, "ledger": self.ledger.__dict__}
        tmp = folder / "state.json.tmp"
        tmp.write_text(jsonfile.dumps(state, indent=2))
        os.replace(tmp, folder / "state.json")
        done = sorted(p for p in checkpoint_root(spec).glob("step-*") if (p / "state.json").is_file())
        for old in done[:-spec.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint: step %d -> %s", step, folder)

    def finish(self, stopped: str | None) -> dict:
        """The summary; unless stopped, the export (``Export`` along the pipeline), the denoiser and
        ``summary.json``."""
        owner, spec, fwd, bwd = self.owner, self.spec, self.owner.privacy, self.bwd
        elapsed = time.perf_counter() - self.t_start
        summary = {"steps": self.step, "total_steps": self.plan.total_steps, "rows": self.plan.rows,
                   "seconds": round(elapsed, 3),
                   "tokens_per_s": round(self.tokens_run / elapsed, 1) if elapsed > 0 else 0.0,
                   "final_loss": self.losses[-1] if self.losses else None, "epsilon_spent": self.epsilon(),
                   "forward_releases_per_row": self.ledger.forward_max,
                   "backward_releases_per_row": self.ledger.backward_max,
                   "privacy_mechanism": fwd.mechanism, "privacy_sigma": fwd.sigma, "privacy_clip": fwd.clip,
                   "grad_privacy_mechanism": bwd.mechanism if bwd else "none",
                   "grad_privacy_sigma": bwd.sigma if bwd else 0.0, "grad_privacy_clip": bwd.clip if bwd else None,
                   "exit_code": 0}
        if stopped:
            owner.stop()
            summary.update(exit_code=EXIT_STOPPED, stopped_by=stopped, rank_stats=self._rank_stats(elapsed))
            log.warning("stopped by %s after step %d; rerun with train.resume=true to continue", stopped, self.step)
            return summary
        owner.send(Export(self.step))
        exported = export(self.trainer, spec, self.folder)
        owner.stop()
        summary["exported"] = exported
        if owner.denoiser is not None:
            summary["denoiser"] = self._save_denoiser(summary)
        if exported and self.trainer.private and spec.owner_trainable:
            summary["export_covered"] = False
            log.warning("the export %s holds rank 0's layers, trained on the raw rows: it is not covered by the "
                        "privacy guarantee (written to train.owner_dir; share it only as you would the data)",
                        exported)
        summary["rank_stats"] = self._rank_stats(elapsed)
        (self.own / "summary.json").write_text(jsonfile.dumps(summary, indent=2, default=str))
        (self.own / "noise-key").unlink(missing_ok=True)
        log.info("done: %d steps in %.1f s (%.0f tokens/s), final loss %.4f, epsilon spent %s%s", self.step, elapsed,
                 summary["tokens_per_s"], summary["final_loss"] if self.losses else float("nan"),
                 _fmt_eps(summary["epsilon_spent"]), f" -> {exported}" if exported else "")
        return summary

    def _save_denoiser(self, summary: dict) -> str:
        owner, fwd, d = self.owner, self.owner.privacy, self.owner.denoiser
        trained = {"steps": self.step, "alone": self.spec.denoiser_alone, "privacy_mechanism": fwd.mechanism,
                   "privacy_sigma": fwd.sigma, "privacy_clip": fwd.clip, "privacy_unit": self.settings.privacy.unit,
                   "epsilon_spent": summary["epsilon_spent"],
                   "data": self.settings.data_path or "built-in public text", "final_loss": summary["final_loss"]}
        path = str(save_denoiser(d, self.own / "denoiser", owner.adapter.config, trained))
        log.info("denoiser (%d blocks, width %d) -> %s: use it with split.denoiser=%s", d.blocks, d.width, path, path)
        return path

    def _rank_stats(self, elapsed: float) -> list[dict]:
        """Rank 0's figures and the workers' (gathered once the pipeline has stopped)."""
        owner = self.owner
        transport = owner.transport if owner.local is None else None
        return [rank_stats(0, owner.all_stats(), transport, elapsed)] + gather_stats(self.trainer.comm, None,
                                                                                    self.settings.trace)


def _fmt_eps(eps: float) -> str:
    if math.isnan(eps):
        return "n/a (no formal claim)"
    return "inf (a message travels unprotected)" if math.isinf(eps) else f"{eps:.4g}"


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
