"""``run(cfg)``: what every rank of an inference job (score, embed, generate) does, from the composed config
to the results file, and ``main``, the entry-point body of every MPI job."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ..config import Settings
from ..engine.control import Progress, SkipLog, StopFlag
from ..engine.job import (
    EXIT_STOPPED,
    JobError,
    agree,
    all_ok,
    gather_stats,
    log_rank_stats,
    rank_modules,
    rank_stats,
    run_main,
    serve_worker,
    share_exit_code,
    start_job,
    stopped_at_startup,
)
from ..engine.owner import Owner, check_finite, run_stream
from ..engine.stage import LocalPipe, Stage
from ..io.batch import Batch, make_batches, prefetch
from ..io.read import DataError, sample_path
from ..io.results import InOrder, ResultWriter
from ..models.lora import check_adapter_use
from ..models.weights import DTYPES, load_modules
from ..privacy.denoiser import owner_denoiser
from .files import (
    chat,
    check_generate,
    check_owner_paths,
    check_task,
    key_file,
    load_tokenizer,
    open_results,
    owner_privacy,
    replay_start,
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
    stopped = stopped_at_startup(comm, "the results file was opened", "output.resume=true")
    if stopped is not None:
        return stopped
    plan = _plan(cfg, job)
    try:
        all_ok(comm, lambda: load_modules(job.adapter, job.folder, rank_modules(job.rank, job.topo, job.adapter,
                                                                                 job.settings.task),
                                          job.settings.model_dtype, job.device))
        if job.settings.model_adapters:
            _apply_adapters(job)
        denoiser = agree(comm, lambda: owner_denoiser(job.settings, job.adapter, job.topo, job.device), share=False)
        transport = job.transport(on_recv)
    except JobError:
        if plan.writer is not None:
            plan.writer.discard()
        raise
    wire_dtype = DTYPES[job.settings.wire_dtype] if job.settings.wire_dtype else None
    stop = StopFlag()  # workers too: they ignore SIGTERM/SIGUSR1, rank 0 drains the pipeline and stops them
    try:
        if job.rank != 0:
            stage = Stage.of_rank(job.rank, job.topo, job.adapter, job.device, plan.task, wire_dtype)
            return serve_worker(job, stage, transport)
        owner = _owner(job, plan, denoiser, transport, wire_dtype)
        summary = _OwnerRun(job, plan, owner, stop).run()
    finally:
        stop.restore()
        if transport is not None:
            transport.close()
    share_exit_code(comm, summary["exit_code"])
    if "error" in summary:
        raise JobError(summary["error"])
    return summary


def row_batches(settings: Settings, tokenizer, data_path: str, todo, on_skip) -> Iterator[Batch]:
    """The micro-batches of the rows ``todo`` ((row, text or request) in input order), as the job batches them."""
    generate = settings.task == "generate"
    if generate and settings.chat_template:
        todo = ((r, chat(tokenizer, t)) for r, t in todo)
    # generation pads on the left, so that every prompt ends at the last column
    padding = "left" if generate else settings.padding_side
    return make_batches(todo, tokenizer, settings.batch_size, settings.max_length, padding, str(data_path),
                        settings.bucket_window, settings.on_error, settings.on_long, on_skip, settings.convention)


def check_resumed_rows(settings: Settings, stored: dict[int, bytes], data_path: str, rows: range | None,
                       tokenizer, adapter) -> None:
    """A results file being resumed against ``data.path`` as it is now: every committed row (``stored``: row
    -> its ``row_digest``) must still read and tokenize as it did, else the resumed file would mix the results
    of two inputs. Rank 0 reads and tokenizes the committed rows again (no model runs); DataError names the
    first changed row."""
    end, start, t0 = max(stored) + 1, rows.start if rows is not None else 0, time.perf_counter()
    todo = itertools.takewhile(lambda item: item[0] < end, rows_from(data_path, settings, start, rows, tokenizer,
                                                                     adapter))
    for batch in row_batches(settings, tokenizer, data_path, todo, lambda row, why: None):
        for row, digest in zip(batch.rows.tolist(), batch.digests(), strict=True):
            if stored.get(row, digest) != digest:
                raise DataError(f"output.resume=true: row {row} of data.path {data_path} is not the row the results "
                                f"file {settings.output_path} holds (its tokens or request changed since): resume "
                                "needs the same input; write a new file for the new input")
    log.info("resume: the %d committed rows match data.path (%.1f s)", len(stored), time.perf_counter() - t0)


@dataclass
class _Plan:
    """What an inference job works on, agreed by every rank before any weight is loaded; the tokenizer, EOS
    ids, shard rows and results file exist on rank 0 only."""

    task: object
    data_path: str
    tokenizer: object = None
    eos: frozenset[int] = frozenset()
    rows: range | None = None
    writer: ResultWriter | None = None


def _plan(cfg: DictConfig, job) -> _Plan:
    comm, settings, adapter, topo, folder = job.comm, job.settings, job.adapter, job.topo, job.folder
    task = all_ok(comm, lambda: make_task(settings.task, topo.head_rank() == 0, settings.pooling,
                                          settings.normalize, settings))
    all_ok(comm, lambda: check_task(settings, adapter))
    # rank 0 alone reads text: it loads the tokenizer once, for every check and for the data
    tokenizer = agree(comm, lambda: load_tokenizer(folder), share=False)
    eos = frozenset()
    if settings.task == "generate":
        agree(comm, lambda: check_generate(settings, adapter, folder, tokenizer))
        eos = eos_token_ids(tokenizer, folder, adapter.config) if job.rank == 0 else eos
    data_path = settings.data_path or str(sample_path())
    job.log_layout("model", job.head_cost)
    # with data.num_shards > 1, rank 0 counts the input rows to find this shard's block
    rows = agree(comm, lambda: shard_rows(settings, data_path), share=False)
    agree(comm, lambda: check_owner_paths(settings, job.hosts))
    # rank 0 opens (or reopens, to resume) the results file before any rank loads weights
    writer = agree(comm, lambda: open_results(
        cfg, settings, topo, adapter, task, folder, data_path, rows, eos,
        verify=lambda stored: check_resumed_rows(settings, stored, data_path, rows, tokenizer, adapter)), share=False)
    return _Plan(task, data_path, tokenizer, eos, rows, writer)


def _apply_adapters(job) -> None:
    """Merge ``model.adapters`` into every rank's layers and check that the adapter was used whole."""
    used, names = all_ok(job.comm, lambda: _load_adapters(job.settings, job.adapter, job.topo, job.rank))
    found = set().union(*job.comm.allgather(used))
    agree(job.comm, lambda: check_adapter_use(job.settings.model_adapters, found, names))


