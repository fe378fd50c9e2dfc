"""GPU checks of the cosine-alignment kernel's launch (``pytest -m gpu``, run by
scripts/gpu_check.sh): the autotuned launch on [s, b, d] views of [b, s, d] states (read in place)
at LET's shapes against the PyTorch reference, and ``torch.compile(fullgraph=True)`` with inductor
through the registered custom op. The CPU counterparts (interpreter, small shapes, aot_eager) are
in tests/test_kernel_cosine_align.py."""

import importlib

import pytest
import torch

GPU = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs a GPU (the compiled kernel)")]

ca = importlib.import_module("megatron_let.kernels.cosine_align")
requires_triton = pytest.mark.skipif(not ca.TRITON_AVAILABLE, reason="triton is not installed")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # max |err| / max |ref|, as tests/test_gpu.py


def _rel(got, want):
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d_m,d_t", [(2048, 576), (4096, 2048)])
def test_autotuned_kernel_on_strided_states(d_m, d_t, dtype, record_property):
    assert not ca.triton_interpreter_active()
    gen = torch.Generator().manual_seed(0)
    b, s = 16, 1280
    base_m = torch.randn(b, s, d_m, generator=gen).to("cuda", dtype)
    base_t = torch.randn(b, s, d_t, generator=gen).to("cuda", dtype)
    mask = (torch.rand(s, b, generator=gen) > 0.1).cuda()
    upstream = torch.randn(s, b, generator=gen).cuda()

    def run(fn, dt):
        bm = base_m.detach().to(dt).requires_grad_(True)
        h_m, h_t = bm.transpose(0, 1), base_t.to(dt).transpose(0, 1)  # [s, b, d] views
        loss = fn(h_m, h_t, mask)
        (loss * upstream).sum().backward()
        return loss.detach(), bm.grad

    loss, g_m = run(ca.fused_cosine_align, dtype)
    ref_loss, ref_m = run(ca.cosine_align_reference, torch.float32)
    errs = {"loss": _rel(loss, ref_loss), "grad_h_m": _rel(g_m, ref_m)}
    record_property("fwd_config", str(ca._cosine_align_fwd_tuned.best_config))
    record_property("bwd_config", str(ca._cosine_align_bwd_tuned.best_config))
    for name, err in errs.items():
        record_property(f"max_rel_err_{name}", f"{err:.3e}")
        assert err <= TOL[dtype], (name, err)


@requires_triton
def test_inductor_fullgraph_compile_through_the_op():
    gen = torch.Generator().manual_seed(1)
    h_m = torch.randn(4, 256, 512, generator=gen).cuda()
    h_t = torch.randn(4, 256, 144, generator=gen).cuda()
    mask = (torch.rand(4, 256, generator=gen) > 0.1).cuda()

    def loss(a, b):
        return ca.fused_cosine_align(a.transpose(0, 1), b.transpose(0, 1), mask.t()).mean()

    a = h_m.clone().requires_grad_(True)
    got = torch.compile(loss, fullgraph=True)(a, h_t)
    got.backward()
    ra = h_m.clone().requires_grad_(True)
    want = loss(ra, h_t)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, ra.grad, rtol=1e-5, atol=1e-6)
