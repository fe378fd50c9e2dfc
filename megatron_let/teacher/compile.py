"""``--teacher-compile``: the frozen teacher's transformer blocks under ``torch.compile``.

Each decoder block's ``forward`` is compiled (regional compilation): the blocks share one graph, so a
30-layer teacher compiles once, not 30 times, and the layer-k forward hook that ends the teacher's
forward early (hf_teacher.py) stays outside the compiled code. The embedding, the final norm and
the (vocabulary-sliced) LM head stay eager: a lookup and one matmul, nothing to fuse. Shapes are fixed
per run (micro-batch x sequence, train and eval alike), hence ``dynamic=False``.

torch.compile's inductor backend writes C++ on CPU and Triton on CUDA (whose launcher is built with
a C compiler); :func:`check_compile_available` names what is missing before anything runs.
"""

from __future__ import annotations

import functools
import os
import shutil
from typing import Iterable, Optional

import torch
from torch import nn

FLAG = "--teacher-compile"


def _first_on_path(names: Iterable[Optional[str]]) -> Optional[str]:
    for name in names:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def check_compile_available(device: torch.device) -> None:
    """ValueError naming ``--teacher-compile`` when torch.compile cannot run on ``device`` here."""
    device = torch.device(device)
    # lazy: torch._dynamo (slow to import) and triton (optional) only for --teacher-compile
    from torch._dynamo.eval_frame import is_dynamo_supported

    if not is_dynamo_supported():
        raise ValueError(f"{FLAG}: torch.compile does not support this Python/torch build "
                         f"(torch {torch.__version__}); run without {FLAG}")
    if device.type == "cpu":
        if _first_on_path((os.environ.get("CXX"), "g++", "c++", "clang++")) is None:
            raise ValueError(f"{FLAG}: torch.compile's inductor backend needs a C++ compiler on CPU "
                             f"and none was found (CXX={os.environ.get('CXX', 'unset')}; no g++, c++ "
                             f"or clang++ on PATH): install one (e.g. apt-get install g++) or run "
                             f"without {FLAG}")
    elif device.type == "cuda":
        # lazy: torch._dynamo (slow to import) and triton (optional) only for --teacher-compile
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError(f"{FLAG}: torch.compile's inductor backend needs Triton for CUDA and it "
                             f"is not importable (or not usable on this GPU); run without {FLAG}")
        if _first_on_path((os.environ.get("CC"), "gcc", "cc", "clang")) is None:
            raise ValueError(f"{FLAG}: Triton builds its kernel launcher with a C compiler and none "
                             f"was found (CC={os.environ.get('CC', 'unset')}; no gcc, cc or clang on "
                             f"PATH): install one or run without {FLAG}")
    else:
        raise ValueError(f"{FLAG} supports CPU and CUDA teachers, not {device.type}")


def _named_failure(fn):
    """A compile failure (it happens at the first forward) reported with the flag's name."""
    # lazy: torch._dynamo (slow to import) and triton (optional) only for --teacher-compile
    from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError, Unsupported

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (BackendCompilerFailed, InternalTorchDynamoError, Unsupported) as e:
            raise RuntimeError(f"{FLAG}: torch.compile failed on the teacher's blocks "
                               f"({type(e).__name__}: {str(e)[:300]}); run without {FLAG}") from e
    return call


def compile_blocks(blocks: Iterable[nn.Module], backend: str = "inductor") -> int:
    """Compile each block's forward in place (hooks stay eager); returns how many."""
    n = 0
    for block in blocks:
        if getattr(block, "_megatron_let_compiled", False):
            continue
        block.forward = _named_failure(torch.compile(block.forward, dynamic=False, backend=backend))
        block._megatron_let_compiled = True
        n += 1
    return n


def release_compiled(blocks: Iterable[nn.Module]) -> None:
    """Undo :func:`compile_blocks` when the teacher is released (S_stop).

    Dynamo keeps its compiled graphs and guards in a cache attached to the *code object* of the
    blocks' ``forward`` (shared by the class), not to the module: it outlives the teacher unless
    reset, holding the compiled code (and on GPU its workspaces) for the rest of the run. Only that
    code's cache is reset (a compiled student or kernel elsewhere keeps its graphs); another live
    teacher of the same class would recompile on its next forward."""
    codes = set()
    for block in blocks:
        if not getattr(block, "_megatron_let_compiled", False):
            continue
        codes.add(type(block).forward.__code__)
        del block.forward  # the instance attribute set above: the class's eager forward again
        del block._megatron_let_compiled
    reset_code = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    reset_code = getattr(reset_code, "reset_code", None)
    for code in codes:
        if reset_code is not None:
            reset_code(code)
        else:  # a torch without the per-code reset: drop every dynamo cache
            torch._dynamo.reset()
            break
