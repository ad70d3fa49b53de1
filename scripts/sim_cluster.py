"""A Slurm cluster of several simulated hosts on one machine, for the tests and for trying the templates.

Each host is a Linux network namespace with an address on one bridge, a hostname of its own (a UTS
namespace) and a slurmd; slurmctld and munged run in the controller's namespace, which holds the bridge.
Hosts talk over real TCP through the bridge (MPI over TCP between hosts, not shared memory: run the ranks
with ``MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp``, which ``SimCluster.env`` sets), and a host can be cut off
(its link set down), shaped (``tc`` rate on its bridge port) or killed (its slurmd and every process it
started). Nothing outside the cluster's folder and its own namespaces is changed: the machine's network, /etc
and any other Slurm are left alone, and ``stop()`` (or ``down``) removes the namespaces again, also after a
failed test.

    python scripts/sim_cluster.py up /tmp/cluster --hosts 4      # prints the environment for the clients
    python scripts/sim_cluster.py run /tmp/cluster -- sinfo       # a client command in the controller's network
    python scripts/sim_cluster.py down /tmp/cluster

Needs root, iproute2, util-linux (nsenter, unshare) and Debian's ``slurm-wlm`` + ``munge`` (.ci/run installs
them). Slurm 22.05 as packaged by Debian was used here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol", "ip", "nsenter",
            "unshare")
_SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
SUBNET = "10.79.{}.{}"


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run here; the message says why (the tests' skip reason)."""


def which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in _SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def _conf(folder: Path, hosts: list[str], addrs: list[str], ctl_addr: str, cpus: int) -> str:
    d = folder
    nodes = "\n".join(f"NodeName={h} NodeAddr={a} CPUs={cpus} RealMemory=4000"
                      for h, a in zip(hosts, addrs, strict=True))
    return f"""\
ClusterName=nesasim
FirstJobId={random.randrange(10_000, 2_000_000)}
SlurmctldHost=ctl({ctl_addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.%n.log
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
SlurmdTimeout=10
MessageTimeout=5
{nodes}
PartitionName=debug Nodes={",".join(hosts)} Default=YES MaxTime=INFINITE State=UP
"""


