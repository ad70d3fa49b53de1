"""``run(cfg)``: what every rank of an inference job (score, embed, generate) does, from the composed config
to the results file, and ``main``, the entry-point body of every MPI job."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from ..engine.control import Progress, SkipLog, StopFlag
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
from ..engine.owner import Owner, check_finite, run_stream
from ..engine.stage import LocalPipe, Stage, serve
from ..io.data import make_batches, prefetch, sample_path
from ..io.results import InOrder, ResultWriter
from ..models.lora import check_adapter_use
from ..models.weights import DTYPES, load_modules
from ..privacy.denoiser import owner_denoiser
from .files import (
    chat,
    check_generate,
    check_task,
    key_file,
    load_tokenizer,
    open_results,
    owner_privacy,
    rows_from,
    rows_to_count,
    shard_rows,
    spent,
)
from .generate import Decoding, eos_token_ids, run_generate
from .tasks import make_task

__all__ = ["run", "main", "JobError", "EXIT_STOPPED"]

log = logging.getLogger("nesa_hpc")


def _load_adapters(settings, adapter, topo, rank: int) -> tuple[set[str], set[str]]:
    """Merge ``model.adapters`` (a peft LoRA folder, e.g. from jobs/train.py) into this rank's layers."""
    from ..models.lora import apply_adapters

    folder = Path(settings.model_adapters).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model.adapters: no such adapter folder: {folder}")
    return apply_adapters(adapter, folder, list(topo.layers_of(rank)) + (list(topo.tail) if rank == 0 else []))


def run(cfg: DictConfig, comm=None, on_recv=None) -> dict:
    """Run one inference job on every rank of ``comm`` (default ``MPI.COMM_WORLD``).

    Returns the summary on rank 0 and ``{"exit_code": ...}`` on the workers; ``exit_code`` is 0, or
    :data:`EXIT_STOPPED` when a SIGTERM/SIGUSR1 stopped the job early (rerun with ``output.resume=true``).
    Errors that every rank can see the same way (config, data, model folder, output file) end all ranks
    with :class:`JobError` before any work starts. ``on_recv(source, message)`` sees every message a
    worker receives (tests use it to check what crosses the wire).
    """
    from mpi4py import MPI

    comm = comm or MPI.COMM_WORLD
    job = start_job(cfg, comm)
    rank, settings, adapter, topo, folder = job.rank, job.settings, job.adapter, job.topo, job.folder
    if signal_name := stop_requested(comm):
        if rank == 0:
            log.warning("stopped by %s during start-up, before the results file was opened; rerun (with "
                        "output.resume=true) to start", signal_name)
        return {"exit_code": EXIT_STOPPED, "stopped_by": signal_name}
    task = all_ok(comm, lambda: make_task(settings.task, topo.head_rank() == 0, settings.pooling,
                                          settings.normalize, settings))
    all_ok(comm, lambda: check_task(settings, adapter))
    # rank 0 alone reads text: it loads the tokenizer once, for every check and for the data
    tokenizer = agree(comm, lambda: load_tokenizer(folder), share=False)
    eos = frozenset()
    if settings.task == "generate":
        agree(comm, lambda: check_generate(settings, adapter, folder, tokenizer))
        eos = eos_token_ids(tokenizer, folder, adapter.config) if rank == 0 else eos
    data_path = settings.data_path or str(sample_path())
    job.log_layout("model", job.head_cost)
    # with data.num_shards > 1, rank 0 counts the input rows to find this shard's block
    rows = agree(comm, lambda: shard_rows(settings, data_path), share=False)
    # rank 0 opens (or reopens, to resume) the results file before any rank loads weights
    writer = agree(comm, lambda: open_results(cfg, settings, topo, adapter, task, folder, data_path, rows, eos),
                   share=False)
    try:
        all_ok(comm, lambda: load_modules(adapter, folder, rank_modules(rank, topo, adapter, settings.task),
                                          settings.model_dtype, job.device))
        if settings.model_adapters:
            used, names = all_ok(comm, lambda: _load_adapters(settings, adapter, topo, rank))
            found = set().union(*comm.allgather(used))
            agree(comm, lambda: check_adapter_use(settings.model_adapters, found, names))
        denoiser = agree(comm, lambda: owner_denoiser(settings, adapter, topo, job.device), share=False)
        transport = job.transport(on_recv)
    except JobError:
        if writer is not None:
            writer.discard()
        raise
    stop = StopFlag()
    start = time.perf_counter()
    wire_dtype = DTYPES[settings.wire_dtype] if settings.wire_dtype else None
    if rank != 0:
        # workers ignore SIGTERM/SIGUSR1: rank 0 drains the pipeline and then tells them to stop
        stage = Stage.of_rank(rank, topo, adapter, job.device, task, wire_dtype)
        try:
            stats = serve(stage, transport)
        finally:
            stop.restore()
            transport.close()
        gather_stats(comm, rank_stats(rank, stats, transport, time.perf_counter() - start))
        code = share_exit_code(comm, None)
        if code == 2:
            raise JobError("reported by rank 0")
        return {"exit_code": code}
    try:
        try:
            privacy = owner_privacy(settings, topo, adapter, tokenizer, writer, job.device)
            if denoiser is not None:
                denoiser.check_noise(privacy.sigma)
                writer.set_attrs({"denoiser": settings.denoiser})
        except BaseException:
            writer.abort()
            raise
        pipe = transport or LocalPipe(Stage.in_owner(range(topo.k, topo.num_layers), adapter, job.device))
        owner = Owner(topo, adapter, privacy, pipe, job.device, wire_dtype, denoiser)
        summary = _run_owner(comm, settings, owner, task, folder, data_path, start, writer, stop, rows, tokenizer,
                             eos)
    finally:
        stop.restore()
        if transport is not None:
            transport.close()
    share_exit_code(comm, summary["exit_code"])
    if "error" in summary:
        raise JobError(summary["error"])
    return summary


