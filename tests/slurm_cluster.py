"""A one-machine SLURM cluster for the tests: Debian's ``munged``, ``slurmctld`` and ``slurmd``
started from a private folder, and stopped by the ids of the processes started here.

The packages start no services (no systemd here), so :func:`start_cluster` does what their
units would: a fresh munge key and socket, a ``slurm.conf`` pointing at them, ``slurmctld -D``
and ``slurmd -D -N localhost`` in the background, then waits until ``sinfo`` shows the node
``idle`` (about 7 s cold, 1.5 s warm). Everything lives under one folder made for the purpose
(created 0755 under the temporary folder: the ``munge`` user must reach its key and socket);
the client commands find the cluster through ``SLURM_CONF`` in :attr:`Cluster.env`.

Settings, as measured on these machines: ``select/cons_tres`` with cores as the consumable
resource, ``proctrack/linuxproc`` and ``task/none`` (no cgroups), ``batch_sched_delay=0``
(otherwise each job waits about 3 s), no accounting (``sacct`` does not work; ``scontrol show
job`` keeps finished jobs for ``MinJobAge`` = 300 s). Jobs run as the submitting user, root
here: ``SlurmUser`` and ``SlurmdUser`` are root.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SBIN = ("/usr/sbin", "/usr/local/sbin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel")


class ClusterUnavailable(RuntimeError):
    """The cluster cannot start here; the message says why (tests skip with it)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemTotal:\s+(\d+) kB", text).group(1)) // 1024