def _bits_per_s(rate: str) -> int:
    """tc's rate syntax (10gbit, 100mbit, 512kbit, 1000000bit) in bits per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if not m:
        raise ValueError(f"link rate {rate!r}: expected a number and kbit, mbit, gbit or bit (tc syntax)")
    return int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2)])


class SimCluster:
    """``start()`` makes the namespaces and starts munged, slurmctld and one slurmd per host; ``client(cmd)``
    prefixes a command so that it runs in the controller's network; ``stop()`` undoes everything."""

    def __init__(self, folder: Path, hosts: int = 4, cpus: int = 2, tag: str | None = None) -> None:
        self.folder = Path(folder)
        self.cpus = cpus
        tag = tag or f"{os.getpid() % 100000}"
        self.ctl = f"nsc{tag}"
        self.hosts = [f"h{i + 1}" for i in range(hosts)]
        self.netns = {h: f"ns{tag}{h}" for h in self.hosts}
        self.net = random.randrange(1, 250)
        self.addrs = {h: SUBNET.format(self.net, i + 1) for i, h in enumerate(self.hosts)}
        self.ctl_addr = SUBNET.format(self.net, 254)
        self.conf = self.folder / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    # -- what clients need
    @property
    def env(self) -> dict[str, str]:
        """For every client command and job: the cluster's config, and MPICH over TCP between hosts."""
        return {"SLURM_CONF": str(self.conf), "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}

    def client(self, cmd: list[str]) -> list[str]:
        return [which("nsenter"), f"--net=/run/netns/{self.ctl}", *cmd]

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        env = {**os.environ, **self.env, **kw.pop("env", {})}
        return subprocess.run(self.client(cmd), env=env, **kw)

    # -- start and stop
    def start(self, timeout: float = 60.0) -> SimCluster:
        missing = [c for c in COMMANDS if which(c) is None]
        if missing:
            raise ClusterUnavailable(f"missing {', '.join(missing)} (as root: apt-get install slurm-wlm munge "
                                     "iproute2 util-linux; .ci/run does this)")
        if os.geteuid() != 0:
            raise ClusterUnavailable("simulated hosts and their daemons need root")
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "cluster.json").write_text(json.dumps(
            {"ctl": self.ctl, "netns": self.netns, "addrs": self.addrs, "ctl_addr": self.ctl_addr}))
        try:
            self._network()
        except subprocess.CalledProcessError as exc:
            self._remove_network()
            raise ClusterUnavailable(f"network namespaces are not available here: {' '.join(exc.cmd)}: "
                                     f"{(exc.stderr or b'').decode().strip()}") from None
        try:
            self._daemons(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _ip(self, *args: str) -> None:
        subprocess.run([which("ip"), *args], check=True, capture_output=True)

    def _network(self) -> None:
        self._ip("netns", "add", self.ctl)
        self._ip("-n", self.ctl, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.ctl, "addr", "add", f"{self.ctl_addr}/24", "dev", "br0")
        self._ip("-n", self.ctl, "link", "set", "br0", "up")
        self._ip("-n", self.ctl, "link", "set", "lo", "up")
        for h in self.hosts:
            ns = self.netns[h]
            self._ip("netns", "add", ns)
            for conf in ("all", "default"):  # no IPv6 duplicate address detection: usable at once
                subprocess.run([which("ip"), "netns", "exec", ns, "sysctl", "-qw",
                                f"net.ipv6.conf.{conf}.accept_dad=0"], capture_output=True)
            self._ip("-n", self.ctl, "link", "add", h, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip("-n", self.ctl, "link", "set", h, "master", "br0")
            self._ip("-n", self.ctl, "link", "set", h, "up")
            self._ip("-n", ns, "addr", "add", f"{self.addrs[h]}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
        deadline = time.monotonic() + 30
        while not all(self.link_ready(h) for h in self.hosts):
            if time.monotonic() > deadline:
                raise ClusterUnavailable("the simulated links did not come up within 30 s")
            time.sleep(0.2)

    def link_ready(self, host: str) -> bool:
        out = subprocess.run([which("ip"), "-n", self.netns[host], "addr", "show", "dev", "eth0"],
                             capture_output=True, text=True).stdout
        return "LOWER_UP" in out and "state UP" in out and "tentative" not in out

    def _daemons(self, timeout: float) -> None:
        d = self.folder
        for sub in ("munge", "state", *(f"spool/{h}" for h in self.hosts)):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o700)
        key = d / "munge" / "munge.key"
        if not key.exists():
            subprocess.run([which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        self.conf.write_text(_conf(d, self.hosts, [self.addrs[h] for h in self.hosts], self.ctl_addr, self.cpus))
        self._spawn("munged", [which("munged"), "--foreground", "--force", f"--socket={d}/munge/munge.socket",
                               f"--key-file={key}", f"--pid-file={d}/munge/munged.pid",
                               f"--log-file={d}/munge/munged.log", f"--seed-file={d}/munge/munged.seed"])
        self._wait(lambda: (d / "munge" / "munge.socket").exists(), 10, "munged did not create its socket")
        self._spawn("slurmctld", self._in_namespace(self.ctl, "ctl", f"{which('slurmctld')} -D -i -f {self.conf}"))
        for h in self.hosts:
            self.start_host(h)
        self._wait(lambda: self.idle_hosts() == set(self.hosts), timeout, "the hosts did not become idle")

    def start_host(self, host: str) -> None:
        """(Re)start a host's slurmd in its namespace, under its own hostname (a UTS namespace; a private mount
        namespace keeps /sys as it is, where `ip netns exec` would remount it)."""
        self._spawn(f"slurmd.{host}", self._in_namespace(self.netns[host], host,
                                                          f"{which('slurmd')} -D -N {host} -f {self.conf}"))

    @staticmethod
    def _in_namespace(netns: str, hostname: str, command: str) -> list[str]:
        return [which("nsenter"), f"--net=/run/netns/{netns}", which("unshare"), "--uts", "--mount", "sh", "-c",
                f"hostname {hostname} && exec {command}"]

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.folder / f"{name}.stdout", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                start_new_session=True)
        log.close()
        self.procs[name] = proc

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None and not name.startswith("slurmd."):
                    raise ClusterUnavailable(f"{name} exited with status {proc.returncode}: {self.logs()}")
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"{what} within {timeout:.0f} s: {self.logs()}")
            time.sleep(0.3)

    def node_states(self) -> dict[str, str]:
        out = self.run([which("sinfo"), "-h", "-N", "-o", "%N %t"])
        if out.returncode != 0:
            return {}
        return dict(line.split() for line in out.stdout.splitlines() if line.strip())

    def idle_hosts(self) -> set[str]:
        return {h for h, s in self.node_states().items() if s == "idle"}

    def host_pids(self, host: str) -> list[int]:
        """Every process in the host's network namespace (its slurmd, job steps and ranks)."""
        out = subprocess.run([which("ip"), "netns", "pids", self.netns[host]], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill_host(self, host: str) -> None:
        """The host dies: its slurmd and every process it runs are killed at once (SIGKILL)."""
        for pid in self.host_pids(host):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc = self.procs.pop(f"slurmd.{host}", None)
        if proc is not None:
            proc.wait()

    def set_link(self, host: str, up: bool) -> None:
        self._ip("-n", self.ctl, "link", "set", host, "up" if up else "down")

    def shape(self, host: str, rate: str | None) -> None:
        """Limit the host's link to `rate` (tc syntax: 1gbit, 100mbit) in both directions: a token bucket on
        the bridge port (towards the host) and on the host's own interface (from it); None removes the limit.
        This kernel has no netem: delay cannot be added here."""
        tc = which("tc") or "tc"
        burst = max(16_000, _bits_per_s(rate) // 800) if rate else 0  # 10 ms at the rate, at least 16 kB
        for ns, dev in ((self.ctl, host), (self.netns[host], "eth0")):
            subprocess.run([tc, "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True)
            if rate:
                subprocess.run([tc, "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst",
                                str(burst), "latency", "100ms"], check=True, capture_output=True)

    def logs(self, tail: int = 600) -> str:
        parts = []
        for path in sorted(self.folder.glob("*.log")) + sorted(self.folder.glob("*.stdout")):
            text = path.read_text(errors="replace")[-tail:]
            if text.strip():
                parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts)

    def stop(self) -> None:
        for h in self.hosts:  # every job process first, then the daemons
            for pid in self.host_pids(h):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = {}
        self._remove_network()

    def _remove_network(self) -> None:
        for ns in [*self.netns.values(), self.ctl]:
            subprocess.run([which("ip") or "ip", "netns", "del", ns], capture_output=True)

    @classmethod
    def attach(cls, folder: Path) -> SimCluster:
        """The cluster started in `folder` by another process (`up`), for `run` and `down`."""
        info = json.loads((Path(folder) / "cluster.json").read_text())
        self = cls(folder, hosts=len(info["netns"]))
        self.ctl, self.netns, self.addrs, self.ctl_addr = info["ctl"], info["netns"], info["addrs"], info["ctl_addr"]
        return self


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the cluster and keep it running until interrupted")
    up.add_argument("folder", type=Path)
    up.add_argument("--hosts", type=int, default=4)
    up.add_argument("--cpus", type=int, default=2, help="CPUs each host offers to Slurm")
    run = sub.add_parser("run", help="run a client command in the controller's network")
    run.add_argument("folder", type=Path)
    run.add_argument("command", nargs=argparse.REMAINDER)
    down = sub.add_parser("down", help="stop a cluster whose `up` was killed, and remove its namespaces")
    down.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "up":
        cluster = SimCluster(args.folder, hosts=args.hosts, cpus=args.cpus)
        try:
            cluster.start()
        except ClusterUnavailable as exc:
            print(f"sim_cluster: {exc}", file=sys.stderr)
            return 2
        print(" ".join(f"{k}={v}" for k, v in cluster.env.items()))
        print(f"hosts {', '.join(f'{h} {a}' for h, a in cluster.addrs.items())}; controller {cluster.ctl_addr}; "
              f"clients: python scripts/sim_cluster.py run {args.folder} -- sbatch ...; Ctrl-C stops", flush=True)
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        finally:
            cluster.stop()
        return 0
    cluster = SimCluster.attach(args.folder)
    if args.cmd == "run":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        return subprocess.run(cluster.client(command), env={**os.environ, **cluster.env}).returncode
    for name in ("slurmctld.pid", "munge/munged.pid", *(f"slurmd.{h}.pid" for h in cluster.hosts)):
        path = args.folder / name
        if path.exists():
            try:
                os.kill(int(path.read_text().split()[0]), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
    cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
