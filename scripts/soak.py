#!/usr/bin/env python
"""Soak test: interrupt real MPI jobs again and again, resume them, and compare with an uninterrupted run.

For each task (score, embed, generate, train) the script builds tiny random models and a dataset in a work
folder, runs the job once without interruption (the reference, which also gives the typical run time T),
then runs ``--cycles`` cycles. A cycle is one fresh job, started and interrupted repeatedly:

    start (infer: output.resume=true from the first start; train: train.resume=true once train.json exists)
    -> wait a random time (25 % uniform in [0, 2 s] to hit start-up, else uniform in [0, T])
    -> one of: SIGTERM to mpiexec | SIGUSR1 to mpiexec (both forwarded to every rank) |
               SIGUSR1 to every process group of the job (MPICH's launcher puts each proxy and each rank
               in a session of its own, so mpiexec's group alone is mpiexec: this sends to mpiexec's,
               the proxy's and every rank's group, so ranks get it directly and forwarded) |
               SIGKILL to one random rank (found by PMI_RANK in mpiexec's process tree)
    -> wait for the exit (a hang: no exit within --deadline; everything is killed and counted)
    -> start again (resume) ... until the job exits 0.

After ``--max-interrupts`` interrupts (each cycle draws 1..max) the job is left to finish. The final HDF5
file (rows, every per-row dataset: exactly, and within 1e-6) or, for train, the per-step losses and the
adapter tensors are compared with the reference. A markdown table per task is printed, and everything
(every attempt: kind, delay, phase hit, exit code, output tail of odd exits) goes to ``--json``.

    .venv/bin/python scripts/soak.py --tasks score,embed,generate,train --cycles 20 --ranks 3 --seed 1 \
        --deadline 120 --json soak.json

Exit status: 0 when every cycle ended complete with no row lost, duplicated or mismatched and no hang,
1 otherwise (unclean exits alone, a signal during start-up ending with a code other than 0/75, are
reported but do not fail the soak unless ``--strict-exits``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parents[1]  # the repository this script belongs to (tests/ for the models)
TASKS = ("score", "embed", "generate", "train")
KINDS = ("SIGTERM->mpiexec", "SIGUSR1->mpiexec", "SIGUSR1->pgrps", "SIGKILL->rank")
EXIT_STOPPED = 75
STARTUP_WINDOW = 2.0  # seconds: the short delays drawn to land in start-up


# ----------------------------------------------------------------------------------------------- set-up

def build_inputs(work: Path, scale: float) -> dict:
    """Tiny random models (tests/conftest.py's Llama, tests/families.py's BERT) and the datasets."""
    sys.path.insert(0, str(HERE / "tests"))
    from conftest import _save_tiny, _tokenizer_source  # noqa: E402  (tests/ is not a package)
    from families import save_family  # noqa: E402

    models = work / "models"
    llama, bert = models / "llama", models / "bert"
    if not (llama / "config.json").is_file():
        _save_tiny(llama, "llama")
    if not (bert / "config.json").is_file():
        save_family(bert, "bert", _tokenizer_source())
    data = {}
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    # sizes chosen so each job computes for several seconds at 3 ranks on 2 CPU cores (start-up adds 7-12 s)
    for name, rows in (("score", 2400), ("embed", 6000), ("generate", 400), ("train", 400)):
        n = max(16, int(rows * scale))
        path = work / f"rows-{name}-{n}.jsonl"
        if not path.is_file():
            rng = random.Random(f"rows-{name}")
            path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in
                                                                  range(rng.randint(3, 60)))}) + "\n"
                                    for _ in range(n)))
        data[name] = path
    return {"llama": llama, "bert": bert, "data": data}


def job_args(task: str, inputs: dict, out: Path, root: Path, generate_sampling: bool) -> list[str]:
    common = ["runtime.threads=1", "data.batch_size=8", "runtime.timeout=60"]
    if task == "train":
        return [str(root / "jobs" / "train.py"), f"model.path={inputs['llama']}", f"data.path={inputs['data'][task]}",
                f"train.out_dir={out}", *common, "data.max_length=48", "train.grad_accum=2", "train.epochs=1",
                "train.save_every=4", "train.log_every=1", "split.k=1", "runtime.log_every=0.5"]
    args = [str(root / "jobs" / "infer.py"), f"task={task}", f"data.path={inputs['data'][task]}",
            f"output.path={out}", *common, "data.bucket_window=64", "runtime.log_every=0.5"]
    if task == "embed":
        args.append(f"model.path={inputs['bert']}")
    else:
        args.append(f"model.path={inputs['llama']}")
    if task == "generate":
        args += ["data.max_length=64", "task.max_new_tokens=16"]
        if generate_sampling:
            args += ["task.temperature=0.8", "task.top_k=50", "task.seed=3"]
    return args


def resume_args(task: str, out: Path) -> list[str]:
    if task == "train":
        # train.resume=true needs train.json (written at start-up); before that a plain start is the resume
        return ["train.resume=true"] if (out / "train.json").is_file() else []
    return ["output.resume=true"]  # a missing file starts fresh


# ------------------------------------------------------------------------------------------ one attempt

class Launch:
    """mpiexec -n R python <args>, in its own session (process group), output to a log file; tracks the
    rank processes (PMI_RANK) as they appear."""

    def __init__(self, ranks: int, args: list[str], log: Path, root: Path) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        python = Path(sys.executable)
        local = python.with_name("mpiexec")
        mpiexec = str(local) if local.exists() else shutil.which("mpiexec")
        self.log = log
        self.fh = open(log, "w")
        self.script = Path(args[0]).name
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([mpiexec, "-n", str(ranks), str(python), *args], cwd=root, env=env,
                                     stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.pgid = self.proc.pid
        self.ranks: dict[int, psutil.Process] = {}  # rank -> process
        self.seen: dict[int, psutil.Process] = {}  # every descendant ever seen, by pid

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def scan(self) -> None:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            self.seen.setdefault(child.pid, child)
            if child.pid in {p.pid for p in self.ranks.values()}:
                continue
            try:
                if self.script in " ".join(child.cmdline()):
                    r = child.environ().get("PMI_RANK")
                    if r is not None:
                        self.ranks[int(r)] = child
            except psutil.Error:
                continue

    def output(self) -> str:
        self.fh.flush()
        return self.log.read_text(errors="replace")

    def kill_all(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in list(self.seen.values()):
            try:
                p.kill()
            except psutil.Error:
                pass

    def leftovers(self, grace: float) -> list[int]:
        """Descendants still alive ``grace`` seconds after mpiexec ended (then SIGKILLed)."""
        deadline = time.monotonic() + grace
        alive = []
        while True:
            alive = [p for p in self.seen.values() if _alive(p)]
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        return [p.pid for p in alive]

    def close(self) -> None:
        self.fh.close()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def phase(task: str, text: str) -> str:
    """Where the job was when the signal went out, from rank 0's log: start-up (no layer map yet), run, end."""
    if "done:" in text:
        return "end"
    if "expected share of work" in text or "rank 0 (owner)" in text:
        return "run"
    return "startup"


