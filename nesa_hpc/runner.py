"""``run(cfg)``: what every rank of an inference job does, from the composed config to the results file."""

from __future__ import annotations

import itertools
import logging
import os
import resource
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import __version__
from .config import ConfigError, Settings, settings_from_cfg
from .control import Progress, SkipLog, StopFlag
from .data import DataError, RowError, count_rows, make_batches, prefetch, read_rows, sample_path, shard_range
from .generate import Decoding, eos_token_ids, run_generate_owner, run_generate_worker
from .lora import check_adapter_use
from .pipeline import check_finite, run_owner, run_worker
from .placement import describe_device, launcher_local_rank, node_local_rank, pick_device
from .privacy import PrivacySpec, calibrate_clip, make_privacy
from .public_text import load_texts
from .results import InOrder, ResultWriter
from .tasks import make_task
from .topology import make_topology
from .transport import MpiTransport, PeerFailure, TorchTransport, TransportTimeout
from .weights import DTYPES, build_adapter, load_modules, packaged_model_path

__all__ = ["run", "main", "JobError", "EXIT_STOPPED"]

# Exit status of a job stopped early by SIGTERM/SIGUSR1 (EX_TEMPFAIL: rerun with output.resume=true).
EXIT_STOPPED = 75

log = logging.getLogger("nesa_hpc")

# Errors that are the user's to fix: reported as one line, no traceback.
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, FileExistsError, PermissionError, ValueError, KeyError,
               TransportTimeout, PeerFailure)


class JobError(RuntimeError):
    """A failure already reported by the rank that saw it; every rank raises it to exit together."""


def _setup_logging(rank: int, device: torch.device | None = None) -> None:
    host = socket.gethostname()
    handler = logging.StreamHandler(sys.stderr)
    where = f" {device}" if device is not None else ""
    handler.setFormatter(logging.Formatter(f"[nesa_hpc r{rank}@{host}{where}] %(message)s"))
    root = logging.getLogger("nesa_hpc")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False


def _agree(comm, fn: Callable[[], object], root: int = 0, share: bool = True):
    """Run ``fn`` on ``root``; if it fails, every rank raises the same error. With ``share`` its result
    is broadcast to every rank, else only ``root`` gets it (the others get None)."""
    result, error = None, None
    if comm.Get_rank() == root:
        try:
            result = fn()
        except USER_ERRORS as exc:
            error = _message(exc)
    shared, error = comm.bcast((result if share else None, error), root=root)
    if error is not None:
        raise JobError(error)
    return shared if share else result


def _all_ok(comm, fn: Callable[[], object]):
    """Run ``fn`` on every rank; if any rank fails, every rank raises with the first failure's message."""
    result, error = None, None
    try:
        result = fn()
    except USER_ERRORS as exc:
        error = f"rank {comm.Get_rank()} ({socket.gethostname()}): {_message(exc)}"
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        raise JobError(errors[0])
    return result


def _message(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text or type(exc).__name__


def _threads(settings: Settings, comm) -> int:
    from mpi4py import MPI

    if settings.threads:
        return settings.threads
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local)


def _model_folder(settings: Settings) -> str:
    if settings.model_path:
        folder = Path(settings.model_path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"model.path: no such model folder: {folder}")
        return str(folder.resolve())
    return str(packaged_model_path(settings.model_packaged))


