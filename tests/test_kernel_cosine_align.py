"""Fused LET cosine-alignment kernel vs the plain PyTorch reference (and the reference vs F.interpolate,
hand-computed values and gradcheck).

Without a GPU the Triton kernels run under Triton's CPU interpreter, which must be switched on before
triton builds the kernels; shapes stay small because the interpreter is slow.
"""

import os

import torch

if not torch.cuda.is_available():
    # The interpreter is read when the kernels are decorated, i.e. when the module is imported.
    os.environ["TRITON_INTERPRET"] = "1"

import importlib
import math
import subprocess
import sys

import pytest
import torch.nn.functional as F

# The package re-exports the function ``cosine_align``, which shadows the submodule attribute, so
# ``import megatron_let.kernels.cosine_align as ca`` would bind the function: fetch the module itself.
ca = importlib.import_module("megatron_let.kernels.cosine_align")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if ca.TRITON_AVAILABLE and DEVICE.type == "cpu" and not ca.triton_interpreter_active():
    # Another test module imported the kernels before TRITON_INTERPRET was set: rebuild them.
    ca = importlib.reload(ca)

requires_triton = pytest.mark.skipif(
    not ca.TRITON_AVAILABLE, reason="triton is not installed: the fused-kernel tests need it (pip install triton)"
)

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


def _inputs(lead, d_m, d_t, dtype=torch.float32, seed=0, mask_p=0.3):
    gen = torch.Generator().manual_seed(seed)
    h_m = torch.randn(*lead, d_m, generator=gen).to(dtype)
    h_t = torch.randn(*lead, d_t, generator=gen).to(dtype)
    mask = torch.rand(lead, generator=gen) > mask_p
    upstream = torch.randn(lead, generator=gen)
    return h_m.to(DEVICE), h_t.to(DEVICE), mask.to(DEVICE), upstream.to(DEVICE)


def _loss_and_grads(fn, h_m, h_t, mask, upstream, **kwargs):
    h_m = h_m.detach().clone().requires_grad_(True)
    h_t = h_t.detach().clone().requires_grad_(True)
    loss = fn(h_m, h_t, mask, **kwargs)
    (loss * upstream).sum().backward()
    return loss.detach(), h_m.grad, h_t.grad


# ---------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize(
    "d_in,d_out", [(200, 96), (50, 130), (64, 64), (7, 1), (1, 5), (3, 5), (2048, 576), (576, 2048)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interpolate_hidden_matches_f_interpolate(d_in, d_out, dtype):
    h = torch.randn(2, 3, d_in, dtype=dtype)
    # F.interpolate is evaluated in fp64: in fp32 it rounds the source position j*scale itself (errors up
    # to ~3e-4 at d=2048), while interpolate_hidden splits u_j exactly with integer arithmetic.
    expected = F.interpolate(h.double().reshape(-1, 1, d_in), size=d_out, mode="linear", align_corners=True)
    got = ca.interpolate_hidden(h, d_out)
    assert got.shape == (2, 3, d_out) and got.dtype == dtype
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got.double(), expected.reshape(2, 3, d_out), **tol)


def test_interpolate_hidden_hand_computed():
    # d_M=3 -> d_T=5: u = j*2/4 = 0, .5, 1, 1.5, 2
    h = torch.tensor([1.0, 3.0, 7.0])
    torch.testing.assert_close(ca.interpolate_hidden(h, 5), torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0]))
    # d_M=4 -> d_T=3: u = j*3/2 = 0, 1.5, 3
    h = torch.tensor([2.0, 4.0, 8.0, 16.0])
    torch.testing.assert_close(ca.interpolate_hidden(h, 3), torch.tensor([2.0, 6.0, 16.0]))
    # d_T=1: u_0 = 0 -> first feature
    torch.testing.assert_close(ca.interpolate_hidden(h, 1), torch.tensor([2.0]))