def run_attempt(ranks: int, args: list[str], log: Path, root: Path, task: str, plan: dict | None,
                deadline: float) -> dict:
    """Start the job; if ``plan`` ({kind, delay, rank}), interrupt it at ``delay`` s. Wait for the exit."""
    launch = Launch(ranks, args, log, root)
    rec = {"kind": None, "delay": None, "phase": None, "target_pid": None, "code": None, "hang": False,
           "seconds": None, "leftovers": [], "log": str(log)}
    signalled_at = None
    try:
        while True:
            code = launch.proc.poll()
            if code is not None:
                break
            launch.scan()
            now = launch.elapsed()
            limit = (signalled_at if signalled_at is not None else
                     (plan["delay"] if plan is not None else 0.0)) + deadline
            if now > limit:
                rec["hang"] = True
                rec["hang_ranks_alive"] = sorted(r for r, p in launch.ranks.items() if _alive(p))
                rec["tail_at_hang"] = launch.output()[-3000:]
                launch.kill_all()
                launch.proc.wait(timeout=30)
                break
            if plan is not None and signalled_at is None and now >= plan["delay"]:
                kind = plan["kind"]
                if kind == "SIGKILL->rank":
                    victim = launch.ranks.get(plan["rank"])
                    if victim is None:  # not started yet: keep polling until it is
                        time.sleep(0.02)
                        continue
                    rec["phase"] = phase(task, launch.output())
                    try:
                        os.kill(victim.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    rec["target_pid"] = victim.pid
                    rec["kind"] = f"SIGKILL->rank{plan['rank']}"
                else:
                    rec["phase"] = phase(task, launch.output())
                    sig = signal.SIGTERM if kind.startswith("SIGTERM") else signal.SIGUSR1
                    if kind.endswith("pgrps"):
                        groups = {launch.pgid} | {g for g in map(_pgid, list(launch.seen)) if g}
                        rec["groups_signalled"] = len(groups)
                        for g in sorted(groups):
                            try:
                                os.killpg(g, sig)
                            except ProcessLookupError:
                                pass
                    else:
                        launch.proc.send_signal(sig)
                    rec["kind"] = kind
                rec["delay"] = round(now, 3)
                signalled_at = now
            time.sleep(0.05)
        rec["code"] = launch.proc.returncode
        rec["seconds"] = round(launch.elapsed(), 3)
        rec["leftovers"] = launch.leftovers(grace=10.0)
    finally:
        if launch.proc.poll() is None:
            launch.kill_all()
        launch.close()
    if plan is not None and signalled_at is None:
        rec["kind_planned"] = plan["kind"]  # the job ended before the planned moment: nothing was sent
    rec["outcome"] = classify(rec)
    rec["signal_lost"] = signal_lost(rec)
    if rec["outcome"] not in ("complete", "stopped", "killed") or rec["signal_lost"]:
        rec["tail"] = log.read_text(errors="replace")[-3000:]
    return rec


def classify(rec: dict) -> str:
    code, kind = rec["code"], rec["kind"]
    if rec["hang"]:
        return "hang"
    if code == 0:
        return "complete"
    if kind is None:
        return "failed"  # no signal, yet not 0: a resume refused, a crash: a real problem
    if kind.startswith("SIGKILL"):
        return "killed"
    return "stopped" if code == EXIT_STOPPED else "unclean"


def signal_lost(rec: dict) -> bool:
    """A SIGTERM/SIGUSR1 sent during start-up, yet the job ran to the end (exit 0, no stop)."""
    return bool(rec["kind"]) and not rec["kind"].startswith("SIGKILL") and rec["code"] == 0 \
        and rec["phase"] == "startup"


# ----------------------------------------------------------------------------------------- comparisons

def wait_unlocked(path: Path, wait: float = 15.0):
    import h5py

    end = time.monotonic() + wait
    while True:
        try:
            return h5py.File(path, "r")
        except BlockingIOError:
            if time.monotonic() > end:
                raise
            time.sleep(0.3)


def read_h5(path: Path) -> tuple[dict, dict]:
    with wait_unlocked(path) as f:
        return {k: f[k][()] for k in f.keys()}, dict(f.attrs)


def _same(a, b, tol: float | None) -> bool:
    """Equal values: exactly (``tol=None``) or within ``tol`` (floats); strings and variable-length arrays
    (generate's ids and text) element by element."""
    if isinstance(a, (bytes, str)) or isinstance(b, (bytes, str)):
        return a == b
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "SUO" or b.dtype.kind in "SUO":
        if a.ndim == 0:
            x, y = a.item(), b.item()
            if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
                return _same(np.asarray(x), np.asarray(y), tol)
            return x == y
        return all(_same(x, y, tol) for x, y in zip(a.ravel(), b.ravel(), strict=True))
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        if tol is None:
            return np.array_equal(a, b, equal_nan=True)
        return bool(np.allclose(a, b, rtol=tol, atol=tol, equal_nan=True))
    return np.array_equal(a, b)


def compare_infer(ref_path: Path, out: Path) -> dict:
    if not out.exists():
        return {"error": "no results file", "rows_lost": None}
    try:
        ref, _ = read_h5(ref_path)
        got, attrs = read_h5(out)
    except Exception as exc:  # noqa: BLE001 (an unreadable file is a finding)
        return {"error": f"unreadable: {exc}", "rows_lost": None}
    ref_rows, got_rows = ref["row"].tolist(), got.get("row", np.zeros(0, np.int64)).tolist()
    counts = Counter(got_rows)
    per_row = [k for k, v in ref.items() if k not in ("row", "skipped_row", "skipped_reason")
               and getattr(v, "shape", ()) and v.shape[0] == len(ref_rows)]
    where = {}
    for i, r in enumerate(got_rows):
        where.setdefault(r, i)
    mismatched, inexact, fields = 0, 0, Counter()
    for i, r in enumerate(ref_rows):
        j = where.get(r)
        if j is None:
            continue
        bad = [k for k in per_row if k not in got or not _same(ref[k][i], got[k][j], 1e-6)]
        if bad:
            mismatched += 1
            fields.update(bad)
        elif any(not _same(ref[k][i], got[k][j], None) for k in per_row):
            inexact += 1
    return {"rows_ref": len(ref_rows), "rows_final": len(got_rows),
            "rows_lost": len(set(ref_rows) - set(got_rows)),
            "rows_duplicated": sum(c - 1 for c in counts.values() if c > 1),
            "rows_extra": len(set(got_rows) - set(ref_rows)),
            "rows_mismatched": mismatched, "rows_inexact": inexact, "mismatched_fields": dict(fields),
            "in_order": got_rows == sorted(got_rows),
            "complete": bool(attrs.get("complete", False)), "next_row": int(attrs.get("next_row", -1))}


def _metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"step": None, "loss": None, "torn": line})
    return out


