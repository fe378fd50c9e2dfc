"""Custom kernels. Triton is optional: everything here imports and falls back to PyTorch without it."""

from megatron_let.kernels.cosine_align import (
    COSINE_EPS,
    TRITON_AVAILABLE,
    CosineAlignKernelConfig,
    cosine_align,
    cosine_align_reference,
    fused_cosine_align,
    interpolate_hidden,
    triton_interpreter_active,
)

__all__ = [
    "COSINE_EPS",
    "TRITON_AVAILABLE",
    "CosineAlignKernelConfig",
    "cosine_align",
    "cosine_align_reference",
    "fused_cosine_align",
    "interpolate_hidden",
    "triton_interpreter_active",
]
