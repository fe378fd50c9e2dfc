"""Workers exit when their torchrun agent dies.

torchrun starts each worker in a session of its own, so when the agent is SIGKILLed (OOM killer, a
node agent, ``kill -9``) nothing tells the workers: they would train on, and save, as orphans while
a restarted job starts next to them. On Linux each worker asks the kernel to SIGKILL it when its
parent dies (``prctl(PR_SET_PDEATHSIG)``, effective immediately, no thread or polling). SIGKILL,
not SIGTERM: an orphan must not write a checkpoint (the next run's lock owner could be writing one).

The same holds for the checkpoint helpers a trainer starts (:func:`exit_with_trainer`).

Workers: only under torchrun (``TORCHELASTIC_RUN_ID`` set): a plain ``python pretrain_let.py`` run's parent is
a shell, which may legitimately go away (``nohup``). Elsewhere than Linux this is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _kill_me_with_my_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")


def exit_with_trainer(trainer_pid: int) -> None:
    """In a helper process the trainer ``trainer_pid`` started (megatron-core's checkpoint helpers,
    runtime/signal_shield.py): SIGKILL this helper when the trainer dies, also by SIGKILL, when no
    finaliser shuts it down. Its stop signals are blocked, so nothing else would."""
    if not sys.platform.startswith("linux"):
        return
    _kill_me_with_my_parent()
    if os.getppid() != trainer_pid:  # the trainer died before the prctl: already an orphan
        os.kill(os.getpid(), signal.SIGKILL)


def exit_with_agent() -> bool:
    """Arrange for this torchrun worker to be SIGKILLed when its agent dies; True if armed."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return False
    _kill_me_with_my_parent()
    # The agent may have died between starting us and the prctl: then we are already an orphan.
    # megatron_let.runtime.torchrun tells us its pid (a value inherited from some outer agent is
    # not our parent and still alive); under plain torchrun, reparenting to init is the sign.
    agent = os.environ.get("MEGATRON_LET_AGENT_PID", "")
    parent = os.getppid()
    if parent == 1 or (agent.isdigit() and parent != int(agent) and not _alive(int(agent))):
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True