def compare_train(ref_dir: Path, out: Path) -> dict:
    from safetensors.numpy import load_file

    ref_m, got_m = _metrics(ref_dir), _metrics(out)
    ref_steps = {m["step"]: m["loss"] for m in ref_m}
    counts = Counter(m.get("step") for m in got_m)
    got_steps = {}
    for m in got_m:
        got_steps.setdefault(m.get("step"), m.get("loss"))
    mismatched = sum(1 for s, loss in ref_steps.items() if s in got_steps and got_steps[s] is not None
                     and not _same(loss, got_steps[s], 1e-6))
    inexact = sum(1 for s, loss in ref_steps.items() if s in got_steps and got_steps[s] != loss)
    res = {"rows_ref": len(ref_steps), "rows_final": len(got_m),
           "rows_lost": len(set(ref_steps) - set(got_steps)),
           "rows_duplicated": sum(c - 1 for c in counts.values() if c > 1),
           "rows_extra": len(set(got_steps) - set(ref_steps)),
           "rows_mismatched": mismatched, "rows_inexact": inexact,
           "torn_lines": sum(1 for m in got_m if "torn" in m),
           "complete": (out / "summary.json").is_file()}
    adapter = "adapter/adapter_model.safetensors"
    if not (out / adapter).is_file():
        res.update(adapter="missing", tensors_mismatched=None)
        return res
    a, b = load_file(str(ref_dir / adapter)), load_file(str(out / adapter))
    bad = [k for k in a if k not in b or not _same(a[k], b[k], 1e-6)]
    res.update(adapter="present", tensors=len(a), tensors_mismatched=len(bad) + len(set(b) - set(a)),
               tensors_inexact=sum(1 for k in a if k in b and not np.array_equal(a[k], b[k])))
    return res


