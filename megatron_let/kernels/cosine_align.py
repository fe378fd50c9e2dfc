"""Fused LET alignment loss: per-token negative cosine after linear hidden-size interpolation.

For every token the student hidden state ``h_M`` (``d_M`` features) is linearly interpolated along the
hidden dimension to the teacher width ``d_T`` with aligned endpoints (``F.interpolate(mode="linear",
align_corners=True)``) and compared with the teacher hidden state ``h_T``::

    u_j  = j (d_M - 1) / (d_T - 1)        (u_j = 0 when d_T == 1)
    i0_j = floor(u_j),  i1_j = min(i0_j + 1, d_M - 1),  beta_j = u_j - i0_j
    x_j  = (1 - beta_j) h_M[i0_j] + beta_j h_M[i1_j]
    loss = -(x . h_T) / (max(||x||, eps) * max(||h_T||, eps)),   eps = COSINE_EPS = 1e-8

``i0_j`` and ``beta_j`` are computed with exact integer arithmetic (``j (d_M-1) // (d_T-1)`` and the
remainder), so the reference and the kernel pick the same source features even where ``u_j`` is an
integer.  Tokens with ``loss_mask == 0`` get loss 0 and gradient 0.

Four entry points:

* :func:`interpolate_hidden` - reference interpolation of the last dimension.
* :func:`cosine_align_reference` - plain PyTorch, autograd-differentiable.
* :func:`fused_cosine_align` - Triton forward/backward kernels that never materialise the interpolated
  ``[N, d_T]`` tensor; only the inputs and three fp32 scalars per token are kept for backward.
* :func:`cosine_align` - dispatcher between the two.

Triton is optional: this module imports without it, and on CPU the kernels only run under Triton's
interpreter (``TRITON_INTERPRET=1`` set before this module is imported).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch._library.custom_ops import OPDEFS

try:  # Triton is an optional dependency: the reference path must work without it.
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    TRITON_AVAILABLE = False

__all__ = [
    "COSINE_EPS",
    "TRITON_AVAILABLE",
    "CosineAlignKernelConfig",
    "cosine_align",
    "cosine_align_reference",
    "fit_block",
    "fused_cosine_align",
    "interpolate_hidden",
    "triton_interpreter_active",
]

COSINE_EPS: float = 1e-8
"""Lower clamp applied to each norm (same value in the reference and the kernel)."""

_IMPLS = ("auto", "triton", "reference")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Integer index arithmetic in the kernel is int32: j*(d_M-1) and i*(d_T-1) must not overflow.
_MAX_DIM_PRODUCT = 2**31 - 1


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _floor_power_of_2(n: int) -> int:
    """Largest power of two <= n (1 for n < 1)."""
    return 1 << max(n.bit_length() - 1, 0)


@dataclass(frozen=True)
class CosineAlignKernelConfig:
    """Launch configuration of the fused kernels.

    Attributes:
        max_block: largest number of features one program handles per loop iteration (power of two);
            wider hidden sizes loop over blocks of this size.
        num_warps: warps per program.
        rows_per_program: tokens one program handles (power of two). ``None`` picks the largest power
            of two <= ``tile_elems // max(BLOCK_M, BLOCK_T)``, clamped to [1, 16]: one row per program
            at LET's real widths (>= 1024 features), several rows for narrow ones, where per-program
            overhead dominates (notably under the CPU interpreter).
        tile_elems: element budget per program tile used by the ``rows_per_program=None`` heuristic.
    """

    max_block: int = 1024
    num_warps: int = 4
    rows_per_program: int | None = None
    tile_elems: int = 1024

    def __post_init__(self) -> None:
        if self.max_block < 2 or self.max_block & (self.max_block - 1):
            raise ValueError(f"max_block must be a power of two >= 2, got {self.max_block}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two >= 1, got {self.num_warps}")
        rows = self.rows_per_program
        if rows is not None and (rows < 1 or rows & (rows - 1)):
            raise ValueError(f"rows_per_program must be a power of two >= 1 or None, got {rows}")
        if self.tile_elems < 1:
            raise ValueError(f"tile_elems must be >= 1, got {self.tile_elems}")

    def plan(self, d_m: int, d_t: int) -> tuple[int, int, int]:
        """(rows per program, BLOCK_M, BLOCK_T) for hidden sizes d_m -> d_t (blocks fitted to the
        widths, :func:`fit_block`)."""
        block_m = fit_block(d_m, self.max_block)
        block_t = fit_block(d_t, self.max_block)
        rows = self.rows_per_program
        if rows is None:
            rows = self.plan_rows(max(block_m, block_t))
        return rows, block_m, block_t

    def plan_rows(self, block: int) -> int:
        """The ``rows_per_program=None`` heuristic for a feature block of ``block`` lanes."""
        return min(_floor_power_of_2(self.tile_elems // block), 16)


def fit_block(d: int, max_block: int = 1024) -> int:
    """Feature block (a power of two <= ``max_block``) for a width of ``d`` features.

    The kernels loop over a row's features in blocks, so any power of two works; the one that
    leaves the fewest idle lanes in the last block wins, among blocks down to 1/8 of the
    full-width one (at most 8x the loop iterations), the larger on a tie. d_T = 576: 128 (5
    iterations, 10% idle) rather than 1024 (one iteration, 44% idle)."""
    full = min(_next_power_of_2(d), max_block)
    best, block = full, full
    while block >= max(2, full // 8):
        if -(-d // block) * block < -(-d // best) * best:
            best = block
        block //= 2
    return best


# --------------------------------------------------------------------------------------------------
# Validation shared by every entry point (runs before any compute).
# --------------------------------------------------------------------------------------------------


def _validate(h_m: torch.Tensor, h_t: torch.Tensor, loss_mask: torch.Tensor | None) -> None:
    for name, h in (("h_m", h_m), ("h_t", h_t)):
        if not isinstance(h, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(h).__name__}")
        if not h.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {h.dtype}")
        if h.dim() < 1 or h.shape[-1] < 1:
            raise ValueError(f"{name} needs a non-empty last (hidden) dimension, got shape {tuple(h.shape)}")
    if h_m.shape[:-1] != h_t.shape[:-1]:
        raise ValueError(
            f"h_m and h_t must share leading (token) dims, got {tuple(h_m.shape)} and {tuple(h_t.shape)}"
        )
    if h_m.device != h_t.device:
        raise ValueError(f"h_m is on {h_m.device} but h_t is on {h_t.device}")
    if loss_mask is not None:
        if not isinstance(loss_mask, torch.Tensor):
            raise ValueError(f"loss_mask must be a torch.Tensor or None, got {type(loss_mask).__name__}")
        if loss_mask.shape != h_m.shape[:-1]:
            raise ValueError(
                f"loss_mask shape {tuple(loss_mask.shape)} must equal the token dims {tuple(h_m.shape[:-1])}"
            )
        if loss_mask.device != h_m.device:
            raise ValueError(f"loss_mask is on {loss_mask.device} but the hidden states are on {h_m.device}")


# --------------------------------------------------------------------------------------------------
# Reference implementation.
# --------------------------------------------------------------------------------------------------


def _interp_indices(d_in: int, d_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (i0, i1) and fp64 weights beta for interpolating d_in -> d_out features."""
    den = max(d_out - 1, 1)  # d_out == 1: u_0 = 0
    num = torch.arange(d_out, device=device, dtype=torch.int64) * (d_in - 1)
    i0 = torch.div(num, den, rounding_mode="floor")
    beta = (num - i0 * den).to(torch.float64) / den
    i1 = torch.clamp(i0 + 1, max=d_in - 1)
    return i0, i1, beta


