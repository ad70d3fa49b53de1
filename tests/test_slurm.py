"""The sbatch templates on a real Slurm of four simulated hosts (scripts/sim_cluster.py: a network namespace,
hostname and slurmd each, MPI over TCP between them), started once for the module.

One fixture submits the jobs that spread over three hosts (score and generate through slurm/multi-node.sbatch
and slurm/cpu.sbatch, training through slurm/train.sbatch), an array job and a job with a bad option, all at
once (`sbatch --wait` each), and runs the same jobs under one host's `mpiexec`; the tests compare the files.
Then the faults: the time limit's signal on a multi-host job (requeue and resume, several times), and a host
that dies mid-run (the others notice within runtime.timeout, Slurm requeues the job onto the hosts left, the
resume completes). Both end with a file equal to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_jobs, run_mpi

from nesa_hpc.io.results import read_results

sys.path.insert(0, str(ROOT / "scripts"))
from sim_cluster import ClusterUnavailable, SimCluster  # noqa: E402

INFER = str(ROOT / "jobs" / "infer.py")
MERGE = str(ROOT / "jobs" / "merge.py")
ROWS = 40
LONG = 3000
HOSTS3 = ["-N", "3", "--ntasks-per-node=1", "--cpus-per-task=1"]
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    sim = SimCluster(tmp_path_factory.mktemp("cluster"), hosts=4, cpus=2)
    try:
        sim.start()
    except ClusterUnavailable as exc:
        pytest.skip(f"no simulated Slurm cluster: {exc}")
    yield sim
    sim.stop()


def _env(cluster: SimCluster) -> dict[str, str]:
    """The job runs in the environment sbatch is called from: this Python's venv first on PATH (so the
    template's `python` is this interpreter), this checkout on PYTHONPATH, MPICH over TCP between hosts."""
    bin_dir = str(Path(sys.executable).parent)
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **cluster.env, "PATH": path, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}


def _texts(path: Path, n: int, seed: int = 0) -> Path:
    words = ["north", "south", "east", "west", "river", "stone", "cloud", "field", "light", "over"]
    path.write_text("".join(json.dumps({"text": " ".join(words[(i * 7 + j + seed) % 10]
                                                         for j in range(1 + (i * 3 + seed) % 13))}) + "\n"
                            for i in range(n)))
    return path


