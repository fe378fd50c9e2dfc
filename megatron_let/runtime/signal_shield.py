"""Helper processes that a job step's stop signal must not kill.

SLURM delivers its time-limit SIGTERM (and ``--signal=USR1`` without ``B:``, ``scancel`` without
``--batch``) to every process of the job step. A trainer catches it and checkpoints at the next step
boundary (``--exit-signal-handler``), but megatron-core's save depends on helper processes that run
Python's default action: the spawn-context ``Manager`` whose queue collects the shard writers'
results (``filesystem_async._get_write_results_queue``) and multiprocessing's resource tracker
(which ignores SIGTERM, not SIGUSR1). Killed, they take the checkpoint down with ``BrokenPipeError``.

:func:`start_checkpoint_helpers` starts them before the first save with the stop signals blocked in
the calling thread: a child inherits the signal mask (across ``exec`` too), so the signals stay
pending there for good, while the trainer gets any that arrived meanwhile as soon as the mask is
restored. The helpers still end with the trainer: the tracker at EOF of its pipe, the Manager by its
finaliser, or, when the trainer is SIGKILLed (no finaliser runs), by the kernel: we start that Manager
ourselves with an initializer that asks for SIGKILL at the trainer's death (lifeline.exit_with_trainer);
megatron-core's ``ctx.Manager()`` would have left it an orphan, immune to the stop signals, for good.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from multiprocessing import resource_tracker
from multiprocessing.managers import SyncManager
from typing import Iterable, Iterator

from megatron.core.dist_checkpointing.strategies import filesystem_async

from megatron_let.runtime.lifeline import exit_with_trainer

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def signals_blocked(signals: Iterable[int] = STOP_SIGNALS) -> Iterator[None]:
    """Block ``signals`` in this thread (processes started meanwhile inherit the mask); restore after,
    when a signal that arrived meanwhile is delivered to this process."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_checkpoint_helpers() -> list[str]:
    """Start the helper processes megatron-core's checkpoint save uses, shielded from the stop
    signals. Idempotent (both are started once per process). Returns what was started, for tests."""
    started = []
    with signals_blocked():
        # ensure_running blocks SIGINT/SIGTERM itself around the spawn and then *unblocks* them in
        # this thread, so the Manager below gets a block of its own
        resource_tracker.ensure_running()
        started.append("resource tracker")
    get_queue = getattr(filesystem_async, "_get_write_results_queue", None)
    if get_queue is not None:
        if getattr(filesystem_async, "_results_queue", "absent") is None:
            # what get_queue would do (a spawn-context Manager's Queue), with the lifeline; the proxy
            # keeps the manager alive, as megatron-core's own does
            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            with signals_blocked():
                manager.start(initializer=exit_with_trainer, initargs=(os.getpid(),))
            filesystem_async._results_queue = manager.Queue()
        else:  # already made, or kept elsewhere by this megatron-core: its own getter, shielded
            with signals_blocked():
                get_queue()
        started.append("write-results queue manager")
    return started