def interpolate_hidden(h: torch.Tensor, d_out: int) -> torch.Tensor:
    """Linearly interpolate the last dimension of ``h`` to ``d_out`` features, endpoints aligned.

    Equals ``F.interpolate(h.reshape(-1, 1, d_in), size=d_out, mode="linear", align_corners=True)``
    reshaped back. Computed in ``h``'s dtype when it is fp32/fp64 and in fp32 otherwise; the result
    has ``h``'s dtype. Differentiable.
    """
    if not isinstance(h, torch.Tensor) or not h.is_floating_point():
        raise ValueError("h must be a floating-point torch.Tensor")
    if h.dim() < 1 or h.shape[-1] < 1:
        raise ValueError(f"h needs a non-empty last dimension, got shape {tuple(h.shape)}")
    if not isinstance(d_out, int) or d_out < 1:
        raise ValueError(f"d_out must be a positive int, got {d_out!r}")
    d_in = h.shape[-1]
    if d_in == d_out:
        return h
    compute_dtype = h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float32
    i0, i1, beta = _interp_indices(d_in, d_out, h.device)
    beta = beta.to(compute_dtype)
    hc = h.to(compute_dtype)
    out = (1.0 - beta) * hc.index_select(-1, i0) + beta * hc.index_select(-1, i1)
    return out.to(h.dtype)


