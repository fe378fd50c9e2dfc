"""One test per patch of the CPU compatibility layer (megatron_let/runtime/cpu_compat.py)."""

import importlib

import pytest
import torch

from megatron_let.runtime import cpu_compat


@pytest.fixture(scope="module", autouse=True)
def applied(megatron_single_process):
    assert cpu_compat.cpu_compat_applied()


@pytest.mark.parametrize("module_name", sorted(cpu_compat.PATCHED_MODULES))
def test_module_torch_is_redirected(module_name):
    mod = importlib.import_module(module_name)
    assert isinstance(mod.torch, cpu_compat.CudaToCpuTorch)
    # the proxy is transparent for everything that is not a CUDA device request
    assert mod.torch.Tensor is torch.Tensor and mod.torch.float32 is torch.float32
    assert mod.torch.cuda.current_device() == "cpu"
    t = mod.torch.zeros(3, device="cuda")
    assert t.device.type == "cpu"
    assert mod.torch.empty(2, device=mod.torch.cuda.current_device()).device.type == "cpu"
    assert mod.torch.tensor([1.0], device="cuda:1").device.type == "cpu"
    mod.torch.cuda.synchronize()  # no-op instead of "Torch not compiled with CUDA"


def test_the_real_torch_is_untouched():
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_rng_tracker_forks_cpu_generator():
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state().clone()
    with tracker.fork():
        a = torch.rand(4)
    # the default stream was restored, and the fork consumed the tracker's own stream
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)
    # reseeding reproduces the tracked stream
    tensor_parallel.model_parallel_cuda_manual_seed(77, force_reset_rng=True)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        c = torch.rand(4)
    tensor_parallel.model_parallel_cuda_manual_seed(77, force_reset_rng=True)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        d = torch.rand(4)
    assert torch.equal(c, d)


def test_clip_grad_replacement_matches_torch_clip():
    from megatron.core.optimizer import clip_grads, optimizer

    assert optimizer.clip_grad_by_total_norm_fp32 is cpu_compat._cpu_clip_grad_by_total_norm_fp32
    assert clip_grads.clip_grad_by_total_norm_fp32 is cpu_compat._cpu_clip_grad_by_total_norm_fp32
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, r in zip(params, ref):
        p.grad = torch.randn(5) * 3
        r.grad = p.grad.clone()
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in params)).item()
    cpu_compat._cpu_clip_grad_by_total_norm_fp32(params, 1.0, total)
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-6)
    # below the threshold nothing changes
    g = [p.grad.clone() for p in params]
    cpu_compat._cpu_clip_grad_by_total_norm_fp32(params, 100.0, 1.0)
    assert all(torch.equal(a, p.grad) for a, p in zip(g, params))


def test_default_causal_mask_on_cpu():
    from megatron.core.transformer.utils import get_default_causal_mask

    m = get_default_causal_mask(4)
    assert m.device.type == "cpu"
    assert torch.equal(m, torch.ones(4, 4).triu(1).bool())


def test_optimizer_constructors_see_cuda_type_names():
    for dotted in cpu_compat.CUDA_TYPE_CHECKED_CONSTRUCTORS:
        assert hasattr(cpu_compat._resolve(dotted).__init__, "__wrapped__"), dotted

    def inside():
        t = torch.zeros(2, dtype=torch.bfloat16)
        return t.type(), torch.zeros(1).type(), t.type(torch.float64).dtype

    assert cpu_compat._with_cuda_type_names(inside)() == (
        "torch.cuda.BFloat16Tensor", "torch.cuda.FloatTensor", torch.float64)
    # scoped to the call: afterwards torch reports the real type again
    assert "type" not in torch.Tensor.__dict__
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.BFloat16Tensor"


def test_bf16_optimizer_keeps_fp32_main_params_on_cpu():
    """megatron-core's mixed-precision optimizer on CPU bf16 params: fp32 main copies, and
    reload_model_params() re-copies them from the model (what --no-load-optim relies on)."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3).bfloat16())
    opt = Float16OptimizerWithFloat16Params(
        torch.optim.AdamW([p], lr=0.1), OptimizerConfig(bf16=True, lr=0.1), None, lambda *a: None)
    main = opt.fp32_from_float16_groups[0][0]
    assert main.dtype == torch.float32 and torch.equal(main, p.detach().float())
    with torch.no_grad():
        p.copy_(torch.randn(4, 3).bfloat16())  # a checkpoint loaded into the model
    assert not torch.equal(main, p.detach().float())
    opt.reload_model_params()
    assert torch.equal(opt.fp32_from_float16_groups[0][0], p.detach().float())


def test_torch_adam_fallback_fixes_installed():
    from megatron.core.optimizer import distrib_optimizer

    assert not distrib_optimizer.HAVE_APEX_OR_TE  # the CPU environment has neither apex nor TE
    assert cpu_compat.apply_torch_adam_fallback_fixes()
    for name in cpu_compat.TORCH_ADAM_FALLBACK_FIXES:
        assert hasattr(getattr(distrib_optimizer.DistributedOptimizer, name), "__wrapped__"), name


def test_eager_adam_state_equals_torch_lazy_state():
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(a.detach().clone())
    lazy, eager = torch.optim.AdamW([a], lr=0.01), torch.optim.AdamW([b], lr=0.01)
    cpu_compat._fill_fresh_adam_state(eager)
    assert float(eager.state[b]["step"]) == 0.0
    for _ in range(3):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        lazy.step()
        eager.step()
    assert torch.equal(a, b) and float(eager.state[b]["step"]) == 3.0
