"""Training options (``train.*``), the training rows and their micro-batches, and the learning-rate schedule."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError, Settings, as_bool, choice, integer, nonneg, positive, privacy_spec
from ..engine.schedule import PIPELINES
from ..infer.tasks import score_positions
from ..io.batch import content_digests, pad_batch, position_ids
from ..io.public_text import public_texts
from ..io.read import DataError, RowError, read_rows
from ..io.tokenize import encode_rows
from ..privacy.mechanism import PrivacySpec

ALLOW_SHARED = "allow_shared"  # train.owner_dir: rank 0's files in train.out_dir even with noise on

__all__ = ["TrainSpec", "TrainBatch", "train_spec", "load_examples", "epoch_batches", "lr_factor", "MODES",
           "SCHEDULES", "LOSSES", "EXPORTS"]

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
    owner_shared_ok: bool = False  # train.owner_dir=allow_shared: rank 0's files in out_dir even with noise on
    completion_eos: bool = True
    resume: bool = False
    overwrite: bool = False
    save_every: int = 100
    keep_checkpoints: int = 2
    export: str = "auto"
    log_every: int = 10
    pipeline: str = "1f1b"
    grad_privacy: PrivacySpec = field(default_factory=PrivacySpec)
    denoiser_blocks: int = 0            # train.denoiser.blocks: > 0 trains rank 0's denoiser
    denoiser_width: int | None = None   # null = 4 x the model's hidden size
    denoiser_alone: bool = False        # the owner-alone model: the workers' answer is not used
    denoiser_lr: float | None = None    # null = train.lr


def _layers_option(layers) -> tuple[int, int] | None:
    """``train.layers``: null (every layer a rank may train), [] (none: only the denoiser) or [start, stop)."""
    if layers is None:
        return None
    if isinstance(layers, (list, tuple)) and len(layers) == 0:
        return (0, 0)
    if not isinstance(layers, (list, tuple)) or len(layers) != 2:
        raise ConfigError(f"train.layers={layers!r} must be null, [] (no layer) or [start, stop) layer indices")
    layers = (integer("train.layers[0]", layers[0], 0), integer("train.layers[1]", layers[1], 1))
    if layers[1] <= layers[0]:
        raise ConfigError(f"train.layers={list(layers)} is empty: stop must be > start (or [] for no layer)")
    return layers


def train_spec(cfg: DictConfig) -> TrainSpec:
    """``train.*`` checked into a :class:`TrainSpec`, with the checks that involve other options (privacy, split)."""
    t = OmegaConf.to_container(cfg.train, resolve=True)
    lora = t.get("lora") or {}
    layers = _layers_option(t.get("layers"))
    targets = _lora_targets(lora.get("target_modules"))
    spec = _spec(t, lora, layers, targets, _grad_privacy(t.get("grad_privacy")))
    if spec.export == "auto":
        spec = replace(spec, export="adapter" if spec.mode == "lora" else "merged")
    if not spec.out_dir:
        raise ConfigError("train.out_dir must name the folder for checkpoints and the exported model")
    noisy = OmegaConf.select(cfg, "privacy.mechanism", default="none") != "none" or spec.grad_privacy.adds_noise
    _check_owner_files(spec, noisy)
    if spec.lora_dropout != 0:
        raise ConfigError(f"train.lora.dropout={spec.lora_dropout}: only 0 is supported (dropout would draw from "
                          "an unseeded random state: split and unsplit training, and a resumed run, would differ)")
    if spec.export == "adapter" and spec.mode == "full":
        raise ConfigError("train.export=adapter needs train.mode=lora (full fine-tuning exports train.export=merged)")
    _check_denoiser(cfg, spec, noisy)
    if spec.resume and spec.overwrite:
        raise ConfigError("train.resume=true and train.overwrite=true contradict each other")
    return spec


def _lora_targets(targets) -> tuple[str, ...] | None:
    """``train.lora.target_modules``: null (the family's default) or a list of module names."""
    if targets is not None and (not isinstance(targets, (list, tuple)) or not targets
                                or not all(isinstance(x, str) and x for x in targets)):
        raise ConfigError(f"train.lora.target_modules={targets!r} must be null or a list of module names")
    return None if targets is None else tuple(targets)


def _grad_privacy(options: dict | None) -> PrivacySpec:
    """``train.grad_privacy``: the mechanism on the gradient message, per row (unit sequence, a numeric clip)."""
    gp = dict(options or {"mechanism": "none"})
    if gp.get("unit", "sequence") != "sequence":
        raise ConfigError("train.grad_privacy.unit must be sequence: a row's gradient message mixes all its tokens")
    gp["unit"] = "sequence"
    try:
        grad_privacy = privacy_spec(gp, 0)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("privacy.", "train.grad_privacy.")) from None
    if grad_privacy.mechanism == "dchi":
        raise ConfigError("train.grad_privacy.mechanism must be none, gaussian or sigma (dchi is for token embeddings)")
    if grad_privacy.clip == "auto":
        raise ConfigError("train.grad_privacy.clip must be a number (the L2 norm of one row's gradient of its summed "
                          "token loss); auto applies to activations only")
    return grad_privacy