# ------------------------------------------------------------------------------------------------ cycles

def draw_plan(rng: random.Random, typical: float, ranks: int) -> dict:
    kind = rng.choice(KINDS)
    delay = rng.uniform(0, STARTUP_WINDOW) if rng.random() < 0.25 else rng.uniform(0, typical)
    return {"kind": kind, "delay": delay, "rank": rng.randrange(ranks)}


def run_cycle(task: str, cycle: int, args_seed: str, ranks: int, typical: float, deadline: float,
              max_interrupts: int, max_attempts: int, work: Path, inputs: dict, root: Path, ref: Path,
              sampling: bool) -> dict:
    rng = random.Random(f"{args_seed}:{task}:{cycle}")
    folder = work / task / f"cycle-{cycle:03d}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    out = folder / ("out" if task == "train" else "out.h5")
    base = job_args(task, inputs, out, root, sampling)
    interrupts = rng.randint(1, max_interrupts)
    attempts, t0 = [], time.monotonic()
    while len(attempts) < max_attempts:
        plan = draw_plan(rng, typical, ranks) if sum(a["kind"] is not None for a in attempts) < interrupts else None
        log = folder / f"attempt-{len(attempts):02d}.log"
        rec = run_attempt(ranks, [*base, *resume_args(task, out)], log, root, task, plan, deadline)
        attempts.append(rec)
        print(f"  {task} cycle {cycle} attempt {len(attempts) - 1}: {rec['kind'] or '-'}"
              f"{'' if rec['delay'] is None else ' at %.1fs' % rec['delay']} ({rec['phase'] or '-'}) -> "
              f"exit {rec['code']} [{rec['outcome']}] in {rec['seconds']:.1f}s"
              + (f", leftover pids {rec['leftovers']}" if rec["leftovers"] else ""), flush=True)
        if rec["outcome"] == "complete":
            break
        if plan is None and rec["outcome"] == "failed" and len(attempts) >= 2 and \
                attempts[-2]["outcome"] == "failed":
            break  # two failed uninterrupted resumes in a row: the state is not resumable
    result = compare_train(ref, out) if task == "train" else compare_infer(ref, out)
    return {"cycle": cycle, "interrupts_planned": interrupts, "attempts": attempts,
            "resumes": len(attempts) - 1, "completed": attempts[-1]["outcome"] == "complete",
            "seconds": round(time.monotonic() - t0, 1), "result": result, "folder": str(folder)}


