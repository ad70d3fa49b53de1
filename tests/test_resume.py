"""Kill or stop a real MPI run mid-way, resume it, and compare with an uninterrupted run row by row."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from conftest import ROOT, mpiexec, open_released, run_mpi

from nesa_hpc.io.results import read_results

INFER = str(ROOT / "jobs" / "infer.py")
ROWS = 500


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """Rows of 3 to 30 words. The interrupted runs are stopped after 100 rows, far from the end; a run's work is
    mostly rank 0's head (30522 logits per token), paid again by every full run of this module."""
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    path = tmp_path_factory.mktemp("resume") / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))})
                            + "\n" for _ in range(ROWS)))
    return path


def _args(model, data, out, *extra):
    return [INFER, f"model.path={model}", f"data.path={data}", f"output.path={out}", "runtime.threads=1",
            "data.batch_size=8", "data.bucket_window=64", *extra]


@pytest.fixture(scope="module")
def reference(tiny_models, long_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    proc = run_mpi(3, _args(tiny_models["llama"], long_data, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_results(out)[0]


def _start(args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # one stream: the launcher reports a dead process on stdout, the ranks log on stderr
    return subprocess.Popen([mpiexec(), "-n", "3", sys.executable, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_progress(proc, min_rows: int = 100) -> list[str]:
    """Read rank 0's log until it reports ``min_rows`` rows done (so the kill lands mid-run)."""
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "progress:" in line and int(line.split("progress:")[1].split("/")[0]) >= min_rows:
            return lines
    raise AssertionError("the run never reported progress:\n" + "".join(lines[-30:]))


def _rank_pid(proc, rank: int) -> int:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "infer.py" in " ".join(child.cmdline()) and child.environ().get("PMI_RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"rank {rank} not found")


def _finish(proc, timeout: float = 60) -> tuple[int, str]:
    start = time.monotonic()
    rest = proc.communicate(timeout=timeout)[0]
    assert time.monotonic() - start < timeout
    return proc.returncode, rest


def _assert_identical(out, reference):
    got, attrs = read_results(out)
    assert attrs["complete"] == True  # noqa: E712
    assert set(got) == set(reference)
    for name, values in reference.items():
        assert np.array_equal(got[name], values, equal_nan=values.dtype.kind == "f"), name


def _committed(out) -> int:
    with open_released(out) as f:
        assert f.attrs["complete"] == False  # noqa: E712
        n = len(f["row"])
        assert f["row"][()].tolist() == list(range(n))
        return n


@pytest.mark.parametrize("how", ["sigterm", "sigusr1", "kill-rank0", "kill-worker"])
def test_interrupt_then_resume_equals_uninterrupted(how, tiny_models, long_data, reference, tmp_path):
    out = tmp_path / "out.h5"
    args = _args(tiny_models["llama"], long_data, out, "runtime.log_every=0.05")
    proc = _start(args)
    started = _wait_for_progress(proc)
    if how.startswith("sig"):
        # mpiexec forwards it to every rank, as srun does
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGUSR1)
    else:
        victim = _rank_pid(proc, 0 if how == "kill-rank0" else 1)
        os.kill(victim, signal.SIGKILL)
    code, stderr = _finish(proc)
    assert code != 0
    if how.startswith("kill"):
        # either a surviving rank reports the broken peer, or the launcher reports a process of the job by
        # pid and host (rank 0's layer map ties every pid to a rank; it is not always the killed one: the
        # launcher names the first process it saw end, which can be one it stopped while cleaning up)
        pids = re.findall(r"\[\S+ pid (\d+), cpu\]", "".join(started))
        assert str(victim) in pids
        reported = re.findall(r"PID (\d+) RUNNING AT", stderr)
        assert (reported and reported[0] in pids) or "has probably exited or been killed" in stderr, stderr[-2000:]
    if how.startswith("sig"):
        name = how.upper()
        assert code == 75 and f"stopped by {name}" in stderr
        with open_released(out) as f:
            assert f.attrs["stopped_by"] == name
    committed = _committed(out)
    assert 0 < committed < ROWS
    resumed = run_mpi(3, [*args, "output.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed after {committed} rows" in resumed.stderr
    _assert_identical(out, reference)


def test_resume_refuses_other_settings_and_keeps_the_file(tiny_models, long_data, reference, tmp_path):
    """Other settings, or the same input path holding other rows: refused, the file untouched."""
    out, data = tmp_path / "out.h5", tmp_path / "rows.jsonl"
    original = long_data.read_text()
    data.write_text(original)
    proc = _start(_args(tiny_models["llama"], data, out, "runtime.log_every=0.05"))
    _wait_for_progress(proc)
    proc.send_signal(signal.SIGTERM)
    _finish(proc)
    before = out.read_bytes()
    bad = run_mpi(2, [*_args(tiny_models["llama"], data, out, "data.max_length=16"), "output.resume=true"])
    assert bad.returncode != 0
    assert "different configuration" in bad.stderr and "max_length: file has 512, this run 16" in bad.stderr
    assert out.read_bytes() == before
    # a committed row edited in the input (row 3): its results would no longer be its results
    lines = original.splitlines(keepends=True)
    lines[3] = json.dumps({"text": "an edited row"}) + "\n"
    data.write_text("".join(lines))
    edited = run_mpi(2, [*_args(tiny_models["llama"], data, out), "output.resume=true"])
    assert edited.returncode == 2 and "row 3 of data.path" in edited.stderr, edited.stderr[-3000:]
    assert out.read_bytes() == before
    data.write_text(original)
    # a different world size is fine: the rows do not depend on it
    ok = run_mpi(2, [*_args(tiny_models["llama"], data, out), "output.resume=true"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "committed rows match data.path" in ok.stderr
    _assert_identical(out, reference)


def test_resume_of_a_complete_file_changes_nothing(tiny_models, texts_file, tmp_path):
    out = tmp_path / "out.h5"
    args = _args(tiny_models["gpt2"], texts_file, out)
    assert run_mpi(2, args).returncode == 0
    first = read_results(out)[0]
    again = run_mpi(2, [*args, "output.resume=true"])
    assert again.returncode == 0, again.stderr[-3000:]
    got, attrs = read_results(out)
    assert attrs["complete"] == True and len(got["row"]) == 9  # noqa: E712
    assert all(np.array_equal(got[k], first[k]) for k in first)


def test_os_seeded_noise_keeps_its_key_until_the_job_completes(tiny_models, long_data, tmp_path):
    """A stopped job with OS-seeded noise leaves its key (mode 0600) for the resume, which re-sends replayed
    rows with the same noise; the key goes once the file is complete, and a resume without it is refused."""
    out = tmp_path / "out.h5"
    key = tmp_path / "owner" / "out.noise-key"  # privacy.key_path: rank 0's folder, not the results'
    noisy = ["privacy=gaussian", "privacy.epsilon=50", "privacy.clip=5.0", f"privacy.key_path={key}"]
    args = _args(tiny_models["llama"], long_data, out, "runtime.log_every=0.05", *noisy)
    proc = _start(args)
    _wait_for_progress(proc)
    proc.send_signal(signal.SIGTERM)
    code, _ = _finish(proc)
    assert code == 75
    assert key.is_file() and (key.stat().st_mode & 0o777) == 0o600 and len(key.read_bytes()) == 32
    assert (key.parent.stat().st_mode & 0o777) == 0o700 and not list(tmp_path.glob("*noise-key*"))
    committed = _committed(out)
    saved = key.read_bytes()
    key.unlink()
    refused = run_mpi(2, [*args, "output.resume=true"], own_launch=True)  # rank 0 alone sees it: an MPI abort
    assert refused.returncode != 0 and "privacy.key_path" in refused.stderr and "overwrite" in refused.stderr
    assert _committed(out) == committed
    key.write_bytes(saved)
    key.chmod(0o600)
    resumed = run_mpi(3, [*args, "output.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not key.exists()
    got, attrs = read_results(out)
    assert attrs["complete"] == True and got["row"].tolist() == list(range(ROWS))  # noqa: E712
    assert attrs["privacy_seed"] == "os" and np.allclose(got["epsilon_spent"], 50.0, rtol=1e-3)


def _catching(proc, ranks: int = 3, wait: float = 60) -> None:
    """Wait until each of the ``ranks`` ranks catches SIGUSR1 (jobs/infer.py's first line): before that, the
    signal would end a rank as its default action does, which no job can prevent."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        caught = 0
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "infer.py" in " ".join(child.cmdline()):
                    status = open(f"/proc/{child.pid}/status").read()
                    mask = int(status.split("SigCgt:")[1].split()[0], 16)
                    caught += bool(mask >> (signal.SIGUSR1 - 1) & 1)
            except (psutil.Error, OSError, IndexError):
                continue
        if caught == ranks:
            return
        time.sleep(0.02)
    raise AssertionError(f"the ranks did not install their signal handlers within {wait} s")


@pytest.mark.parametrize("delay", [0.3, 2.5])
def test_signal_during_start_up_stops_cleanly_then_resumes(delay, tiny_models, long_data, reference, tmp_path):
    """SIGUSR1 to mpiexec while the ranks import, load weights or connect: every rank ends with exit 75
    (not a crash), nothing is written, and the resumed run equals an uninterrupted one. The signal goes
    ``delay`` seconds after the launch, and not before every rank catches it (a loaded machine may start
    the ranks later than that)."""
    out = tmp_path / "out.h5"
    proc = _start(_args(tiny_models["llama"], long_data, out, "output.resume=true"))
    time.sleep(delay)
    _catching(proc)
    proc.send_signal(signal.SIGUSR1)
    code, text = _finish(proc, timeout=120)
    assert code == 75, text[-3000:]
    assert "stopped by SIGUSR1 during start-up" in text and "BAD TERMINATION" not in text, text[-3000:]
    assert not out.exists()
    resumed = run_mpi(3, _args(tiny_models["llama"], long_data, out, "output.resume=true"), timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_identical(out, reference)