def cosine_align_reference(
    h_m: torch.Tensor, h_t: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token ``-cos(interp(h_m), h_t)`` in plain PyTorch (autograd-differentiable).

    Args:
        h_m: student hidden states ``[..., d_M]``.
        h_t: teacher hidden states ``[..., d_T]`` with the same leading dims.
        loss_mask: optional ``[...]``; tokens where it is 0 get loss 0 (and gradient 0).

    Returns:
        ``[...]`` losses in fp32 (fp64 when an input is fp64, so gradcheck can run on it).
    """
    _validate(h_m, h_t, loss_mask)
    dtype = torch.float64 if torch.float64 in (h_m.dtype, h_t.dtype) else torch.float32
    x = interpolate_hidden(h_m.to(dtype), h_t.shape[-1])
    t = h_t.to(dtype)
    dot = (x * t).sum(dim=-1)
    norm_x = torch.linalg.vector_norm(x, dim=-1).clamp_min(COSINE_EPS)
    norm_t = torch.linalg.vector_norm(t, dim=-1).clamp_min(COSINE_EPS)
    loss = -dot / (norm_x * norm_t)
    if loss_mask is not None:
        loss = torch.where(loss_mask != 0, loss, torch.zeros_like(loss))
    return loss


# --------------------------------------------------------------------------------------------------
# Triton kernels.
# --------------------------------------------------------------------------------------------------

if TRITON_AVAILABLE:

    @triton.jit
    def _interp_src(j, m1, den):
        """Source indices (i0, i1) and fp32 weight beta of output features j (exact integer split of u_j)."""
        num = j * m1
        i0 = num // den
        beta = (num - i0 * den).to(tl.float32) / den
        i1 = tl.minimum(i0 + 1, m1)
        return i0, i1, beta

    @triton.jit
    def _row_base(ptr, rows, inner, s_outer, s_inner):
        """Addresses of the rows' first features: row r is (r // inner, r % inner) of a two-level
        row layout (strided views are read in place, without a contiguous copy)."""
        return ptr + ((rows // inner) * s_outer + (rows % inner) * s_inner)[:, None]

    @triton.jit
    def _load_x(hm_rows, j, m1, den, sf, mask, SAME_DIM: tl.constexpr):
        """Interpolated student features x[:, j] (fp32), gathered from the two source features of each j."""
        if SAME_DIM:
            x = tl.load(hm_rows + (j.to(tl.int64) * sf)[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            i0, i1, beta = _interp_src(j, m1, den)
            a0 = tl.load(hm_rows + (i0.to(tl.int64) * sf)[None, :], mask=mask, other=0.0).to(tl.float32)
            a1 = tl.load(hm_rows + (i1.to(tl.int64) * sf)[None, :], mask=mask, other=0.0).to(tl.float32)
            x = (1.0 - beta[None, :]) * a0 + beta[None, :] * a1
        return x

    @triton.jit
    def _grad_x_gather(hm_rows, ht_rows, j, mask, m1, den, hm_sf, ht_sf, c_cross, c_xx):
        """dL/dx[:, j] = c_cross * t_j + c_xx * x_j recomputed from the inputs (x is never stored), and beta_j."""
        i0, i1, beta = _interp_src(j, m1, den)
        t = tl.load(ht_rows + (j.to(tl.int64) * ht_sf)[None, :], mask=mask, other=0.0).to(tl.float32)
        a0 = tl.load(hm_rows + (i0.to(tl.int64) * hm_sf)[None, :], mask=mask, other=0.0).to(tl.float32)
        a1 = tl.load(hm_rows + (i1.to(tl.int64) * hm_sf)[None, :], mask=mask, other=0.0).to(tl.float32)
        x = (1.0 - beta[None, :]) * a0 + beta[None, :] * a1
        return c_cross * t + c_xx * x, beta

    @triton.jit
    def _jstart(i, den, m1_div):
        """First output feature j whose i0_j >= i, i.e. ceil(i * (d_T-1) / (d_M-1))."""
        return (i * den + m1_div - 1) // m1_div

    @triton.jit
    def _cosine_align_fwd_kernel(
        hm_ptr, ht_ptr, mask_ptr, loss_ptr, dot_ptr, nx_ptr, nt_ptr,
        n_rows, d_m, d_t, m1, den, eps,
        hm_inner, hm_so, hm_si, hm_sf, ht_inner, ht_so, ht_si, ht_sf,
        HAS_MASK: tl.constexpr, SAME_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        # One program handles ROWS tokens; the feature index math is shared by its rows.
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < n_rows
        hm_rows = _row_base(hm_ptr, rows, hm_inner, hm_so, hm_si)
        ht_rows = _row_base(ht_ptr, rows, ht_inner, ht_so, ht_si)
        acc_dot = tl.zeros([ROWS, BLOCK_T], dtype=tl.float32)
        acc_xx = tl.zeros([ROWS, BLOCK_T], dtype=tl.float32)
        acc_tt = tl.zeros([ROWS, BLOCK_T], dtype=tl.float32)
        for start in range(0, d_t, BLOCK_T):
            j = start + tl.arange(0, BLOCK_T)
            mask = rmask[:, None] & (j < d_t)[None, :]
            t = tl.load(ht_rows + (j.to(tl.int64) * ht_sf)[None, :], mask=mask, other=0.0).to(tl.float32)
            x = _load_x(hm_rows, j, m1, den, hm_sf, mask, SAME_DIM)
            acc_dot += x * t
            acc_xx += x * x
            acc_tt += t * t
        dot = tl.sum(acc_dot, axis=1)
        nx = tl.sqrt(tl.sum(acc_xx, axis=1))
        nt = tl.sqrt(tl.sum(acc_tt, axis=1))
        loss = -dot / (tl.maximum(nx, eps) * tl.maximum(nt, eps))
        if HAS_MASK:
            loss = tl.where(tl.load(mask_ptr + rows, mask=rmask, other=0) != 0, loss, 0.0)
        tl.store(loss_ptr + rows, loss, mask=rmask)
        tl.store(dot_ptr + rows, dot, mask=rmask)
        tl.store(nx_ptr + rows, nx, mask=rmask)
        tl.store(nt_ptr + rows, nt, mask=rmask)

    @triton.jit
    def _cosine_align_bwd_kernel(
        hm_ptr, ht_ptr, mask_ptr, gout_ptr, dot_ptr, nx_ptr, nt_ptr, ghm_ptr, ght_ptr,
        n_rows, d_m, d_t, m1, m1_div, den, k_max, eps,
        hm_inner, hm_so, hm_si, hm_sf, ht_inner, ht_so, ht_si, ht_sf,
        HAS_MASK: tl.constexpr, SAME_DIM: tl.constexpr, NEED_GRAD_M: tl.constexpr,
        NEED_GRAD_T: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < n_rows
        hm_rows = _row_base(hm_ptr, rows, hm_inner, hm_so, hm_si)
        ht_rows = _row_base(ht_ptr, rows, ht_inner, ht_so, ht_si)
        g = tl.load(gout_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        if HAS_MASK:
            g = tl.where(tl.load(mask_ptr + rows, mask=rmask, other=0) != 0, g, 0.0)
        dot = tl.load(dot_ptr + rows, mask=rmask, other=0.0)
        nx = tl.load(nx_ptr + rows, mask=rmask, other=0.0)
        nt = tl.load(nt_ptr + rows, mask=rmask, other=0.0)
        a = tl.maximum(nx, eps)
        b = tl.maximum(nt, eps)
        cos = dot / (a * b)
        # L = -dot/(a b): dL/dx = -t/(ab) + cos/a^2 * x, the second term only where the norm clamp is
        # inactive (matching clamp_min's gradient); symmetric for t.
        c_cross = (-g / (a * b))[:, None]
        c_xx = tl.where(nx >= eps, g * cos / (a * a), 0.0)[:, None]
        c_tt = tl.where(nt >= eps, g * cos / (b * b), 0.0)[:, None]

        # the gradients are written contiguous, [n, d]
        if NEED_GRAD_T:
            ght_rows = ght_ptr + rows[:, None] * d_t
            for start in range(0, d_t, BLOCK_T):
                j = start + tl.arange(0, BLOCK_T)
                mask = rmask[:, None] & (j < d_t)[None, :]
                t = tl.load(ht_rows + (j.to(tl.int64) * ht_sf)[None, :], mask=mask, other=0.0).to(tl.float32)
                x = _load_x(hm_rows, j, m1, den, hm_sf, mask, SAME_DIM)
                gt = c_cross * x + c_tt * t
                tl.store(ght_rows + j[None, :], gt.to(ght_ptr.dtype.element_ty), mask=mask)

        if NEED_GRAD_M:
            ghm_rows = ghm_ptr + rows[:, None] * d_m
            if SAME_DIM:
                for start in range(0, d_m, BLOCK_M):
                    i = start + tl.arange(0, BLOCK_M)
                    mask = rmask[:, None] & (i < d_m)[None, :]
                    t = tl.load(ht_rows + (i.to(tl.int64) * ht_sf)[None, :], mask=mask, other=0.0).to(tl.float32)
                    x = tl.load(hm_rows + (i.to(tl.int64) * hm_sf)[None, :], mask=mask, other=0.0).to(tl.float32)
                    gm = c_cross * t + c_xx * x
                    tl.store(ghm_rows + i[None, :], gm.to(ghm_ptr.dtype.element_ty), mask=mask)
            else:
                # Gather form of the interpolation adjoint (no atomics): source feature i receives
                #   (1 - beta_j) * gx_j  from every j with i0_j == i      (j in [jstart(i), jend(i)))
                #   beta_j * gx_j        from every j with i0_j == i - 1  (j in [jstart(i-1), jstart(i)))
                # where gx_j = c_cross * t_j + c_xx * x_j is recomputed from the inputs. Each range holds
                # at most k_max outputs, so k_max passes cover both. Masked lanes load zeros -> add 0.
                for start in range(0, d_m, BLOCK_M):
                    i = start + tl.arange(0, BLOCK_M)
                    im = i < d_m
                    js = _jstart(i, den, m1_div)
                    je = tl.minimum(tl.where(i == d_m - 1, d_t, _jstart(i + 1, den, m1_div)), d_t)
                    js_prev = _jstart(tl.maximum(i - 1, 0), den, m1_div)
                    acc = tl.zeros([ROWS, BLOCK_M], dtype=tl.float32)
                    for k in range(0, k_max):
                        ja = js + k
                        ma = rmask[:, None] & (im & (ja < je))[None, :]
                        gx_a, beta_a = _grad_x_gather(hm_rows, ht_rows, ja, ma, m1, den, hm_sf, ht_sf,
                                                      c_cross, c_xx)
                        acc += (1.0 - beta_a[None, :]) * gx_a
                        jb = js_prev + k
                        mb = rmask[:, None] & (im & (i >= 1) & (jb < js))[None, :]
                        gx_b, beta_b = _grad_x_gather(hm_rows, ht_rows, jb, mb, m1, den, hm_sf, ht_sf,
                                                      c_cross, c_xx)
                        acc += beta_b[None, :] * gx_b
                    gm_mask = rmask[:, None] & im[None, :]
                    tl.store(ghm_rows + i[None, :], acc.to(ghm_ptr.dtype.element_ty), mask=gm_mask)

    # Autotuned launchers: ROWS (tokens per program) and num_warps, per (d_M, d_T) and dtypes; the
    # feature blocks are fitted to the widths on the host (CosineAlignKernelConfig.plan). Under the
    # CPU interpreter, which cannot time configs, the pruning keeps the heuristic's one config.
    _TUNE_CONFIGS = [triton.Config({"ROWS": rows}, num_warps=warps)
                     for rows in (1, 2, 4, 8) for warps in (2, 4, 8)]

    def _prune(configs, named_args, **kwargs):
        block = max(kwargs.get("BLOCK_T", 1), kwargs.get("BLOCK_M", 1))
        heuristic = CosineAlignKernelConfig().plan_rows(block)
        if triton_interpreter_active():
            return [triton.Config({"ROWS": heuristic}, num_warps=4)]
        # at most 8K fp32 accumulator lanes per program (registers), and no more rows than tokens
        n = named_args["n_rows"]
        kept = [c for c in configs if c.kwargs["ROWS"] * block <= 8192
                and c.kwargs["ROWS"] <= max(_next_power_of_2(n), 1)]
        return kept or [triton.Config({"ROWS": heuristic}, num_warps=4)]

    _cosine_align_fwd_tuned = triton.autotune(
        configs=_TUNE_CONFIGS, key=["d_m", "d_t", "HAS_MASK", "SAME_DIM"],
        prune_configs_by={"early_config_prune": _prune})(_cosine_align_fwd_kernel)
    _cosine_align_bwd_tuned = triton.autotune(
        configs=_TUNE_CONFIGS, key=["d_m", "d_t", "HAS_MASK", "SAME_DIM", "NEED_GRAD_M", "NEED_GRAD_T"],
        prune_configs_by={"early_config_prune": _prune})(_cosine_align_bwd_kernel)


def triton_interpreter_active() -> bool:
    """True when this module's kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return TRITON_AVAILABLE and type(_cosine_align_fwd_kernel).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------------------------------
# The fused op: registered with torch.library, so torch.compile traces through it.
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _max_outputs_per_source(d_m: int, d_t: int) -> int:
    """Largest number of output features sharing one i0 (loop count of the backward gather)."""
    i0, _, _ = _interp_indices(d_m, d_t, torch.device("cpu"))
    return int(torch.bincount(i0, minlength=d_m).max())


def _check_kernel_usable(h_m: torch.Tensor, h_t: torch.Tensor) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError("the fused cosine-align kernel needs triton, which is not installed; "
                           "use impl='reference' or install triton")
    for name, h in (("h_m", h_m), ("h_t", h_t)):
        if h.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"fused cosine align supports fp32/fp16/bf16, got {name}.dtype={h.dtype}; "
                             "use impl='reference' for other dtypes")
    if h_m.device.type != "cuda" and not triton_interpreter_active():
        raise RuntimeError(
            f"the Triton cosine-align kernel got {h_m.device.type} tensors: on CPU it only runs under "
            "Triton's interpreter, so set TRITON_INTERPRET=1 in the environment before importing triton / "
            "megatron_let.kernels (or use impl='reference')"
        )
    if h_m.shape[-1] * h_t.shape[-1] > _MAX_DIM_PRODUCT:
        raise ValueError(f"d_M * d_T = {h_m.shape[-1] * h_t.shape[-1]} overflows the kernel's int32 index math")


