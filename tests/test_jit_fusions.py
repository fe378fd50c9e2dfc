"""runtime/jit_fusions.py: on a CPU-only torch, megatron-core's jit fusions stay eager (no dynamo or
inductor at import); on a CUDA build of torch (mocked: the decision reads only runtime.device's
cuda_built) megatron-core sets them up itself, unchanged."""

import json
import subprocess
import sys

import pytest
import torch

from launch import ROOT, base_env

PROBE = """
import json, sys
{pre}
import megatron.core
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_swiglu
print(json.dumps({{"fuser": jit.jit_fuser.__name__, "inductor": "torch._inductor.compile_fx" in sys.modules,
                  "plain": not hasattr(fused_bias_swiglu.swiglu, "_torchdynamo_orig_callable")}}))
"""


def _probe(pre: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(pre=pre)], env=base_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="a CUDA build of torch (CI has the CPU wheel)")
def test_cpu_only_torch_keeps_megatron_fusions_eager():
    got = _probe("import megatron_let")
    assert got == {"fuser": "noop_decorator", "inductor": False, "plain": True}


def test_megatron_alone_compiles_them_and_a_cuda_build_is_left_as_megatron_sets_it():
    # megatron-core imported on its own: its torch.compile wrappers (what a GPU run gets)
    assert _probe("") == {"fuser": "compile", "inductor": True, "plain": False}
    # our package on a CUDA build of torch (the probe mocked): the hook leaves megatron-core alone
    cuda_build = "import megatron_let.runtime.device as d; d.cuda_built = lambda: True; import megatron_let"
    assert _probe(cuda_build) == {"fuser": "compile", "inductor": True, "plain": False}


def test_install_is_idempotent_and_inert_once_megatron_is_loaded():
    from megatron_let.runtime import jit_fusions

    before = list(sys.meta_path)
    jit_fusions.install()  # megatron-core is loaded in this process: nothing to hook
    jit_fusions.install()
    assert sys.meta_path == before
    assert sum(isinstance(f, jit_fusions.JitFuserHook) for f in sys.meta_path) <= 1