def _load_adapters(settings: Settings, adapter, topo, rank: int) -> tuple[set[str], set[str]]:
    """Merge ``model.adapters`` (a peft LoRA folder, e.g. from jobs/train.py) into this rank's layers."""
    from .lora import apply_adapters

    folder = Path(settings.model_adapters).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model.adapters: no such adapter folder: {folder}")
    return apply_adapters(adapter, folder, list(topo.layers_of(rank)) + (list(topo.tail) if rank == 0 else []))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(cfg: DictConfig, comm=None, on_recv=None) -> dict:
    """Run one inference job on every rank of ``comm`` (default ``MPI.COMM_WORLD``).

    Returns the summary on rank 0 and ``{"exit_code": ...}`` on the workers; ``exit_code`` is 0, or
    :data:`EXIT_STOPPED` when a SIGTERM/SIGUSR1 stopped the job early (rerun with ``output.resume=true``).
    Errors that every rank can see the same way (config, data, model folder, output file) end all ranks
    with :class:`JobError` before any work starts.
    """
    from mpi4py import MPI

    comm = comm or MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    _setup_logging(rank)
    settings = _all_ok(comm, lambda: settings_from_cfg(cfg))
    torch.set_num_threads(_threads(settings, comm))
    local_rank, local_size = node_local_rank(comm)
    kind = settings.owner_device if rank == 0 else settings.device
    option = "runtime.owner_device" if rank == 0 and settings.device != kind else "runtime.device"
    device = _all_ok(comm, lambda: pick_device(kind, local_rank, local_size, option))
    _setup_logging(rank, device)
    hint = launcher_local_rank()
    if hint is not None and hint != local_rank and device.type == "cuda":
        log.warning("the launcher says node-local rank %d, MPI says %d: using %s", hint, local_rank, device)

    folder = _agree(comm, lambda: _model_folder(settings))
    adapter = _all_ok(comm, lambda: build_adapter(folder))
    head_cost = adapter.head_cost(settings.task) if settings.head_cost is None else settings.head_cost
    topo = _all_ok(comm, lambda: make_topology(adapter.num_layers, settings.k, size, settings.head,
                                               settings.partition, head_cost, settings.owner_tail))
    task = _all_ok(comm, lambda: make_task(settings.task, topo.head_rank() == 0, settings.pooling,
                                           settings.normalize))
    _all_ok(comm, lambda: _check_task(settings, adapter))
    if settings.task == "generate":
        _agree(comm, lambda: _check_generate(settings, adapter, folder))
    data_path = settings.data_path or str(sample_path())
    places = comm.allgather((socket.gethostname(), os.getpid(), describe_device(device)))
    if rank == 0:
        log.info("model %s: %d layers, world size %d, split.k=%d, head on %s, transport %s", folder,
                 topo.num_layers, size, settings.k,
                 "rank 0 (owner)" if topo.head == "owner" else f"rank {topo.last} (last worker)",
                 _transport_name(settings) if size > 1 else "none")
        for (host, pid, where), line in zip(places, topo.describe(topo.stage_costs(head_cost)), strict=True):
            log.info("  %s [%s pid %d, %s]", line, host, pid, where)
    # with data.num_shards > 1, rank 0 counts the input rows to find this shard's block
    rows = _agree(comm, lambda: _shard_rows(settings, data_path), share=False)
    # rank 0 opens (or reopens, to resume) the results file before any rank loads weights
    writer = _agree(comm, lambda: _open_results(cfg, settings, topo, adapter, task, folder, data_path, rows),
                    share=False)

    try:
        _all_ok(comm, lambda: load_modules(adapter, folder, _rank_modules(rank, topo, adapter, settings.task),
                                           settings.model_dtype, device))
        if settings.model_adapters:
            used, names = _all_ok(comm, lambda: _load_adapters(settings, adapter, topo, rank))
            found = set().union(*comm.allgather(used))
            _agree(comm, lambda: check_adapter_use(settings.model_adapters, found, names))
        transport = _make_transport(comm, settings, device, local_rank, local_size, on_recv,
                                    [h for h, _, _ in places]) if size > 1 else None
    except JobError:
        if writer is not None:
            writer.discard()
        raise
    stop = StopFlag()
    start = time.perf_counter()

    wire_dtype = DTYPES[settings.wire_dtype] if settings.wire_dtype else None
    if rank != 0:
        try:  # workers ignore SIGTERM/SIGUSR1: rank 0 drains the pipeline and then tells them to stop
            if settings.task == "generate":
                stats = run_generate_worker(rank, topo, adapter, task, transport, wire_dtype)
            else:
                stats = run_worker(rank, topo, adapter, task, transport, wire_dtype, device)
        finally:
            stop.restore()
            transport.close()
        comm.gather(_rank_stats(rank, stats, transport, time.perf_counter() - start), root=0)
        code = comm.bcast(None, root=0)
        if code == 2:
            raise JobError("reported by rank 0")
        return {"exit_code": code}
    try:
        summary = _run_owner(comm, settings, topo, adapter, task, transport, folder, data_path, start, wire_dtype,
                             writer, stop, device, rows)
    finally:
        stop.restore()
        if transport is not None:
            transport.close()
    if size > 1:
        comm.bcast(summary["exit_code"], root=0)
    if "error" in summary:
        raise JobError(summary["error"])
    return summary


