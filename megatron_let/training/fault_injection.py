"""Test hook: make a chosen file write of a run fail as a full or broken disk would.

``MEGATRON_LET_TEST_FAIL_WRITE=GLOB[#N]:ERRNO`` (e.g. ``*/iter_0000004.tmp/__0_0.distcp:ENOSPC``,
``*/latest_checkpointed_iteration.txt.tmp:EIO``) makes every open-for-writing of a path matching
``GLOB`` (from the N-th such open of the process on, default the first) create the file empty and
then raise ``OSError(ERRNO)`` naming it: what a write that finds
the disk full leaves behind (the file exists, its data does not). It works through a Python audit
hook, so it reaches every writer of the process, megatron-core's and torch's included, and the shard
writer processes megatron-core forks (they inherit the hook). Never set outside tests.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import sys
import threading

import torch

ENV = "MEGATRON_LET_TEST_FAIL_WRITE"
_installed = False


def _writing(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def install_from_env() -> bool:
    """Install the hook when the variable is set; True when installed (once per process)."""
    global _installed
    spec = os.environ.get(ENV)
    if not spec or _installed:
        return _installed
    pattern, _, name = spec.rpartition(":")
    pattern, _, nth = pattern.partition("#")
    code = getattr(errno, name)
    busy = threading.local()
    seen = [0]

    def hook(event, args):
        if event != "open" or getattr(busy, "on", False):
            return
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        if not isinstance(path, (str, bytes, os.PathLike)) or not _writing(mode, flags):
            return
        path = os.fsdecode(path)
        if not fnmatch.fnmatch(path, pattern):
            return
        seen[0] += 1
        if seen[0] < int(nth or 1):
            return
        busy.on = True
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))  # the file exists, empty
        except OSError:
            pass
        finally:
            busy.on = False
        raise OSError(code, os.strerror(code), path)

    sys.addaudithook(hook)
    _route_torch_save_through_open()
    _installed = True
    return True


def _route_torch_save_through_open() -> None:
    """``torch.save(obj, path)`` opens its file in C++, unseen by audit hooks: open it in Python
    (same bytes: torch.save writes the same archive into a file object)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, bytes, os.PathLike)):
            with open(f, "wb") as stream:
                return real_save(obj, stream, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
