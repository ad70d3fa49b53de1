"""The sbatch templates on a real one-node Slurm started by the tests (see slurm_cluster.py).

One module fixture submits every job at once (`sbatch --wait` each, in parallel: the cluster has 8 CPU
slots) and runs the same job under `mpiexec`; the tests then compare the files array by array.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_mpi
from slurm_cluster import SlurmCluster, SlurmUnavailable

from nesa_hpc.io.results import read_results

INFER = str(ROOT / "jobs" / "infer.py")
MERGE = str(ROOT / "jobs" / "merge.py")
ROWS = 40


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"no Slurm: {exc}")
    yield cluster
    cluster.stop()


def _env(cluster: SlurmCluster) -> dict[str, str]:
    """The job runs in the environment sbatch is called from: this Python's venv first on PATH (so the
    template's `python` is this interpreter), this checkout on PYTHONPATH."""
    bin_dir = str(Path(sys.executable).parent)
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **cluster.env, "PATH": path, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}


def _data(folder: Path) -> Path:
    words = ["north", "south", "east", "west", "river", "stone", "cloud"]
    rows = [" ".join(words[(i * 3 + j) % len(words)] for j in range(1 + i % 11)) for i in range(ROWS)]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return path


@pytest.fixture(scope="module")
def jobs(slurm, tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("jobs")
    data = _data(work)
    common = [f"model.path={tiny_models['llama']}", f"data.path={data}", "data.batch_size=4",
              "data.bucket_window=8", "runtime.timeout=120"]
    env = _env(slurm)

    def submit(*args: str) -> subprocess.Popen:
        return subprocess.Popen(["sbatch", "--wait", f"--output={work}/slurm-%A_%a.out", *args], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = {
        "cpu": submit("-n", "3", "slurm/cpu.sbatch", *common, f"output.path={work}/cpu/out.h5"),
        "array": submit("--array=0-1", "-n", "2", "slurm/array.sbatch", *common, f"output.path={work}/arr/out.h5"),
        "bad": submit("-n", "2", "slurm/cpu.sbatch", *common, "data.batch_size=0", f"output.path={work}/bad/out.h5"),
    }
    reference = run_mpi(3, [INFER, *common, "runtime.threads=1", f"output.path={work}/mpiexec.h5"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    done = {}
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"sbatch --wait ({name}) did not return within 300 s: {slurm.logs()}") from None
        done[name] = (proc.returncode, out)
    return {"work": work, "done": done, "reference": read_results(work / "mpiexec.h5")[0]}


def _log_text(folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(folder.glob("*.log")))


def _assert_same(got: dict, reference: dict) -> None:
    assert set(got) == set(reference)
    for name, values in reference.items():
        assert np.array_equal(got[name], values, equal_nan=values.dtype.kind == "f"), name


def test_cpu_template_equals_mpiexec(jobs):
    code, out = jobs["done"]["cpu"]
    folder = jobs["work"] / "cpu"
    assert code == 0, out + _log_text(folder)
    logs = list(folder.glob("out.*.log"))
    assert len(logs) == 1  # next to the results, named after the job
    text = logs[0].read_text()
    assert "world size 3" in text
    assert text.count("(worker)") == 2 and "done: 40 rows" in text
    got, attrs = read_results(folder / "out.h5")
    assert attrs["complete"] == True and attrs["world_size"] == 3  # noqa: E712
    _assert_same(got, jobs["reference"])


def test_array_then_merge_equals_unsharded(jobs, tmp_path):
    code, out = jobs["done"]["array"]
    folder = jobs["work"] / "arr"
    assert code == 0, out + _log_text(folder)
    shards = sorted(folder.glob("out.shard*.h5"))
    assert [p.name for p in shards] == ["out.shard0.h5", "out.shard1.h5"]
    ranges = []
    for p in shards:
        _, attrs = read_results(p)
        assert attrs["num_shards"] == 2 and attrs["complete"] == True  # noqa: E712
        ranges.append(json.loads(attrs["shard_rows"]))
    assert ranges == [[0, 16], [16, 40]]  # 5 batching windows of 8 rows, dealt out 2 + 3
    assert len(list(folder.glob("out.shard*.log"))) == 2
    merged = tmp_path / "merged.h5"
    proc = subprocess.run([sys.executable, MERGE, "-o", str(merged), str(folder / "out.shard*.h5")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "merged 2 shards: 40 rows" in proc.stdout
    got, attrs = read_results(merged)
    _assert_same(got, jobs["reference"])
    assert attrs["complete"] == True and attrs["rows"] == ROWS and attrs["next_row"] == ROWS  # noqa: E712


def test_failed_job_exits_nonzero_with_the_reason_in_the_log(jobs):
    code, out = jobs["done"]["bad"]
    assert code != 0, out
    text = _log_text(jobs["work"] / "bad")
    assert "data.batch_size=0 must be >= 1" in text
    assert not (jobs["work"] / "bad" / "out.h5").exists()


def _job_fields(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], env={**os.environ, **cluster.env},
                         capture_output=True, text=True).stdout
    return dict(w.split("=", 1) for w in out.split() if "=" in w)


def test_time_limit_requeues_until_done_equal_to_uninterrupted(slurm, tiny_models, tmp_path):
    """A 1-minute time limit with an early USR1 (--signal=B:USR1@25): the job stops cleanly (exit 75),
    requeues itself, and the next allocation resumes, until the data is done; the file equals an
    uninterrupted run. To make at least three allocations certain on a fast machine, the test also sends
    the same batch signal (as the time-limit warning does) once each of the first two allocations has
    started its ranks; Slurm's own hold of a requeued job (BeginTime, ~2 min) is cut short by the test once
    the node has been idle for 3 s (the last allocation's processes are gone)."""
    words = ["north", "south", "east", "west", "river", "stone", "cloud", "field", "light", "over"]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(words[(i * 7 + j) % 10] for j in range(5 + i % 13))}) + "\n"
                            for i in range(1000)))
    common = [f"model.path={tiny_models['llama']}", f"data.path={data}", "data.batch_size=8", "runtime.timeout=120"]
    # the uninterrupted reference first: the job's start-up must stay well inside the ~30 s before Slurm's own
    # time-limit signal, so the two do not share the cores
    reference = run_mpi(3, [INFER, *common, "runtime.threads=1", f"output.path={tmp_path}/mpiexec.h5"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    env = {**_env(slurm), "NESA_MAX_REQUEUES": "30"}  # a loaded machine may need more short allocations
    sub = subprocess.run(["sbatch", "--parsable", "-n", "3", "--time=1", "--signal=B:USR1@25", "--open-mode=append",
                          f"--output={tmp_path}/slurm-%j.out", "slurm/cpu.sbatch", *common,
                          f"output.path={tmp_path}/req/out.h5"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    signalled, allocations, offset, deadline, fields, idle_since = 0, 0, 0, time.monotonic() + 600, {}, None
    log_path = tmp_path / "req" / f"out.{job_id}.log"
    while time.monotonic() < deadline:
        fields = _job_fields(slurm, job_id)
        state, restarts = fields.get("JobState"), int(fields.get("Restarts", 0))
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        held = state == "PENDING" and fields.get("Reason") == "BeginTime"
        idle_since = (idle_since or time.monotonic()) if held and slurm.node_idle() else None
        # the last allocation is cleaned up: the node has been idle for a while (slurmd refuses to launch a
        # job id it killed moments ago: "Job ... already killed, do not launch batch job")
        if idle_since and time.monotonic() - idle_since > 3:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, capture_output=True)
            idle_since = None
        started = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out")).count(" ranks on ")
        log = log_path.read_text() if log_path.exists() else ""
        if started > allocations:  # a new allocation: its ranks' lines start here in the appended log
            allocations, offset = started, len(log)
        # once this allocation's ranks are up (the layout is printed), stop it as the time limit would
        if state == "RUNNING" and restarts < 2 and signalled <= restarts and "(worker)" in log[offset:]:
            time.sleep(1)
            subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=env, capture_output=True)
            signalled = restarts + 1
        time.sleep(0.5)
    assert fields.get("JobState") == "COMPLETED", (fields, slurm.logs())
    assert int(fields["Restarts"]) >= 2, fields  # at least three allocations
    out = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert out.count("requeued (") >= 2, out
    log = (tmp_path / "req" / f"out.{job_id}.log").read_text()
    assert log.count("stopped by SIGUSR1") >= 2, log[-3000:]
    got, attrs = read_results(tmp_path / "req" / "out.h5")
    assert attrs["complete"] == True  # noqa: E712
    _assert_same(got, read_results(tmp_path / "mpiexec.h5")[0])
