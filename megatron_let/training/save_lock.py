"""One writer per ``--save`` directory: a lock file naming its holder, with a heartbeat.

``DIR/.megatron_let.lock`` (JSON: host, pid, SLURM job id, start time, heartbeat) is taken by rank 0
before any compute. A second run finds it and stops with an error naming the holder, unless the lock
is stale: its pid is dead on this host, or its heartbeat is older than ``stale_after_s``. A stale lock
is taken over with a warning. The lock is removed at exit.

Atomicity. Every read-decide-write on the lock (acquire, takeover, heartbeat, release) runs under an
OS lock, ``flock`` on the directory itself (no extra file), so racing acquirers are serialised and
exactly one wins; the others read the winner's complete record. The lock file itself only ever
appears whole: it is written to a unique temporary file and put in place with ``link`` (create: fails
when a lock exists) or ``rename`` (takeover, heartbeat). Where the file system refuses ``flock`` on a
directory (NFS emulates ``flock`` with POSIX locks, which need a file open for writing) the OS lock
is taken on ``DIR/.megatron_let.lock.guard`` instead. Lustre grants ``flock`` only when mounted with
``-o flock`` (``localflock`` makes it node-local: two nodes could then both win a stale takeover); on
a file system with no ``flock`` at all a warning says so, and creating a fresh lock stays atomic
(``link``) while a stale takeover is no longer serialised.

The holder refreshes the heartbeat from a background thread (:meth:`SaveLock.start_heartbeat`) every
``HEARTBEAT_S`` seconds, so long evaluations and saves never let it go stale; the thread checks that
the lock is still its own. A failed refresh (disk full, a takeover by another run) is raised by the
next :meth:`SaveLock.check` on the main thread, as one line naming the lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Callable, Iterator, Optional

from megatron_let.training.errors import CheckpointWriteError, DiskFullError, SaveLockError

LOCK_NAME = ".megatron_let.lock"
GUARD_SUFFIX = ".guard"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # a live holder refreshes every HEARTBEAT_S from its heartbeat thread
_NO_FLOCK = (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


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
    started = info.get("started")
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            if isinstance(started, (int, float)) else "at an unknown time")
    return (f"host {info.get('host') or 'unknown'} pid {info.get('pid') or 'unknown'}{job}, "
            f"started {when}")


def write_error(exc: OSError, path: str, what: str) -> OSError:
    """One line naming ``path`` for a failed write; disk full keeps its own type."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(exc.errno, f"disk full while writing {what} {path} ({reason}): free space")
    return CheckpointWriteError(exc.errno, f"cannot write {what} {path}: [Errno {exc.errno}] {reason}")