def _privacy_key(spec: PrivacySpec) -> dict:
    """The privacy settings a resumed run must share (the calibrated clip follows from them)."""
    return {"privacy_mechanism": spec.mechanism, "privacy_unit": spec.unit, "privacy_epsilon": spec.epsilon,
            "privacy_delta": spec.delta, "privacy_clip": spec.clip, "privacy_clip_percentile": spec.clip_percentile,
            "privacy_calibration_path": spec.calibration_path, "privacy_sigma": spec.sigma,
            "privacy_seed": "os" if spec.seed is None else spec.seed, "privacy_releases": spec.releases}


def _transport_name(settings: Settings) -> str:
    if settings.transport == "mpi":
        return "mpi"
    return f"torch ({'nccl' if settings.device == 'cuda' else 'gloo'})"


def _make_transport(comm, settings: Settings, device: torch.device, local_rank: int, local_size: int, on_recv,
                    hosts: list[str]):
    """The ``runtime.transport`` backend, started on every rank (a failure anywhere ends every rank)."""
    if settings.transport == "mpi":
        return MpiTransport(comm, settings.timeout, on_recv, hosts, device, settings.cuda_aware_mpi)
    # NCCL when the workers compute on GPUs: then every rank, the owner included, sends from its GPU
    wire = _all_ok(comm, lambda: pick_device(settings.device, local_rank, local_size))
    transport = TorchTransport(comm, wire, settings.timeout, on_recv, hosts)
    _all_ok(comm, lambda: TorchTransport.check_backend(wire))
    address = _agree(comm, lambda: transport.start_store(hosts))
    _all_ok(comm, lambda: transport.connect(*address))
    _all_ok(comm, transport.join)
    return transport


def _shard_rows(settings: Settings, data_path: str) -> range | None:
    """This job's input rows with ``data.num_shards > 1`` (None otherwise: every row)."""
    if settings.num_shards == 1:
        return None
    window = max(settings.bucket_window, settings.batch_size) if settings.bucket_window else settings.batch_size
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


def _resume_key(settings: Settings, folder: str, data_path: str, privacy_attrs: dict,
                rows: range | None = None) -> dict:
    """What must match for rows of two runs to be interchangeable (world size and partition need not).
    A shard also records which shard it is and its rows (so :mod:`nesa_hpc.merge` can check that shards
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
            **(_decoding_attrs(settings) if settings.task == "generate" else {})}


def _decoding_attrs(settings: Settings) -> dict:
    return {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature, "top_k": settings.top_k,
            "top_p": settings.top_p, "seed": settings.seed, "stop": list(settings.stop),
            "chat_template": settings.chat_template}


def _open_results(cfg, settings: Settings, topo, adapter, task, folder: str, data_path: str,
                  rows: range | None) -> ResultWriter:
    if not Path(data_path).is_file():
        raise DataError(f"data.path: no such file: {data_path}")
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
        "resume_key": _resume_key(settings, folder, data_path, _privacy_key(settings.privacy), rows),
        "device": settings.device, "owner_device": settings.owner_device, "transport": settings.transport,
    }
    if rows is not None:
        attrs.update(num_shards=settings.num_shards, shard=settings.shard, shard_rows=[rows.start, rows.stop])
    if settings.task == "embed":
        attrs.update(pooling=settings.pooling, normalize=settings.normalize)
    if settings.task == "generate":
        attrs.update(_decoding_attrs(settings), decoding="greedy" if settings.temperature == 0 else "sample",
                     padding_side="left", eos_token_ids=sorted(_generate_eos(settings, adapter, folder)))
    columns = {**task.columns(adapter.hidden_size), "epsilon_spent": (np.float64, ())}
    writer = ResultWriter(settings.output_path, columns, attrs, settings.overwrite, resume=settings.resume,
                          first_row=rows.start if rows is not None else 0)
    if writer.resumed_rows:
        log.info("resuming %s after %d committed rows", settings.output_path, writer.resumed_rows)
    return writer


def _check_task(settings: Settings, adapter) -> None:
    if settings.task in ("score", "generate") and not adapter.has_head:
        raise ConfigError(f"task={settings.task} needs a causal language model; {type(adapter.model).__name__} has "
                          "no LM head (use task=embed)")
    if settings.task == "generate" and "cuda" in (settings.device, settings.owner_device):
        raise ConfigError("task=generate runs on the CPU only (runtime.device=cpu, runtime.owner_device=cpu); "
                          "score and embed run on CUDA")


def _generate_eos(settings: Settings, adapter, folder: str) -> frozenset[int]:
    from transformers import AutoTokenizer

    return eos_token_ids(AutoTokenizer.from_pretrained(folder), folder, adapter.config)


def _check_generate(settings: Settings, adapter, folder: str) -> None:
    """Options of task=generate that depend on the model: chat template, position limit."""
    from transformers import AutoTokenizer

    limit = getattr(adapter.config, "max_position_embeddings", None) or getattr(adapter.config, "n_positions", None)
    if limit and settings.max_length + settings.max_new_tokens > limit:
        raise ConfigError(f"data.max_length={settings.max_length} + task.max_new_tokens={settings.max_new_tokens} "
                          f"exceeds the model's {limit} positions; lower one of them")
    if settings.chat_template and not AutoTokenizer.from_pretrained(folder).chat_template:
        raise ConfigError(f"data.chat_template=true but the tokenizer in {folder} has no chat template")


def _rank_modules(rank: int, topo, adapter, task: str) -> list[str]:
    """This rank's modules: embeddings (+ head, + tail layers) on the owner, its layer block on a worker."""
    names: list[str] = []
    layers = list(topo.layers_of(rank)) + (list(topo.tail) if rank == 0 else [])
    if rank == 0:
        names += adapter.embed_modules
    if layers:
        names += adapter.stage_modules
        names += [adapter.layer_module(i) for i in layers]
    if topo.head_rank() == rank:
        names += adapter.norm_modules
        if task in ("score", "generate"):
            names += adapter.head_modules
    return names