def _spec(t: dict, lora: dict, layers: tuple[int, int] | None, targets: tuple[str, ...] | None,
          grad_privacy: PrivacySpec) -> TrainSpec:
    """Each ``train.*`` option checked on its own, in the order of :class:`TrainSpec`."""
    den = t.get("denoiser") or {}
    mgn = t.get("max_grad_norm")
    return TrainSpec(
        mode=choice("train.mode", t.get("mode", "lora"), MODES),
        layers=layers,
        owner_trainable=as_bool("train.owner_trainable", t.get("owner_trainable", False)),
        lora_r=integer("train.lora.r", lora.get("r", 8), 1),
        lora_alpha=positive("train.lora.alpha", lora.get("alpha", 16)),
        lora_dropout=nonneg("train.lora.dropout", lora.get("dropout", 0.0)),
        lora_targets=targets,
        epochs=integer("train.epochs", t.get("epochs", 1), 1),
        max_steps=integer("train.max_steps", t.get("max_steps"), 1, allow_none=True),
        grad_accum=integer("train.grad_accum", t.get("grad_accum", 4), 1),
        lr=positive("train.lr", t.get("lr", 2e-4)),
        schedule=choice("train.schedule", t.get("schedule", "cosine"), SCHEDULES),
        warmup_steps=integer("train.warmup_steps", t.get("warmup_steps", 0), 0),
        weight_decay=nonneg("train.weight_decay", t.get("weight_decay", 0.0)),
        max_grad_norm=None if mgn is None else positive("train.max_grad_norm", mgn),
        seed=integer("train.seed", t.get("seed", 0), 0),
        loss=choice("train.loss", t.get("loss", "causal"), LOSSES),
        prompt_field=str(t.get("prompt_field", "prompt")),
        completion_field=str(t.get("completion_field", "completion")),
        out_dir=str(t.get("out_dir") or ""),
        owner_dir=str(t.get("out_dir") or "") if t.get("owner_dir") in (None, "", ALLOW_SHARED)
        else str(t["owner_dir"]),
        owner_shared_ok=t.get("owner_dir") == ALLOW_SHARED,
        completion_eos=as_bool("train.completion_eos", t.get("completion_eos", True)),
        resume=as_bool("train.resume", t.get("resume", False)),
        overwrite=as_bool("train.overwrite", t.get("overwrite", False)),
        save_every=integer("train.save_every", t.get("save_every", 100), 1),
        keep_checkpoints=integer("train.keep_checkpoints", t.get("keep_checkpoints", 2), 1),
        export=choice("train.export", t.get("export", "auto"), EXPORTS),
        log_every=integer("train.log_every", t.get("log_every", 10), 1),
        pipeline=choice("train.pipeline", t.get("pipeline", "1f1b"), PIPELINES),
        grad_privacy=grad_privacy,
        denoiser_blocks=integer("train.denoiser.blocks", den.get("blocks", 0), 0),
        denoiser_width=integer("train.denoiser.width", den.get("width"), 1, allow_none=True),
        denoiser_alone=as_bool("train.denoiser.alone", den.get("alone", False)),
        denoiser_lr=None if den.get("lr") is None else positive("train.denoiser.lr", den["lr"]),
    )


