"""Where each rank computes: the CPU, or the GPU that matches its rank among the ranks of its node."""

from __future__ import annotations

import os
import socket

import torch

from ..errors import ConfigError

__all__ = ["node_local_rank", "pick_device", "describe_device"]

# Launcher hints for the node-local rank, checked against MPI's own answer (which is what counts).
_LOCAL_RANK_HINTS = ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK")


def node_local_rank(comm) -> tuple[int, int]:
    """(rank among the ranks on this node, ranks on this node), from an MPI shared-memory split: it needs no
    launcher variables and holds under srun, mpiexec and any mapping of ranks to nodes."""
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_rank(), local.Get_size()
    finally:
        local.Free()


def launcher_local_rank() -> int | None:
    """The node-local rank the launcher announces (Slurm, Open MPI, MPICH), if any."""
    for name in _LOCAL_RANK_HINTS:
        value = os.environ.get(name)
        if value is not None and value.isdigit():
            return int(value)
    return None


def pick_device(kind: str, local_rank: int, local_size: int, option: str = "runtime.device") -> torch.device:
    """``cpu``, or ``cuda:i`` with ``i = local_rank % visible GPUs`` (made the current CUDA device).

    With one GPU visible per rank (Slurm ``--gpus-per-task=1`` or ``--gpu-bind=single:1`` set
    CUDA_VISIBLE_DEVICES per task) every rank takes device 0 of its own list; with all of a node's GPUs
    visible, local rank i takes GPU i. More ranks than GPUs on a node share them round-robin. ``option``
    names the setting in errors.
    """
    if kind == "cpu":
        return torch.device("cpu")
    if kind != "cuda":
        raise ConfigError(f"{option}={kind!r} must be 'cpu' or 'cuda'")
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(f"{option}=cuda, but no GPU is usable on "
                          f"{socket.gethostname()}: torch {torch.__version__} is {built}"
                          f"{f', CUDA_VISIBLE_DEVICES={visible!r}' if visible is not None else ''}; "
                          "use runtime.device=cpu or ask Slurm for GPUs (--gpus-per-task=1)")
    count = torch.cuda.device_count()
    device = torch.device("cuda", local_rank % count)
    torch.cuda.set_device(device)
    return device


def describe_device(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)`` for the layer map and log lines."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"
