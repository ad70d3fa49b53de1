"""Job set-up shared by every MPI job (infer, train, audit, bench): logging, error agreement between ranks,
device, model folder, topology, this rank's modules, the transport, and the end of a job.

:func:`start_job` is the one path from a composed config to a :class:`Job` (settings, device, adapter
skeleton, topology) on every rank; a failure that one rank sees ends every rank with :class:`JobError`.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Settings, settings_from_cfg
from ..errors import UserError
from ..models.sentence import embed_settings
from ..models.weights import build_adapter, packaged_model_path
from ..preflight import model_problem
from . import trace
from .placement import describe_device, launcher_local_rank, node_local_rank, pick_device
from .topology import Topology, make_topology
from .transport import MpiTransport, PeerFailure, TorchTransport, TransportTimeout

__all__ = ["EXIT_STOPPED", "EXIT_LOST_RANK", "JobError", "USER_ERRORS", "Job", "start_job", "setup_logging", "agree",
           "all_ok", "settle", "stop_requested", "message", "model_folder", "rank_modules", "make_transport",
           "transport_name", "peak_rss_mb", "gather_stats", "share_exit_code", "run_main", "rank_stats", "threads_for",
           "takes_turns", "stopped_at_startup", "serve_worker", "log_rank_stats"]

# Exit status of a job stopped early by SIGTERM/SIGUSR1 (EX_TEMPFAIL: rerun with output.resume=true).
EXIT_STOPPED = 75
# Exit status of a job that lost a rank (dead, hung or cut off: no progress within runtime.timeout, or MPI
# reported the peer gone). The committed rows are kept and the job can resume on other hosts; the line
# LOST_RANK_LINE tells slurm/step.sh to requeue it (an MPI abort's own status does not reach srun).
EXIT_LOST_RANK = 76
LOST_RANK_LINE = f"a rank was lost; the job can resume (exit {EXIT_LOST_RANK})"
# Seconds a rank that ends the job with MPI_Abort waits first, so that the launcher forwards its error line.
ABORT_GRACE_S = 0.5

log = logging.getLogger("nesa_hpc")

# Errors that are the user's to fix: reported as one line, no traceback. A bare ValueError or KeyError is
# an internal bug and keeps its traceback; user-facing errors subclass one of these.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, PermissionError, TransportTimeout, PeerFailure)


class JobError(RuntimeError):
    """A failure already reported by the rank that saw it; every rank raises it to exit together."""


def setup_logging(rank: int, device: torch.device | None = None) -> None:
    host = socket.gethostname()
    handler = logging.StreamHandler(sys.stderr)
    where = f" {device}" if device is not None else ""
    handler.setFormatter(logging.Formatter(f"[nesa_hpc r{rank}@{host}{where}] %(message)s"))
    root = logging.getLogger("nesa_hpc")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False


def message(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text or type(exc).__name__


def settle(comm, most: float = 0.02) -> None:
    """Wait until every rank of ``comm`` reaches this point, sleeping between polls. MPICH's blocking
    collectives poll at full speed: ranks waiting in one while another rank computes (reading the data,
    writing results, the first layers' backward) would take cores from it where ranks share cores. Called
    before the job's collectives, so that they meet ranks that are all there."""
    if comm is None or comm.Get_size() == 1:
        return
    request, nap = comm.Ibarrier(), 0.0002
    while not request.Test():
        time.sleep(nap)
        nap = min(2 * nap, most)


def agree(comm, fn: Callable[[], object], root: int = 0, share: bool = True):
    """Run ``fn`` on ``root``; if it fails, every rank raises the same error. With ``share`` its result
    is broadcast to every rank, else only ``root`` gets it (the others get None)."""
    result, error = None, None
    if comm.Get_rank() == root:
        try:
            result = fn()
        except USER_ERRORS as exc:
            error = message(exc)
    settle(comm)
    shared, error = comm.bcast((result if share else None, error), root=root)
    if error is not None:
        raise JobError(error)
    return shared if share else result


def all_ok(comm, fn: Callable[[], object]):
    """Run ``fn`` on every rank; if any rank fails, every rank raises with the first failure's message."""
    result, error = None, None
    try:
        result = fn()
    except USER_ERRORS as exc:
        error = f"rank {comm.Get_rank()} ({socket.gethostname()}): {message(exc)}"
    settle(comm)
    errors = [e for e in comm.allgather(error) if e]
    if errors:
        raise JobError(errors[0])
    return result


def threads_for(settings: Settings, local_size: int, turns: bool = False) -> int:
    """``runtime.threads``, or this node's cores shared evenly by its ``local_size`` ranks; with ``turns``
    (the ranks compute one after another) every core of the node."""
    if settings.threads:
        return settings.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if turns else max(1, cores // local_size)


def takes_turns(settings: Settings, size: int, local_size: int) -> bool:
    """``runtime.turns``, or its default: on for ``task=generate`` when every rank computes on the CPU of one
    node. Ranks that share a node's cores then run one generation lane by turns, each with all the cores:
    a decode step reads every weight once per forward, so on a CPU one forward of all the rows with all
    the cores beats one lane per rank with a share of them (docs/benchmarks.md)."""
    if settings.turns is not None:
        return settings.turns
    return settings.task == "generate" and size > 1 and local_size == size and \
        settings.device == "cpu" and settings.owner_device == "cpu"


def model_folder(settings: Settings) -> str:
    """``model.path`` (checked), or the packaged model's folder."""
    if settings.model_path:
        problem = model_problem(settings.model_path)
        if problem:
            raise FileNotFoundError(problem)
        return str(Path(settings.model_path).expanduser().resolve())
    return str(packaged_model_path(settings.model_packaged))


def rank_modules(rank: int, topo: Topology, adapter, task: str) -> list[str]:
    """This rank's modules: embeddings (+ head, + tail layers) on the owner, its layer block on a worker."""
    names: list[str] = []
    layers = list(topo.layers_of(rank)) + (list(topo.tail) if rank == 0 else [])
    names += adapter.stage_modules  # the family's forward runs them around any part (small)
    if rank == 0:
        names += adapter.embed_modules
    names += [adapter.layer_module(i) for i in layers]
    if topo.head_rank() == rank:
        if task in ("score", "generate"):
            names += adapter.head_modules
    return names


def transport_name(settings: Settings) -> str:
    if settings.transport == "mpi":
        return "mpi"
    return f"torch ({'nccl' if settings.device == 'cuda' else 'gloo'})"


def make_transport(comm, settings: Settings, device: torch.device, local_rank: int, local_size: int, on_recv,
                   hosts: list[str]):
    """The ``runtime.transport`` backend, started on every rank (a failure anywhere ends every rank)."""
    if settings.transport == "mpi":
        return MpiTransport(comm, settings.timeout, on_recv, hosts, device, settings.cuda_aware_mpi)
    # NCCL when the workers compute on GPUs: then every rank, the owner included, sends from its GPU
    wire = all_ok(comm, lambda: pick_device(settings.device, local_rank, local_size))
    transport = TorchTransport(comm, wire, settings.timeout, on_recv, hosts)
    all_ok(comm, lambda: TorchTransport.check_backend(wire))
    address = agree(comm, lambda: transport.start_store(hosts))
    all_ok(comm, lambda: transport.connect(*address))
    all_ok(comm, transport.join)
    return transport


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Job:
    """What every rank knows once the job is set up: who it is, where it computes, the model and the split."""

    comm: object
    rank: int
    size: int
    settings: Settings
    device: torch.device
    local_rank: int
    local_size: int
    folder: str
    adapter: object
    topo: Topology
    hosts: list[str]
    places: list[tuple[str, int, str]]
    head_cost: float
    turns: bool = False  # generation: the ranks run one lane by turns, each with all the node's cores

    def transport(self, on_recv=None):
        """The transport between the ranks (None at world size 1: the owner drives an in-process pipe)."""
        if self.size == 1:
            return None
        return make_transport(self.comm, self.settings, self.device, self.local_rank, self.local_size, on_recv,
                              self.hosts)

    def log_layout(self, what: str, head_cost: float | None = None) -> None:
        """Rank 0: one line for the job, one per rank (host, pid, device, layers, expected share of work)."""
        if self.rank != 0:
            return
        topo, s = self.topo, self.settings
        log.info("%s %s: %d layers, world size %d, split.k=%d, head on %s, transport %s", what, self.folder,
                 topo.num_layers, self.size, s.k, "rank 0 (owner)" if topo.head == "owner"
                 else f"rank {topo.last} (last worker)", transport_name(s) if self.size > 1 else "none")
        costs = topo.stage_costs(head_cost) if head_cost is not None else None
        for (host, pid, where), line in zip(self.places, topo.describe(costs), strict=True):
            log.info("  %s [%s pid %d, %s]", line, host, pid, where)


def start_job(cfg, comm, head_task: str | None = None, costs: Callable[[float], tuple] | None = None) -> Job:
    """Settings, threads, device, model folder, adapter skeleton and topology, agreed by every rank.
    ``head_task`` (score, embed or generate; default ``task.name``) prices the head for
    ``split.partition=balanced``; ``costs(head_cost)`` returns (head cost, (front, worker, tail) layer
    costs) when a job weighs stages otherwise than inference (training)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    setup_logging(rank)
    settings = all_ok(comm, lambda: settings_from_cfg(cfg))
    local_rank, local_size = node_local_rank(comm)
    turns = takes_turns(settings, size, local_size)
    torch.set_num_threads(threads_for(settings, local_size, turns))
    if settings.trace:
        trace.start()
    kind = settings.owner_device if rank == 0 else settings.device
    option = "runtime.owner_device" if rank == 0 and settings.device != kind else "runtime.device"
    device = all_ok(comm, lambda: pick_device(kind, local_rank, local_size, option))
    setup_logging(rank, device)
    hint = launcher_local_rank()
    if hint is not None and hint != local_rank and device.type == "cuda":
        log.warning("the launcher says node-local rank %d, MPI says %d: using %s", hint, local_rank, device)
    folder = agree(comm, lambda: model_folder(settings))
    settings = agree(comm, lambda: embed_settings(settings, folder))  # sentence-transformers' own defaults
    adapter = all_ok(comm, lambda: build_adapter(folder))
    head_task = head_task or settings.task
    head_cost = adapter.head_cost(head_task) if settings.head_cost is None else settings.head_cost
    layer_costs = (1.0, 1.0, 1.0)
    if costs is not None:
        head_cost, layer_costs = costs(head_cost)
    topo = all_ok(comm, lambda: make_topology(adapter.num_layers, settings.k, size, settings.head,
                                              settings.partition, head_cost, settings.owner_tail, layer_costs))
    settle(comm)
    places = comm.allgather((socket.gethostname(), os.getpid(), describe_device(device)))
    return Job(comm, rank, size, settings, device, local_rank, local_size, folder, adapter, topo,
               [h for h, _, _ in places], places, head_cost, turns)


def rank_stats(rank: int, stats, transport, wall: float) -> dict:
    """One rank's figures for the summary: compute, waits, idle share, memory, micro-batches, bytes sent."""
    waits = transport.wait_seconds if transport else {"recv": 0.0, "send": 0.0}
    return {"rank": rank, "host": socket.gethostname(), "compute_s": round(stats.compute_s, 3),
            "wait_input_s": round(waits["recv"], 3), "wait_send_s": round(waits["send"], 3),
            "idle_share": round(max(0.0, 1 - stats.compute_s / wall), 3) if wall > 0 else 0.0,
            "peak_rss_mb": round(peak_rss_mb(), 1), "threads": torch.get_num_threads(), "batches": stats.batches,
            "peak_activation_mb": round(stats.peak_saved_bytes / 2**20, 3),
            "bytes_sent": transport.bytes_sent if transport else 0}


def gather_stats(comm, mine: dict | None, trace_path: str | None = None) -> list[dict]:
    """The workers' figures, gathered on rank 0 (which passes None and gets the list; the others get []).
    When the ranks record a timeline (``runtime.trace``), their spans come along and rank 0 writes them to
    ``trace_path`` (:mod:`nesa_hpc.engine.trace`)."""
    spans = trace.take()
    gathered = [(mine, spans)]
    if comm.Get_size() > 1:
        settle(comm)
        gathered = comm.gather((mine, spans), root=0)
    if comm.Get_rank() != 0:
        return []
    if trace_path and spans is not None:  # rank 0's own figures (``mine``) are None: its host is this one
        trace.write(trace_path, [(r, s["host"] if s else socket.gethostname(), events)
                                 for r, (s, events) in enumerate(gathered)])
        log.info("timeline of every rank -> %s", trace_path)
    return [s for s, _ in gathered if s is not None]


def share_exit_code(comm, code: int | None) -> int:
    """Rank 0's exit code, on every rank (the last collective of a job)."""
    if comm.Get_size() == 1:
        return int(code)
    settle(comm)
    return int(comm.bcast(code, root=0))


def stopped_at_startup(comm, before: str, resume: str) -> dict | None:
    """The summary of a job that a stop signal ended during start-up (exit 75), or None to go on. A
    collective: every rank calls it at the same point, ``before`` anything of the job was written."""
    signal_name = stop_requested(comm)
    if signal_name is None:
        return None
    if comm.Get_rank() == 0:
        log.warning("stopped by %s during start-up, before %s; rerun (with %s) to start", signal_name, before,
                    resume)
    return {"exit_code": EXIT_STOPPED, "stopped_by": signal_name}


def serve_worker(job: Job, stage, transport) -> dict:
    """A worker's job once its stage is built: answer messages until rank 0 stops the pipeline, send its
    figures to rank 0, and end with rank 0's exit code (raising :class:`JobError` when rank 0 reported an
    error). The caller closes the transport."""
    from .stage import serve

    start = time.perf_counter()
    stats = serve(stage, transport)
    gather_stats(job.comm, rank_stats(job.rank, stats, transport, time.perf_counter() - start))
    code = share_exit_code(job.comm, None)
    if code == 2:
        raise JobError("reported by rank 0")
    return {"exit_code": code}


def log_rank_stats(ranks: list[dict]) -> None:
    """Rank 0: one line per rank of where its time went."""
    for r in ranks:
        log.info("rank %d (%s): compute %.2f s, waiting for input %.2f s, waiting to send %.2f s, idle %.0f%%, "
                 "peak RSS %.0f MB", r["rank"], r["host"], r["compute_s"], r["wait_input_s"], r["wait_send_s"],
                 100 * r["idle_share"], r["peak_rss_mb"])


def stop_requested(comm) -> str | None:
    """The stop signal any rank has received so far (SIGTERM/SIGUSR1, caught from the entry script's
    first line), or None. A collective: every rank calls it at the same point of start-up."""
    from . import stopsignal

    settle(comm)
    return next((s for s in comm.allgather(stopsignal.received()) if s), None)


def _abort(comm, code: int) -> None:
    """End every rank of the job with ``code``, once this rank's last lines have left: the launcher stops
    reading a rank's output when it tears the job down, and the error line is the one the user needs."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_S)
    comm.Abort(code)


def run_main(cfg, job: Callable[..., dict], comm=None) -> None:
    """The entry-point body of every MPI job: run ``job(cfg, comm)`` on every rank of ``comm`` (default
    ``MPI.COMM_WORLD``), exit with its ``exit_code``; a user error ends every rank with exit 2 and one line,
    anything else with a traceback."""
    from mpi4py import MPI

    comm = comm or MPI.COMM_WORLD
    try:
        summary = job(cfg, comm)
    except JobError as exc:
        if comm.Get_rank() == 0:
            logging.getLogger("nesa_hpc").error("error: %s", exc)
        sys.stderr.flush()
        sys.exit(2)
    except (TransportTimeout, PeerFailure) as exc:
        logging.getLogger("nesa_hpc").error("error: %s; %s", message(exc), LOST_RANK_LINE)
        _abort(comm, EXIT_LOST_RANK)
    except USER_ERRORS as exc:
        # Seen by one rank only (e.g. a bad row read by rank 0 mid-run): end every rank now.
        logging.getLogger("nesa_hpc").error("error: %s", message(exc))
        _abort(comm, 2)
    except BaseException:
        logging.getLogger("nesa_hpc").exception("rank %d failed", comm.Get_rank())
        _abort(comm, 1)
    else:
        from . import stopsignal

        stopsignal.ignore()  # the job is over on this rank: a late stop signal must not change its exit
        sys.exit(summary["exit_code"])
