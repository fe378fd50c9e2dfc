"""The student's layer implementation and fusions, decided once per run.

``--transformer-impl`` (Megatron-LM's flag) picks megatron-core's Transformer Engine layer spec or its
local spec; the default is ``transformer_engine`` on CUDA and ``local`` on CPU. A CUDA run that asks
for TE (explicitly or by default) while ``transformer_engine.pytorch`` cannot be imported stops before
any compute with an error naming the fix, instead of falling back silently to the local attention,
which materialises the b x heads/TP x s x s attention probabilities of every layer.

Fusions are on where their kernels exist, each with Megatron-LM's switch; on CPU all are off (the
fused kernels are CUDA-only; megatron-core's jit-fused functions need torch.compile's GPU backend):

=============================  ==================================  ======================================
TransformerConfig field        switch                              needs (megatron-core 0.16.1)
=============================  ==================================  ======================================
apply_rope_fusion              --no-rope-fusion                    TE (``rope_utils`` imports its fused
                                                                   RoPE from megatron's TE extension)
bias_activation_fusion         --no-bias-swiglu-fusion             CUDA (``fused_bias_swiglu``, jit-fused)
masked_softmax_fusion          --no-masked-softmax-fusion          TE spec: TE's attention (megatron-core
                                                                   reads the field only in the local
                                                                   attention); local spec: apex's
                                                                   ``scaled_upper_triang_masked_softmax_cuda``
gradient_accumulation_fusion   --no-gradient-accumulation-fusion   apex's ``fused_weight_gradient_mlp_cuda``:
                                                                   ``ColumnParallelLinear`` (the output
                                                                   layer in either spec) raises without it
bias_dropout_fusion            --no-bias-dropout-fusion            CUDA (``fused_bias_dropout``, jit-fused)
=============================  ==================================  ======================================

``batch_p2p_sync`` is off on every device: megatron-core calls ``torch.cuda.synchronize()`` after each
batched pipeline send/receive when it is on (a workaround for old PyTorch), which would also wait for
the teacher's side stream; CPU cannot call it at all.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from megatron_let.runtime import device as device_policy

TRANSFORMER_IMPLS = ("transformer_engine", "local")
TE_FIX = ("install Transformer Engine (pip install --no-build-isolation 'transformer-engine[pytorch]', "
          "or use NVIDIA's PyTorch container) or pass --transformer-impl local")
APEX_WGRAD = "fused_weight_gradient_mlp_cuda"
APEX_SOFTMAX = "scaled_upper_triang_masked_softmax_cuda"


@dataclass
class ImplConfig:
    """What the flags ask for; :func:`resolve_spec` decides what runs."""

    transformer_impl: Optional[str] = None  # None: transformer_engine on CUDA, local on CPU
    rope_fusion: bool = True
    bias_swiglu_fusion: bool = True
    masked_softmax_fusion: bool = True
    gradient_accumulation_fusion: bool = True
    bias_dropout_fusion: bool = True


# (TransformerConfig field, ImplConfig attribute, Megatron-LM switch, what it fuses)
FUSIONS: Tuple[Tuple[str, str, str, str], ...] = (
    ("apply_rope_fusion", "rope_fusion", "--no-rope-fusion", "RoPE"),
    ("bias_activation_fusion", "bias_swiglu_fusion", "--no-bias-swiglu-fusion", "bias+SwiGLU"),
    ("masked_softmax_fusion", "masked_softmax_fusion", "--no-masked-softmax-fusion",
     "scale+mask+softmax"),
    ("gradient_accumulation_fusion", "gradient_accumulation_fusion",
     "--no-gradient-accumulation-fusion", "weight-gradient accumulation into main_grad"),
    ("bias_dropout_fusion", "bias_dropout_fusion", "--no-bias-dropout-fusion", "bias+dropout+add"),
)


@dataclass(frozen=True)
class Fusion:
    field: str  # TransformerConfig field
    flag: str  # the switch that turns it off
    what: str
    on: bool
    why: str


@dataclass
class StudentSpec:
    """The resolved implementation: spec, attention backend, fusions."""

    impl: str  # "transformer_engine" | "local"
    device: str  # "cuda" | "cpu"
    fusions: List[Fusion] = field(default_factory=list)
    batch_p2p_sync: bool = False
    note: str = ""  # how it was decided, when that is not obvious (dry runs planned elsewhere)

    @property
    def use_te(self) -> bool:
        return self.impl == "transformer_engine"

    def fusion(self, field_name: str) -> Fusion:
        return next(f for f in self.fusions if f.field == field_name)

    @property
    def attention_backend(self) -> str:
        if self.use_te:
            return ("Transformer Engine DotProductAttention (flash / cuDNN fused / unfused, chosen by TE; "
                    "no s x s matrix with the fused backends)")
        softmax = "apex fused masked softmax" if self.fusion("masked_softmax_fusion").on else "torch softmax"
        return (f"megatron-core local DotProductAttention ({softmax}; materialises the b x heads/TP x "
                "s x s attention probabilities of every layer)")

    def config_kwargs(self) -> dict:
        """The TransformerConfig fields this decides."""
        kw = {f.field: f.on for f in self.fusions}
        kw["batch_p2p_sync"] = self.batch_p2p_sync
        return kw

    def describe(self) -> List[str]:
        """Lines for the run's log and the dry run."""
        spec = ("megatron-core Transformer Engine layer spec (TE fused norm+linear layers)" if self.use_te
                else "megatron-core local layer spec (LlamaRMSNorm, torch linear layers)")
        lines = [f"student spec: --transformer-impl {self.impl} on {self.device}: {spec}"
                 + (f" [{self.note}]" if self.note else ""),
                 f"  attention backend: {self.attention_backend}"]
        for f in self.fusions:
            lines.append(f"  {f.field}: {'on' if f.on else 'off'} ({f.what}; {f.why})")
        lines.append(f"  batch_p2p_sync: {'on' if self.batch_p2p_sync else 'off'}")
        return lines