@pytest.fixture(scope="module")
def jobs(cluster, tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("jobs")
    data = _texts(work / "rows.jsonl", ROWS)
    common = [f"model.path={tiny_models['llama']}", f"data.path={data}", "data.batch_size=4",
              "data.bucket_window=8", "runtime.timeout=120"]
    generate = [*common, "task=generate", "task.max_new_tokens=6", "data.max_length=64"]
    train = [f"model.path={tiny_models['llama']}", f"data.path={data}", "data.batch_size=4", "train.max_steps=3",
             "train.lr=0.05", "split.k=1", "runtime.timeout=120"]
    env = _env(cluster)

    def submit(*args: str) -> subprocess.Popen:
        return subprocess.Popen(cluster.client(["sbatch", "--wait", f"--output={work}/slurm-%A_%a.out", *args]),
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = {
        # runtime.device=cpu given on the command line: the CPU run of the multi-node template
        "multi": submit(*HOSTS3, "slurm/multi-node.sbatch", *common, "runtime.device=cpu",
                        f"output.path={work}/multi/out.h5"),
        "generate": submit(*HOSTS3, "slurm/multi-node.sbatch", *generate, f"output.path={work}/gen/out.h5"),
        "embed": submit(*HOSTS3, "slurm/multi-node.sbatch", *common, "task=embed", f"output.path={work}/emb/out.h5"),
        "cpu": submit(*HOSTS3, "slurm/cpu.sbatch", *common, f"output.path={work}/cpu/out.h5"),
        "train": submit(*HOSTS3, "slurm/train.sbatch", *train, f"train.out_dir={work}/train/run"),
        "array": submit("--array=0-1", "-n", "2", "slurm/array.sbatch", *common, f"output.path={work}/arr/out.h5"),
        "bad": submit("-n", "2", "slurm/cpu.sbatch", *common, "data.batch_size=0", f"output.path={work}/bad/out.h5"),
    }
    # the same jobs on one host, in one launch of three ranks
    report = run_jobs(3, [[*common, "runtime.threads=1", f"output.path={work}/ref_score.h5"],
                          [*generate, "runtime.threads=1", f"output.path={work}/ref_generate.h5"],
                          [*common, "task=embed", "runtime.threads=1", f"output.path={work}/ref_embed.h5"],
                          {"config": "train", "overrides": [*train, "runtime.threads=1",
                                                            f"train.out_dir={work}/ref_train"]}], work, timeout=300)
    assert report == [None] * 4, report
    done = {}
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"sbatch --wait ({name}) did not return within 400 s: {cluster.logs()}") from None
        done[name] = (proc.returncode, out)
    return {"work": work, "done": done}


def _log_text(folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(folder.glob("*.log")))


def _assert_same(got: dict, reference: dict) -> None:
    assert set(got) == set(reference)
    for name, values in reference.items():
        if values.dtype == object:  # variable-length rows (generated tokens, their log-probabilities)
            assert len(got[name]) == len(values), name
            assert all(np.array_equal(g, v, equal_nan=np.asarray(v).dtype.kind == "f")
                       for g, v in zip(got[name], values, strict=True)), name
        else:
            assert np.array_equal(got[name], values, equal_nan=values.dtype.kind == "f"), name


def _layout_hosts(text: str) -> dict[int, str]:
    """Rank -> host, from the last layout the job printed ("rank 1 (worker): ... [h2 pid 123, cpu]")."""
    return {int(r): h for r, h in re.findall(r"rank (\d+) \((?:owner|worker)\):[^\n]*\[(\S+) pid", text)}


@pytest.mark.parametrize("name,folder,ref", [("multi", "multi", "score"), ("cpu", "cpu", "score"),
                                             ("generate", "gen", "generate"), ("embed", "emb", "embed")])
def test_templates_across_three_hosts_equal_one_host(jobs, name, folder, ref):
    """Score (multi-node and cpu templates), generation and embedding (multi-node) on three hosts, one rank each: the
    results file equals the one-host `mpiexec` run array by array (same partition: bit-identical)."""
    code, out = jobs["done"][name]
    work = jobs["work"] / folder
    assert code == 0, out + _log_text(work)
    logs = list(work.glob("out.*.log"))
    assert len(logs) == 1  # next to the results, named after the job
    text = logs[0].read_text()
    assert "world size 3" in text and "done: 40 rows" in text
    hosts = list(_layout_hosts(text).values())  # one rank on each of three hosts (whichever Slurm gave the job)
    assert len(hosts) == len(set(hosts)) == 3, hosts
    got, attrs = read_results(work / "out.h5")
    assert attrs["complete"] == True and attrs["world_size"] == 3  # noqa: E712
    _assert_same(got, read_results(jobs["work"] / f"ref_{ref}.h5")[0])


def test_training_across_three_hosts_equals_one_host(jobs):
    code, out = jobs["done"]["train"]
    work = jobs["work"] / "train"
    assert code == 0, out + _log_text(jobs["work"])
    text = "".join(p.read_text() for p in work.glob("run.*.log"))
    assert len(set(re.findall(r"\[(h\d) pid", text))) == 3, text[-2000:]  # three hosts, whichever Slurm gave

    def steps(folder: Path) -> list[dict]:
        return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]

    got, want = steps(work / "run"), steps(jobs["work"] / "ref_train")
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == w["loss"] and g["grad_norm"] == w["grad_norm"], (g, w)


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
    _assert_same(got, read_results(jobs["work"] / "ref_score.h5")[0])
    assert attrs["complete"] == True and attrs["rows"] == ROWS and attrs["next_row"] == ROWS  # noqa: E712


def test_failed_job_exits_nonzero_with_the_reason_in_the_log(jobs):
    code, out = jobs["done"]["bad"]
    assert code != 0, out
    text = _log_text(jobs["work"] / "bad")
    assert "data.batch_size=0 must be >= 1" in text
    assert not (jobs["work"] / "bad" / "out.h5").exists()