def _check_owner_files(spec: TrainSpec, noisy: bool) -> None:
    """With privacy on, rank 0's own files stay out of the folder the workers write (unless allowed)."""
    if noisy and spec.owner_trainable and spec.export == "merged":
        raise ConfigError("train.export=merged with train.owner_trainable=true and a privacy mechanism on: every rank "
                          "writes its shard to train.out_dir, rank 0's layers (trained on the raw rows, not covered by "
                          "the guarantee) included; use train.export=adapter (rank 0 writes it to train.owner_dir) "
                          "or train.export=none")
    if noisy and not spec.owner_shared_ok and \
            Path(spec.owner_dir).expanduser().resolve() == Path(spec.out_dir).expanduser().resolve():
        raise ConfigError(f"privacy is on, and rank 0's own files (the noise key, the loss on the private labels "
                          f"in metrics.jsonl) would go to train.out_dir={spec.out_dir}, which the workers write: set "
                          "train.owner_dir to a folder only rank 0 reads (a node-local or owner-only path), or "
                          f"train.owner_dir={ALLOW_SHARED} to keep them in train.out_dir knowingly")


def _check_denoiser(cfg: DictConfig, spec: TrainSpec, noisy: bool) -> None:
    if not spec.denoiser_blocks:
        if spec.denoiser_alone:
            raise ConfigError("train.denoiser.alone=true needs train.denoiser.blocks > 0")
        return
    if OmegaConf.select(cfg, "split.head", default="owner") != "owner":
        raise ConfigError("train.denoiser.blocks > 0 needs split.head=owner: the denoiser runs on rank 0 on the "
                          "final states the workers send back")
    if OmegaConf.select(cfg, "split.denoiser", default=None):
        raise ConfigError("split.denoiser applies to jobs/infer.py; training starts a new denoiser "
                          "(train.denoiser.blocks)")
    if spec.denoiser_alone:
        k = OmegaConf.select(cfg, "split.k", default=0)
        if noisy:
            raise ConfigError("train.denoiser.alone=true trains the owner-alone model, which sends nothing: set "
                              "privacy=none and train.grad_privacy.mechanism=none")
        if spec.layers != (0, 0):
            raise ConfigError(f"train.denoiser.alone=true trains the denoiser alone over rank 0's frozen layers "
                              f"[0, split.k={k}): set train.layers=[]")


# ------------------------------------------------------------------------------------------------ data

@dataclass
class TrainBatch:
    """One padded training micro-batch (``data.padding_side``). ``target`` (B, T) marks tokens the loss predicts."""

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

    def digests(self) -> list[bytes]:
        """Per row, a digest of its real tokens and of which of them the loss predicts (they key its noise)."""
        tags = [self.target[i][self.mask[i].bool()].cpu().numpy().astype("u1").tobytes() for i in range(self.size)]
        return content_digests(self.ids, self.mask, tags)


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
        # the prompt (or the whole text) with the tokenizer's own truncation, as inference tokenizes it
        ids, long, count, exact = encode_rows(tokenizer, [text], limit)[0]
        target = [completion is None] * len(ids)
        if completion is not None:
            # the completion after the prompt, no special tokens: only what can still fit is tokenized
            room = max(limit - len(ids), 1)
            more, cut, n_more, more_exact = encode_rows(tokenizer, [completion], room, add_special_tokens=False)[0]
            if spec.completion_eos and tokenizer.eos_token_id is not None:
                more = [*more, tokenizer.eos_token_id]
                n_more += 1
            count, exact = count + n_more, exact and more_exact
            long = long or cut or len(ids) + len(more) > limit
            ids, target = ids + more, target + [True] * len(more)
        if long and settings.on_long == "fail":
            raise DataError(f"{source}: row {row}: {'' if exact else 'at least '}{count} tokens, longer than "
                            f"data.max_length={limit}")
        if long and settings.on_long == "skip":
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


def epoch_batches(examples: list, epoch: int, seed: int, batch_size: int, pad_id: int,
                  padding_side: str = "right") -> list[TrainBatch]:
    """The micro-batches of one epoch: rows shuffled by (seed, epoch), cut into ``batch_size`` rows and padded
    on ``padding_side`` (``data.padding_side``)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    batches = []
    for start in range(0, len(order), batch_size):
        part = [examples[i] for i in order[start:start + batch_size]]
        ids, mask = pad_batch([seq for _, seq, _ in part], pad_id, padding_side)
        target = pad_batch([[int(t) for t in tgt] for _, _, tgt in part], 0, padding_side)[0].bool()
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


