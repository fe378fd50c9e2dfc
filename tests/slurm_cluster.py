"""A real one-node SLURM for tests: Debian's slurm-wlm (munge, slurmctld, slurmd) on localhost.

Everything lives in one temporary folder (config, state, spool, logs; clients find the config
through ``SLURM_CONF``), on free ports, and is torn down afterwards: daemons killed by their pid
files, state removed (else old jobs come back). Facts and pitfalls: shared/notes/slurm-on-one-machine.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time

PACKAGES = ("slurm-wlm", "munge")
MUNGE_PID = "/run/munge/munged.pid"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed(say=print) -> str | None:
    """None when slurmctld/slurmd/munged are there (installing them with apt-get when root, which
    ``say`` announces); otherwise the reason they cannot be."""
    needed = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "scancel")
    if all(shutil.which(t) or os.path.exists(f"/usr/sbin/{t}") for t in needed):
        return None
    if os.geteuid() != 0:
        return "slurm-wlm/munge are not installed and installing them needs root (apt-get install slurm-wlm munge)"
    if not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and there is no apt-get"
    say(f"tests/slurm_cluster.py: running as root, installing {' '.join(PACKAGES)} system-wide "
        "with apt-get (Debian packages, for the real-SLURM test)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
                              env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr.strip()[-500:]}"
    return None


def _pid_alive(path: str) -> int | None:
    try:
        pid = int(open(path).read().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


class SlurmCluster:
    def __init__(self, root: str) -> None:
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self._own_munge = False
        self.node = socket.gethostname().split(".")[0]

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30) -> None:
        for sub in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._start_munge()
        r = self.root
        conf = f"""ClusterName=letcluster
SlurmctldHost={self.node}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/log/jobcomp.log
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=5
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=1
NodeName={self.node} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(conf)
        # both daemons fork into the background and write their pid files
        subprocess.run(["slurmctld", "-f", self.conf], env=self.env, check=True, timeout=30)
        subprocess.run(["slurmd", "-f", self.conf], env=self.env, check=True, timeout=30)
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True,
                                 text=True).stdout.strip()
            if out == "idle":
                return
            time.sleep(0.3)
        raise RuntimeError(f"SLURM node not idle after {timeout}s (sinfo: {out!r}):\n" + self.logs())

    def _start_munge(self) -> None:
        if _pid_alive(MUNGE_PID):
            return  # someone's munged is running: use it, leave it running
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            os.makedirs(d, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=30)
        self._own_munge = True

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            pid = _pid_alive(os.path.join(self.root, f"{name}.pid"))
            if pid:
                os.kill(pid, signal.SIGTERM)
                self._wait_gone(pid)
        if self._own_munge:
            pid = _pid_alive(MUNGE_PID)
            if pid:
                os.kill(pid, signal.SIGTERM)
                self._wait_gone(pid)
        shutil.rmtree(os.path.join(self.root, "state"), ignore_errors=True)
        shutil.rmtree(os.path.join(self.root, "spool"), ignore_errors=True)
        if os.path.exists(self.conf):
            os.remove(self.conf)

    @staticmethod
    def _wait_gone(pid: int, timeout: float = 10) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ jobs
    def run(self, *cmd: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        e = dict(env or self.env, SLURM_CONF=self.conf)
        return subprocess.run(list(cmd), env=e, capture_output=True, text=True, timeout=60, **kw)

    def sbatch(self, *args: str, env: dict, cwd: str) -> str:
        proc = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def logs(self) -> str:
        text = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                text.append(f"--- {name}\n" + open(path).read()[-3000:])
        return "\n".join(text)