# ------------------------------------------------------------------------------------ probes
# Module-level functions so tests can replace them (CUDA-only decisions are tested on CPU); whether
# CUDA is there is asked of runtime/device.py (device_policy.cuda_usable), the one place for that.

def te_importable() -> bool:
    """``transformer_engine.pytorch`` imports (its CUDA part raises RuntimeError, not only
    ImportError, where it cannot load)."""
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:
        return False
    return True


def module_importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


# ------------------------------------------------------------------------------------ decision

def default_impl(device: str) -> str:
    return "transformer_engine" if device == "cuda" else "local"


def resolve_spec(impl_cfg: Optional[ImplConfig], device: str, assume_te: bool = False) -> StudentSpec:
    """Decide spec and fusions for a run on ``device`` ("cuda"/"cpu"). Raises ValueError (before
    anything is built) for TE on CPU or TE requested on CUDA but not importable. ``assume_te``: a
    dry run planning a GPU job on a machine without a GPU takes TE as present there."""
    c = impl_cfg or ImplConfig()
    impl = c.transformer_impl or default_impl(device)
    if impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"--transformer-impl must be one of {', '.join(TRANSFORMER_IMPLS)}, got {impl!r}")
    if device == "cpu":
        if impl == "transformer_engine":
            raise ValueError("--transformer-impl transformer_engine needs a CUDA device (this run is on "
                             "CPU): pass --transformer-impl local, or run on a GPU")
        return StudentSpec(impl, device, [Fusion(fld, flag, what, False,
                                                 "CPU: the fused kernels are CUDA-only")
                                          for fld, _, flag, what in FUSIONS], batch_p2p_sync=False)
    found = te_importable()
    te = found or assume_te
    if impl == "transformer_engine" and not te:
        raise ValueError(
            "--transformer-impl transformer_engine (the default on CUDA) but transformer_engine.pytorch "
            "cannot be imported: " + TE_FIX + ". Without it the local attention keeps a "
            "b x heads/TP x s x s matrix per layer (see --dry-run for the memory it needs)")
    have = {
        "apply_rope_fusion": (te, "Transformer Engine's fused RoPE kernel",
                              "needs Transformer Engine (megatron-core takes its fused RoPE from TE)"),
        "bias_activation_fusion": (True, "megatron-core's jit-fused bias-SwiGLU", ""),
        "masked_softmax_fusion": (
            (True, "inside TE's attention", "") if impl == "transformer_engine" else
            (module_importable(APEX_SOFTMAX), f"apex's {APEX_SOFTMAX}",
             f"the local attention needs apex's {APEX_SOFTMAX}")),
        "gradient_accumulation_fusion": (
            module_importable(APEX_WGRAD), f"apex's {APEX_WGRAD}",
            f"needs apex's {APEX_WGRAD}: megatron-core's ColumnParallelLinear (the output layer, in "
            "either spec) refuses the fusion without it"),
        "bias_dropout_fusion": (True, "megatron-core's jit-fused bias-dropout-add", ""),
    }
    fusions = []
    for fld, attr, flag, what in FUSIONS:
        available, provider, missing = have[fld]
        if not getattr(c, attr):
            fusions.append(Fusion(fld, flag, what, False, f"switched off by {flag}"))
        elif available:
            fusions.append(Fusion(fld, flag, what, True, provider))
        else:
            fusions.append(Fusion(fld, flag, what, False, missing))
    return StudentSpec(impl, device, fusions, batch_p2p_sync=False,
                       note="planned for a GPU node from a machine without one: Transformer Engine "
                       "assumed installed there, apex's kernels as found here" if te and not found else "")


def planned_spec(impl_cfg: Optional[ImplConfig], device_flag: str) -> StudentSpec:
    """The spec a dry run reports. Like the dry run's other estimates it plans the GPU job unless
    ``--device cpu``; where this machine has a GPU the run's own checks apply (the same errors),
    elsewhere TE is taken as installed on the GPU nodes (the run refuses to start if it is not)."""
    if device_flag == "cpu":
        return resolve_spec(impl_cfg, "cpu")
    return resolve_spec(impl_cfg, "cuda", assume_te=not device_policy.cuda_usable())


