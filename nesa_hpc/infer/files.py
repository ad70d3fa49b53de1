"""The inference job's input and results on rank 0: rows to read, the results file and its attributes, the
resume key, the noise key, and the ledger's totals."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from pathlib import Path

import h5py
import numpy as np
from omegaconf import OmegaConf

from .. import __version__
from ..config import Settings
from ..errors import ConfigError
from ..io.fs import network_fs
from ..io.inputs import RowFields, chat_text, render
from ..io.read import DataError, RowError, count_rows, read_rows, shard_range
from ..io.results import ResultWriter
from ..preflight import data_problem
from ..privacy.mechanism import (
    NOISE_KEYING,
    PrivacySpec,
    auto_clip,
    default_key_path,
    make_privacy,
    read_key,
    write_key,
)

__all__ = ["privacy_key", "batching_window", "replay_start", "shard_rows", "resume_key", "decoding_attrs",
           "open_results", "check_task", "check_generate", "load_tokenizer", "key_file", "owner_privacy", "spent",
           "chat", "rows_from", "rows_to_count", "row_fields"]

log = logging.getLogger("nesa_hpc")


def privacy_key(spec: PrivacySpec) -> dict:
    """The privacy settings a resumed run must share (the calibrated clip follows from them)."""
    return {"privacy_mechanism": spec.mechanism, "privacy_unit": spec.unit, "privacy_epsilon": spec.epsilon,
            "privacy_delta": spec.delta, "privacy_clip": spec.clip, "privacy_clip_percentile": spec.clip_percentile,
            "privacy_calibration_path": spec.calibration_path, "privacy_sigma": spec.sigma,
            "privacy_seed": "os" if spec.seed is None else spec.seed, "privacy_releases": spec.releases,
            **({"privacy_noise_keying": NOISE_KEYING} if spec.adds_noise else {})}


def batching_window(settings: Settings) -> int:
    """Rows read and batched together (``data.bucket_window``, at least one batch)."""
    return max(settings.bucket_window, settings.batch_size) if settings.bucket_window else settings.batch_size


def replay_start(settings: Settings, writer: ResultWriter) -> int:
    """The first input row a (resumed) run reads: the start of the batching window holding the first missing
    row, so every remaining row lands in the same batch as in an uninterrupted run; rows of that window that
    were already committed are recomputed but not written again."""
    committed = writer.next_row
    return committed if writer.was_complete else committed // batching_window(settings) * batching_window(settings)


def shard_rows(settings: Settings, data_path: str) -> range | None:
    """This job's input rows with ``data.num_shards > 1`` (None otherwise: every row)."""
    if settings.num_shards == 1:
        return None
    window = batching_window(settings)
    total = count_rows(data_path, settings.data_format)
    rows = shard_range(total, settings.num_shards, settings.shard, window)
    if not rows:
        windows = -(-total // window)
        raise DataError(f"data.shard={settings.shard} of data.num_shards={settings.num_shards} has no rows: "
                        f"{data_path} has {total} rows, {windows} batching windows of {window} "
                        f"(max(data.bucket_window, data.batch_size)); use data.num_shards <= {windows}")
    log.info("shard %d of %d: input rows [%d, %d) of %d", settings.shard, settings.num_shards, rows.start,
             rows.stop, total)
    return rows


def resume_key(settings: Settings, folder: str, data_path: str, privacy_attrs: dict,
                rows: range | None = None) -> dict:
    """What must match for rows of two runs to be interchangeable (world size and partition need not).
    A shard also records which shard it is and its rows (so :mod:`nesa_hpc.io.merge` can check that shards
    belong together once those are set aside)."""
    shard = {} if rows is None else {"num_shards": settings.num_shards, "shard": settings.shard,
                                     "shard_rows": [rows.start, rows.stop]}
    return {"task": settings.task, "pooling": settings.pooling, "normalize": settings.normalize,
            "model_path": folder, "model_adapters": settings.model_adapters or "none",
            "model_dtype": settings.model_dtype, "split_k": settings.k,
            "data_path": str(data_path), "data_format": settings.data_format, "text_field": settings.text_field,
            "max_length": settings.max_length, "batch_size": settings.batch_size,
            "on_error": settings.on_error, "on_long": settings.on_long,
            "bucket_window": settings.bucket_window, "padding_side": settings.padding_side,
            "wire_dtype": settings.wire_dtype or settings.model_dtype, **privacy_attrs, **shard,
            **({"denoiser": settings.denoiser} if settings.denoiser else {}),
            **(decoding_attrs(settings) if settings.task == "generate" else {}), **row_attrs(settings)}


def row_attrs(settings: Settings) -> dict:
    """The row and per-token options that differ from their defaults (files of earlier versions, written
    before these options existed, keep resuming)."""
    defaults = {f.name: f.default for f in dataclasses.fields(Settings) if f.name in _ROW_OPTIONS}
    return {k: getattr(settings, k) for k in _ROW_OPTIONS if getattr(settings, k) != defaults[k]}


_ROW_OPTIONS = ("messages_field", "prompt_field", "completion_field", "token_logprobs", "top_logprobs", "id_field",
                "convention")


def decoding_attrs(settings: Settings) -> dict:
    out = {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature, "top_k": settings.top_k,
           "top_p": settings.top_p, "seed": settings.seed, "stop": list(settings.stop),
           "chat_template": settings.chat_template}
    if settings.ignore_eos:  # files of earlier versions, written before the option existed, keep resuming
        out["ignore_eos"] = True
    if settings.hide_finish:  # (the same)
        out["hide_finish"] = True
    return out


def open_results(cfg, settings: Settings, topo, adapter, task, folder: str, data_path: str,
                 rows: range | None, eos_ids: frozenset[int] = frozenset(), verify=None) -> ResultWriter:
    problem = data_problem(data_path)
    if problem:
        raise DataError(problem)
    attrs = {
        "task": settings.task, "model_path": folder, "model_adapters": settings.model_adapters or "none",
        "num_layers": topo.num_layers, "split_k": topo.k,
        "split_head": topo.head, "world_size": topo.world_size, "layers_per_rank": topo.layer_counts(),
        "layer_ranges": [[r.start, r.stop] for r in topo.ranges], "owner_tail": [topo.tail.start, topo.tail.stop],
        "split_partition": list(settings.partition) if isinstance(settings.partition, tuple) else settings.partition,
        "data_path": str(data_path), "config": OmegaConf.to_yaml(cfg, resolve=True),
        "nesa_hpc_version": __version__, "model_dtype": settings.model_dtype,
        "wire_dtype": settings.wire_dtype or settings.model_dtype, "bucket_window": settings.bucket_window,
        "batch_size": settings.batch_size, "privacy_mechanism": settings.privacy.mechanism,
        "resume_key": resume_key(settings, folder, data_path, privacy_key(settings.privacy), rows),
        "device": settings.device, "owner_device": settings.owner_device, "transport": settings.transport,
    }
    if rows is not None:
        attrs.update(num_shards=settings.num_shards, shard=settings.shard, shard_rows=[rows.start, rows.stop])
    attrs.update(data_format=settings.data_format, **row_attrs(settings))
    if settings.task == "embed":
        attrs.update(pooling=settings.pooling, normalize=settings.normalize)
    if settings.task == "generate":
        attrs.update(decoding_attrs(settings), decoding="greedy" if settings.temperature == 0 else "sample",
                     padding_side="left", eos_token_ids=sorted(eos_ids))
    # row_digest: the row's content digest (Batch.digests: its tokens and request), which a resume checks the
    # input against
    columns = {**task.columns(adapter.output_size), "epsilon_spent": (np.float64, ()),
               "row_digest": (np.uint8, (16,))}
    if settings.id_field:
        columns["id"] = (h5py.string_dtype(), ())
    writer = ResultWriter(settings.output_path, columns, attrs, settings.overwrite, resume=settings.resume,
                          first_row=rows.start if rows is not None else 0, verify=verify)
    if writer.resumed_rows:
        log.info("resuming %s after %d committed rows", settings.output_path, writer.resumed_rows)
    return writer


def check_task(settings: Settings, adapter) -> None:
    if settings.task in ("score", "generate") and not adapter.has_head:
        raise ConfigError(f"task={settings.task} needs a causal language model; {type(adapter.model).__name__} has "
                          "no LM head (use task=embed)")


def load_tokenizer(folder: str):
    """Rank 0's tokenizer (loaded once per job)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer from {folder}: {exc}") from None


def position_limit(config) -> int | None:
    """The most positions the model takes (None when its config does not say)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_generate(settings: Settings, adapter, folder: str, tokenizer) -> None:
    """Options of task=generate that depend on the model: chat template, position limit."""
    limit = position_limit(adapter.config)
    if limit and settings.max_length + settings.max_new_tokens > limit:
        raise ConfigError(f"data.max_length={settings.max_length} + task.max_new_tokens={settings.max_new_tokens} "
                          f"exceeds the model's {limit} positions; lower one of them")
    if settings.chat_template and not tokenizer.chat_template:
        raise ConfigError(f"data.chat_template=true but the tokenizer in {folder} has no chat template")


def check_owner_paths(settings: Settings, hosts: list[str], mounts: str | None = None) -> None:
    """With a privacy mechanism on and workers on other hosts than rank 0, rank 0's own files stay off file
    systems the workers' nodes may mount (:func:`~nesa_hpc.io.fs.network_fs`): the results of the private
    rows (unless ``output.allow_shared``), and the OS noise key in its default folder (``privacy.key_path``
    or ``$NESA_HPC_KEYS`` chosen by the user are taken as they are)."""
    spec = settings.privacy
    away = sorted({h for h in hosts[1:] if h != hosts[0]}) if hosts else []
    if not spec.adds_noise or not away:
        return
    nodes = ", ".join(away[:4]) + (" ..." if len(away) > 4 else "")
    fs = network_fs(settings.output_path, mounts)
    if fs and not settings.allow_shared:
        raise ConfigError(f"output.path {settings.output_path} is on a {fs} file system, which the workers' nodes "
                          f"({nodes}) may mount, and a privacy mechanism is on: the results of the private rows "
                          "belong where only rank 0 reads. Point output.path at a node-local or owner-only "
                          "folder, or pass output.allow_shared=true to keep them there knowingly")
    if spec.seed is None and not spec.key_path and not os.environ.get("NESA_HPC_KEYS"):
        folder = default_key_path(settings.output_path).parent
        fs = network_fs(folder, mounts)
        if fs:
            raise ConfigError(f"the noise key (it rebuilds the noise) would be kept in {folder}, on a {fs} file "
                              f"system that the workers' nodes ({nodes}) may mount: set privacy.key_path to a "
                              "node-local path only you read (or $NESA_HPC_KEYS to such a folder)")


def key_file(settings: Settings) -> Path:
    """Where rank 0 keeps the OS noise key of this job's results file until it completes."""
    spec = settings.privacy
    return Path(spec.key_path).expanduser() if spec.key_path else default_key_path(settings.output_path)


def owner_privacy(settings: Settings, topo, adapter, tokenizer, writer: ResultWriter, device="cpu"):
    """Rank 0: calibrate the clip on public text if asked, set up the noise key, record the attributes.

    With OS-seeded noise the key is kept at ``privacy.key_path`` (default: the owner's key folder, see
    :func:`~nesa_hpc.privacy.mechanism.default_key_path`; never next to the results, which workers can usually read)
    until the job completes, so a resumed run re-sends a replayed row with the same noise as before
    instead of releasing it a second time with fresh noise."""
    spec = settings.privacy
    clip = auto_clip(spec, adapter, tokenizer, topo.k, settings.max_length, device)
    key, path = None, key_file(settings)
    # a reopened file whose run got as far as its privacy set-up may have sent rows with its key
    resuming_key = spec.adds_noise and spec.seed is None and writer.reopened and not writer.was_complete \
        and "privacy_seed" in writer.file.attrs
    if resuming_key:
        if not path.is_file():
            raise ConfigError(f"output.resume=true with OS-seeded noise needs the noise key {path} "
                              "(privacy.key_path), written by the first run: without it, rows sent before the stop "
                              "would be released again with fresh noise. Restore the file, or start over with "
                              "output.overwrite=true")
        key = read_key(path)
    privacy = make_privacy(spec, topo.k, clip, key)  # without a key: a fresh one from the OS
    if spec.adds_noise and spec.seed is None and not resuming_key:
        path.unlink(missing_ok=True)  # the key of the file this run replaces
        write_key(path, privacy.key)
    writer.set_attrs(privacy.attrs())
    if spec.adds_noise:
        log.info("privacy: %s, unit %s, clip %s, sigma %.4g", spec.mechanism, privacy.attrs()["privacy_unit"],
                 "none" if privacy.clip is None else f"{privacy.clip:.4g}", privacy.sigma)
    return privacy


def spent(writer: ResultWriter, releases: int) -> dict:
    """The ledger's totals over every row in the file: worst-case epsilon and the most releases of a row."""
    eps = writer.file["epsilon_spent"][()]
    worst = float(np.max(eps)) if len(eps) else 0.0
    before = int(writer.file.attrs.get("privacy_releases", 0)) if writer.resumed_rows else 0
    return {"privacy_epsilon_spent": worst, "privacy_releases": max(before, releases)}


def chat(tokenizer, text):
    """Wrap one prompt as a user message in the tokenizer's chat template, ready for the assistant's reply
    (``data.chat_template=true``; see :func:`nesa_hpc.io.inputs.chat_text`)."""
    if not isinstance(text, str) or not text:
        return text
    return chat_text(tokenizer, [{"role": "user", "content": text}], generation_prompt=True)


def row_fields(settings: Settings, adapter=None) -> RowFields:
    """What a row of ``data.path`` holds, from the ``data.*`` options."""
    positions = position_limit(adapter.config) if adapter is not None else None
    limit = positions - settings.max_length if positions else None
    kept = settings.top_logprobs if settings.task == "generate" and settings.token_logprobs else None
    return RowFields(settings.text_field, settings.messages_field, settings.prompt_field, settings.completion_field,
                     openai=settings.data_format == "openai_batch", max_new_tokens=limit, id_field=settings.id_field,
                     embed=settings.task == "embed",
                     logprobs=kept, prompt_logprobs=settings.head == "owner")


def rows_from(data_path: str, settings: Settings, first: int, rows: range | None, tokenizer=None, adapter=None):
    """(row, text or Request) of the input from row ``first`` on, and only this shard's rows when sharded;
    with ``tokenizer``, chats are rendered by its chat template (a row the template refuses is a RowError)."""
    fields = row_fields(settings, adapter)
    if rows is None:
        todo = ((r, t) for r, t in read_rows(data_path, settings.data_format, settings.text_field,
                                             settings.on_error, fields) if r >= first)
    else:
        # a bad row of another shard is that shard's to report: read every row, let make_batches judge ours
        todo = read_rows(data_path, settings.data_format, settings.text_field, "skip", fields)
        todo = itertools.takewhile(lambda rt: rt[0] < rows.stop, ((r, t) for r, t in todo if r >= first))
    if tokenizer is None:
        return todo
    generation_prompt = settings.task == "generate"

    def rendered(row, item):
        try:
            return row, render(tokenizer, item, generation_prompt)
        except ValueError as exc:
            return row, RowError(f"{data_path}: row {row}: {exc}")

    return (rendered(r, t) for r, t in todo)


def rows_to_count(path: str, settings: Settings) -> int | None:
    """Rows in the input, for the progress bar (None when the file cannot be counted)."""
    try:
        return count_rows(path, settings.data_format)
    except DataError:
        return None