# -- faults across hosts ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_run(tiny_models, tmp_path_factory):
    """LONG rows and their uninterrupted one-host run, shared by the fault tests (the tiny model scores them in
    a few seconds: long enough to outlast the stop signal's 5 s grace after a step starts, slurm/step.sh)."""
    work = tmp_path_factory.mktemp("long")
    data = _texts(work / "rows.jsonl", LONG, seed=3)
    common = [f"model.path={tiny_models['llama']}", f"data.path={data}", "data.batch_size=8"]
    reference = run_mpi(3, [INFER, *common, "runtime.threads=1", f"output.path={work}/mpiexec.h5"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    return {"common": common, "reference": read_results(work / "mpiexec.h5")[0]}


def _job_fields(cluster: SimCluster, job_id: str) -> dict[str, str]:
    out = cluster.run(["scontrol", "show", "job", job_id]).stdout
    return dict(w.split("=", 1) for w in out.split() if "=" in w)


class _Requeues:
    """Follows a job; releases Slurm's hold of a requeued job (BeginTime, ~2 min) once the hosts it may use
    have been idle for 3 s (slurmd refuses to launch a job id it killed moments ago)."""

    def __init__(self, cluster: SimCluster, job_id: str, dead: str | None = None) -> None:
        self.cluster, self.job_id, self.dead, self.idle_since = cluster, job_id, dead, None

    def poll(self) -> dict[str, str]:
        fields = _job_fields(self.cluster, self.job_id)
        held = fields.get("JobState") == "PENDING" and fields.get("Reason") == "BeginTime"
        states = self.cluster.node_states()
        usable = {h for h, s in states.items() if h != self.dead and s == "idle"}
        # a dead host is released only once Slurm knows (not responding: "*", or down)
        known = self.dead is None or states.get(self.dead, "").endswith("*") or "down" in states.get(self.dead, "")
        free = held and known and len(usable) >= 3
        self.idle_since = (self.idle_since or time.monotonic()) if free else None
        if self.idle_since and time.monotonic() - self.idle_since > 3:
            self.cluster.run(["scontrol", "update", f"JobId={self.job_id}", "StartTime=now"])
            self.idle_since = None
        return fields


def _submit(cluster: SimCluster, args: list[str], env: dict) -> str:
    sub = subprocess.run(cluster.client(["sbatch", "--parsable", *args]), cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert sub.returncode == 0, sub.stderr
    return sub.stdout.strip().split(";")[0]


def test_time_limit_requeues_across_hosts_until_done(cluster, long_run, tmp_path):
    """A multi-host job with a 1-minute time limit and an early USR1 (--signal=B:USR1@25): it stops cleanly
    (exit 75), requeues itself, and the next allocation (wherever Slurm puts it) resumes, until the data is
    done; the file equals an uninterrupted run. To make at least three allocations certain on a fast machine,
    the test also sends the same batch signal once each of the first two allocations has started its ranks."""
    env = {**_env(cluster), "NESA_MAX_REQUEUES": "30"}  # a loaded machine may need more short allocations
    job_id = _submit(cluster, [*HOSTS3, "--time=1", "--signal=B:USR1@25", "--open-mode=append",
                               f"--output={tmp_path}/slurm-%j.out", "slurm/multi-node.sbatch", *long_run["common"],
                               "runtime.timeout=120", f"output.path={tmp_path}/req/out.h5"], env)
    follow = _Requeues(cluster, job_id)
    signalled, allocations, offset, deadline, fields = 0, 0, 0, time.monotonic() + 600, {}
    log_path = tmp_path / "req" / f"out.{job_id}.log"
    while time.monotonic() < deadline:
        fields = follow.poll()
        state, restarts = fields.get("JobState"), int(fields.get("Restarts", 0))
        if state in FINAL:
            break
        started = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out")).count(" ranks on ")
        log = log_path.read_text() if log_path.exists() else ""
        if started > allocations:  # a new allocation: its ranks' lines start here in the appended log
            allocations, offset = started, len(log)
        # once this allocation's ranks are up (the layout is printed), stop it as the time limit would
        if state == "RUNNING" and restarts < 2 and signalled <= restarts and "(worker)" in log[offset:]:
            time.sleep(1)
            cluster.run(["scancel", "--batch", "--signal=USR1", job_id], env=env)
            signalled = restarts + 1
        time.sleep(0.5)
    assert fields.get("JobState") == "COMPLETED", (fields, cluster.logs())
    assert int(fields["Restarts"]) >= 2, fields  # at least three allocations
    out = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert out.count("requeued (") >= 2, out
    log = log_path.read_text()
    assert log.count("stopped by SIGUSR1") >= 2, log[-3000:]
    assert len(set(re.findall(r"\[(h\d) pid", log))) >= 3
    got, attrs = read_results(tmp_path / "req" / "out.h5")
    assert attrs["complete"] == True  # noqa: E712
    _assert_same(got, long_run["reference"])


def _start_long_job(cluster: SimCluster, long_run: dict, folder: Path, timeout: int) -> tuple[str, Path, str]:
    """Submit the long run on three hosts through slurm/multi-node.sbatch and wait until 100 rows are done:
    (job id, its log, the log so far)."""
    job_id = _submit(cluster, [*HOSTS3, "--open-mode=append", f"--output={folder}/slurm-%j.out",
                               "slurm/multi-node.sbatch", *long_run["common"], f"runtime.timeout={timeout}",
                               "runtime.log_every=0.2", f"output.path={folder}/out.h5"], _env(cluster))
    log_path = folder / f"out.{job_id}.log"
    deadline = time.monotonic() + 300
    while True:
        text = log_path.read_text() if log_path.exists() else ""
        done = [int(n) for n in re.findall(r"progress: (\d+)/", text)]
        if done and done[-1] >= 100:
            return job_id, log_path, text
        assert f"done: {LONG} rows" not in text, "the run ended before the fault"
        assert time.monotonic() < deadline, text[-3000:] + cluster.logs()
        time.sleep(0.2)


def _follow_fault(cluster: SimCluster, job_id: str, log_path: Path, seen: int, sign: str, dead: str | None = None,
                  limit: float = 400) -> tuple[dict, str, float | None]:
    """After a fault at log offset ``seen``: follow the job (releasing its requeue hold, see :class:`_Requeues`)
    until it ends; (its last fields, its log, seconds until the regex ``sign`` first appeared after ``seen``)."""
    start, noticed = time.monotonic(), None
    follow, fields, text = _Requeues(cluster, job_id, dead=dead), {}, ""
    while time.monotonic() < start + limit:
        text = log_path.read_text()
        if noticed is None and re.search(sign, text[seen:]):
            noticed = time.monotonic() - start
        fields = follow.poll()
        if fields.get("JobState") in FINAL:
            break
        time.sleep(0.3)
    return fields, text, noticed


def test_dead_host_ends_the_job_then_slurm_requeues_it_onto_the_hosts_left(cluster, long_run, tmp_path):
    """Mid-run, the host of rank 1 dies (its slurmd, step daemon and rank are killed at once). The ranks left
    end within runtime.timeout naming rank 1 and its host; Slurm marks the host down (SlurmdTimeout) and
    requeues the job (--requeue, NODE_FAIL); the next allocation runs on the three hosts left and resumes after
    the last committed row: the file equals an uninterrupted run, no row lost or written twice."""
    timeout = 10
    job_id, log_path, text = _start_long_job(cluster, long_run, tmp_path, timeout)
    victim = _layout_hosts(text)[1]
    seen = len(text)
    cluster.kill_host(victim)
    try:
        fields, text, noticed = _follow_fault(cluster, job_id, log_path, seen, rf"rank \d+ on {victim}", dead=victim)
        assert fields.get("JobState") == "COMPLETED", (fields, text[-3000:], cluster.logs())
        assert int(fields["Restarts"]) >= 1, fields
        lost = re.search(rf"rank \d+: no progress for {timeout} s while [^\n]*rank 1 on {victim}|"
                         rf"rank \d+: [^\n]*rank 1 on {victim} failed", text[seen:])
        assert lost, text[seen:][-3000:]
        assert noticed is not None and noticed < timeout + 10, noticed
        assert "resuming" in text and f"the file holds {LONG}" in text[text.rindex("resuming"):], text[-3000:]
        hosts_after = _layout_hosts(text[text.rindex("world size 3"):])
        assert victim not in hosts_after.values() and len(set(hosts_after.values())) == 3, hosts_after
        got, attrs = read_results(tmp_path / "out.h5")
        assert attrs["complete"] == True  # noqa: E712
        _assert_same(got, long_run["reference"])
    finally:  # the host comes back for whatever runs next
        cluster.start_host(victim)
        cluster.run(["scontrol", "update", f"NodeName={victim}", "State=RESUME"])


def test_hung_rank_ends_the_step_and_the_job_requeues_itself(cluster, long_run, tmp_path):
    """Mid-run, rank 1 stops answering while its host stays up (SIGSTOP: its connections stay open, so MPI
    notices nothing, as with a cut link). The ranks left end the step within runtime.timeout with the lost-rank
    line, slurm/step.sh requeues the job (Slurm sees no failed node here), and the resume completes."""
    timeout = 5
    job_id, log_path, text = _start_long_job(cluster, long_run, tmp_path, timeout)
    host, pid = re.findall(r"rank 1 \(worker\):[^\n]*\[(\S+) pid (\d+)", text)[-1]
    seen = len(text)
    os.kill(int(pid), signal.SIGSTOP)
    fields, text, noticed = _follow_fault(cluster, job_id, log_path, seen, "a rank was lost; the job can resume",
                                          limit=300)
    assert fields.get("JobState") == "COMPLETED", (fields, text[-3000:], cluster.logs())
    assert noticed is not None and noticed < timeout + 10, noticed
    assert re.search(rf"rank \d+: no progress for {timeout} s while [^\n]*rank 1 on {host}", text[seen:]), text[seen:]
    out = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert "nesa_hpc: a rank was lost; requeued (1 of at most" in out, out
    got, attrs = read_results(tmp_path / "out.h5")
    assert attrs["complete"] == True  # noqa: E712
    _assert_same(got, long_run["reference"])
