"""Point-to-point messages between ranks: a fixed int64 header, then one raw byte buffer per tensor.

The messages themselves are the classes of :mod:`nesa_hpc.engine.messages`. Two backends share one
interface, :class:`Transport` (``send(dest, message)`` returns a handle with ``wait()``;
``recv(source)`` returns the message; ``bytes_sent``, ``wait_seconds``, ``close()``):

- :class:`MpiTransport`: ``tensor.view(torch.uint8)`` with mpi4py's buffer API (no pickles: float16
  and bfloat16 have no MPI datatype, and pickling is an order of magnitude slower). GPU tensors go
  straight to a CUDA-aware MPI, or are staged through pinned host memory. Either way a send waits only
  for the work that produced its tensors, never for the whole device: an event recorded on the
  producing (current) stream is synchronized before MPI reads GPU memory; staged copies run on the
  transport's own CUDA stream, which waits on that event, and a "copy done" event on that stream is
  synchronized before MPI reads the pinned buffer. A receive into GPU memory (CUDA-aware MPI) first
  waits for the work already queued on the current stream, since MPI writes outside stream order.
- :class:`TorchTransport`: ``torch.distributed`` point-to-point (NCCL between GPUs, gloo on CPUs), with
  the rendezvous done over MPI so users configure nothing. NCCL orders its own stream after the current
  stream, so a send does not synchronize the host with the GPU.

Every wait polls with a short sleep, so idle ranks yield the CPU to busy ones, and gives up after
``timeout`` seconds with an error naming the peer instead of hanging.
"""

from __future__ import annotations

import ctypes
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch

from ..errors import ConfigError
from . import trace
from .messages import Message, decode

__all__ = ["Transport", "MpiTransport", "TorchTransport", "TransportTimeout", "PeerFailure", "encode_header",
           "decode_header", "HEADER_LEN", "WIRE_DTYPES", "mpi_cuda_aware", "rendezvous_address"]

HEADER_LEN = 80  # int64s: kind, batch_id, count, then 12 tensor slots
_MAX_DIMS = 4
_SLOT = 2 + _MAX_DIMS  # dtype code, ndim, dims
MAX_TENSORS = (HEADER_LEN - 3) // _SLOT
_TAG_HEADER = 11
_TAG_DATA = 12

WIRE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
               torch.int8, torch.uint8, torch.bool]
_CODE = {dt: i for i, dt in enumerate(WIRE_DTYPES)}


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


def _bytes(t: torch.Tensor):
    """The tensor's bytes as a 1-D buffer: a NumPy view on the host, a uint8 CUDA tensor on a GPU (which
    mpi4py hands to a CUDA-aware MPI through DLPack / ``__cuda_array_interface__``)."""
    flat = t.detach().contiguous().view(torch.uint8).reshape(-1)
    return flat if flat.is_cuda else flat.numpy()


def mpi_cuda_aware() -> bool:
    """Whether the MPI library mpi4py loaded accepts GPU buffers (``MPIX_Query_cuda_support``, offered by
    MPICH and Open MPI builds with CUDA); False when the library cannot tell."""
    from mpi4py import MPI

    try:
        query = getattr(ctypes.CDLL(MPI.__file__), "MPIX_Query_cuda_support", None)
    except OSError:
        return False
    return bool(query()) if query is not None else False


class Transport:
    """What both backends share: the peers' hosts for messages, the progress deadline, the counters, the
    test hook, and turning received buffers back into a message. A backend implements
    ``send_raw(dest, kind, batch_id, tensors)`` (returns a handle with ``wait()``) and ``recv_raw(source)``
    -> (kind, batch_id, tensors): the header and the raw buffers."""

    def __init__(self, comm, timeout: float, on_recv=None, hosts: list[str] | None = None) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.hosts = hosts
        self.timeout = float(timeout)
        self.on_recv = on_recv  # optional hook(source, message), used by tests to inspect traffic
        self.wait_seconds = {"recv": 0.0, "send": 0.0}  # time blocked waiting for input / for a send
        self.bytes_sent = 0

    def send(self, dest: int, msg: Message):
        """Start sending ``msg`` to ``dest``; returns a handle whose ``wait()`` completes the send."""
        return self.send_raw(dest, msg.kind, msg.batch_id, msg.tensors)

    def recv(self, source: int) -> Message:
        """Receive one whole message from ``source`` (blocking, with the progress deadline)."""
        msg = decode(*self.recv_raw(source))
        if self.on_recv is not None:
            self.on_recv(source, msg)
        return msg

    def _peer(self, rank: int) -> str:
        return f"{rank} on {self.hosts[rank]}" if self.hosts else str(rank)

    def _poll(self, done, what: str, kind: str, cancel=None) -> None:
        """Wait until ``done()``, sleeping a little longer each time (an idle rank leaves the core to busy
        ones); after ``runtime.timeout`` seconds without it, ``cancel()`` and raise naming ``what``."""
        start = time.perf_counter()
        nap = 1e-5
        while not done():
            if time.perf_counter() - start > self.timeout:
                if cancel is not None:
                    cancel()
                raise TransportTimeout(f"rank {self.rank}: no progress for {self.timeout:.0f} s while {what} "
                                       "(runtime.timeout)")
            time.sleep(nap)
            nap = min(nap * 2, 1e-3)
        self._waited(kind, start, what)

    def _waited(self, kind: str, start: float, what: str) -> None:
        end = time.perf_counter()
        self.wait_seconds[kind] += end - start
        trace.span("wait for input" if kind == "recv" else "wait to send", "wait", start, end, what=what)

    def close(self) -> None:
        """Release what the backend holds (nothing by default)."""


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