def test_reference_hand_computed():
    h_m = torch.tensor([[1.0, 3.0, 7.0], [1.0, 3.0, 7.0]])  # interpolates to [1, 2, 3, 5, 7]
    h_t = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0], [1.0, 2.0, 3.0, 5.0, 7.0]])
    # row 0: dot = 2 + 5 = 7, ||x|| = sqrt(88), ||t|| = sqrt(2); row 1: identical vectors -> cos = 1
    expected = torch.tensor([-7.0 / math.sqrt(88.0 * 2.0), -1.0])
    torch.testing.assert_close(ca.cosine_align_reference(h_m, h_t), expected)
    masked = ca.cosine_align_reference(h_m, h_t, torch.tensor([0, 1]))
    torch.testing.assert_close(masked, torch.tensor([0.0, -1.0]))


@pytest.mark.parametrize("d_m,d_t", [(7, 4), (4, 9), (5, 5)])
def test_reference_gradcheck_float64(d_m, d_t):
    gen = torch.Generator().manual_seed(3)
    h_m = torch.randn(2, 3, d_m, generator=gen, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(2, 3, d_t, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    assert torch.autograd.gradcheck(lambda a, b: ca.cosine_align_reference(a, b, mask), (h_m, h_t))


def test_reference_masked_tokens_zero_loss_and_grad():
    h_m, h_t, mask, upstream = _inputs((4, 6), 12, 8)
    loss, g_m, g_t = _loss_and_grads(ca.cosine_align_reference, h_m, h_t, mask, upstream)
    assert loss.dtype == torch.float32
    assert torch.all(loss[~mask] == 0) and torch.all(g_m[~mask] == 0) and torch.all(g_t[~mask] == 0)
    assert torch.all(g_m[mask].abs().sum(-1) > 0)


def test_reference_upcasts_bf16_to_fp32():
    h_m, h_t, _, _ = _inputs((5,), 20, 12, dtype=torch.bfloat16)
    loss = ca.cosine_align_reference(h_m, h_t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ca.cosine_align_reference(h_m.float(), h_t.float()), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- kernel

# (name, leading dims, d_M, d_T)
KERNEL_CASES = [
    ("downsample", (3, 47), 200, 96),
    ("same_dim", (3, 21), 64, 64),
    ("upsample", (2, 13), 50, 130),
    ("one_token", (1,), 33, 20),
]


@requires_triton
@pytest.mark.parametrize("name,lead,d_m,d_t", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_fused_matches_reference_fp32(name, lead, d_m, d_t):
    h_m, h_t, mask, upstream = _inputs(lead, d_m, d_t, seed=len(name))
    ref = _loss_and_grads(ca.cosine_align_reference, h_m, h_t, mask, upstream)
    got = _loss_and_grads(ca.fused_cosine_align, h_m, h_t, mask, upstream)
    assert got[0].shape == lead and got[0].dtype == torch.float32
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **FP32_TOL)
    assert torch.all(got[0][~mask] == 0)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_m,d_t", [(200, 96), (50, 130)])
def test_fused_half_precision_vs_fp32_reference(dtype, d_m, d_t):
    # Both see the same rounded inputs; the reference computes in fp32 from them.
    h_m, h_t, mask, upstream = _inputs((2, 9), d_m, d_t, dtype=dtype, seed=7)
    ref = _loss_and_grads(ca.cosine_align_reference, h_m.float(), h_t.float(), mask, upstream)
    loss, g_m, g_t = _loss_and_grads(ca.fused_cosine_align, h_m, h_t, mask, upstream)
    assert loss.dtype == torch.float32 and g_m.dtype == dtype and g_t.dtype == dtype
    for g, r in zip((loss, g_m, g_t), ref):
        torch.testing.assert_close(g.float(), r, **BF16_TOL)


@requires_triton
@pytest.mark.parametrize(
    "d_m,d_t",
    [(200, 96), (50, 130), (40, 40), (1, 7), (7, 1), (1, 1), (3, 29), (17, 16), (3, 5)],
)
@pytest.mark.parametrize("rows", [1, 4])
def test_fused_block_loops_and_edge_widths(d_m, d_t, rows):
    # max_block=16 forces several feature blocks per row, exercising the loops used at d = 2048/4096.
    config = ca.CosineAlignKernelConfig(max_block=16, rows_per_program=rows)
    h_m, h_t, mask, upstream = _inputs((3,), d_m, d_t, seed=d_m * 100 + d_t)
    ref = _loss_and_grads(ca.cosine_align_reference, h_m, h_t, mask, upstream)
    got = _loss_and_grads(ca.fused_cosine_align, h_m, h_t, mask, upstream, config=config)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **FP32_TOL)


@requires_triton
def test_fused_masked_tokens_have_exactly_zero_grad():
    h_m, h_t, mask, upstream = _inputs((3, 8), 30, 18, seed=11, mask_p=0.5)
    loss, g_m, g_t = _loss_and_grads(ca.fused_cosine_align, h_m, h_t, mask, upstream)
    assert (~mask).any() and mask.any()
    assert torch.all(loss[~mask] == 0) and torch.all(g_m[~mask] == 0) and torch.all(g_t[~mask] == 0)
    assert torch.all(g_m[mask].abs().sum(-1) > 0)


@requires_triton
def test_fused_non_contiguous_inputs_and_mean_reduction():
    gen = torch.Generator().manual_seed(5)
    base_m = torch.randn(24, 6, generator=gen).to(DEVICE)  # [d_M, N] -> transposed view
    base_t = torch.randn(6, 2 * 10, generator=gen).to(DEVICE)  # every other feature
    base_mask = (torch.rand(6, 2, generator=gen) > 0.3).to(DEVICE)

    def run(fn):
        h_m = base_m.clone().requires_grad_(True)
        h_t = base_t.clone().requires_grad_(True)
        mask = base_mask[:, 0]  # strided view
        loss = fn(h_m.t(), h_t[:, ::2], mask)
        assert not h_m.t().is_contiguous() and not h_t[:, ::2].is_contiguous()
        # mean backward hands the Function an expanded (stride-0) gradient
        (loss.sum() / mask.sum()).backward()
        return loss.detach(), h_m.grad, h_t.grad

    for g, r in zip(run(ca.fused_cosine_align), run(ca.cosine_align_reference)):
        torch.testing.assert_close(g, r, **FP32_TOL)


@requires_triton
def test_fused_teacher_grad_only_when_requested():
    h_m, h_t, mask, upstream = _inputs((4,), 20, 12, seed=2)
    student = h_m.clone().requires_grad_(True)
    teacher = h_t.clone()  # frozen teacher
    (ca.fused_cosine_align(student, teacher, mask) * upstream).sum().backward()
    assert teacher.grad is None and student.grad is not None
    _, g_m_ref, _ = _loss_and_grads(ca.cosine_align_reference, h_m, h_t, mask, upstream)
    torch.testing.assert_close(student.grad, g_m_ref, **FP32_TOL)

    # teacher-only gradient (student constant) also works
    teacher = h_t.clone().requires_grad_(True)
    (ca.fused_cosine_align(h_m, teacher, mask) * upstream).sum().backward()
    _, _, g_t_ref = _loss_and_grads(ca.cosine_align_reference, h_m, h_t, mask, upstream)
    torch.testing.assert_close(teacher.grad, g_t_ref, **FP32_TOL)


@requires_triton
def test_fused_keeps_only_inputs_and_per_token_scalars():
    n, d_m, d_t = 6, 40, 24
    h_m, h_t, mask, _ = _inputs((n,), d_m, d_t, seed=4)
    h_m.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ca.fused_cosine_align(h_m, h_t, mask)
    # inputs (n*d_m + n*d_t), the uint8 mask (n) and dot/||x||/||t|| (3n): no [n, d_T] interpolated copy.
    assert sorted(saved) == sorted([n * d_m, n * d_t, n, 3 * n])


@requires_triton
def test_fused_scalar_token_and_empty_batch():
    h_m, h_t, _, _ = _inputs((), 9, 5, seed=8)
    torch.testing.assert_close(ca.fused_cosine_align(h_m, h_t), ca.cosine_align_reference(h_m, h_t), **FP32_TOL)
    empty = ca.fused_cosine_align(torch.zeros(0, 9, device=DEVICE), torch.zeros(0, 5, device=DEVICE))
    assert empty.shape == (0,)


# ---------------------------------------------------------------------------------------------- dispatch


def test_cosine_align_dispatch(monkeypatch):
    h_m, h_t, mask, _ = _inputs((3, 4), 16, 10)
    expected = ca.cosine_align_reference(h_m, h_t, mask)
    torch.testing.assert_close(ca.cosine_align(h_m, h_t, mask, impl="reference"), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        ca.cosine_align(h_m, h_t, mask, impl="cuda")
    if DEVICE.type == "cpu":
        def boom(*args, **kwargs):
            raise AssertionError("auto must not pick the kernel for CPU tensors")

        monkeypatch.setattr(ca, "fused_cosine_align", boom)
        torch.testing.assert_close(ca.cosine_align(h_m, h_t, mask), expected, atol=0, rtol=0)


@requires_triton
def test_cosine_align_triton_impl_on_cpu(monkeypatch):
    h_m, h_t, mask, _ = _inputs((3, 4), 16, 10)
    h_m, h_t, mask = h_m.cpu(), h_t.cpu(), mask.cpu()
    if ca.triton_interpreter_active():
        torch.testing.assert_close(
            ca.cosine_align(h_m, h_t, mask, impl="triton"), ca.cosine_align_reference(h_m, h_t, mask), **FP32_TOL
        )
    monkeypatch.setattr(ca, "triton_interpreter_active", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ca.cosine_align(h_m, h_t, mask, impl="triton")


def test_bad_inputs_raise_value_error():
    h_m = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="leading"):
        ca.cosine_align_reference(h_m, torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="loss_mask shape"):
        ca.cosine_align_reference(h_m, torch.randn(2, 3, 5), torch.ones(3, 2))
    with pytest.raises(ValueError, match="floating-point"):
        ca.cosine_align_reference(h_m, torch.ones(2, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty last"):
        ca.cosine_align_reference(h_m, torch.randn(2, 3, 0))
    with pytest.raises(ValueError, match="d_out"):
        ca.interpolate_hidden(h_m, 0)
    with pytest.raises(ValueError, match="power of two"):
        ca.CosineAlignKernelConfig(max_block=48)
    if ca.TRITON_AVAILABLE:
        with pytest.raises(ValueError, match="fp32/fp16/bf16"):
            ca.fused_cosine_align(h_m.double().to(DEVICE), torch.randn(2, 3, 5, dtype=torch.float64, device=DEVICE))


def test_module_imports_and_falls_back_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, megatron_let.kernels as k\n"
        "assert not k.TRITON_AVAILABLE\n"
        "h_m, h_t = torch.randn(3, 6), torch.randn(3, 4)\n"
        "assert torch.equal(k.cosine_align(h_m, h_t), k.cosine_align_reference(h_m, h_t))\n"
        "try:\n"
        "    k.cosine_align(h_m, h_t, impl='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('impl=triton without triton must raise')\n"
    )
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


_AOT_COMPILE_SCRIPT = """
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ca = importlib.import_module("megatron_let.kernels.cosine_align")
assert not ca.triton_interpreter_active()
common = {"n_rows": "i32", "d_m": "i32", "d_t": "i32", "m1": "i32"}
# row layouts: a [s, b, d] view of [b, s, d] student states, contiguous teacher states
strides = {"hm_inner": "i32", "hm_so": "i32", "hm_si": "i32", "hm_sf": "i32",
           "ht_inner": "i32", "ht_so": "i32", "ht_si": "i32", "ht_sf": "i32"}
fwd_sig = {"hm_ptr": "*bf16", "ht_ptr": "*bf16", "mask_ptr": "*u8", "loss_ptr": "*fp32", "dot_ptr": "*fp32",
           "nx_ptr": "*fp32", "nt_ptr": "*fp32", **common, "den": "i32", "eps": "fp32", **strides,
           "HAS_MASK": "constexpr", "SAME_DIM": "constexpr", "ROWS": "constexpr", "BLOCK_T": "constexpr"}
bwd_sig = {"hm_ptr": "*bf16", "ht_ptr": "*bf16", "mask_ptr": "*u8", "gout_ptr": "*fp32", "dot_ptr": "*fp32",
           "nx_ptr": "*fp32", "nt_ptr": "*fp32", "ghm_ptr": "*bf16", "ght_ptr": "*bf16", **common,
           "m1_div": "i32", "den": "i32", "k_max": "i32", "eps": "fp32", **strides,
           "HAS_MASK": "constexpr", "SAME_DIM": "constexpr", "NEED_GRAD_M": "constexpr",
           "NEED_GRAD_T": "constexpr", "ROWS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_T": "constexpr"}
target = GPUTarget("cuda", 90, 32)
sources = [
    ASTSource(ca._cosine_align_fwd_kernel, fwd_sig,
              {"HAS_MASK": True, "SAME_DIM": False, "ROWS": 1, "BLOCK_T": 1024}),
    ASTSource(ca._cosine_align_fwd_kernel, fwd_sig,  # d_T = 576: the fitted block
              {"HAS_MASK": True, "SAME_DIM": False, "ROWS": 4, "BLOCK_T": ca.fit_block(576)}),
    ASTSource(ca._cosine_align_bwd_kernel, bwd_sig,
              {"HAS_MASK": True, "SAME_DIM": False, "NEED_GRAD_M": True, "NEED_GRAD_T": True,
               "ROWS": 2, "BLOCK_M": 1024, "BLOCK_T": 512}),
]
for src in sources:
    compiled = triton.compile(src, target=target, options={"num_warps": 4})
    assert compiled.asm["cubin"], src.name
print("ok")
"""


@requires_triton
def test_kernels_compile_for_sm90_without_gpu():
    # The interpreter accepts code the real compiler rejects; compiling ahead of time for an H100 target
    # (no GPU needed) checks the kernels as a GPU run would build them.
    pytest.importorskip("triton.backends.nvidia", reason="triton's NVIDIA backend is not installed")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", _AOT_COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- launch, layout, op


def test_blocks_fitted_to_the_width():
    # one block of 1024 lanes for d_T = 576 leaves 44% idle; 128 x 5 leaves 10%
    assert ca.fit_block(576) == 128 and ca.CosineAlignKernelConfig().plan(2048, 576)[1:] == (1024, 128)
    assert ca.fit_block(2048) == 1024 and ca.fit_block(960) == 1024 and ca.fit_block(4096) == 1024
    assert ca.fit_block(64) == 64 and ca.fit_block(1) == 1 and ca.fit_block(200, 16) == 8
    for d in range(1, 3000, 37):
        b = ca.fit_block(d)
        assert b & (b - 1) == 0 and b <= 1024
        full = min(1 << max(d - 1, 0).bit_length(), 1024)
        assert -(-d // b) * b <= -(-d // full) * full  # never more idle lanes than the full block


# [s, b, d] views of [b, s, d] data (the capture's layout), and every other teacher feature
STRIDED_CASES = [("transposed", 200, 96, False), ("transposed_same", 64, 64, False),
                 ("feature_strided", 50, 130, True)]


def _strided_inputs(d_m, d_t, every_other, dtype=torch.float32, seed=3):
    gen = torch.Generator().manual_seed(seed)
    base_m = torch.randn(3, 7, d_m, generator=gen).to(DEVICE, dtype)  # [b, s, d]
    base_t = torch.randn(3, 7, d_t * (2 if every_other else 1), generator=gen).to(DEVICE, dtype)
    mask = (torch.rand(7, 3, generator=gen) > 0.3).to(DEVICE)
    upstream = torch.randn(7, 3, generator=gen).to(DEVICE)
    return base_m, base_t, mask, upstream


def _views(base_m, base_t, every_other):
    h_m = base_m.transpose(0, 1)
    h_t = base_t.transpose(0, 1)[..., ::2] if every_other else base_t.transpose(0, 1)
    assert not h_m.is_contiguous() and not h_t.is_contiguous()
    return h_m, h_t


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,d_m,d_t,every_other", STRIDED_CASES, ids=[c[0] for c in STRIDED_CASES])
def test_fused_strided_inputs_read_in_place(name, d_m, d_t, every_other, dtype):
    """Non-contiguous inputs give the reference's losses and gradients, and backward keeps the
    inputs' own storage: no contiguous copy of the teacher (or student) states is made."""
    base_m, base_t, mask, upstream = _strided_inputs(d_m, d_t, every_other, dtype)

    def run(fn):
        bm = base_m.clone().requires_grad_(True)
        bt = base_t.clone().requires_grad_(True)
        h_m, h_t = _views(bm, bt, every_other)
        if fn is ca.cosine_align_reference:
            h_m, h_t = h_m.float(), h_t.float()
        (fn(h_m, h_t, mask) * upstream).sum().backward()
        return fn(h_m, h_t, mask).detach(), bm.grad, bt.grad

    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    for g, r in zip(run(ca.fused_cosine_align), run(ca.cosine_align_reference)):
        torch.testing.assert_close(g.float(), r.float(), **tol)

    h_m, h_t = _views(base_m.clone().requires_grad_(True), base_t.clone(), every_other)
    inputs = {h_m.untyped_storage().data_ptr(), h_t.untyped_storage().data_ptr()}
    big = []

    def pack(t):
        if t.numel() >= 7 * 3 * min(d_m, d_t):
            big.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ca.fused_cosine_align(h_m, h_t, mask)
    assert sorted(big) == sorted(inputs), "backward keeps a copy of an input"


@requires_triton
def test_torch_compile_traces_the_kernel_without_graph_breaks():
    """The kernel is a torch.library custom op with a fake and an autograd registration: a
    fullgraph compile of a loss that calls it works and gives eager's values and gradients."""
    h_m, h_t, mask, upstream = _inputs((2, 5), 40, 24, seed=9)

    def loss_fn(fn, h_m, h_t):
        return (fn(h_m, h_t, mask) * upstream).sum()

    compiled = torch.compile(lambda a, b: loss_fn(ca.fused_cosine_align, a, b), fullgraph=True,
                             backend="aot_eager")
    a, b = h_m.clone().requires_grad_(True), h_t.clone().requires_grad_(True)
    got = compiled(a, b)
    got.backward()
    ra, rb = h_m.clone().requires_grad_(True), h_t.clone().requires_grad_(True)
    want = loss_fn(ca.cosine_align_reference, ra, rb)
    want.backward()
    for g, r in ((got, want), (a.grad, ra.grad), (b.grad, rb.grad)):
        torch.testing.assert_close(g, r, **FP32_TOL)


@requires_triton
def test_custom_ops_pass_opcheck():
    h_m, h_t, mask, _ = _inputs((4,), 20, 12, seed=6)
    mask8 = mask.to(torch.uint8)
    fwd = torch.ops.megatron_let.cosine_align_fwd.default
    bwd = torch.ops.megatron_let.cosine_align_bwd.default
    torch.library.opcheck(fwd, (h_m.requires_grad_(True), h_t, mask8, 1024, 0, 0))
    torch.library.opcheck(fwd, (h_m.detach().t().contiguous().t(), h_t, None, 16, 4, 2))
    _, stats = fwd(h_m.detach(), h_t, mask8, 1024, 0, 0)
    torch.library.opcheck(bwd, (torch.randn(4, device=DEVICE), h_m.detach(), h_t, mask8, stats,
                                True, False, 1024, 0, 0))


def test_bench_reports_bandwidth_against_the_gpu_table():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    bench = importlib.import_module("bench_cosine_align")
    assert bench.peak_gbps("NVIDIA H200") == 4800 and bench.peak_gbps("NVIDIA H100 80GB HBM3") == 3350
    assert bench.peak_gbps("NVIDIA H100 PCIe") == 2000 and bench.peak_gbps("NVIDIA A100-SXM4-80GB") == 2039
    assert bench.peak_gbps("NVIDIA A100-SXM4-40GB") == 1555 and bench.peak_gbps("Tesla T4") is None
    # 10 tokens, bf16, 8 -> 4 features: fwd 10*(12*2+1) + 10*16, bwd the same + grad h_m 10*8*2
    assert bench.min_traffic_bytes(10, 8, 4, torch.bfloat16) == 2 * (250 + 160) + 160
    r = bench.measure("reference", ca.cosine_align_reference, *bench.make_inputs(64, 32, 16, torch.float32, "cpu", 0.1),
                      "cpu", 2, 0)
    assert r.gbps == pytest.approx(bench.min_traffic_bytes(64, 32, 16, torch.float32) / (r.time_ms / 1e3) / 1e9)
