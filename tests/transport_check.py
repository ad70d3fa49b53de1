"""Both transports inside one MPI launch: raw messages, a receive deadline, and whole jobs compared.

    mpiexec -n 3 python tests/transport_check.py spec.json report.json

``spec.json``: {"device": "cpu" | "cuda", "cases": [[override, ...], ...]}. Every rank

1. sends rank 0 -> 1 -> 2 messages of every wire dtype (empty tensors included) over the torch transport
   (gloo on CPU, NCCL on CUDA), and rank 2 checks them against what rank 0 sent, bit for bit;
2. waits for a message that never comes, with a 1 s deadline, and records how long it took to fail;
3. runs every case as a job once with ``runtime.transport=mpi`` and once with ``runtime.transport=torch``.

Rank 0 writes the report: per-check results and, per case, the datasets that differ between transports.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from mpi4py import MPI

from nesa_hpc.engine.placement import node_local_rank, pick_device
from nesa_hpc.engine.transport import WIRE_DTYPES, MpiTransport, TorchTransport, TransportTimeout
from nesa_hpc.infer.job import run
from nesa_hpc.io.results import read_results

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _messages(device: torch.device) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for dtype in WIRE_DTYPES:
        if dtype.is_floating_point:
            t = torch.randn(2, 3, 5, generator=g).to(dtype)
        elif dtype == torch.bool:
            t = torch.rand(4, 6, generator=g) > 0.5
        else:
            t = torch.randint(-100 if dtype != torch.uint8 else 0, 100, (3, 7), generator=g).to(dtype)
        out.append([t.to(device), torch.empty(0, 4, dtype=dtype, device=device), t[:1].to(device)])
    return out


def _raw_messages(transport, rank: int, device: torch.device) -> str | None:
    """0 -> 1 -> 2: relay every message; rank 2 compares bytes with what rank 0 built."""
    messages = _messages(device)
    if rank == 0:
        pending = [transport.send_raw(1, 1, i, m) for i, m in enumerate(messages)]
        for p in pending:
            p.wait()
        return None
    for i, expected in enumerate(messages):
        kind, batch_id, tensors = transport.recv_raw(rank - 1)
        if rank == 1:
            transport.send_raw(2, kind, batch_id, tensors).wait()
            continue
        if batch_id != i or len(tensors) != len(expected):
            return f"message {i}: batch id {batch_id}, {len(tensors)} tensors"
        for got, want in zip(tensors, expected, strict=True):
            if got.dtype != want.dtype or got.shape != want.shape or got.device.type != device.type:
                return (f"message {i}: {got.dtype}{tuple(got.shape)} on {got.device}, "
                        f"want {want.dtype}{tuple(want.shape)}")
            if not torch.equal(got.cpu().view(torch.uint8), want.cpu().contiguous().view(torch.uint8)):
                return f"message {i}: the {want.dtype} bytes differ"
    return None


def _deadline(transport, rank: int) -> float | None:
    """Rank 1 waits for a message rank 0 never sends; returns seconds until TransportTimeout."""
    if rank != 1:
        return None
    transport.timeout = 1.0
    start = time.monotonic()
    try:
        transport.recv(0)
    except TransportTimeout:
        return time.monotonic() - start
    return -1.0


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    report_path = Path(sys.argv[2])
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    local, size = node_local_rank(comm)
    device = pick_device(spec["device"], local, size)
    report: dict = {}

    torch_t = TorchTransport(comm, device, timeout=60)
    address = comm.bcast(torch_t.start_store([MPI.Get_processor_name()] * comm.Get_size()) if rank == 0 else None)
    torch_t.connect(*address)
    comm.Barrier()
    torch_t.join()
    errors = comm.gather(_raw_messages(torch_t, rank, device), root=0) or []
    report["torch_messages"] = next((e for e in errors if e), None)
    report["torch_deadline_s"] = comm.gather(_deadline(torch_t, rank), root=0)
    torch_t.close()  # a timed-out receive leaves gloo's pair closed: a new group for the jobs
    comm.Barrier()

    mpi_t = MpiTransport(comm, timeout=60, device=device)
    errors = comm.gather(_raw_messages(mpi_t, rank, device), root=0) or []
    report["mpi_messages"] = next((e for e in errors if e), None)
    comm.Barrier()

    report["cases"] = []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for n, overrides in enumerate(spec["cases"]):
            files = {}
            for transport in ("mpi", "torch"):
                out = report_path.with_name(f"case{n}-{transport}.h5")
                cfg = compose(config_name="infer", overrides=[*overrides, f"runtime.transport={transport}",
                                                              f"runtime.device={spec['device']}",
                                                              f"output.path={out}", "output.overwrite=true"])
                run(cfg, comm)
                files[transport] = out
            if rank == 0:
                a, b = read_results(files["mpi"])[0], read_results(files["torch"])[0]
                differ = sorted(k for k in a if k not in b or not np.array_equal(
                    a[k], b[k], equal_nan=a[k].dtype.kind == "f"))
                report["cases"].append({"overrides": overrides, "rows": len(a["row"]), "differ": differ})
    if rank == 0:
        report_path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