class MpiTransport(Transport):
    """Header + raw buffers over an mpi4py communicator, with polling waits and a progress deadline."""

    def __init__(self, comm, timeout: float = 300.0, on_recv=None, hosts: list[str] | None = None,
                 device: torch.device | str = "cpu", cuda_aware: bool | None = None) -> None:
        super().__init__(comm, timeout, on_recv, hosts)
        # where this rank computes; with CUDA, GPU buffers go to MPI directly only if it is CUDA-aware
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        self.cuda_aware = on_gpu and (mpi_cuda_aware() if cuda_aware is None else bool(cuda_aware))
        self.pinned = on_gpu and not self.cuda_aware
        self._copy_streams: dict = {}  # CUDA device -> this transport's stream for device-to-host staging

    def send_raw(self, dest: int, kind: int, batch_id: int, tensors: list[torch.Tensor]) -> Pending:
        from mpi4py import MPI

        if any(t.is_cuda for t in tensors):
            tensors = self._outgoing_cuda(list(tensors))  # returns once MPI may read every buffer
        else:
            tensors = [self._outgoing(t) for t in tensors]
        header = encode_header(kind, batch_id, tensors)
        reqs = [self.comm.Isend([header, MPI.INT64_T], dest=dest, tag=_TAG_HEADER)]
        bufs = [header]
        for t in tensors:
            if t.numel():
                b = _bytes(t)
                reqs.append(self.comm.Isend([b, MPI.BYTE], dest=dest, tag=_TAG_DATA))
                bufs.append(b)
                self.bytes_sent += t.numel() * t.element_size()
        return Pending(reqs, bufs + tensors, self, dest)

    def _outgoing(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor as a buffer MPI can read (GPU tensors go through :meth:`_outgoing_cuda`)."""
        return t.detach().contiguous()

    def _copy_stream(self, device: torch.device):
        """This transport's side stream on ``device`` (created on first use), for device-to-host staging."""
        stream = self._copy_streams.get(device)
        if stream is None:
            stream = self._copy_streams[device] = torch.cuda.Stream(device=device)
        return stream

    def _outgoing_cuda(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Buffers MPI can read for a message holding GPU tensors; returns once their bytes are final.

        An event recorded on each device's current stream (where the tensors were produced) marks the
        point after which they hold their values. With a CUDA-aware MPI the (contiguous) GPU tensors are the
        buffers and that event is synchronized. Otherwise the transport's side stream waits on the event
        (a GPU-side wait: the producer stream goes on), copies each tensor into pinned host memory, and
        the event recorded after those copies is synchronized; the host waits for nothing else on the
        device. Host tensors in the message are used as they are."""
        tensors = [t.detach() for t in tensors]
        if self.cuda_aware:
            tensors = [t.contiguous() for t in tensors]  # any repacking runs on the producer stream, before the event
        ready = {}
        for t in tensors:
            if t.is_cuda and t.device not in ready:
                ready[t.device] = torch.cuda.Event()
                ready[t.device].record(torch.cuda.current_stream(t.device))
        if self.cuda_aware:
            for event in ready.values():
                event.synchronize()
            return tensors
        out = []
        for t in tensors:
            if not t.is_cuda:
                out.append(t.contiguous())
                continue
            side = self._copy_stream(t.device)
            if ready[t.device] is not None:
                side.wait_event(ready[t.device])  # once per device: the side stream starts after the producer
                ready[t.device] = None
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            with torch.cuda.stream(side):
                host.copy_(t, non_blocking=True)
            t.record_stream(side)  # the allocator keeps t's memory until the side stream is past the copy
            out.append(host)
        for device in ready:
            done = torch.cuda.Event()
            done.record(self._copy_stream(device))
            done.synchronize()  # the copies are done (and only they, and what they waited for)
        return out

    def _incoming(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if self.cuda_aware:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return torch.empty(shape, dtype=dtype, pin_memory=self.pinned)

    def recv_raw(self, source: int) -> tuple[int, int, list[torch.Tensor]]:
        """Tensors land on the host (pinned when this rank computes on a GPU), or on the GPU with a
        CUDA-aware MPI."""
        from mpi4py import MPI

        header = np.empty(HEADER_LEN, dtype=np.int64)
        req = self.comm.Irecv([header, MPI.INT64_T], source=source, tag=_TAG_HEADER)
        self._wait_all([req], f"waiting for rank {self._peer(source)}", "recv")
        kind, batch_id, specs = decode_header(header)
        tensors = [self._incoming(dtype, shape) for dtype, shape in specs]
        if self.cuda_aware and any(t.numel() for t in tensors):
            # MPI writes GPU memory outside any stream, but the caching allocator may have handed out memory
            # that kernels queued on the current stream still read: wait for them before MPI may write
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            done.synchronize()
        reqs = [self.comm.Irecv([_bytes(t), MPI.BYTE], source=source, tag=_TAG_DATA) for t in tensors if t.numel()]
        if reqs:
            self._wait_all(reqs, f"receiving data from rank {self._peer(source)}", "recv")
        return kind, batch_id, tensors

    def _test_all(self, requests: list, what: str) -> bool:
        from mpi4py import MPI

        try:
            return bool(MPI.Request.Testall(requests))
        except MPI.Exception as exc:
            raise PeerFailure(f"rank {self.comm.Get_rank()}: {what} failed ({exc.Get_error_string().strip()}); "
                              "that rank has probably exited or been killed") from None

    def _wait_all(self, requests: list, what: str, kind: str) -> None:
        from mpi4py import MPI

        def cancel() -> None:
            for r in requests:
                if r != MPI.REQUEST_NULL:
                    r.Cancel()

        self._poll(lambda: self._test_all(requests, what), what, kind, cancel)


def rendezvous_address(comm, hosts: list[str]) -> str:
    """The address other ranks use to reach rank 0: ``MASTER_ADDR`` when set; 127.0.0.1 when every rank is
    on rank 0's host; else rank 0's address on the route to the first other host."""
    import os

    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    others = [h for h in hosts if h != hosts[0]]
    if not others:
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(others[0]), 9))  # UDP: picks the route, sends nothing
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


class _TorchPending:
    """In-flight ``torch.distributed`` sends: keeps their buffers alive until ``wait()``."""

    def __init__(self, works: list, buffers: list, transport: TorchTransport, peer: int) -> None:
        self.works, self.buffers, self.transport, self.peer = works, buffers, transport, peer

    def wait(self) -> None:
        self.transport._wait_all(self.works, f"sending to rank {self.transport._peer(self.peer)}", "send")
        self.buffers = []


class TorchTransport(Transport):
    """The same messages over ``torch.distributed`` point-to-point: NCCL when ``device`` is a GPU, gloo on CPU.

    The process group spans ``comm``'s ranks. Rank 0 starts the rendezvous store on a free port and
    broadcasts its address over MPI, so no ``MASTER_ADDR``/``MASTER_PORT`` is needed (``MASTER_ADDR``,
    when set, overrides the address). Messages are an 80 x int64 header followed by one uint8 buffer per
    tensor, posted in order (NCCL and gloo match point-to-point operations between two ranks in order).
    Received tensors land on ``device``.
    """

    def __init__(self, comm, device: torch.device | str = "cpu", timeout: float = 300.0, on_recv=None,
                 hosts: list[str] | None = None) -> None:
        super().__init__(comm, timeout, on_recv, hosts)
        self.device = torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self._started = False

    @staticmethod
    def check_backend(device: torch.device) -> None:
        """Raise ValueError when this torch build lacks the backend the device needs."""
        import torch.distributed as dist

        if not dist.is_available():
            raise ConfigError("runtime.transport=torch: this torch build has no torch.distributed")
        if device.type == "cuda" and not dist.is_nccl_available():
            raise ConfigError(f"runtime.transport=torch with runtime.device=cuda needs NCCL, which this torch "
                             f"{torch.__version__} build lacks; use runtime.transport=mpi")
        if device.type == "cpu" and not dist.is_gloo_available():
            raise ConfigError(f"runtime.transport=torch on CPU needs gloo, which this torch {torch.__version__} "
                             "build lacks; use runtime.transport=mpi")

    def start_store(self, hosts: list[str]):
        """Rank 0: start the rendezvous store on a free port; returns (address, port) for the others."""
        import torch.distributed as dist

        self._store = dist.TCPStore("0.0.0.0", 0, self.comm.Get_size(), is_master=True, wait_for_workers=False,
                                    timeout=timedelta(seconds=self.timeout))
        return rendezvous_address(self.comm, hosts), self._store.port

    def connect(self, address: str, port: int) -> None:
        """Ranks other than 0: join rank 0's rendezvous store."""
        import torch.distributed as dist

        if self.rank == 0:
            return
        try:
            self._store = dist.TCPStore(address, port, self.comm.Get_size(), is_master=False,
                                        timeout=timedelta(seconds=self.timeout))
        except (RuntimeError, OSError) as exc:
            raise PeerFailure(f"cannot reach rank 0's rendezvous store at {address}:{port} "
                              f"({str(exc).splitlines()[0]}); set MASTER_ADDR to an address of rank 0's host "
                              "that the other nodes can reach") from None

    def join(self) -> None:
        """Every rank, once all hold the store: start the process group."""
        import torch.distributed as dist

        kwargs = {"device_id": self.device} if self.device.type == "cuda" else {}
        try:
            dist.init_process_group(self.backend, store=self._store, rank=self.rank,
                                    world_size=self.comm.Get_size(), timeout=timedelta(seconds=self.timeout),
                                    **kwargs)
        except RuntimeError as exc:
            raise PeerFailure(f"cannot start the {self.backend} process group "
                              f"({str(exc).splitlines()[0][:300]})") from None
        self._started = True

    def send_raw(self, dest: int, kind: int, batch_id: int, tensors: list[torch.Tensor]) -> _TorchPending:
        import torch.distributed as dist

        if self.device.type == "cuda":
            # no host synchronization: NCCL's stream waits for the current stream, where these copies are queued
            tensors = [self._to_gpu(t) for t in tensors]
            header = self._to_gpu(torch.from_numpy(encode_header(kind, batch_id, tensors)))
        else:
            tensors = [t.detach().to(self.device).contiguous() for t in tensors]
            header = torch.from_numpy(encode_header(kind, batch_id, tensors)).to(self.device)
        works = [dist.isend(header, dest)]
        bufs = [header, *tensors]
        for t in tensors:
            if t.numel():
                b = t.view(torch.uint8).reshape(-1)
                works.append(dist.isend(b, dest))
                bufs.append(b)
                self.bytes_sent += b.numel()
        return _TorchPending(works, bufs, self, dest)

    def _to_gpu(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on this rank's GPU, contiguous, without a host synchronization: a host tensor is copied
        through pinned memory with a non-blocking copy on the current stream (a copy from pageable memory
        would synchronize the stream); the pinned block is not reused before that copy is done."""
        t = t.detach()
        if not t.is_cuda:
            t = t.contiguous().pin_memory()
        return t.to(self.device, non_blocking=True).contiguous()

    def recv_raw(self, source: int) -> tuple[int, int, list[torch.Tensor]]:
        import torch.distributed as dist

        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self._wait_all([dist.irecv(header, source)], f"waiting for rank {self._peer(source)}", "recv")
        kind, batch_id, specs = decode_header(header.cpu().numpy())
        tensors = [torch.empty(shape, dtype=dtype, device=self.device) for dtype, shape in specs]
        works = [dist.irecv(t.view(torch.uint8).reshape(-1), source) for t in tensors if t.numel()]
        if works:
            self._wait_all(works, f"receiving data from rank {self._peer(source)}", "recv")
        return kind, batch_id, tensors

    def _wait_all(self, works: list, what: str, kind: str) -> None:
        start = time.perf_counter()
        try:
            if self.backend == "gloo":
                # gloo's point-to-point work reports completion only through wait(), which takes a deadline
                # and sleeps on a condition variable (no busy polling)
                for w in works:
                    w.wait(timedelta(seconds=max(1e-3, start + self.timeout - time.perf_counter())))
                self._waited(kind, start, what)
            else:
                self._poll(lambda: all(w.is_completed() for w in works), what, kind)  # NCCL: polls CUDA events
                for w in works:
                    w.wait()  # raises if the operation failed; orders the current stream after it
        except TransportTimeout:
            raise
        except RuntimeError as exc:
            text = str(exc)
            if "Timed out" in text or "timed out" in text:
                raise TransportTimeout(f"rank {self.rank}: no progress for {self.timeout:.0f} s while {what} "
                                       "(runtime.timeout)") from None
            raise PeerFailure(f"rank {self.rank}: {what} failed ({text.splitlines()[0][:300]}); that rank has "
                              "probably exited or been killed") from None

    def close(self) -> None:
        """Leave the process group (every rank calls it once the pipeline has drained)."""
        import torch.distributed as dist

        if self._started and dist.is_initialized():
            dist.destroy_process_group()
        self._started = False

