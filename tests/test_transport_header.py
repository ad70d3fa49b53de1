"""Unit tests for the fixed int64 message header of nesa_hpc.engine.transport (no MPI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nesa_hpc.engine.messages import Kind
from nesa_hpc.engine.transport import HEADER_LEN, MAX_TENSORS, WIRE_DTYPES, decode_header, encode_header

INT64 = st.integers(-(2**63), 2**63 - 1)
shapes = st.lists(st.integers(0, 50), min_size=0, max_size=4).map(tuple)
specs = st.lists(st.tuples(st.sampled_from(WIRE_DTYPES), shapes), min_size=0, max_size=MAX_TENSORS)


def _tensors(spec_list):
    # the header only depends on dtype and shape: expand a scalar so no memory is allocated for the data
    return [torch.zeros((), dtype=dtype).expand(shape) for dtype, shape in spec_list]


def test_constants():
    assert HEADER_LEN == 80
    # every slot (dtype, ndim, 4 dims) plus kind, batch_id, count must fit in the header
    assert 3 + MAX_TENSORS * 6 <= HEADER_LEN
    from dataclasses import fields

    from nesa_hpc.engine.messages import MESSAGES

    # every message's tensors fit (the largest: a generation step's)
    assert max(len(fields(cls)) - 1 for cls in MESSAGES.values()) <= MAX_TENSORS == 12
    assert len(set(WIRE_DTYPES)) == len(WIRE_DTYPES)
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool):
        assert dt in WIRE_DTYPES


def test_round_trip_data_message():
    hidden = torch.zeros(2, 7, 48, dtype=torch.bfloat16)
    mask = torch.ones(2, 7, dtype=torch.int64)
    pos = torch.arange(7).expand(2, 7)
    header = encode_header(Kind.DATA, 5, [hidden, mask, pos])
    assert header.dtype == np.int64
    assert header.shape == (HEADER_LEN,)
    assert list(header[:3]) == [int(Kind.DATA), 5, 3]
    kind, batch_id, got = decode_header(header)
    assert kind == Kind.DATA
    assert batch_id == 5
    assert got == [(torch.bfloat16, (2, 7, 48)), (torch.int64, (2, 7)), (torch.int64, (2, 7))]


def test_stop_message_has_no_tensors():
    header = encode_header(Kind.STOP, -1, [])
    assert decode_header(header) == (int(Kind.STOP), -1, [])
    assert not header[3:].any()


def test_scalar_and_empty_tensors():
    ts = [torch.tensor(3.0), torch.empty(0, 5, dtype=torch.int8), torch.zeros(4, 0, dtype=torch.bool)]
    _, _, got = decode_header(encode_header(Kind.RESULT, 0, ts))
    assert got == [(torch.float32, ()), (torch.int8, (0, 5)), (torch.bool, (4, 0))]


@settings(max_examples=300, deadline=None)
@given(kind=INT64, batch_id=INT64, spec_list=specs)
def test_round_trip_property(kind, batch_id, spec_list):
    header = encode_header(kind, batch_id, _tensors(spec_list))
    assert header.shape == (HEADER_LEN,)
    assert header.dtype == np.int64
    got_kind, got_batch, got_specs = decode_header(header)
    assert got_kind == kind
    assert got_batch == batch_id
    assert got_specs == [(dtype, tuple(shape)) for dtype, shape in spec_list]
    # a header survives a copy through raw bytes (what MPI moves)
    copy = np.frombuffer(header.tobytes(), dtype=np.int64)
    assert decode_header(copy) == (got_kind, got_batch, got_specs)


def test_too_many_tensors():
    ts = [torch.zeros(1)] * (MAX_TENSORS + 1)
    with pytest.raises(ValueError, match=rf"at most {MAX_TENSORS} tensors, got {MAX_TENSORS + 1}"):
        encode_header(Kind.DATA, 0, ts)


def test_max_tensors_is_allowed():
    ts = [torch.zeros(1, 2, 3, 4, dtype=torch.float16)] * MAX_TENSORS
    _, _, got = decode_header(encode_header(Kind.DATA, 0, ts))
    assert got == [(torch.float16, (1, 2, 3, 4))] * MAX_TENSORS


@pytest.mark.parametrize("position", [0, 1])
def test_too_many_dims(position):
    ts = [torch.zeros(2, 2)]
    ts.insert(position, torch.zeros(1, 1, 1, 1, 2))
    with pytest.raises(ValueError, match=r"at most 4 dims, got \(1, 1, 1, 1, 2\)"):
        encode_header(Kind.DATA, 0, ts)


@pytest.mark.parametrize("n", [-1, MAX_TENSORS + 1, 2**40])
def test_decode_rejects_bad_count(n):
    header = np.zeros(HEADER_LEN, dtype=np.int64)
    header[2] = n
    with pytest.raises(ValueError, match=rf"corrupt message header: {n} tensors"):
        decode_header(header)


@pytest.mark.parametrize(("code", "ndim"), [(len(WIRE_DTYPES), 1), (-1, 1), (0, 5), (0, -1)])
def test_decode_rejects_bad_slot(code, ndim):
    header = np.zeros(HEADER_LEN, dtype=np.int64)
    header[2] = 1
    header[3], header[4] = code, ndim
    with pytest.raises(ValueError, match=rf"dtype code {code}, ndim {ndim}"):
        decode_header(header)


def test_decode_rejects_negative_dim():
    header = encode_header(Kind.DATA, 0, [torch.zeros(2, 3)])
    header[3 + 2 + 1] = -3
    with pytest.raises(ValueError, match=r"shape \(2, -3\)"):
        decode_header(header)


@settings(max_examples=500, deadline=None)
@given(values=st.lists(INT64, min_size=HEADER_LEN, max_size=HEADER_LEN),
       count=st.one_of(st.none(), st.integers(-1, MAX_TENSORS + 1)))
def test_corrupt_header_decodes_or_value_error(values, count):
    if count is not None:  # random int64 counts are nearly always out of range; also try plausible ones
        values[2] = count
    header = np.array(values, dtype=np.int64)
    try:
        kind, batch_id, got = decode_header(header)
    except ValueError:
        return
    assert kind == values[0] and batch_id == values[1]
    assert len(got) == values[2]
    for dtype, shape in got:
        assert dtype in WIRE_DTYPES
        assert len(shape) <= 4 and all(d >= 0 for d in shape)


@st.composite
def mostly_valid_headers(draw):
    """Valid headers with a few slots overwritten: exercises the in-range branches more than random data."""
    spec_list = draw(specs)
    header = encode_header(draw(INT64), draw(INT64), _tensors(spec_list))
    for _ in range(draw(st.integers(1, 4))):
        header[draw(st.integers(2, HEADER_LEN - 1))] = draw(st.integers(-8, 60))
    return header


@settings(max_examples=300, deadline=None)
@given(mostly_valid_headers())
def test_mutated_header_decodes_or_value_error(header):
    try:
        _, _, got = decode_header(header)
    except ValueError:
        return
    assert 0 <= len(got) <= MAX_TENSORS
    for dtype, shape in got:
        assert dtype in WIRE_DTYPES
        assert len(shape) <= 4 and all(d >= 0 for d in shape)


# --- MpiTransport.send with GPU tensors, on CPU: fakes for the CUDA stream/event API record what is
# synchronized, and in what order, against what MPI is handed (the real CUDA runs in scripts/gpu_check.sh).

class _FakeCuda(torch.Tensor):
    """A CPU tensor that says it lives on cuda:0; ``record_stream`` is logged."""

    log: list = []

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 0)

    def record_stream(self, stream):
        _FakeCuda.log.append(("record_stream", stream.name))


class _FakeStream:
    def __init__(self, name):
        self.name = name

    def wait_event(self, event):
        _FakeCuda.log.append(("wait_event", self.name, event.id))

    def synchronize(self):
        _FakeCuda.log.append(("stream_synchronize", self.name))


class _FakeEvent:
    count = 0

    def __init__(self, *args, **kwargs):
        _FakeEvent.count += 1
        self.id = _FakeEvent.count

    def record(self, stream=None):
        _FakeCuda.log.append(("record", self.id, stream.name if stream is not None else "current"))

    def synchronize(self):
        _FakeCuda.log.append(("event_synchronize", self.id))


class _FakeComm:
    @staticmethod
    def Get_rank():  # noqa: N802 - mpi4py's name
        return 0

    def Isend(self, buf, dest, tag):  # noqa: N802 - mpi4py's name
        data = buf[0]
        _FakeCuda.log.append(("Isend", tag, bytes(np.asarray(data).view(np.uint8))))
        return object()


@pytest.fixture()
def fake_cuda(monkeypatch):
    import contextlib

    pytest.importorskip("mpi4py")
    _FakeCuda.log = []
    compute = _FakeStream("compute")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream("side"))
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: _FakeCuda.log.append(("device_synchronize",)))

    @contextlib.contextmanager
    def stream(s):
        _FakeCuda.log.append(("enter", s.name))
        yield
        _FakeCuda.log.append(("exit", s.name))

    monkeypatch.setattr(torch.cuda, "stream", stream)
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            _FakeCuda.log.append(("pinned",))
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    return _FakeCuda.log


def _gpu_message():
    h = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    return [h.as_subclass(_FakeCuda), h.transpose(1, 2).as_subclass(_FakeCuda),
            torch.tensor([1, 0], dtype=torch.int8)]  # a host tensor may travel with GPU ones


def _index(log, entry):
    return next(i for i, e in enumerate(log) if e[:len(entry)] == entry)


@pytest.mark.parametrize("cuda_aware", [False, True])
def test_gpu_send_synchronizes_events_not_streams(fake_cuda, cuda_aware):
    from nesa_hpc.engine.transport import MpiTransport

    log = fake_cuda
    tr = MpiTransport(_FakeComm(), device="cuda", cuda_aware=cuda_aware)
    tensors = _gpu_message()
    expect = [t.as_subclass(torch.Tensor).contiguous() for t in tensors]
    tr.send_raw(1, Kind.DATA, 7, tensors)
    ops = [e[0] for e in log]
    assert "stream_synchronize" not in ops and "device_synchronize" not in ops
    ready = _index(log, ("record",))
    assert log[ready][2] == "compute"  # the producer's stream
    first_send = ops.index("Isend")
    sent = [e[2] for e in log if e[0] == "Isend"][1:]  # data buffers, in order, after the header
    assert sent == [t.numpy().tobytes() for t in expect]
    assert tr.bytes_sent == sum(t.numel() * t.element_size() for t in expect)
    if cuda_aware:  # MPI reads GPU memory: the producer's event is synchronized first; no copies, no side stream
        assert _index(log, ("event_synchronize", log[ready][1])) < first_send
        assert "pinned" not in ops and "enter" not in ops and not tr._copy_streams
        return
    # staged: the side stream waits on the producer's event, copies into pinned memory, and only the
    # event recorded on the side stream after the copies is synchronized before MPI reads the host buffers
    wait = _index(log, ("wait_event", "side", log[ready][1]))
    enters = [i for i, e in enumerate(log) if e == ("enter", "side")]
    done = next(i for i, e in enumerate(log) if e[0] == "record" and e[2] == "side")
    synced = [e[1] for e in log if e[0] == "event_synchronize"]
    assert ready < wait < enters[0] and len(enters) == 2 and ops.count("pinned") == 2
    assert [e for e in log if e[0] == "record_stream"] == [("record_stream", "side")] * 2
    assert max(enters) < done < _index(log, ("event_synchronize", log[done][1])) < first_send
    assert synced == [log[done][1]]
    assert ops.count("wait_event") == 1


def test_cpu_send_never_touches_cuda(fake_cuda):
    from nesa_hpc.engine.transport import MpiTransport

    tr = MpiTransport(_FakeComm(), device="cpu")
    t = torch.arange(6, dtype=torch.float32).view(2, 3).t()
    tr.send_raw(1, Kind.DATA, 0, [t])
    assert [e[0] for e in fake_cuda] == ["Isend", "Isend"]
    assert fake_cuda[1][2] == t.contiguous().numpy().tobytes()


def test_gpu_check_transport_step_runs_on_cpu(tmp_path):
    """scripts/gpu_check.sh's transport self-check (scripts/gpu_reference.py transport) on host buffers: the
    step the GPU run starts with keeps up with the transport's interface."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_reference.py"), "transport", str(tmp_path),
                           "--device", "cpu"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "transport.json").read_text()) == {"ok": True, "problems": [], "modes": ["host"],
                                                                      "device": "cpu"}
