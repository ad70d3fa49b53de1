"""A cut network link (the process stays alive) ends the job within runtime.timeout, on simulated hosts.

Two network namespaces joined by a veth pair stand for two hosts; MPICH runs over TCP between them
(ofi/tcp, no shared memory). The test cuts the link mid-run with `ip link set ... down`: MPI itself
does not notice for minutes, so the pipeline's own progress deadline must end the job.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, mpiexec, open_released

TIMEOUT = 8
NS = [f"nesa{os.getpid()}a", f"nesa{os.getpid()}b"]
ADDR = ["10.77.0.1", "10.77.0.2"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _link_ready(ns: str, dev: str) -> bool:
    out = subprocess.run(["ip", "-n", ns, "addr", "show", "dev", dev], capture_output=True, text=True).stdout
    return "LOWER_UP" in out and "state UP" in out and "tentative" not in out


@pytest.fixture()
def two_hosts():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("simulated hosts need root and iproute2 (ip netns)")
    try:
        for ns in NS:
            _ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"network namespaces are not available here: {exc.stderr.decode().strip()}")
    try:
        for ns in NS:  # no IPv6 duplicate address detection: the links' addresses are usable at once
            for conf in ("all", "default"):
                subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{conf}.accept_dad=0"],
                               capture_output=True)
        _ip("link", "add", "nesa-v0", "netns", NS[0], "type", "veth", "peer", "name", "nesa-v1", "netns", NS[1])
        for i, ns in enumerate(NS):
            _ip("-n", ns, "addr", "add", f"{ADDR[i]}/24", "dev", f"nesa-v{i}")
            _ip("-n", ns, "link", "set", f"nesa-v{i}", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        # MPI picks its address during MPI_Init, under a second after the job starts: wait until both ends
        # of the link are up and running and no address is tentative (else libfabric's tcp provider finds no
        # usable interface, advertises 127.0.0.1, and the ranks of the other host retry it forever)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(_link_ready(ns, f"nesa-v{i}") for i, ns in enumerate(NS)):
            time.sleep(0.2)
        yield
    finally:
        for ns in NS:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _tx_bytes() -> int:
    out = subprocess.run(["ip", "-n", NS[1], "-s", "link", "show", "nesa-v1"], capture_output=True, text=True).stdout
    lines = out.splitlines()
    return int(lines[lines.index(next(line for line in lines if "TX:" in line)) + 1].split()[0])


def test_cut_link_ends_the_job_within_the_deadline(two_hosts, tiny_models, tmp_path):
    import json
    import random

    rng = random.Random(5)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(["word"] * rng.randint(3, 60))}) + "\n"
                            for _ in range(6000)))
    out = tmp_path / "out.h5"
    env = {**os.environ, "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "MPIR_CVAR_NOLOCAL": "1",
           "NESA_NETNS_MAP": f"{ADDR[0]}={NS[0]},{ADDR[1]}={NS[1]}", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = ["ip", "netns", "exec", NS[0], mpiexec(), "-launcher", "rsh", "-launcher-exec",
           str(ROOT / "tests" / "netns_rsh.sh"), "-hosts", ",".join(ADDR), "-n", "3", sys.executable,
           str(ROOT / "jobs" / "infer.py"), f"model.path={tiny_models['llama']}", f"data.path={data}",
           f"output.path={out}", "runtime.threads=1", f"runtime.timeout={TIMEOUT}", "runtime.log_every=0.2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = []
    watchdog = threading.Timer(180, proc.kill)  # a job that never gets going must not hang the suite
    watchdog.start()
    try:
        for line in proc.stderr:
            lines.append(line)
            if "progress:" in line and int(line.split("progress:")[1].split("/")[0]) >= 500:
                break
        else:
            pytest.fail("the run ended before the cut:\n" + "".join(lines[-20:]))
    finally:
        watchdog.cancel()
    before = _tx_bytes()
    assert before > 100_000, "no traffic crossed the simulated link"
    _ip("-n", NS[1], "link", "set", "nesa-v1", "down")
    cut = time.monotonic()
    try:
        rest = proc.communicate(timeout=TIMEOUT + 60)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job did not end after the link was cut")
    elapsed = time.monotonic() - cut
    stderr = "".join(lines) + rest
    assert proc.returncode != 0
    assert f"no progress for {TIMEOUT} s while" in stderr, stderr[-3000:]
    assert elapsed < TIMEOUT + 30
    f = open_released(out)  # every rank is gone within seconds (the file lock is released)
    with f:
        n = len(f["row"])
        assert n > 0 and f["row"][()].tolist() == list(range(n)) and f.attrs["complete"] == False  # noqa: E712
