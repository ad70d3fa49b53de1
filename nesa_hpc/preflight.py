"""The entry scripts' first look at the files a job names, before torch, transformers or any model loads.

A missing input, an existing output or an unwritable folder ends every rank within about a second (MPI and
h5py start; nothing else does), with one line from rank 0 and exit status 2, where the job itself would
find it after its start-up. Rank 0 looks at its own files (``data.path``, ``output.path``; for training
``train.out_dir``); every rank looks for ``model.path``, which each of them reads. The job checks all of
this again, and more (the settings, the model, a resumed file's options): the checks here refuse only what
the job would refuse, with the same words.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["check_paths", "path_problems", "data_problem", "model_problem", "check_train_out"]


def data_problem(data_path) -> str | None:
    """What is wrong with ``data.path`` (None: nothing; a null path is the built-in sample)."""
    if data_path is None:
        return None  # the built-in sample rows
    path = Path(str(data_path))
    if not path.is_file():
        return f"data.path: no such file: {data_path}" + (" (a folder)" if path.is_dir() else "")
    if not os.access(path, os.R_OK):
        return f"data.path: {data_path} is not readable"
    return None


def _output(output) -> str | None:
    from .io.results import check_output_path

    path = output.get("path")
    if not path:
        return None
    if output.get("resume", False) is True and Path(str(path)).exists():
        return None  # reopened to resume: the job compares its options
    try:
        check_output_path(str(path), output.get("overwrite", False) is True)
    except OSError as exc:
        return str(exc)
    return None


def check_train_out(out: str | Path, resume: bool, overwrite: bool) -> None:
    """``train.out_dir`` against ``train.resume`` / ``train.overwrite``: FileNotFoundError when resuming a
    folder without a run, FileExistsError when a run is there and neither is set."""
    has_state = (Path(out) / "train.json").is_file()
    if resume:
        if not has_state:
            raise FileNotFoundError(f"train.resume=true: {out} holds no training run (no train.json)")
        return
    if has_state and not overwrite:
        raise FileExistsError(f"train.out_dir={out} already holds a training run; resume it with train.resume=true "
                              "or replace it with train.overwrite=true")


def _train_out(train) -> str | None:
    out, resume, overwrite = train.get("out_dir"), train.get("resume", False), train.get("overwrite", False)
    if not out or (resume and overwrite):  # the job names the contradiction
        return None
    try:
        check_train_out(str(out), resume is True, overwrite is True)
    except OSError as exc:
        return str(exc)
    return None


def model_problem(path) -> str | None:
    """What is wrong with ``model.path`` (None: nothing; a null path is the packaged model)."""
    if path and not Path(str(path)).expanduser().is_dir():
        return f"model.path: no such model folder: {Path(str(path)).expanduser()}"
    return None


def path_problems(cfg, config_name: str, rank: int) -> list[str]:
    """What rank ``rank`` finds wrong with the paths of ``cfg`` (a composed ``infer`` or ``train`` config)."""
    found = [model_problem((cfg.get("model") or {}).get("path"))]
    if rank == 0:
        found.append(data_problem((cfg.get("data") or {}).get("path")))
        if config_name == "train":
            found.append(_train_out(cfg.get("train") or {}))
        else:
            found.append(_output(cfg.get("output") or {}))
    return [p for p in found if p]


def check_paths(cfg, config_name: str) -> None:
    """Every rank of ``MPI.COMM_WORLD``: exit 2 together (rank 0 prints the first problem) when a path of
    ``cfg`` is wrong on some rank."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    try:
        mine = path_problems(cfg, config_name, rank)
    except Exception:  # an unusual value (a number for a path): the job's own checks name it
        mine = []
    everyone = comm.allgather(mine[:1])
    first = next(((r, p[0]) for r, p in enumerate(everyone) if p), None)
    if first is None:
        return
    if rank == 0:
        where = "" if first[0] == 0 else f"rank {first[0]}: "
        print(f"nesa_hpc: error: {where}{first[1]}", file=sys.stderr, flush=True)
    sys.exit(2)