def _owner(job, plan: _Plan, denoiser, transport, wire_dtype) -> Owner:
    """Rank 0's ends of the pipeline, with its privacy transform (set up here: the results file records it)."""
    settings, topo, adapter, writer = job.settings, job.topo, job.adapter, plan.writer
    try:
        privacy = owner_privacy(settings, topo, adapter, plan.tokenizer, writer, job.device)
        if denoiser is not None:
            denoiser.check_noise(privacy.sigma)
            writer.set_attrs({"denoiser": settings.denoiser})
    except BaseException:
        writer.abort()
        raise
    pipe = transport or LocalPipe(Stage.in_owner(range(topo.k, topo.num_layers), adapter, job.device))
    return Owner(topo, adapter, privacy, pipe, job.device, wire_dtype, denoiser)


class _OwnerRun:
    """Rank 0 of an inference job: read, batch and drive the rows through the pipeline, write the results in
    input order (:meth:`on_result`), then the summary (:meth:`finish`)."""

    def __init__(self, job, plan: _Plan, owner: Owner, stop: StopFlag) -> None:
        self.job, self.settings, self.plan, self.owner, self.stop = job, job.settings, plan, owner, stop
        self.writer = plan.writer
        self.ledger = owner.privacy.ledger()
        self.committed = self.writer.next_row
        self.replay_from = replay_start(self.settings, self.writer)
        self.ordered = InOrder(self.writer, first_row=self.replay_from, keep_from=self.committed)
        self.skips = SkipLog()
        self.generate = self.settings.task == "generate"
        self.progress = Progress(self.settings.log_every, self._rows_to_do,
                                 "generated tokens" if self.generate else "tokens")
        self.done = {"rows": 0, "tokens": 0, "padded": 0, "releases": 0}
        self.start = time.perf_counter()

    def _rows_to_do(self) -> int | None:
        rows = self.plan.rows
        total = rows_to_count(self.plan.data_path, self.settings) if rows is None else rows.stop
        return None if total is None else total - self.replay_from

    def on_result(self, batch, outputs, bad) -> None:
        """Rows of ``batch`` are done: their columns go to the file in input order."""
        owner, done = self.owner, self.done
        self.skips.drain_into(self.ordered)  # rows the reader skipped before this batch was read
        cols = self.plan.task.finish(owner.adapter, batch, outputs)
        bad = check_finite(cols, bad, batch, owner.topo, self.settings.on_nonfinite)
        released = [owner.privacy.releases.pop(r, 0) for r in batch.rows.tolist()]
        cols.update(row=batch.rows.numpy(), truncated=batch.truncated.numpy(), nonfinite=bad.numpy() >= 0,
                    epsilon_spent=self.ledger.per_row(released),
                    row_digest=np.frombuffer(b"".join(batch.digests()), dtype=np.uint8).reshape(-1, 16))
        if self.settings.id_field:
            requests = batch.requests or [None] * batch.size
            cols["id"] = np.array([r.row_id if r is not None else "" for r in requests], dtype=object)
        done["releases"] = max(done["releases"], max(released, default=0))
        self.ordered.add(cols)
        done["rows"] += batch.size
        done["tokens"] += batch.tokens
        done["padded"] += batch.ids.numel()
        self.progress.update(batch.size, int(cols["n_generated"].sum()) if self.generate else batch.tokens)

    def run(self) -> dict:
        try:
            stats = self._drive(self._batches())
            stopped = stats.extra.get("stopped", False)
            if not stopped:
                self.skips.drain_into(self.ordered)
            if self.ordered.pending and not stopped:
                raise RuntimeError(f"{self.ordered.pending} rows finished but could not be written in input order")
        except BaseException:
            self.progress.close()
            _record_uncommitted(self.writer, self.owner.privacy, self.ledger)
            self.writer.abort()
            raise
        self.progress.close()
        return self.finish(stats, stopped)

    def _batches(self):
        settings, plan = self.settings, self.plan
        todo = rows_from(plan.data_path, settings, self.replay_from, plan.rows, plan.tokenizer, self.owner.adapter)
        return prefetch(row_batches(settings, plan.tokenizer, plan.data_path, todo, self.skips.add))

    def _drive(self, batches):
        settings, owner = self.settings, self.owner
        world = owner.topo.world_size
        if not self.generate:
            return run_stream(owner, self.plan.task, batches, self.on_result, settings.inflight or world + 1,
                              should_stop=self.stop)
        decoding = Decoding(settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p,
                            settings.seed, settings.stop, self.plan.eos, settings.ignore_eos, settings.hide_finish)
        lanes, capacity = settings.inflight or world, settings.batch_size
        if self.job.turns:  # the lanes' rows as one lane, which the ranks run by turns with all the cores
            lanes, capacity = 1, lanes * capacity
            log.info("runtime.turns: the ranks take turns with %d threads each on one lane of up to %d rows "
                     "(runtime.inflight x data.batch_size)", torch.get_num_threads(), capacity)
        return run_generate(owner, self.plan.task, batches, self.on_result, lanes, decoding,
                            self.plan.tokenizer, self.stop, capacity, settings.prefill_tokens)

    def finish(self, stats, stopped: bool) -> dict:
        """Close the results file with the run's figures; the summary (and its log line)."""
        settings, writer, done = self.settings, self.writer, self.done
        elapsed = time.perf_counter() - self.start
        ranks = [rank_stats(0, stats, self.owner.transport if self.owner.local is None else None, elapsed)] + \
            gather_stats(self.job.comm, None, settings.trace)
        waste = 1 - done["tokens"] / done["padded"] if done["padded"] else 0.0
        summary = {"rows": done["rows"], "tokens": done["tokens"], "seconds": round(elapsed, 3),
                   "tokens_per_s": round(done["tokens"] / elapsed, 1) if elapsed > 0 else 0.0,
                   "padding_waste": round(waste, 4), "exit_code": 0}
        final = {"seconds": elapsed, "padding_waste": waste, "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
                 "rank_stats": ranks, **writer.totals(), **spent(writer, done["releases"])}
        if self.generate:
            # tokens generated by this run (rows replayed on resume included), and the rate
            generated = stats.extra["generated"]
            summary["generated"] = final["generated_this_run"] = generated
            summary["generated_per_s"] = final["generated_per_s"] = generated / elapsed if elapsed else 0.0
            final.update(max_groups_in_flight=stats.extra["max_lanes"], max_rows_in_flight=stats.extra["max_rows"],
                         generation_steps=stats.extra["steps"], lane_splits=stats.extra["splits"], turns=self.job.turns)
        if stopped:
            summary["exit_code"] = EXIT_STOPPED
            final["stopped_by"] = self.stop.signal
            writer.close(final, complete=False)
            log.warning("stopped by %s after %d committed rows; rerun with output.resume=true to continue",
                        self.stop.signal, final["rows"])
            return summary
        if final["rows"] == 0:
            writer.abort()
            summary.update(exit_code=2, error=f"{self.plan.data_path}: the dataset has no usable rows "
                                              f"({final['skipped']} skipped)")
            return summary
        writer.close(final)
        key_file(settings).unlink(missing_ok=True)  # complete: nothing will be re-sent
        log_rank_stats(ranks)
        log.info("%s -> %s", self._done_line(summary, final, waste), settings.output_path)
        summary.update(ranks=ranks, output=settings.output_path)
        return summary

    def _done_line(self, summary: dict, final: dict, waste: float) -> str:
        line = (f"done: {summary['rows']} rows, {summary['tokens']} tokens in {summary['seconds']:.1f} s "
                f"({summary['tokens_per_s']:.1f} tokens/s, padding {100 * waste:.1f}%)")
        if self.generate:
            line += f", {summary['generated']} tokens generated ({summary['generated_per_s']:.1f}/s)"
        if "perplexity" in final:
            summary["perplexity"] = final["perplexity"]
            line += f", perplexity {final['perplexity']:.4f}"
        if final["skipped"]:
            line += f", {final['skipped']} rows skipped (see skipped_row / skipped_reason)"
        if self.writer.resumed_rows:
            line += f" (resumed after {self.writer.resumed_rows} rows; the file holds {final['rows']})"
        return line


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
