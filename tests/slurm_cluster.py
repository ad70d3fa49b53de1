"""A real one-node Slurm (Debian ``slurm-wlm`` + ``munge``) started in a private folder, for the tests.

Everything lives in that folder: a munge key and socket of its own, the daemons' state, logs and pid
files, and a ``slurm.conf`` with free ports; clients find it through ``SLURM_CONF``. Nothing under /etc
is changed, so it can run beside another Slurm on the same machine. The daemons run as root in the
foreground as children of the test process and are stopped (by pid) when the cluster is stopped.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "sinfo")
_SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why (used as the tests' skip reason)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in _SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(folder: Path, host: str, cpus: int) -> str:
    d = folder
    return f"""\
ClusterName=nesatest
FirstJobId={random.randrange(10_000, 2_000_000)}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmi2
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
InactiveLimit=0
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """``start()`` brings up munged, slurmctld and slurmd; ``env`` runs clients against them; ``stop()``."""

    def __init__(self, folder: Path, cpus: int = 8) -> None:
        self.folder = Path(folder)
        self.cpus = cpus
        self.procs: list[subprocess.Popen] = []
        self.conf = self.folder / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        missing = [d for d in COMMANDS if _which(d) is None]
        if missing:
            raise SlurmUnavailable(f"Slurm/munge are not installed (missing {', '.join(missing)}); as root: "
                                   "apt-get install slurm-wlm munge (.ci/run does this)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmctld/slurmd needs root")
        d = self.folder
        for sub in ("munge", "state", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o700)
        key = d / "munge" / "munge.key"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        host = socket.gethostname()
        self.conf.write_text(_conf(d, host, self.cpus))
        self._spawn([_which("munged"), "--foreground", "--force", f"--socket={d}/munge/munge.socket",
                     f"--key-file={key}", f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munge/munged.log",
                     f"--seed-file={d}/munge/munged.seed"], "munged")
        self._wait(lambda: (d / "munge" / "munge.socket").exists(), 10, "munged did not create its socket")
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._spawn([_which("slurmd"), "-D", "-f", str(self.conf)], "slurmd")
        self._wait(self._node_idle, timeout, "the node did not become idle")
        return self

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.folder / f"{name}.stdout", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                start_new_session=True)
        log.close()
        self.procs.append(proc)

    def node_idle(self) -> bool:
        """The node runs nothing and holds no job's processes (a finished job's are gone)."""
        return self._node_idle()

    def _node_idle(self) -> bool:
        for proc in self.procs:
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{proc.args[0]} exited with status {proc.returncode}: {self.logs()}")
        out = subprocess.run([_which("sinfo"), "-h", "-o", "%t"], env={**os.environ, **self.env},
                             capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                self.stop()
                raise SlurmUnavailable(f"{what} within {timeout:.0f} s: {self.logs()}")
            time.sleep(0.2)

    def logs(self, tail: int = 1500) -> str:
        parts = []
        for name in ("munge/munged.log", "slurmctld.log", "slurmd.log", "munged.stdout", "slurmctld.stdout",
                     "slurmd.stdout"):
            path = self.folder / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
