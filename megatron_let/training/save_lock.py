"""One writer per ``--save`` directory: a lock file naming its holder, with a heartbeat.

``DIR/.megatron_let.lock`` (JSON: host, pid, SLURM job id, start time, heartbeat) is created with
``O_EXCL`` by rank 0 before any compute. A second run finds it and stops with an error naming the
holder, unless the lock is stale: its pid is dead on this host, or its heartbeat (refreshed by the
holder at most every ``HEARTBEAT_S`` seconds, from the training loop) is older than ``stale_after_s``.
A stale lock is taken over with a warning. The lock is removed at exit.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Callable, Optional

from megatron_let.training.errors import SaveLockError

LOCK_NAME = ".megatron_let.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # a live holder refreshes every HEARTBEAT_S, even during a long save it cannot


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(info: dict) -> str:
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"host {info.get('host')} pid {info.get('pid')}{job}, started {started}"


class SaveLock:
    def __init__(self, save_dir: str, stale_after_s: float = STALE_AFTER_S,
                 log: Callable[[str], None] = print) -> None:
        self.path = os.path.join(save_dir, LOCK_NAME)
        self.stale_after_s = stale_after_s
        self.log = log
        self.info: Optional[dict] = None
        self._last_beat = 0.0

    def _read(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written right now, or garbage: judged by its age below

    def _stale_reason(self, info: dict) -> Optional[str]:
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
                and not _pid_alive(info["pid"]):
            return f"its process {info['pid']} is gone"
        beat = info.get("heartbeat")
        if not isinstance(beat, (int, float)):
            beat = os.path.getmtime(self.path) if os.path.exists(self.path) else 0.0
        age = time.time() - beat
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f}s old (> {self.stale_after_s:.0f}s)"
        return None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        now = time.time()
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": now, "heartbeat": now}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # released meanwhile
                reason = self._stale_reason(holder)
                if reason is None:
                    raise SaveLockError(
                        f"--save {os.path.dirname(self.path)} is in use by another run ({_describe(holder)});"
                        f" two runs must not write one checkpoint directory (lock file {self.path})")
                self.log(f"WARNING: taking over the stale lock {self.path} of {_describe(holder)}: {reason}")
                os.unlink(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
            self._last_beat = now
            return
        raise SaveLockError(f"could not take the lock {self.path} (it keeps changing)")

    def heartbeat(self, force: bool = False) -> None:
        """Refresh the heartbeat (cheap: at most every HEARTBEAT_S seconds unless ``force``)."""
        now = time.time()
        if self.info is None or (not force and now - self._last_beat < HEARTBEAT_S):
            return
        self.info["heartbeat"] = now
        tmp = self.path + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.info, f)
        os.replace(tmp, self.path)
        self._last_beat = now

    def release(self) -> None:
        if self.info is None:
            return
        current = self._read()
        if current and current.get("pid") == self.info["pid"] and current.get("host") == self.info["host"]:
            os.unlink(self.path)
        self.info = None