def _rank_stats(rank: int, stats, transport, wall: float) -> dict:
    waits = transport.wait_seconds if transport else {"recv": 0.0, "send": 0.0}
    return {"rank": rank, "host": socket.gethostname(), "compute_s": round(stats.compute_s, 3),
            "wait_input_s": round(waits["recv"], 3), "wait_send_s": round(waits["send"], 3),
            "idle_share": round(max(0.0, 1 - stats.compute_s / wall), 3) if wall > 0 else 0.0,
            "peak_rss_mb": round(_peak_rss_mb(), 1), "batches": stats.batches,
            "bytes_sent": transport.bytes_sent if transport else 0}


def _run_owner(comm, settings, topo, adapter, task, transport, folder, data_path, start, wire_dtype,
               writer: ResultWriter, stop: StopFlag, device: torch.device, rows: range | None) -> dict:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # rank 0 alone sees this: main() aborts every rank
        writer.abort()
        raise ValueError(f"cannot load the tokenizer from {folder}: {exc}") from None
    try:
        privacy = _owner_privacy(settings, topo, adapter, tokenizer, writer, device)
    except BaseException:
        writer.abort()
        raise
    ledger = privacy.ledger()
    committed = writer.next_row
    # Resume at the start of the batching window holding the first missing row, so every remaining row
    # lands in the same batch as in an uninterrupted run (identical results); rows of that window that
    # were already committed are recomputed but not written again.
    window = max(settings.bucket_window, settings.batch_size) if settings.bucket_window else settings.batch_size
    replay_from = committed if writer.was_complete else committed // window * window
    ordered = InOrder(writer, first_row=replay_from, keep_from=committed)
    skips = SkipLog()
    def rows_to_do() -> int | None:
        total = _count_rows(data_path, settings) if rows is None else rows.stop
        return None if total is None else total - replay_from

    progress = Progress(settings.log_every, rows_to_do)
    done = {"rows": 0, "tokens": 0, "padded": 0, "releases": 0}

    def on_result(batch, outputs, bad):
        skips.drain_into(ordered)  # rows the reader skipped before this batch was read
        cols = task.finish(adapter, batch, outputs)
        bad = check_finite(cols, bad, batch, topo, settings.on_nonfinite)
        released = [privacy.releases.pop(r, 0) for r in batch.rows.tolist()]
        cols.update(row=batch.rows.numpy(), truncated=batch.truncated.numpy(), nonfinite=bad.numpy() >= 0,
                    epsilon_spent=ledger.per_row(released))
        done["releases"] = max(done["releases"], max(released, default=0))
        ordered.add(cols)
        done["rows"] += batch.size
        done["tokens"] += batch.tokens
        done["padded"] += batch.ids.numel()
        progress.update(batch.size, batch.tokens)

    generate = settings.task == "generate"
    try:
        todo = _rows_from(data_path, settings, replay_from, rows)
        if generate and settings.chat_template:
            todo = ((r, _chat(tokenizer, t)) for r, t in todo)
        # generation pads on the left, so that every prompt ends at the last column
        padding = "left" if generate else settings.padding_side
        batches = prefetch(make_batches(todo, tokenizer, settings.batch_size, settings.max_length,
                                        padding, str(data_path), settings.bucket_window,
                                        settings.on_error, settings.on_long, skips.add))
        if generate:
            decoding = Decoding(settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p,
                                settings.seed, settings.stop, eos_token_ids(tokenizer, folder, adapter.config))
            groups = settings.inflight or topo.world_size
            stats = run_generate_owner(topo, adapter, privacy, task, batches, on_result, transport, groups, decoding,
                                       tokenizer, wire_dtype, should_stop=stop, max_rows=groups * settings.batch_size)
        else:
            stats = run_owner(topo, adapter, privacy, task, batches, on_result, transport,
                              settings.inflight or topo.world_size + 1, wire_dtype, should_stop=stop, device=device)
        if not stop():
            skips.drain_into(ordered)
        if ordered.pending and not stop():
            raise RuntimeError(f"{ordered.pending} rows finished but could not be written in input order")
    except BaseException:
        progress.close()
        writer.abort()
        raise
    progress.close()
    elapsed = time.perf_counter() - start
    ranks = [_rank_stats(0, stats, transport, elapsed)]
    if topo.world_size > 1:
        ranks += [r for r in comm.gather(None, root=0) if r is not None]
    waste = 1 - done["tokens"] / done["padded"] if done["padded"] else 0.0
    summary = {"rows": done["rows"], "tokens": done["tokens"], "seconds": round(elapsed, 3),
               "tokens_per_s": round(done["tokens"] / elapsed, 1) if elapsed > 0 else 0.0,
               "padding_waste": round(waste, 4), "exit_code": 0}
    final = {"seconds": elapsed, "padding_waste": waste, "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
             "rank_stats": ranks, **writer.totals(), **_spent(writer, done["releases"])}
    if generate:
        # tokens generated by this run (rows replayed on resume included), and the rate
        summary["generated"] = final["generated_this_run"] = stats.extra["generated"]
        summary["generated_per_s"] = final["generated_per_s"] = stats.extra["generated"] / elapsed if elapsed else 0.0
        final["max_groups_in_flight"] = stats.extra["max_groups"]
    if stop():
        summary["exit_code"] = EXIT_STOPPED
        final["stopped_by"] = stop.signal
        writer.close(final, complete=False)
        log.warning("stopped by %s after %d committed rows; rerun with output.resume=true to continue",
                    stop.signal, final["rows"])
        return summary
    if final["rows"] == 0:
        writer.abort()
        summary.update(exit_code=2, error=f"{data_path}: the dataset has no usable rows ({final['skipped']} skipped)")
        return summary
    writer.close(final)
    _key_file(settings.output_path).unlink(missing_ok=True)  # complete: nothing will be re-sent
    for r in ranks:
        log.info("rank %d (%s): compute %.2f s, waiting for input %.2f s, waiting to send %.2f s, idle %.0f%%, "
                 "peak RSS %.0f MB", r["rank"], r["host"], r["compute_s"], r["wait_input_s"], r["wait_send_s"],
                 100 * r["idle_share"], r["peak_rss_mb"])
    line = (f"done: {summary['rows']} rows, {summary['tokens']} tokens in {summary['seconds']:.1f} s "
            f"({summary['tokens_per_s']:.1f} tokens/s, padding {100 * waste:.1f}%)")
    if generate:
        line += f", {summary['generated']} tokens generated ({summary['generated_per_s']:.1f}/s)"
    if "perplexity" in final:
        summary["perplexity"] = final["perplexity"]
        line += f", perplexity {final['perplexity']:.4f}"
    if final["skipped"]:
        line += f", {final['skipped']} rows skipped (see skipped_row / skipped_reason)"
    if writer.resumed_rows:
        line += f" (resumed after {writer.resumed_rows} rows; the file holds {final['rows']})"
    log.info("%s -> %s", line, settings.output_path)
    summary["ranks"] = ranks
    summary["output"] = settings.output_path
    return summary