class SaveLock:
    def __init__(self, save_dir: str, stale_after_s: float = STALE_AFTER_S,
                 log: Callable[[str], None] = print, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.dir = save_dir
        self.path = os.path.join(save_dir, LOCK_NAME)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.log = log
        self.info: Optional[dict] = None
        self._last_beat = 0.0
        self._mutex = threading.Lock()  # main thread vs heartbeat thread
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._failure: Optional[BaseException] = None
        self._warned_no_flock = False

    # ------------------------------------------------------------------ the OS lock
    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Serialises every read-decide-write on the lock file across processes and hosts."""
        fd = None
        for path, flags in ((self.dir, os.O_RDONLY | os.O_DIRECTORY),
                            (self.path + GUARD_SUFFIX, os.O_RDWR | os.O_CREAT)):
            try:
                fd = os.open(path, flags, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
                break
            except OSError as e:
                if fd is not None:
                    os.close(fd)
                    fd = None
                if e.errno not in _NO_FLOCK:
                    raise
        if fd is None and not self._warned_no_flock:
            self._warned_no_flock = True
            self.log(f"WARNING: the file system of {self.dir} supports no flock: a stale lock taken "
                     "over by two runs at once is not detected (Lustre: mount with -o flock)")
        try:
            yield
        finally:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    # ------------------------------------------------------------------ the lock file
    def _read(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # garbage (never half-written: the file appears whole): judged by its age

    def _write_tmp(self) -> str:
        """Our record in a unique temporary file next to the lock; removed again on failure."""
        tmp = f"{self.path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.info, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise write_error(e, self.path, "the lock file") from None
        return tmp

    def _stale_reason(self, info: dict) -> Optional[str]:
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) \
                and not _pid_alive(info["pid"]):
            return f"its process {info['pid']} is gone"
        beat = info.get("heartbeat")
        if not isinstance(beat, (int, float)):
            try:
                beat = os.path.getmtime(self.path)
            except OSError:
                return "it is unreadable"
        age = time.time() - beat
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f}s old (> {self.stale_after_s:.0f}s)"
        return None

    def _ours(self, current: Optional[dict]) -> bool:
        return bool(current) and self.info is not None and all(
            current.get(k) == self.info[k] for k in ("host", "pid", "started"))

    def acquire(self) -> None:
        os.makedirs(self.dir or ".", exist_ok=True)
        now = time.time()
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "started": now, "heartbeat": now}
        tmp = self._write_tmp()
        try:
            with self._guard():
                try:
                    os.link(tmp, self.path)  # atomic: fails when any lock exists
                except FileExistsError:
                    holder = self._read()
                    reason = self._stale_reason(holder or {})
                    if reason is None:
                        self.info = None
                        raise SaveLockError(
                            f"--save {self.dir} is in use by another run ({_describe(holder or {})});"
                            f" two runs must not write one checkpoint directory (lock file {self.path})")
                    self.log(f"WARNING: taking over the stale lock {self.path} of "
                             f"{_describe(holder or {})}: {reason}")
                    os.replace(tmp, self.path)  # under the OS lock: no other acquirer in between
                    tmp = None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        self._last_beat = now

    def _refresh(self) -> None:
        """Rewrite our record with a new heartbeat, if the lock is still ours."""
        with self._mutex, self._guard():
            if self.info is None:
                return
            current = self._read()
            if not self._ours(current):
                holder = f"now held by {_describe(current)}" if current else "the lock file is gone"
                raise SaveLockError(f"lost the lock {self.path} of --save {self.dir} ({holder}): "
                                    "another run may be writing checkpoints there; stopping")
            now = time.time()
            self.info["heartbeat"] = now
            tmp = self._write_tmp()
            try:
                os.replace(tmp, self.path)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise write_error(e, self.path, "the lock file") from None
            self._last_beat = now

    def heartbeat(self, force: bool = False) -> None:
        """Refresh the heartbeat (cheap: at most every ``heartbeat_s`` seconds unless ``force``);
        raises what the heartbeat thread met."""
        self.check()
        if self.info is None or (not force and time.time() - self._last_beat < self.heartbeat_s):
            return
        self._refresh()

    def check(self) -> None:
        """Raise the heartbeat thread's failure, if any (on the main thread)."""
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def start_heartbeat(self) -> None:
        """Refresh from a daemon thread every ``heartbeat_s`` s: evaluations and saves may be long."""
        if self._thread is not None or self.info is None:
            return
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    self._refresh()
                except (OSError, SaveLockError) as e:
                    self._failure = e
                    return

        self._thread = threading.Thread(target=beat, name="save-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._mutex:
            if self.info is None:
                return
            with self._guard():
                if self._ours(self._read()):
                    os.unlink(self.path)
            self.info = None


def check_lock(save_dir: str, stale_after_s: float = STALE_AFTER_S) -> Optional[str]:
    """What ``--dry-run`` reports: None when a run could take the lock of ``save_dir`` now; else the
    error the real run would stop with (a live holder). Reads only."""
    probe = SaveLock(save_dir, stale_after_s=stale_after_s)
    holder = probe._read()
    if holder is None:
        return None
    if probe._stale_reason(holder) is not None:
        return None
    return (f"--save {save_dir} is in use by another run ({_describe(holder)}); two runs must not "
            f"write one checkpoint directory (lock file {probe.path})")