def summarize(task: str, cycles: list[dict]) -> dict:
    kinds, phases, outcomes = Counter(), Counter(), Counter()
    for c in cycles:
        for a in c["attempts"]:
            if a["kind"]:
                kinds["SIGKILL->rank" if a["kind"].startswith("SIGKILL") else a["kind"]] += 1
                phases[a["phase"]] += 1
            outcomes[a["outcome"]] += 1

    def total(key):
        return sum((c["result"].get(key) or 0) for c in cycles)

    resumes = [c["resumes"] for c in cycles]
    return {
        "task": task, "cycles": len(cycles), "kills": dict(kinds), "signal_phase": dict(phases),
        "outcomes": dict(outcomes), "resumes_total": sum(resumes), "resumes_max": max(resumes, default=0),
        "unclean_exits": outcomes["unclean"],
        "signals_lost": sum(1 for c in cycles for a in c["attempts"] if a.get("signal_lost")),
        "done_after_signal": sum(1 for c in cycles for a in c["attempts"] if a["kind"] and a["code"] == 0
                                 and not a["kind"].startswith("SIGKILL") and not a.get("signal_lost")),
        "failed_runs": outcomes["failed"], "hangs": outcomes["hang"],
        "leftover_processes": sum(len(a["leftovers"]) for c in cycles for a in c["attempts"]),
        "incomplete_cycles": sum(1 for c in cycles if not c["completed"] or not c["result"].get("complete")),
        "rows_lost": total("rows_lost"), "rows_duplicated": total("rows_duplicated"),
        "rows_extra": total("rows_extra"), "rows_mismatched": total("rows_mismatched"),
        "rows_inexact": total("rows_inexact"), "tensors_mismatched": total("tensors_mismatched"),
        "unreadable": sum(1 for c in cycles if c["result"].get("error")),
        "seconds_per_cycle": round(sum(c["seconds"] for c in cycles) / max(len(cycles), 1), 1),
    }


def table(s: dict) -> str:
    unit = "steps" if s["task"] == "train" else "rows"
    kills = ", ".join(f"{k} {v}" for k, v in sorted(s["kills"].items())) or "none"
    phases = ", ".join(f"{k} {v}" for k, v in sorted(s["signal_phase"].items())) or "-"
    lines = [f"### {s['task']}", "", "| measure | value |", "|---|---|",
             f"| cycles | {s['cycles']} ({s['incomplete_cycles']} incomplete) |",
             f"| kills by kind | {kills} |",
             f"| signal landed in | {phases} |",
             f"| resumes needed (total / max per cycle) | {s['resumes_total']} / {s['resumes_max']} |",
             f"| unclean exits (signal -> code not 0/75) | {s['unclean_exits']} |",
             f"| stop signals lost (sent in start-up, job ran to exit 0) | {s['signals_lost']} |",
             f"| exit 0 after a stop signal in run or end phase | {s['done_after_signal']} |",
             f"| failed runs (no signal, nonzero exit) | {s['failed_runs']} |",
             f"| hangs (no exit within deadline) | {s['hangs']} |",
             f"| processes left after mpiexec ended | {s['leftover_processes']} |",
             f"| {unit} lost | {s['rows_lost']} |",
             f"| {unit} duplicated | {s['rows_duplicated']} |",
             f"| {unit} extra (not in the reference) | {s['rows_extra']} |",
             f"| mismatched {unit} (> 1e-6) | {s['rows_mismatched']} |",
             f"| {unit} not bit-identical (within 1e-6) | {s['rows_inexact']} |"]
    if s["task"] == "train":
        lines.append(f"| adapter tensors mismatched | {s['tensors_mismatched']} |")
    lines.append(f"| seconds per cycle (mean) | {s['seconds_per_cycle']} |")
    return "\n".join(lines)