def _key_file(output_path: str) -> Path:
    return Path(f"{output_path}.noise-key")


def _owner_privacy(settings: Settings, topo, adapter, tokenizer, writer: ResultWriter, device="cpu"):
    """Rank 0: calibrate the clip on public text if asked, set up the noise key, record the attributes.

    With OS-seeded noise the key is kept next to the results (``<output.path>.noise-key``, mode 0600)
    until the job completes, so a resumed run re-sends a replayed row with the same noise as before
    instead of releasing it a second time with fresh noise."""
    spec = settings.privacy
    clip = None
    if spec.adds_noise and spec.clip == "auto":
        texts = load_texts(spec.calibration_path)
        clip = calibrate_clip(adapter, tokenizer, topo.k, spec.unit, spec.clip_percentile, texts,
                              max_length=settings.max_length, device=device)
        log.info("privacy.clip=auto: C = %.4g (percentile %g of %s norms at layer %d over %d public texts)",
                 clip, spec.clip_percentile, spec.unit, topo.k, len(texts))
    key, path = None, _key_file(settings.output_path)
    # a reopened file whose run got as far as its privacy set-up may have sent rows with its key
    resuming_key = spec.adds_noise and spec.seed is None and writer.reopened and not writer.was_complete \
        and "privacy_seed" in writer.file.attrs
    if resuming_key:
        if not path.is_file():
            raise ValueError(f"output.resume=true with OS-seeded noise needs {path}, written by the first run: "
                             "without it, rows sent before the stop would be released again with fresh noise. "
                             "Restore the file, or start over with output.overwrite=true")
        key = path.read_bytes()
    privacy = make_privacy(spec, topo.k, clip, key)  # without a key: a fresh one from the OS
    if spec.adds_noise and spec.seed is None and not resuming_key:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(privacy.key)
    writer.set_attrs(privacy.attrs())
    if spec.adds_noise:
        log.info("privacy: %s, unit %s, clip %s, sigma %.4g", spec.mechanism, privacy.attrs()["privacy_unit"],
                 "none" if privacy.clip is None else f"{privacy.clip:.4g}", privacy.sigma)
    return privacy


