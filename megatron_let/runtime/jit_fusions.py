"""megatron-core's jit fusions stay eager on a CPU-only torch build.

``megatron.core.jit`` binds ``jit_fuser = torch.compile`` when it is imported, and megatron-core
decorates some 38 functions with it while ``import megatron.core`` runs (bias-GeLU/SwiGLU,
bias-dropout-add, the fused cross entropy...). Making those wrappers imports torch's dynamo and
inductor: about 1 s of every process's start, on every rank, every tool and every test process. On a
torch built without CUDA no GPU can ever run them, so right after ``megatron.core.jit`` executes we
call megatron-core's own ``disable_jit_fuser()``: the functions decorated afterwards stay plain
(eager) Python, with the same arithmetic. A torch built with CUDA is left exactly as megatron-core
sets it up, whatever device a run then picks.

:func:`install` is called by ``megatron_let/__init__.py``, i.e. before any of our modules imports
megatron-core; it adds an import hook and imports nothing itself (torch is loaded by megatron-core's
own import, when the hook runs).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

JIT_MODULE = "megatron.core.jit"


class _DisableAfterExec(importlib.abc.Loader):
    """Runs ``megatron.core.jit`` with its own loader, then disables its fuser on CPU-only torch."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        # lazy: torch is loaded only now (megatron-core's import loads it); runtime.device imports
        # torch, numpy and runtime.cpu_compat (torch only), so this cannot cycle into megatron-core
        from megatron_let.runtime.device import cuda_built

        disable = getattr(module, "disable_jit_fuser", None)  # absent: megatron-core's default stays
        if disable is not None and not cuda_built():
            disable()


class JitFuserHook(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core.jit`` like the path finder does, with :class:`_DisableAfterExec`."""

    def find_spec(self, fullname, path, target=None):
        if fullname != JIT_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _DisableAfterExec(spec.loader)
        return spec


def install() -> None:
    """Put the hook first on ``sys.meta_path`` (once); nothing when megatron-core is already loaded."""
    if JIT_MODULE in sys.modules or any(isinstance(f, JitFuserHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, JitFuserHook())