def bad(s: dict, strict_exits: bool) -> bool:
    return any(s[k] for k in ("incomplete_cycles", "failed_runs", "hangs", "rows_lost", "rows_duplicated",
                              "rows_extra", "rows_mismatched", "tensors_mismatched", "unreadable",
                              "leftover_processes")) or (strict_exits and s["unclean_exits"] > 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma list of score,embed,generate,train")
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--first-cycle", type=int, default=0, help="number of the first cycle (to replay one: the "
                    "draws of cycle N depend only on --seed, the task and N)")
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--seed", default="0")
    ap.add_argument("--deadline", type=float, default=120.0,
                    help="seconds after the signal (or the start, with none) for the job to exit; else a hang")
    ap.add_argument("--max-interrupts", type=int, default=3,
                    help="each cycle interrupts its job 1..N times (drawn), then lets it finish")
    ap.add_argument("--max-attempts", type=int, default=12, help="give up on a cycle after this many starts")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the dataset sizes")
    ap.add_argument("--generate-sampling", action="store_true", help="generate with temperature 0.8 (seeded) "
                    "instead of greedy")
    ap.add_argument("--root", type=Path, default=HERE,
                    help="the checkout whose jobs/ and nesa_hpc/ run (default: this one)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep models, data and every cycle's files here "
                    "(default: a temporary folder, removed unless something went wrong)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--strict-exits", action="store_true", help="unclean exits fail the soak too")
    a = ap.parse_args(argv)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    root = a.root.resolve()
    work = a.workdir.resolve() if a.workdir else Path(tempfile.mkdtemp(prefix="nesa-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"soak: work folder {work}, jobs from {root}, {a.ranks} ranks, seed {a.seed}", flush=True)
    t_build = time.monotonic()
    inputs = build_inputs(work, a.scale)
    print(f"soak: models and data ready in {time.monotonic() - t_build:.1f} s", flush=True)
    report = {"args": {k: str(v) for k, v in vars(a).items()}, "work": str(work), "tasks": {}}
    failed = False
    for task in tasks:
        ref = work / task / ("reference" if task == "train" else "reference.h5")
        if ref.exists():
            shutil.rmtree(ref) if ref.is_dir() else ref.unlink()
        ref.parent.mkdir(parents=True, exist_ok=True)
        rec = run_attempt(a.ranks, job_args(task, inputs, ref, root, a.generate_sampling),
                          work / task / "reference.log", root, task, None, max(a.deadline, 600))
        if rec["code"] != 0:
            print(f"soak: {task}: the uninterrupted reference run failed (exit {rec['code']}):\n"
                  f"{rec.get('tail', '')}", flush=True)
            report["tasks"][task] = {"reference": rec}
            failed = True
            continue
        typical = rec["seconds"]
        print(f"soak: {task}: reference run {typical:.1f} s", flush=True)
        cycles = []
        for c in range(a.first_cycle, a.first_cycle + a.cycles):
            cycles.append(run_cycle(task, c, a.seed, a.ranks, typical, a.deadline, a.max_interrupts,
                                    a.max_attempts, work, inputs, root, ref, a.generate_sampling))
            r = cycles[-1]["result"]
            print(f"  {task} cycle {c}: {cycles[-1]['resumes']} resumes, {cycles[-1]['seconds']:.0f} s, "
                  f"lost {r.get('rows_lost')}, duplicated {r.get('rows_duplicated')}, "
                  f"mismatched {r.get('rows_mismatched')}, complete {r.get('complete')}"
                  + (f", ERROR {r['error']}" if r.get("error") else ""), flush=True)
        s = summarize(task, cycles)
        report["tasks"][task] = {"reference_seconds": typical, "summary": s, "cycles": cycles}
        failed |= bad(s, a.strict_exits)
        if a.json:
            a.json.write_text(json.dumps(report, indent=1, default=str))
    print()
    for task in tasks:
        if "summary" in report["tasks"].get(task, {}):
            print(table(report["tasks"][task]["summary"]))
            print()
    if a.json:
        a.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"soak: details in {a.json}")
    if not a.workdir:
        if failed:
            print(f"soak: something went wrong; the files stay in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