def why_unavailable() -> str | None:
    """The reason the cluster cannot start on this machine, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a one-machine SLURM cluster needs root (munged runs as user munge, slurmd runs jobs as their owners)"
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return (
            f"SLURM/munge not installed ({', '.join(missing)} missing; "
            "scripts/setup.sh installs slurmctld slurmd slurm-client munge as root)"
        )
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (Debian's munge package creates it)"
    return None


@dataclass
class Cluster:
    """A running one-node cluster: its folder, configuration, environment and processes."""

    root: Path
    conf: Path
    cpus: int
    memory_mb: int
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # -- client commands -----------------------------------------------------------------

    def run(self, *cmd, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """A client command (``sbatch``, ``squeue``, ...) against this cluster."""
        return subprocess.run(
            [str(c) for c in cmd],
            env={**self.env, **kwargs.pop("env", {})},
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )

    def sbatch(self, *args, env: dict | None = None, cwd: str | os.PathLike | None = None) -> str:
        """Submit a batch job; returns its id (an array's parent id for ``--array``)."""
        proc = self.run("sbatch", "--parsable", *args, env=env or {}, cwd=cwd, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(map(str, args))} failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def queued(self) -> list[str]:
        """Ids of the jobs still pending or running (array tasks as ``<id>_<task>``)."""
        out = self.run("squeue", "-h", "-o", "%i").stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def wait(self, timeout: float = 300, poll: float = 0.5) -> None:
        """Wait until the queue is empty (every job finished), or raise TimeoutError."""
        end = time.monotonic() + timeout
        while self.queued():
            if time.monotonic() > end:
                raise TimeoutError(f"SLURM jobs still queued after {timeout:.0f} s: {self.queued()}\n{self.logs()}")
            time.sleep(poll)

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job -o`` of a job, one dict per job (every task of an array)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        records = []
        for line in out.splitlines():
            if line.strip():
                records.append(dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", line)))
        return records

    def logs(self, tail: int = 2000) -> str:
        """The end of the daemons' log files (for failure messages)."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # -- stopping --------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel what is left in the queue, then stop the daemons this module started (by
        process id: terminate, then kill after 10 s) and remove the cluster's folder."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                if self.queued():
                    self.run("scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name, check=False)
                    self.wait(timeout=30)
            except (subprocess.SubprocessError, TimeoutError, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def _slurm_conf(root: Path, socket_path: Path, cpus: int, memory_mb: int) -> str:
    state = root / "state"
    log = root / "log"
    return f"""# One-machine test cluster written by tests/slurm_cluster.py
ClusterName=iqttest
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
StateSaveLocation={state / "ctld"}
SlurmdSpoolDir={state / "d"}
SlurmctldPidFile={state / "slurmctld.pid"}
SlurmdPidFile={state / "slurmd.pid"}
SlurmctldLogFile={log / "slurmctld.log"}
SlurmdLogFile={log / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=300
KillWait=5
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(timeout: float = 60) -> Cluster:
    """Start munged, slurmctld and slurmd; return the :class:`Cluster` once its node is idle.

    Raises :class:`ClusterUnavailable` (after stopping whatever started) when the machine
    cannot run it or it does not come up within ``timeout`` seconds.
    """
    reason = why_unavailable()
    if reason:
        raise ClusterUnavailable(reason)
    munge = pwd.getpwnam("munge")
    root = Path(tempfile.mkdtemp(prefix="iqt-slurm-"))
    os.chmod(root, 0o755)  # the munge user must reach its folder
    for sub in ("state/ctld", "state/d", "log"):
        (root / sub).mkdir(parents=True)
    # munged's folders: owned by munge, not writable by others; the socket folder 0755.
    mdir, sdir = root / "munge", root / "munge-socket"
    for folder, mode in ((mdir, 0o700), (sdir, 0o755)):
        folder.mkdir()
        os.chown(folder, munge.pw_uid, munge.pw_gid)
        os.chmod(folder, mode)
    key = mdir / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chown(key, munge.pw_uid, munge.pw_gid)
    os.chmod(key, 0o400)
    socket_path = sdir / "munge.socket"

    cpus = os.cpu_count() or 1
    memory_mb = _memory_mb()
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, socket_path, cpus, memory_mb))
    env = {
        **os.environ,
        "SLURM_CONF": str(conf),
        "LOGNAME": os.environ.get("LOGNAME") or pwd.getpwuid(os.geteuid()).pw_name,
    }
    for name in list(env):  # a job's own variables must not leak into the test cluster's clients
        if name.startswith(("SLURM_", "SBATCH_", "SRUN_")) and name != "SLURM_CONF":
            del env[name]
    cluster = Cluster(root, conf, cpus, memory_mb, env)

    def launch(name: str, cmd: list[str], **kwargs) -> None:
        out = open(root / "log" / f"{name}.console", "w")
        try:
            cluster.procs[name] = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs
            )
        finally:
            out.close()

    def fail(what: str) -> ClusterUnavailable:
        consoles = "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-1000:]}" for p in sorted((root / "log").glob("*.console"))
        )
        message = f"the one-machine SLURM cluster did not start: {what}\n{cluster.logs()}\n{consoles}"
        cluster.stop()
        return ClusterUnavailable(message)

    try:
        launch(
            "munged",
            [
                _which("munged"),
                "--foreground",
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={mdir / 'munged.pid'}",
                f"--log-file={mdir / 'munged.log'}",
                f"--seed-file={mdir / 'munged.seed'}",
            ],
            user=munge.pw_uid,
            group=munge.pw_gid,
            extra_groups=[],
            cwd=mdir,
        )
        end = time.monotonic() + timeout
        while not socket_path.exists():
            if cluster.procs["munged"].poll() is not None or time.monotonic() > end:
                raise fail("munged did not create its socket")
            time.sleep(0.05)
        launch("slurmctld", [_which("slurmctld"), "-D", "-f", str(conf)], cwd=root)
        launch("slurmd", [_which("slurmd"), "-D", "-N", "localhost", "-f", str(conf)], cwd=root)
        while True:
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    raise fail(f"{name} exited with code {proc.returncode}")
            try:
                proc = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=20)
                said = (proc.stdout + proc.stderr).strip()
                if proc.returncode == 0 and re.search(r"^localhost idle\b", proc.stdout, re.M):
                    return cluster
            except subprocess.TimeoutExpired:
                said = "no answer within 20 s"
            if time.monotonic() > end:
                raise fail(f"the node is not idle after {timeout:.0f} s (sinfo: {said!r})")
            time.sleep(0.2)
    except ClusterUnavailable:
        raise
    except OSError as exc:  # a daemon that cannot be executed
        raise fail(f"{exc.__class__.__name__}: {exc}") from None
    except BaseException:
        cluster.stop()
        raise
