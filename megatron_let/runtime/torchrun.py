"""torchrun that passes stop signals on to its workers: ``python -m megatron_let.runtime.torchrun``.

Takes exactly torchrun's arguments (it runs ``torch.distributed.run.main``). What differs:

* torchrun's agent handles only SIGTERM/SIGINT/SIGHUP/SIGQUIT; SIGUSR1 (SLURM's usual "time limit
  near" signal) kills it (rc -10) and its workers, which run in sessions of their own, never see it.
* On SIGTERM torchrun sends SIGTERM to its workers, gives them 30 s, SIGKILLs them and exits 1 with
  a traceback, so a checkpoint that takes longer is cut off.

When the training script is run with ``--exit-signal-handler``, this agent forwards SIGUSR1 and the
first SIGTERM to every worker once that worker has installed its handler (a worker still importing
would be killed by the signal's default action; it gets the signal as soon as it is ready), and keeps
supervising them: they checkpoint at the next step boundary and exit 0, and so does the agent. A second
SIGTERM, or a SIGTERM before any worker runs (e.g. during rendezvous), is torchrun's own shutdown.
Without ``--exit-signal-handler`` SIGTERM is torchrun's and SIGUSR1 is ignored with a warning (it
would otherwise kill the agent when SLURM signals every process of a job step).

Workers also learn the agent's pid (``MEGATRON_LET_AGENT_PID``) so that they exit when it dies
(megatron_let.runtime.lifeline).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, Iterable, Optional

import psutil
from torch.distributed.elastic.multiprocessing.api import _terminate_process_handler
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.run import parse_args, run

FORWARDED = (signal.SIGUSR1, signal.SIGTERM)
AGENT_PID_ENV = "MEGATRON_LET_AGENT_PID"
POLL_S = 0.2  # how often a pending stop is retried for workers not ready yet
PROG = "megatron_let.runtime.torchrun"


def _say(msg: str) -> None:
    # os.write, not print: this runs in signal handlers, where a buffered stream may be mid-write
    os.write(2, f"{PROG}: {msg}\n".encode())


def child_pids(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (Linux: SigCgt in /proc/PID/status).
    Elsewhere assumed true. A process that is gone catches nothing."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:  # gone (or no /proc: not Linux, assume ready)
        return not os.path.isdir("/proc/self")
    return False


class StopForwarder:
    """Delivers a requested stop signal to each worker (a child of this process) once it catches it.

    ``request`` may run in a signal handler: it only records the signal and wakes the thread that
    does the /proc reads and the kills."""

    def __init__(self, workers: Callable[[], Iterable[int]] = lambda: child_pids(os.getpid()),
                 ready: Callable[[int, int], bool] = catches) -> None:
        self._workers = workers
        self._ready = ready
        self.pending: Optional[int] = None
        self.delivered: set[tuple[int, int]] = set()  # (worker pid, signal)
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def request(self, sig: int) -> None:
        if self.pending is None or sig == signal.SIGTERM:  # TERM is the stronger request
            self.pending = sig
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stop-forwarder", daemon=True)
            self._thread.start()
        self._wake.set()

    def forward_once(self) -> list[int]:
        """Signal the workers that are ready and not signalled yet; returns their pids."""
        sig = self.pending
        sent = []
        if sig is None:
            return sent
        for pid in self._workers():
            if (pid, sig) in self.delivered or not self._ready(pid, sig):
                continue
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
            self.delivered.add((pid, sig))
            sent.append(pid)
        return sent

    def _run(self) -> None:
        while True:
            self._wake.wait(POLL_S)
            self._wake.clear()
            sig = self.pending
            sent = self.forward_once()
            if sent:
                _say(f"forwarded {signal.Signals(sig).name} to worker(s) "
                     f"{', '.join(map(str, sent))}: they checkpoint at the next step boundary and exit")


def install(args) -> Optional[StopForwarder]:
    """Set up the agent's signal handling for torchrun's parsed arguments ``args`` (adjusted)."""
    os.environ[AGENT_PID_ENV] = str(os.getpid())  # inherited by the workers
    if "--exit-signal-handler" not in args.training_script_args:
        def ignore_usr1(signum, _frame):
            _say("SIGUSR1 ignored: the workers run without --exit-signal-handler")

        signal.signal(signal.SIGUSR1, ignore_usr1)
        return None

    # torchrun (re-)registers its handler, which shuts the workers down, for the signals of
    # --signals-to-handle each time it starts workers: leave SIGTERM and SIGUSR1 to us.
    args.signals_to_handle = ",".join(
        name for name in (n.strip() for n in args.signals_to_handle.split(","))
        if name and name not in ("SIGTERM", "SIGUSR1"))
    forwarder = StopForwarder()

    def on_signal(signum, frame):
        if signum == signal.SIGTERM and (forwarder.pending == signal.SIGTERM
                                         or not child_pids(os.getpid())):
            _say("SIGTERM: stopping the workers now (torchrun's shutdown)")
            _terminate_process_handler(signum, frame)  # raises torchrun's SignalException
        _say(f"{signal.Signals(signum).name} received: asking the workers to checkpoint and exit")
        forwarder.request(signum)

    for sig in FORWARDED:
        signal.signal(sig, on_signal)
    return forwarder


def plain_torchrun_warning(exit_signal_handler: bool) -> Optional[str]:
    """The start-up warning for a worker of plain ``torchrun`` run with --exit-signal-handler: the
    agent dies of a SIGUSR1 (and cuts a SIGTERM's checkpoint short) before the workers can save.
    Plain torchrun sets TORCHELASTIC_RUN_ID but not our agent's pid (:func:`install`)."""
    if not exit_signal_handler or "TORCHELASTIC_RUN_ID" not in os.environ \
            or AGENT_PID_ENV in os.environ:
        return None
    return ("--exit-signal-handler under plain torchrun: a SIGUSR1 sent to the torchrun agent (as "
            "SLURM does before the time limit) kills it and the workers without a checkpoint, and "
            "a SIGTERM gives them 30 s; launch with `python -m megatron_let.runtime.torchrun` "
            "(torchrun's arguments) to have stop signals forwarded and the checkpoint written")


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    install(args)
    record(run)(args)  # what torchrun's main does after parsing


if __name__ == "__main__":
    main()