# ------------------------------------------------------------------------------------ memory

def local_attention_bytes(micro_batch_size: int, num_attention_heads: int, tp: int, seq_length: int,
                          bf16: bool) -> Tuple[float, float]:
    """``(kept, transient)`` bytes of the local attention's s x s tensors for one layer and one
    micro-batch: ``n = b·heads/TP·s²`` elements. Kept for backward: the softmax output in fp32 (4
    bytes) and, in bf16, its bf16 copy that the probabilities x V product saves (2): 6n in bf16, 4n in
    fp32 (measured with saved-tensor hooks, tests/test_model_spec.py). Transient during the forward, on
    top: the scores (activation dtype) and the fp32 masked scores, plus the fp32 upcast in bf16:
    10n in bf16, 8n in fp32."""
    n = micro_batch_size * num_attention_heads / tp * seq_length ** 2
    act = 2 if bf16 else 4
    kept = n * (act + 4) if bf16 else n * 4
    transient = n * (act + 4 + (4 if bf16 else 0))
    return kept, transient


def add_local_attention_memory(memory: list, spec: Optional[StudentSpec], cfg, layers_per_chunk: int) -> float:
    """Add the local attention's s x s tensors to the dry run's per-stage activation estimates (which
    count no s x s matrix, as with TE's fused attention); returns the kept bytes per layer (0 with
    the TE spec). Per stage: the layers whose activations stay for backward (all, the unrecomputed
    ones with full recompute, none with selective recompute, which recomputes core attention) times
    the chunk forwards in flight, plus the live layer's transient tensors (and its kept ones when it
    is being recomputed)."""
    if spec is None or spec.use_te:
        return 0.0
    m = cfg.model
    kept, transient = local_attention_bytes(cfg.batch.micro_batch_size, m.num_attention_heads,
                                            cfg.parallel.tensor_model_parallel_size, m.seq_length, cfg.bf16)
    perf = cfg.perf
    if perf.recompute_granularity == "selective":
        kept_layers = 0
    elif perf.recompute_granularity == "full":
        recomputed = layers_per_chunk if perf.recompute_method == "uniform" else perf.recompute_num_layers
        kept_layers = layers_per_chunk - recomputed
    else:
        kept_layers = layers_per_chunk
    # the layer being computed: its transient tensors, and its kept ones again when it is recomputed
    live = transient + (kept if kept_layers < layers_per_chunk else 0.0)
    for stage in memory:
        stage.activations += kept * kept_layers * stage.in_flight_microbatches + live
    return kept


def memory_lines(spec: Optional[StudentSpec], peak_bytes: float, kept_per_layer: float,
                 device_bytes: Optional[int]) -> List[str]:
    """The dry run's lines about the attention's memory and whether the estimate fits the GPU."""
    gib = 2 ** 30
    lines = []
    if spec is not None and not spec.use_te and kept_per_layer:
        lines.append(f"  local attention: {kept_per_layer / gib:.2f} GiB of s x s probabilities kept per "
                     "layer and micro-batch (b x heads/TP x s^2; counted in activ.)")
    if device_bytes is not None and spec is not None and spec.device == "cuda" and peak_bytes > device_bytes:
        why = (" The local attention's s x s probabilities are a large part: install Transformer Engine "
               "(--transformer-impl transformer_engine) or use --recompute-granularity selective."
               if kept_per_layer else "")
        lines.append(f"  WARNING: the estimated peak {peak_bytes / gib:.2f} GiB does not fit this GPU's "
                     f"{device_bytes / gib:.2f} GiB: lower --micro-batch-size, add recompute or more "
                     "parallelism." + why)
    return lines


# ------------------------------------------------------------------------------------ flags

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's flags for the layer implementation and the fusions."""
    g = parser.add_argument_group("layer implementation and fusions")
    g.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default=None,
                   help="megatron-core layer spec (default: transformer_engine on CUDA, local on CPU)")
    for _, attr, flag, what in FUSIONS:
        g.add_argument(flag, dest=attr, action="store_false",
                       help=f"do not fuse {what} (on by default where the kernel exists)")


def config_from_args(a: argparse.Namespace) -> ImplConfig:
    impl = a.transformer_impl
    # Megatron-LM's --attention-backend local is megatron-core's local attention, i.e. the local spec
    if getattr(a, "attention_backend", None) == "local":
        if impl == "transformer_engine":
            raise ValueError("--attention-backend local is megatron-core's local attention, which the "
                             "Transformer Engine spec does not use: drop --transformer-impl "
                             "transformer_engine or pass --transformer-impl local")
        impl = "local"
    return ImplConfig(transformer_impl=impl,
                      **{attr: getattr(a, attr) for _, attr, _, _ in FUSIONS})