def _run_owner(comm, settings, owner: Owner, task, folder: str, data_path: str, start: float,
               writer: ResultWriter, stop: StopFlag, rows: range | None, tokenizer, eos: frozenset[int]) -> dict:
    """Rank 0: read, batch and drive the rows through the pipeline; write results in input order."""
    topo, adapter, privacy = owner.topo, owner.adapter, owner.privacy
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
        total = rows_to_count(data_path, settings) if rows is None else rows.stop
        return None if total is None else total - replay_from

    generate = settings.task == "generate"
    progress = Progress(settings.log_every, rows_to_do, "generated tokens" if generate else "tokens")
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
        progress.update(batch.size, int(cols["n_generated"].sum()) if generate else batch.tokens)

    try:
        todo = rows_from(data_path, settings, replay_from, rows, tokenizer, adapter)
        if generate and settings.chat_template:
            todo = ((r, chat(tokenizer, t)) for r, t in todo)
        # generation pads on the left, so that every prompt ends at the last column
        padding = "left" if generate else settings.padding_side
        batches = prefetch(make_batches(todo, tokenizer, settings.batch_size, settings.max_length,
                                        padding, str(data_path), settings.bucket_window,
                                        settings.on_error, settings.on_long, skips.add))
        if generate:
            decoding = Decoding(settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p,
                                settings.seed, settings.stop, eos, settings.ignore_eos)
            stats = run_generate(owner, task, batches, on_result, settings.inflight or topo.world_size, decoding,
                                 tokenizer, stop, settings.batch_size, settings.prefill_tokens)
        else:
            stats = run_stream(owner, task, batches, on_result, settings.inflight or topo.world_size + 1,
                               should_stop=stop)
        stopped = stats.extra.get("stopped", False)
        if not stopped:
            skips.drain_into(ordered)
        if ordered.pending and not stopped:
            raise RuntimeError(f"{ordered.pending} rows finished but could not be written in input order")
    except BaseException:
        progress.close()
        _record_uncommitted(writer, privacy, ledger)
        writer.abort()
        raise
    progress.close()
    elapsed = time.perf_counter() - start
    transport = owner.transport if topo.world_size > 1 else None
    ranks = [rank_stats(0, stats, transport, elapsed)] + gather_stats(comm, None)
    waste = 1 - done["tokens"] / done["padded"] if done["padded"] else 0.0
    summary = {"rows": done["rows"], "tokens": done["tokens"], "seconds": round(elapsed, 3),
               "tokens_per_s": round(done["tokens"] / elapsed, 1) if elapsed > 0 else 0.0,
               "padding_waste": round(waste, 4), "exit_code": 0}
    final = {"seconds": elapsed, "padding_waste": waste, "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
             "rank_stats": ranks, **writer.totals(), **spent(writer, done["releases"])}
    if generate:
        # tokens generated by this run (rows replayed on resume included), and the rate
        summary["generated"] = final["generated_this_run"] = stats.extra["generated"]
        summary["generated_per_s"] = final["generated_per_s"] = stats.extra["generated"] / elapsed if elapsed else 0.0
        final["max_groups_in_flight"] = stats.extra["max_lanes"]
        final["max_rows_in_flight"] = stats.extra["max_rows"]
        final["generation_steps"] = stats.extra["steps"]
    if stopped:
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
    key_file(settings).unlink(missing_ok=True)  # complete: nothing will be re-sent
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


def _record_uncommitted(writer: ResultWriter, privacy, ledger) -> None:
    """A job that fails after sending rows it never committed still released them: the file says how many
    (``privacy_uncommitted_rows``, their most releases and the epsilon that spent). A resume re-sends them
    with the same noise (the same key), so they are not released again. Never raises (it runs on the way
    out of another error)."""
    left = {r: n for r, n in privacy.releases.items() if n > 0}
    if not privacy.spec.adds_noise or not left or not writer.file.id.valid:
        return
    most = max(left.values())
    try:
        writer.set_attrs({"privacy_uncommitted_rows": len(left), "privacy_uncommitted_releases": most,
                          "privacy_uncommitted_epsilon": ledger.epsilon(most)})
    except (OSError, RuntimeError, ValueError):
        pass
    log.warning("%d rows were sent (up to %d releases each, epsilon %.4g) but not committed before the job "
                "failed; recorded in privacy_uncommitted_rows", len(left), most, ledger.epsilon(most))


def main(cfg: DictConfig) -> None:
    """Entry point body of ``jobs/infer.py``: run the inference job on every rank and exit with its code."""
    run_main(cfg, run)