def _spent(writer: ResultWriter, releases: int) -> dict:
    """The ledger's totals over every row in the file: worst-case epsilon and the most releases of a row."""
    eps = writer.file["epsilon_spent"][()]
    worst = float(np.max(eps)) if len(eps) else 0.0
    before = int(writer.file.attrs.get("privacy_releases", 0)) if writer.resumed_rows else 0
    return {"privacy_epsilon_spent": worst, "privacy_releases": max(before, releases)}


def _chat(tokenizer, text):
    """Wrap one prompt as a user message in the tokenizer's chat template, ready for the assistant's reply."""
    if isinstance(text, RowError) or not text:
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def _rows_from(data_path: str, settings: Settings, first: int, rows: range | None):
    """(row, text) of the input from row ``first`` on, and only this shard's rows when sharded."""
    if rows is None:
        return ((r, t) for r, t in read_rows(data_path, settings.data_format, settings.text_field,
                                             settings.on_error) if r >= first)
    # a bad row of another shard is that shard's to report: read every row, let make_batches judge ours
    todo = read_rows(data_path, settings.data_format, settings.text_field, "skip")
    return itertools.takewhile(lambda rt: rt[0] < rows.stop, ((r, t) for r, t in todo if r >= first))


def _count_rows(path: str, settings: Settings) -> int | None:
    """Rows in the input when cheap to know (line-based formats, Parquet metadata); else None."""
    try:
        from .data import detect_format

        fmt = detect_format(Path(path), settings.data_format)
        if fmt in ("jsonl", "text"):
            with open(path, "rb") as fh:
                return sum(1 for _ in fh)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
    except Exception:
        return None
    return None


def main(cfg: DictConfig, job: Callable[..., dict] | None = None) -> None:
    """Entry point body for ``jobs/infer.py`` (and, with ``job``, the other MPI jobs): run ``job(cfg, comm)``
    (default :func:`run`), exit with its ``exit_code``, and end every rank cleanly on failure."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        summary = (job or run)(cfg, comm)
    except JobError as exc:
        if comm.Get_rank() == 0:
            logging.getLogger("nesa_hpc").error("error: %s", exc)
        sys.stderr.flush()
        sys.exit(2)
    except USER_ERRORS as exc:
        # Seen by one rank only (e.g. a bad row read by rank 0 mid-run): end every rank now.
        logging.getLogger("nesa_hpc").error("error: %s", _message(exc))
        sys.stderr.flush()
        comm.Abort(2)
    except BaseException:
        logging.getLogger("nesa_hpc").exception("rank %d failed", comm.Get_rank())
        sys.stderr.flush()
        comm.Abort(1)
    else:
        sys.exit(summary["exit_code"])
