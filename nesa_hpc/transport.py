"""Point-to-point messages between ranks: a fixed int64 header, then one raw byte buffer per tensor.

Tensors travel as ``tensor.view(torch.uint8)`` with mpi4py's buffer API (no pickles: float16 and
bfloat16 have no MPI datatype, and pickling is an order of magnitude slower). Every wait polls with a
short sleep, so idle ranks yield the CPU to busy ones, and gives up after ``timeout`` seconds with an
error naming the peer instead of hanging.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import torch

__all__ = ["Kind", "Message", "MpiTransport", "TransportTimeout", "PeerFailure", "encode_header", "decode_header",
           "HEADER_LEN", "WIRE_DTYPES"]

HEADER_LEN = 64
_MAX_DIMS = 4
_SLOT = 2 + _MAX_DIMS  # dtype code, ndim, dims
MAX_TENSORS = (HEADER_LEN - 3) // _SLOT
_TAG_HEADER = 11
_TAG_DATA = 12

WIRE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
               torch.int8, torch.uint8, torch.bool]
_CODE = {dt: i for i, dt in enumerate(WIRE_DTYPES)}


class Kind(IntEnum):
    DATA = 1      # hidden states (B, T, H) + mask (B, T) + positions (B, T), owner -> workers
    RESULT = 2    # what the owner needs back from the last rank
    STOP = 3      # no more batches
    PREFILL = 4   # task=generate: a new group's prompts (states, mask, positions, marks, kept rows)
    DECODE = 5    # task=generate: one new position per row of a group
    FREE = 6      # task=generate: a group is finished; every stage drops its KV cache


class TransportTimeout(RuntimeError):
    """No progress on a message within the deadline (peer dead, hung, or cut off)."""


class PeerFailure(RuntimeError):
    """MPI reported a failed message: the peer rank has died or its connection broke."""


def encode_header(kind: int, batch_id: int, tensors: list[torch.Tensor]) -> np.ndarray:
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"a message carries at most {MAX_TENSORS} tensors, got {len(tensors)}")
    header = np.zeros(HEADER_LEN, dtype=np.int64)
    header[:3] = (int(kind), int(batch_id), len(tensors))
    for i, t in enumerate(tensors):
        if t.dim() > _MAX_DIMS:
            raise ValueError(f"a tensor on the wire has at most {_MAX_DIMS} dims, got {tuple(t.shape)}")
        off = 3 + i * _SLOT
        if t.dtype not in _CODE:
            raise ValueError(f"dtype {t.dtype} cannot travel on the wire (supported: {WIRE_DTYPES})")
        header[off] = _CODE[t.dtype]
        header[off + 1] = t.dim()
        header[off + 2: off + 2 + t.dim()] = t.shape
    return header


def decode_header(header: np.ndarray) -> tuple[int, int, list[tuple[torch.dtype, tuple[int, ...]]]]:
    kind, batch_id, n = (int(x) for x in header[:3])
    if not 0 <= n <= MAX_TENSORS:
        raise ValueError(f"corrupt message header: {n} tensors")
    specs = []
    for i in range(n):
        off = 3 + i * _SLOT
        code, ndim = int(header[off]), int(header[off + 1])
        if not (0 <= code < len(WIRE_DTYPES) and 0 <= ndim <= _MAX_DIMS):
            raise ValueError(f"corrupt message header: dtype code {code}, ndim {ndim}")
        shape = tuple(int(d) for d in header[off + 2: off + 2 + ndim])
        if any(d < 0 for d in shape):
            raise ValueError(f"corrupt message header: shape {shape}")
        specs.append((WIRE_DTYPES[code], shape))
    return kind, batch_id, specs


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().view(torch.uint8).reshape(-1).numpy()


@dataclass
class Message:
    kind: int
    batch_id: int
    tensors: list[torch.Tensor]


@dataclass
class Pending:
    """In-flight send: keeps its buffers alive until the requests complete."""

    requests: list
    buffers: list = field(default_factory=list)
    transport: MpiTransport | None = None
    peer: int = -1

    def wait(self) -> None:
        if self.transport is not None:
            self.transport._wait_all(self.requests, f"sending to rank {self.transport._peer(self.peer)}", "send")


class MpiTransport:
    """Header + raw buffers over an mpi4py communicator, with polling waits and a progress deadline."""

    def __init__(self, comm, timeout: float = 300.0, on_recv=None, hosts: list[str] | None = None) -> None:
        self.comm = comm
        self.hosts = hosts
        self.timeout = float(timeout)
        self.on_recv = on_recv  # optional hook(source, Message), used by tests to inspect traffic
        self.wait_seconds = {"recv": 0.0, "send": 0.0}  # time blocked waiting for input / for a send
        self.bytes_sent = 0

    def send(self, dest: int, kind: int, batch_id: int, tensors: list[torch.Tensor] = ()) -> Pending:
        """Start sending; returns a handle whose ``wait()`` completes the send."""
        from mpi4py import MPI

        tensors = [t.detach().cpu().contiguous() for t in tensors]
        header = encode_header(kind, batch_id, tensors)
        reqs = [self.comm.Isend([header, MPI.INT64_T], dest=dest, tag=_TAG_HEADER)]
        bufs = [header]
        for t in tensors:
            if t.numel():
                b = _bytes(t)
                reqs.append(self.comm.Isend([b, MPI.BYTE], dest=dest, tag=_TAG_DATA))
                bufs.append(b)
                self.bytes_sent += b.nbytes
        return Pending(reqs, bufs + tensors, self, dest)

    def recv(self, source: int) -> Message:
        """Receive one whole message from ``source`` (blocking, with the progress deadline)."""
        from mpi4py import MPI

        header = np.empty(HEADER_LEN, dtype=np.int64)
        req = self.comm.Irecv([header, MPI.INT64_T], source=source, tag=_TAG_HEADER)
        self._wait_all([req], f"waiting for rank {self._peer(source)}", "recv")
        kind, batch_id, specs = decode_header(header)
        tensors = [torch.empty(shape, dtype=dtype) for dtype, shape in specs]
        reqs = [self.comm.Irecv([_bytes(t), MPI.BYTE], source=source, tag=_TAG_DATA) for t in tensors if t.numel()]
        if reqs:
            self._wait_all(reqs, f"receiving data from rank {self._peer(source)}", "recv")
        msg = Message(kind, batch_id, tensors)
        if self.on_recv is not None:
            self.on_recv(source, msg)
        return msg

    def _test_all(self, requests: list, what: str) -> bool:
        from mpi4py import MPI

        try:
            return bool(MPI.Request.Testall(requests))
        except MPI.Exception as exc:
            raise PeerFailure(f"rank {self.comm.Get_rank()}: {what} failed ({exc.Get_error_string().strip()}); "
                              "that rank has probably exited or been killed") from None

    def _peer(self, rank: int) -> str:
        return f"{rank} on {self.hosts[rank]}" if self.hosts else str(rank)

    def _wait_all(self, requests: list, what: str, kind: str) -> None:
        from mpi4py import MPI

        start = time.monotonic()
        nap = 1e-5
        while not self._test_all(requests, what):
            now = time.monotonic()
            if now - start > self.timeout:
                for r in requests:
                    if r != MPI.REQUEST_NULL:
                        r.Cancel()
                raise TransportTimeout(f"rank {self.comm.Get_rank()}: no progress for {self.timeout:.0f} s "
                                       f"while {what} (runtime.timeout)")
            time.sleep(nap)
            nap = min(nap * 2, 1e-3)
        self.wait_seconds[kind] += time.monotonic() - start