def _row_layout(h: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(inner, outer stride, inner stride, feature stride) addressing row r, feature f of ``h``'s
    flattened leading dims at ``(r // inner) * outer + (r % inner) * inner_stride + f * feature``;
    None when the leading dims do not merge into two levels (then the caller copies)."""
    merged: list[list[int]] = []
    for size, stride in zip(h.shape[:-1], h.stride()[:-1]):
        if size == 1:
            continue
        if merged and merged[-1][1] == size * stride:  # outer dim steps over the inner one exactly
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    feature = h.stride(-1) if h.shape[-1] > 1 else 1
    if not merged:
        return 1, 0, 0, feature
    if len(merged) == 1:
        return merged[0][0], 0, merged[0][1], feature
    if len(merged) == 2:
        return merged[1][0], merged[0][1], merged[1][1], feature
    return None


def _strided(h: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    layout = _row_layout(h)
    if layout is None:  # three or more non-mergeable leading dims: rare, copied
        h = h.contiguous()
        layout = _row_layout(h)
    return h, layout


def _unpack_config(max_block: int, num_warps: int, rows: int) -> CosineAlignKernelConfig | None:
    """None (autotuned launch) when ``num_warps`` is 0, else the fixed configuration."""
    if num_warps == 0:
        return None
    return CosineAlignKernelConfig(max_block=max_block, num_warps=num_warps,
                                   rows_per_program=rows if rows > 0 else None)


def _cosine_align_fwd_impl(h_m: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor | None,
                      max_block: int, num_warps: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses ``[n]`` and the ``[3, n]`` fp32 statistics (dot, ||x||, ||t||) backward
    reads; ``h_m``/``h_t`` of any strides (read in place)."""
    d_m, d_t = h_m.shape[-1], h_t.shape[-1]
    n = h_m.numel() // d_m
    loss = torch.empty(n, device=h_m.device, dtype=torch.float32)
    stats = torch.empty(3, n, device=h_m.device, dtype=torch.float32)
    if n == 0:
        return loss, stats
    hm, lm = _strided(h_m)
    ht, lt = _strided(h_t)
    config = _unpack_config(max_block, num_warps, rows)
    _, _, block_t = (config or CosineAlignKernelConfig()).plan(d_m, d_t)
    args = (hm, ht, mask if mask is not None else loss, loss, stats[0], stats[1], stats[2],
            n, d_m, d_t, d_m - 1, max(d_t - 1, 1), COSINE_EPS, *lm, *lt)
    meta = dict(HAS_MASK=mask is not None, SAME_DIM=d_m == d_t, BLOCK_T=block_t)
    if config is None:
        _cosine_align_fwd_tuned[lambda m: (triton.cdiv(n, m["ROWS"]),)](*args, **meta)
    else:
        rows_, _, _ = config.plan(d_m, d_t)
        _cosine_align_fwd_kernel[(triton.cdiv(n, rows_),)](*args, **meta, ROWS=rows_,
                                                           num_warps=config.num_warps)
    return loss, stats


def _cosine_align_fwd_fake(h_m, h_t, mask, max_block, num_warps, rows):
    n = h_m.numel() // h_m.shape[-1]
    return (h_m.new_empty((n,), dtype=torch.float32), h_m.new_empty((3, n), dtype=torch.float32))


def _cosine_align_bwd_impl(grad: torch.Tensor, h_m: torch.Tensor, h_t: torch.Tensor,
                      mask: torch.Tensor | None, stats: torch.Tensor, need_m: bool, need_t: bool,
                      max_block: int, num_warps: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``[n, d_M]`` and ``[n, d_T]`` (contiguous, in the inputs' dtypes; an empty
    ``[0]`` tensor for one not needed)."""
    d_m, d_t = h_m.shape[-1], h_t.shape[-1]
    n = h_m.numel() // d_m
    grad_m = torch.empty((n, d_m) if need_m else (0,), device=h_m.device, dtype=h_m.dtype)
    grad_t = torch.empty((n, d_t) if need_t else (0,), device=h_t.device, dtype=h_t.dtype)
    if n == 0 or not (need_m or need_t):
        return grad_m, grad_t
    hm, lm = _strided(h_m)
    ht, lt = _strided(h_t)
    g = grad.reshape(-1).contiguous()  # mean/sum backward hands over expanded (stride-0) gradients
    config = _unpack_config(max_block, num_warps, rows)
    _, block_m, block_t = (config or CosineAlignKernelConfig()).plan(d_m, d_t)
    args = (hm, ht, mask if mask is not None else stats, g, stats[0], stats[1], stats[2],
            grad_m if need_m else stats, grad_t if need_t else stats,
            n, d_m, d_t, d_m - 1, max(d_m - 1, 1), max(d_t - 1, 1), _max_outputs_per_source(d_m, d_t),
            COSINE_EPS, *lm, *lt)
    meta = dict(HAS_MASK=mask is not None, SAME_DIM=d_m == d_t, NEED_GRAD_M=need_m,
                NEED_GRAD_T=need_t, BLOCK_M=block_m, BLOCK_T=block_t)
    if config is None:
        _cosine_align_bwd_tuned[lambda m: (triton.cdiv(n, m["ROWS"]),)](*args, **meta)
    else:
        rows_, _, _ = config.plan(d_m, d_t)
        _cosine_align_bwd_kernel[(triton.cdiv(n, rows_),)](*args, **meta, ROWS=rows_,
                                                           num_warps=config.num_warps)
    return grad_m, grad_t


def _cosine_align_bwd_fake(grad, h_m, h_t, mask, stats, need_m, need_t, max_block, num_warps, rows):
    n = h_m.numel() // h_m.shape[-1]
    return (h_m.new_empty((n, h_m.shape[-1]) if need_m else (0,)),
            h_t.new_empty((n, h_t.shape[-1]) if need_t else (0,)))


def _fwd_setup_context(ctx, inputs, output) -> None:
    h_m, h_t, mask, max_block, num_warps, rows = inputs
    _, stats = output
    # the inputs themselves (views, not copies), the uint8 mask and three fp32 scalars per token
    ctx.save_for_backward(h_m, h_t, mask, stats)
    ctx.launch = (max_block, num_warps, rows)


def _fwd_backward(ctx, grad_loss, grad_stats):
    h_m, h_t, mask, stats = ctx.saved_tensors
    need_m, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_m or need_t):
        return None, None, None, None, None, None
    grad_m, grad_t = _cosine_align_bwd(grad_loss, h_m, h_t, mask, stats, need_m, need_t, *ctx.launch)
    return (grad_m.reshape(h_m.shape) if need_m else None,
            grad_t.reshape(h_t.shape) if need_t else None, None, None, None, None)


def _register_ops():
    """The two custom ops; registered once per process (an importlib.reload of this module, as
    the tests do to switch the interpreter on, keeps them: their bodies look the kernels up in
    this module's namespace, which the reload refreshes)."""
    if "megatron_let::cosine_align_fwd" in OPDEFS:
        return OPDEFS["megatron_let::cosine_align_fwd"], OPDEFS["megatron_let::cosine_align_bwd"]
    fwd = torch.library.custom_op("megatron_let::cosine_align_fwd", mutates_args=())(
        _cosine_align_fwd_impl)
    bwd = torch.library.custom_op("megatron_let::cosine_align_bwd", mutates_args=())(
        _cosine_align_bwd_impl)
    fwd.register_fake(_cosine_align_fwd_fake)
    bwd.register_fake(_cosine_align_bwd_fake)
    fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
    return fwd, bwd


_cosine_align_fwd, _cosine_align_bwd = _register_ops()


def fused_cosine_align(
    h_m: torch.Tensor,
    h_t: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    *,
    config: CosineAlignKernelConfig | None = None,
) -> torch.Tensor:
    """Per-token ``-cos(interp(h_m), h_t)`` with Triton forward/backward kernels.

    Same contract as :func:`cosine_align_reference` (fp32 result of the leading dims' shape, masked
    tokens 0); inputs may be fp32/fp16/bf16 and of any strides (read in place, no copy, when the
    leading dims merge into two levels as ``[s, b]`` views of ``[b, s]`` data do). The interpolated
    tensor is never written to memory; backward keeps the inputs plus dot, ||x|| and ||h_t|| per
    token. The gradient for ``h_t`` is only computed when ``h_t.requires_grad``. ``config`` fixes
    the launch; without it the launch is autotuned per widths (a single heuristic config under the
    CPU interpreter). A ``torch.library`` custom op (``megatron_let::cosine_align_fwd``/``_bwd``):
    ``torch.compile`` traces through it without graph breaks.
    """
    _validate(h_m, h_t, loss_mask)
    _check_kernel_usable(h_m, h_t)
    mask = None if loss_mask is None else (loss_mask.reshape(-1) != 0).to(torch.uint8)
    if config is None:
        launch = (1024, 0, 0)
    else:
        launch = (config.max_block, config.num_warps, config.rows_per_program or 0)
    loss, _ = _cosine_align_fwd(h_m, h_t, mask, *launch)
    return loss.reshape(h_m.shape[:-1])


def cosine_align(
    h_m: torch.Tensor, h_t: torch.Tensor, loss_mask: torch.Tensor | None = None, impl: str = "auto"
) -> torch.Tensor:
    """Per-token LET alignment loss, dispatching between the Triton kernel and the reference.

    ``impl="auto"`` uses the kernel for CUDA tensors of a supported dtype when triton is importable and
    the reference otherwise; ``"triton"`` forces the kernel (on CPU only under TRITON_INTERPRET=1);
    ``"reference"`` forces plain PyTorch.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        use_kernel = (
            TRITON_AVAILABLE
            and isinstance(h_m, torch.Tensor)
            and isinstance(h_t, torch.Tensor)
            and h_m.is_cuda
            and h_m.dtype in _KERNEL_DTYPES
            and h_t.dtype in _KERNEL_DTYPES
        )
        impl = "triton" if use_kernel else "reference"
    if impl == "triton":
        return fused_cosine_align(h_m, h_t, loss_mask)
    return cosine_align_reference(h_m, h_t, loss_mask)

