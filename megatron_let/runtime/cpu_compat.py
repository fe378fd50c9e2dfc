"""Make megatron-core 0.16.1 run on a CPU-only machine (gloo backend).

megatron-core assumes CUDA in a handful of places. Rather than patching ``torch`` globally, we
replace the module-level name ``torch`` inside exactly the megatron-core modules that need it with
:class:`CudaToCpuTorch`, a thin proxy that forwards everything to the real ``torch`` except:

* ``torch.cuda.current_device()`` returns ``"cpu"`` (call sites use it as a ``device=`` argument);
* tensor factories (``zeros``, ``empty``, ``tensor``, ...) map ``device="cuda"``/``cuda:N`` to CPU;
* ``torch.cuda.synchronize``/``empty_cache`` become no-ops;
* ``torch.cuda.get_rng_state``/``manual_seed`` act on the CPU generator (RNG tracker).

Two functions are replaced outright because their CUDA assumption is on tensors, not on ``torch``:
``_get_cuda_rng_state``/``_set_cuda_rng_state`` of the RNG tracker and the fp32 grad-clipping helper
that asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``. The mixed-precision and distributed
optimizers' constructors sort parameters by ``param.type()`` against CUDA type names only; they run
with CPU tensors reporting their CUDA type name (:data:`CUDA_TYPE_CHECKED_CONSTRUCTORS`).

Separately, :func:`apply_torch_adam_fallback_fixes` fixes three bugs of megatron-core's distributed
optimizer with the torch Adam fallback (no apex/Transformer Engine): they are not CPU-specific, so
the runtime applies them whenever that fallback is in use, on CPU and GPU alike.

Everything is applied only by :func:`apply_cpu_compat`, which the runtime calls only when training on
CPU; on a GPU nothing here runs, so megatron-core's behaviour there is untouched. Each entry of
:data:`PATCHED_MODULES` names the call sites it covers; ``tests/test_cpu_compat.py`` has a test per patch.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import torch

# module -> the CUDA-only call sites in megatron-core 0.16.1 that the torch proxy covers there.
PATCHED_MODULES: dict[str, str] = {
    "megatron.core.tensor_parallel.random": "RNG tracker: torch.cuda.get_rng_state/manual_seed",
    "megatron.core.tensor_parallel.mappings": "gather/scatter buffers on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.layers": "weight/grad buffers on torch.cuda.current_device()",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq on current_device()",
    "megatron.core.transformer.dot_product_attention": "softmax offsets on current_device()",
    "megatron.core.pipeline_parallel.schedules": "total_num_tokens = torch.zeros(device='cuda')",
    "megatron.core.pipeline_parallel.p2p_communication": "shape buffers, torch.cuda.synchronize()",
    "megatron.core.distributed.param_and_grad_buffer": "grad buffers on current_device()",
    "megatron.core.distributed.distributed_data_parallel": "synchronize/empty_cache",
    "megatron.core.optimizer.optimizer": "found_inf/_scale tensors with device='cuda'",
    "megatron.core.optimizer.clip_grads": "total-norm tensors with device='cuda'",
    "megatron.core.optimizer.distrib_optimizer": "shard buffers on current_device()",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "torch.cuda.synchronize()",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "save-verification tensors on cuda",
    "megatron.core.dist_checkpointing.strategies.async_utils": "async-save completion all-reduce on "
                                                               "torch.cuda.current_device()",
    "megatron.core.dist_checkpointing.strategies.async_utils": "liveness tensors on current_device()",
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "torch.cuda.synchronize()",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict": "torch.cuda.synchronize()",
    "megatron.core.utils": "l2-norm and helper tensors with device='cuda'",
    "megatron.core.transformer.utils": "get_default_causal_mask: torch.ones(device='cuda')",
}

# class -> the constructor that accepts only torch.cuda.{Float,Half,BFloat16}Tensor parameters.
CUDA_TYPE_CHECKED_CONSTRUCTORS: dict[str, str] = {
    "megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params":
        "__init__: sorts bf16/fp32 params by param.type() (bf16 on CPU)",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer":
        "__init__ and _build_model_and_main_param_groups: the same check (distributed optimizer)",
}

_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor",
)


def _to_cpu_device(device: Any) -> Any:
    """Map any CUDA device spec (``"cuda"``, ``"cuda:1"``, an int, a cuda ``torch.device``) to CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CpuCudaNamespace:
    """Stands in for ``torch.cuda`` inside patched megatron-core modules."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def synchronize(*_args: Any, **_kwargs: Any) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def is_available() -> bool:
        return False

    @staticmethod
    def get_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)


class CudaToCpuTorch(types.ModuleType):
    """A ``torch`` look-alike whose CUDA device requests land on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCudaNamespace()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args: Any, __f=attr, **kwargs: Any) -> Any:
                if "device" in kwargs:
                    kwargs["device"] = _to_cpu_device(kwargs["device"])
                kwargs.pop("pin_memory", None)
                return __f(*args, **kwargs)

            return factory
        return attr


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Scale fp32 grads in place by max_norm / total_norm when that is < 1 (same contract as
    megatron-core's helper, without its CUDA tensor-type assertion)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    with torch.no_grad():
        for param in parameters:
            grad = getattr(param, attr, None)
            if grad is not None:
                grad.mul_(clip_coeff)


_REAL_TENSOR_TYPE = torch.Tensor.type
_cuda_type_depth = 0


def _tensor_type_cuda_names(self, *args, **kwargs):
    """``Tensor.type()`` that names a CPU tensor's CUDA counterpart ("torch.cuda.BFloat16Tensor");
    conversions (``t.type(dtype)``) are untouched."""
    name = _REAL_TENSOR_TYPE(self, *args, **kwargs)
    if not args and not kwargs and self.device.type == "cpu" and name.startswith("torch."):
        return "torch.cuda." + name[len("torch."):]
    return name


def _with_cuda_type_names(fn):
    """Run ``fn`` with CPU tensors reporting CUDA type names. Scoped to the call (re-entrant: the
    distributed optimizer's __init__ calls its own type-checking helper)."""
    def wrapper(*args, **kwargs):
        global _cuda_type_depth
        if _cuda_type_depth == 0:
            torch.Tensor.type = _tensor_type_cuda_names
        _cuda_type_depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _cuda_type_depth -= 1
            if _cuda_type_depth == 0:
                del torch.Tensor.type  # back to torch._C.TensorBase.type

    wrapper.__wrapped__ = fn
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _resolve(dotted: str):
    module_name, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


_APPLIED = False


def apply_cpu_compat() -> None:
    """Install the CPU compatibility layer (idempotent). Call only when running on CPU."""
    global _APPLIED
    if _APPLIED:
        return
    proxy = CudaToCpuTorch()
    for module_name in PATCHED_MODULES:
        module = importlib.import_module(module_name)
        module.torch = proxy
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    random_mod._get_cuda_rng_state = _cpu_get_rng_state
    random_mod._set_cuda_rng_state = _cpu_set_rng_state
    # optimizer.py imported the helper by name, so replace it in both namespaces.
    for module_name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        module = importlib.import_module(module_name)
        module.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    for dotted in CUDA_TYPE_CHECKED_CONSTRUCTORS:
        cls = _resolve(dotted)
        cls.__init__ = _with_cuda_type_names(cls.__init__)
    _APPLIED = True


def cpu_compat_applied() -> bool:
    return _APPLIED


# --------------------------------------------------------------------------------------------
# Distributed optimizer with the torch Adam fallback (megatron-core without apex/TE), any device.

# DistributedOptimizer method -> the bug of the torch-Adam branch that its wrapper fixes.
TORCH_ADAM_FALLBACK_FIXES: dict[str, str] = {
    "state_dict": "asserts exactly one per-param 'step' and finds none on a fresh (lazily "
                  "initialised) torch Adam: fill the state torch would create on its first step",
    "load_state_dict": "puts ONE shared 'step' tensor into every param's state, which Adam then "
                       "increments once per param: give each param its own copy",
    "_set_main_param_and_optimizer_states": "the bucket-space (dp_reshardable) load copies a stale "
                                            "'step' over the one restored from param_groups: skip it",
}

_FALLBACK_FIXED = False


def _fill_fresh_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """The state torch Adam creates lazily on its first step (step 0, zero moments), made eagerly
    so a not-yet-stepped optimizer can be saved or loaded. Numerically identical to the lazy one."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            st.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
            st.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
            st.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))


def apply_torch_adam_fallback_fixes() -> bool:
    """Fix megatron-core 0.16.1's DistributedOptimizer for the torch Adam fallback (idempotent).

    A no-op (returns False) when apex or Transformer Engine provides the optimizer: then
    megatron-core takes its other branches and nothing here would change its behaviour."""
    global _FALLBACK_FIXED
    # lazy: megatron.core takes seconds to import; arguments.py imports this module (CLI start-up)
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return False
    if _FALLBACK_FIXED:
        return True
    cls = distrib_optimizer.DistributedOptimizer
    orig_state_dict = cls.state_dict
    orig_load_state_dict = cls.load_state_dict
    orig_set_states = cls._set_main_param_and_optimizer_states

    def state_dict(self):
        if isinstance(self.optimizer, torch.optim.Adam):
            _fill_fresh_adam_state(self.optimizer)
        return orig_state_dict(self)

    def load_state_dict(self, state_dict):
        orig_load_state_dict(self, state_dict)
        for st in self.optimizer.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].detach().clone()

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return orig_set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, tensor in dst.items():
            if key != "step":  # restored from param_groups by load_state_dict
                tensor.copy_(tensors[key])

    for fn, orig in ((state_dict, orig_state_dict), (load_state_dict, orig_load_state_dict),
                     (_set_main_param_and_optimizer_states, orig_set_states)):
        fn.__wrapped__ = orig
        fn.__doc__ = TORCH_ADAM_FALLBACK_FIXES[fn.__name__]
        setattr(cls, fn.__name__, fn)
    _FALLBACK_FIXED = True
    return True
