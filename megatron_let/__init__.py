"""megatron_let: Late-to-Early Training (LET) and friends on megatron-core."""

from megatron_let.runtime import jit_fusions as _jit_fusions

__version__ = "0.1.0"

# before any of our modules imports megatron-core: its jit fusions stay eager on a CPU-only torch
# (runtime/jit_fusions.py: ~1 s less start-up per process)
_jit_fusions.install()
