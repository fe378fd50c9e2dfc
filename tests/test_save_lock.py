"""The ``--save`` lock under racing acquirers, its heartbeat thread, and its write failures.

The stress test starts 16 processes that, trial after trial, try to take the lock of one fresh
directory at the same instant (a barrier), with no lock, a lock of a dead process on this host, or
a lock whose heartbeat is an hour old: exactly one must win every trial, and every loser's error
must name the winner (host, pid, start time), as read from the winner's own record.
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import socket
import time

import pytest

from megatron_let.training.errors import DiskFullError, SaveLockError
from megatron_let.training.save_lock import LOCK_NAME, SaveLock, _describe, check_lock

PROCS = 16
TRIALS = 50


def _dead_pid() -> int:
    proc = mp.get_context("fork").Process(target=lambda: None)
    proc.start()
    proc.join()
    return proc.pid


def _stale_record(kind: str) -> dict:
    old = time.time() - 3600
    if kind == "dead-pid":
        return {"host": socket.gethostname(), "pid": _dead_pid(), "started": old, "heartbeat": time.time()}
    return {"host": "other-node", "pid": 1, "started": old, "heartbeat": old}


def _acquirer(root, trials, start, done, results):
    for t in range(trials):
        d = os.path.join(root, f"t{t:03d}")
        lock = SaveLock(d, log=lambda m: None)
        start.wait(timeout=60)
        try:
            lock.acquire()
            results.put((t, "won", dict(lock.info)))
        except SaveLockError as e:
            results.put((t, "lost", str(e)))
        except Exception as e:  # noqa: BLE001 - any other outcome is the bug this test looks for
            results.put((t, "crashed", f"{type(e).__name__}: {e}"))
        done.wait(timeout=60)  # the winner holds the lock until every racer has tried
        if lock.info is not None:
            lock.release()


@pytest.mark.parametrize("existing", [None, "dead-pid", "old-heartbeat"])
def test_racing_acquirers_exactly_one_wins_and_losers_name_it(existing, tmp_path):
    ctx = mp.get_context("fork")
    root = str(tmp_path)
    for t in range(TRIALS):
        d = os.path.join(root, f"t{t:03d}")
        os.makedirs(d)
        if existing:
            with open(os.path.join(d, LOCK_NAME), "w") as f:
                json.dump(_stale_record(existing), f)
    start, done, results = ctx.Barrier(PROCS), ctx.Barrier(PROCS), ctx.Queue()
    procs = [ctx.Process(target=_acquirer, args=(root, TRIALS, start, done, results))
             for _ in range(PROCS)]
    t0 = time.time()
    for p in procs:
        p.start()
    outcomes = {}
    try:
        for _ in range(PROCS * TRIALS):
            t, kind, what = results.get(timeout=120)
            outcomes.setdefault(t, []).append((kind, what))
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    print(f"{PROCS} x {TRIALS} acquisitions in {time.time() - t0:.1f}s")
    for t, got in sorted(outcomes.items()):
        crashed = [w for k, w in got if k == "crashed"]
        assert not crashed, (t, crashed)
        winners = [w for k, w in got if k == "won"]
        assert len(winners) == 1, (t, existing, winners)
        holder = f"is in use by another run ({_describe(winners[0])})"
        for kind, msg in got:
            if kind == "lost":
                assert holder in msg, (t, msg, winners[0])
                assert "None" not in msg and "1970" not in msg, msg
        left = sorted(os.listdir(os.path.join(root, f"t{t:03d}")))
        assert left == [], left  # released, and no temporary record left behind


def test_heartbeat_thread_refreshes_during_a_long_pause(tmp_path):
    """A holder busy for longer than the stale timeout (a long evaluation or save) stays the holder:
    its thread refreshes the heartbeat, so another run is refused, not let in."""
    lock = SaveLock(str(tmp_path), stale_after_s=1.0, heartbeat_s=0.2, log=lambda m: None)
    lock.acquire()
    lock.start_heartbeat()
    try:
        first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
        time.sleep(2.5)  # the main thread does nothing: no per-step heartbeat
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["heartbeat"] > first + 1.5, (first, record)
        with pytest.raises(SaveLockError, match=f"pid {os.getpid()}"):
            SaveLock(str(tmp_path), stale_after_s=1.0, log=lambda m: None).acquire()
        lock.check()  # nothing went wrong
    finally:
        lock.release()
    assert os.listdir(tmp_path) == []


def test_heartbeat_thread_reports_a_lost_lock(tmp_path):
    lock = SaveLock(str(tmp_path), heartbeat_s=0.1, log=lambda m: None)
    lock.acquire()
    other = {"host": "other-node", "pid": 4242, "started": time.time(), "heartbeat": time.time()}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))  # taken over behind our back
    lock.start_heartbeat()
    time.sleep(0.6)
    with pytest.raises(SaveLockError, match="lost the lock .*now held by host other-node pid 4242"):
        lock.heartbeat()
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == 4242  # theirs is left alone


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("when", ["acquire", "heartbeat"])
def test_lock_write_failure_names_the_file_and_leaves_no_tmp(code, when, tmp_path, monkeypatch):
    import builtins

    lock = SaveLock(str(tmp_path), log=lambda m: None)
    if when == "heartbeat":
        lock.acquire()
    real_open = builtins.open

    def failing_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode and str(path).endswith(".tmp"):
            f.close()  # the file exists, its write fails: what a full disk does
            raise OSError(code, os.strerror(code))
        return f

    monkeypatch.setattr(builtins, "open", failing_open)
    with pytest.raises(OSError) as e:
        lock.heartbeat(force=True) if when == "heartbeat" else lock.acquire()
    monkeypatch.setattr(builtins, "open", real_open)
    msg = str(e.value)
    assert os.path.join(str(tmp_path), LOCK_NAME) in msg and "\n" not in msg, msg
    assert isinstance(e.value, DiskFullError) == (code == errno.ENOSPC)
    left = sorted(os.listdir(tmp_path))
    assert left == ([LOCK_NAME] if when == "heartbeat" else []), left
    lock.release()


def test_check_lock_reports_a_live_holder_only(tmp_path):
    assert check_lock(str(tmp_path)) is None
    lock = SaveLock(str(tmp_path), log=lambda m: None)
    lock.acquire()
    try:
        msg = check_lock(str(tmp_path))
        assert msg and f"pid {os.getpid()}" in msg and "in use by another run" in msg
    finally:
        lock.release()
    (tmp_path / LOCK_NAME).write_text(json.dumps(_stale_record("dead-pid")))
    assert check_lock(str(tmp_path)) is None  # stale: the run would take it over
