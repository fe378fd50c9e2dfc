"""The LLaMA student, built from megatron-core's GPTModel.

LLaMA = pre-norm RMSNorm, SwiGLU MLP, rotary position embeddings, no biases, optional grouped-query
attention, tied or untied embeddings. ``--transformer-impl`` (model/spec.py) picks megatron-core's
Transformer Engine layer spec (the default on CUDA) or its local spec, with our own
:class:`LlamaRMSNorm` (torch's RMSNorm wrapper in megatron-core refuses sequence parallelism).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_let.model import spec as model_spec
from megatron_let.runtime import device as device_policy


@dataclass
class LlamaConfig:
    """Architecture of the student. ``ffn_hidden_size=None`` means LLaMA's 8/3·h rounded up to 256."""

    num_layers: int = 4
    hidden_size: int = 256
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None = multi-head attention (no GQA)
    seq_length: int = 256
    max_position_embeddings: Optional[int] = None
    vocab_size: int = 32000
    untie_embeddings_and_output_weights: bool = True
    rotary_base: int = 10000
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    # Megatron-LM's --kv-channels (None: hidden / heads), --rotary-percent, dropouts, --apply-layernorm-1p
    kv_channels: Optional[int] = None
    rotary_percent: float = 1.0
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    apply_layernorm_1p: bool = False

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = int(256 * ((int(8 * self.hidden_size / 3) + 255) // 256))
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.kv_channels is None and self.num_attention_heads and \
                self.hidden_size % self.num_attention_heads == 0:
            self.kv_channels = self.hidden_size // self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def validate(self, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> None:
        """Raise ValueError for shapes megatron-core cannot build, before anything is allocated."""
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % tensor_parallel_size:
            raise ValueError(
                f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                f"--tensor-model-parallel-size {tensor_parallel_size}"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(
                f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                f"--num-query-groups {groups}"
            )
        if groups % tensor_parallel_size:
            raise ValueError(
                f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size "
                f"{tensor_parallel_size}"
            )
        if self.ffn_hidden_size % tensor_parallel_size:
            raise ValueError(
                f"--ffn-hidden-size {self.ffn_hidden_size} is not divisible by "
                f"--tensor-model-parallel-size {tensor_parallel_size}"
            )
        if self.num_layers % pipeline_parallel_size:
            raise ValueError(
                f"--num-layers {self.num_layers} is not divisible by "
                f"--pipeline-model-parallel-size {pipeline_parallel_size}"
            )
        if self.seq_length > self.max_position_embeddings:
            raise ValueError(
                f"--seq-length {self.seq_length} exceeds --max-position-embeddings "
                f"{self.max_position_embeddings}"
            )

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        """Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by × TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return ((self.vocab_size + multiple - 1) // multiple) * multiple

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count of the unpadded model (used by dry runs and reports)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        heads = self.num_attention_heads
        groups = self.num_query_groups or heads
        head_dim = self.head_dim
        attn = h * (heads * head_dim) + 2 * h * (groups * head_dim) + (heads * head_dim) * h
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h
        total = self.num_layers * per_layer + h  # + final norm
        if include_embeddings:
            emb = self.vocab_size * h
            total += emb if not self.untie_embeddings_and_output_weights else 2 * emb
        return total


# Paper table 3 (SPEC.md §2), plus small presets for CPU runs and tests.
PRESETS: dict[str, dict] = {
    "tiny": dict(num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                 num_query_groups=2),
    "small": dict(num_layers=8, hidden_size=256, ffn_hidden_size=704, num_attention_heads=8,
                  num_query_groups=4),
    "llama-1b": dict(num_layers=24, hidden_size=2048, ffn_hidden_size=5461, num_attention_heads=32),
    "llama-7b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32),
}


@dataclass
class PerformanceConfig:
    """Megatron-LM's memory and speed features (flags of the same names). None/False = off.

    They change how the step is computed, never what it computes: losses and gradients equal a
    run without them (tests/test_performance_features.py)."""

    recompute_granularity: Optional[str] = None  # "full" | "selective"
    recompute_method: Optional[str] = None  # "uniform" | "block" (full only)
    recompute_num_layers: Optional[int] = None  # full only
    num_layers_per_virtual_pipeline_stage: Optional[int] = None  # interleaved 1F1B
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False  # needs the distributed optimizer
    ddp_bucket_size: Optional[int] = None  # elements per gradient bucket (None: megatron's default)
    attention_backend: str = "auto"  # --attention-backend (megatron-core's AttnBackend name)
    grad_reduce_in_bf16: bool = False  # --grad-reduce-in-bf16 (with --bf16)
    # --cross-entropy-loss-fusion: megatron-core's fused vocab-parallel cross entropy, used by the
    # model when it computes the loss from the labels and by the trainer's logits path (KD)
    cross_entropy_loss_fusion: bool = False
    cross_entropy_fusion_impl: str = "native"  # --cross-entropy-fusion-impl {native,te}

    def virtual_pipeline_size(self, num_layers: int, pipeline_parallel_size: int) -> Optional[int]:
        """Model chunks per pipeline rank, or None without the interleaved schedule."""
        n = self.num_layers_per_virtual_pipeline_stage
        if n is None:
            return None
        return num_layers // pipeline_parallel_size // n

    def validate(self, model: LlamaConfig, pipeline_parallel_size: int,
                 use_distributed_optimizer: bool) -> None:
        """Raise ValueError (naming the flags and values) before anything is built."""
        g, m, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if g not in (None, "full", "selective"):
            raise ValueError(f"--recompute-granularity must be full or selective, got {g!r}")
        if m not in (None, "uniform", "block"):
            raise ValueError(f"--recompute-method must be uniform or block, got {m!r}")
        if g != "full" and (m is not None or n is not None):
            raise ValueError(
                f"--recompute-method/--recompute-num-layers only apply to --recompute-granularity "
                f"full (got --recompute-granularity {g}, --recompute-method {m}, "
                f"--recompute-num-layers {n})")
        vpp_n = self.num_layers_per_virtual_pipeline_stage
        per_stage = model.num_layers // pipeline_parallel_size
        if vpp_n is not None:
            if pipeline_parallel_size < 2:
                raise ValueError("--num-layers-per-virtual-pipeline-stage needs "
                                 "--pipeline-model-parallel-size > 1")
            if vpp_n < 1 or per_stage % vpp_n:
                raise ValueError(
                    f"--num-layers-per-virtual-pipeline-stage {vpp_n} must divide the {per_stage} "
                    f"layers per pipeline stage (--num-layers {model.num_layers} / "
                    f"--pipeline-model-parallel-size {pipeline_parallel_size})")
        per_chunk = vpp_n if vpp_n is not None else per_stage
        if g == "full":
            if m is None or n is None:
                raise ValueError("--recompute-granularity full needs --recompute-method "
                                 "{uniform,block} and --recompute-num-layers N")
            if not 1 <= n <= per_chunk:
                raise ValueError(f"--recompute-num-layers {n} must be between 1 and the {per_chunk} "
                                 "layers of a pipeline stage (model chunk)")
            if m == "uniform" and per_chunk % n:
                raise ValueError(f"--recompute-method uniform: --recompute-num-layers {n} must "
                                 f"divide the {per_chunk} layers of a pipeline stage (model chunk)")
        if self.overlap_param_gather and not use_distributed_optimizer:
            raise ValueError("--overlap-param-gather needs --use-distributed-optimizer "
                             "(the parameter all-gather exists only with a sharded optimizer)")
        if self.ddp_bucket_size is not None and self.ddp_bucket_size < 1:
            raise ValueError(f"--ddp-bucket-size must be >= 1, got {self.ddp_bucket_size}")

    def check_microbatches(self, num_microbatches: int, pipeline_parallel_size: int) -> None:
        """megatron-core's interleaved schedule runs micro-batches in groups of PP."""
        if self.num_layers_per_virtual_pipeline_stage is not None and (
                num_microbatches % pipeline_parallel_size):
            raise ValueError(
                f"--num-layers-per-virtual-pipeline-stage: the {num_microbatches} micro-batches per "
                f"step (--global-batch-size / (--micro-batch-size x data-parallel size)) must be a "
                f"multiple of --pipeline-model-parallel-size {pipeline_parallel_size}")


def preset(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown --model-preset {name!r}; choose from {sorted(PRESETS)}")
    values = dict(PRESETS[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return LlamaConfig(**values)


class LlamaRMSNorm(torch.nn.Module):
    """RMSNorm usable under sequence parallelism: its weight is marked ``sequence_parallel`` so that
    megatron-core all-reduces its gradient across the TP group (each rank saw a sequence shard)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__()
        self.eps = eps
        # --apply-layernorm-1p: the weight is stored as (scale - 1), initialised to 0 (as TE's
        # zero_centered_gamma), so weight decay pulls the scale towards 1, not 0
        self.zero_centered = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = self.weight.float() + 1.0 if self.zero_centered else self.weight.float()
        return (y * scale).to(x.dtype)


def transformer_engine_available() -> bool:
    return model_spec.te_importable() and device_policy.cuda_usable()


def _spec_for(use_cpu: bool, use_te: Optional[bool] = None):
    """The default spec of a device (``use_te`` picks the implementation explicitly)."""
    impl = None if use_te is None else ("transformer_engine" if use_te else "local")
    return model_spec.resolve_spec(model_spec.ImplConfig(transformer_impl=impl),
                                   "cpu" if use_cpu else "cuda")


def build_transformer_config(cfg: LlamaConfig, parallel, bf16: bool, use_cpu: bool,
                             perf: Optional[PerformanceConfig] = None, spec=None):
    """megatron-core TransformerConfig for the LLaMA architecture and the run's features.
    ``spec`` (model/spec.py ``StudentSpec``) sets the fusions; default: the device's."""
    # lazy: megatron.core takes seconds to import; arguments.py imports this module (CLI start-up)
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    perf = perf or PerformanceConfig()
    spec = spec or _spec_for(use_cpu)
    dtype = torch.bfloat16 if bf16 else torch.float32
    vpp = perf.virtual_pipeline_size(cfg.num_layers, parallel.pipeline_model_parallel_size)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        layernorm_zero_centered_gamma=cfg.apply_layernorm_1p,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=use_cpu,
        calculate_per_token_loss=True,
        # megatron-core 0.16.1 defaults to the deprecated "full" and then warns about its own
        # default; [] is what "full" is converted to (whole layer, only used with CUDA graphs).
        cuda_graph_scope=[],
        persist_layer_norm=False,  # needs apex
        # the fusions (where their kernels exist) and batch_p2p_sync (off): model/spec.py
        **spec.config_kwargs(),
        # Interleaved PP=2 over gloo: previous and next rank are one peer and gloo pairs batched
        # sends/recvs in posting order, swapping same-shaped tensors (silently wrong losses).
        batch_p2p_comm=not (use_cpu and vpp is not None),
        # Megatron-LM's default: free a stage's output once sent (needs viewless outputs).
        deallocate_pipeline_outputs=True,
        virtual_pipeline_model_parallel_size=vpp,
        recompute_granularity=perf.recompute_granularity,
        recompute_method=perf.recompute_method,
        recompute_num_layers=perf.recompute_num_layers,
        attention_backend=AttnBackend[perf.attention_backend],
        cross_entropy_loss_fusion=perf.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=perf.cross_entropy_fusion_impl,
    )


def build_ddp_config(perf: Optional[PerformanceConfig], use_distributed_optimizer: bool):
    """megatron-core DDP config: fp32 gradient reduction, overlap and bucketing as flagged."""
    # lazy: megatron.core takes seconds to import; arguments.py imports this module (CLI start-up)
    from megatron.core.distributed import DistributedDataParallelConfig

    perf = perf or PerformanceConfig()
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=not perf.grad_reduce_in_bf16,
        overlap_grad_reduce=perf.overlap_grad_reduce,
        overlap_param_gather=perf.overlap_param_gather,
        align_param_gather=perf.overlap_param_gather,  # Megatron-LM's default with overlap
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=perf.ddp_bucket_size,
    )


def build_layer_spec(config, use_te: bool, vp_stage: Optional[int] = None):
    """Block spec: TE fused layers on GPU when available, else the local spec with LlamaRMSNorm."""
    # lazy: megatron.core takes seconds to import; arguments.py imports this module (CLI start-up)
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if use_te:
        layer = get_gpt_layer_with_transformer_engine_spec()
        # lazy: megatron.core takes seconds to import; arguments.py imports this module (CLI start-up)
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
        layer = dataclasses.replace(
            layer,
            submodules=dataclasses.replace(
                layer.submodules, input_layernorm=LlamaRMSNorm, pre_mlp_layernorm=LlamaRMSNorm
            ),
        )
        final_norm = LlamaRMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=final_norm
    )


def build_student(cfg: LlamaConfig, parallel, bf16: bool = False, use_cpu: bool = True,
                  use_te: Optional[bool] = None, perf: Optional[PerformanceConfig] = None,
                  vp_stage: Optional[int] = None, spec=None):
    """Build this rank's GPTModel stage (model chunk ``vp_stage`` under the interleaved pipeline).
    Requires megatron parallel state to be initialised. ``spec`` (model/spec.py) picks the layer
    implementation and fusions; default: the device's (TE on CUDA, ``use_te`` to choose)."""
    # lazy: megatron.core takes seconds to import; arguments.py imports this module (CLI start-up)
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    spec = spec or _spec_for(use_cpu, use_te)
    config = build_transformer_config(cfg, parallel, bf16=bf16, use_cpu=use_cpu, perf=perf, spec=spec)
    model = GPTModel(
        config=config,
        transformer_layer_spec=build_layer_spec(config, spec.use_te, vp_stage=vp_stage),
        vocab_size=cfg.padded_vocab_size(parallel.tensor_model_parallel_size),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=not cfg.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
        rotary_percent=cfg.rotary_percent,
    )
    if not use_cpu:
        model.cuda(torch.cuda.current_device())
    return model


def build_student_chunks(cfg: LlamaConfig, parallel, bf16: bool = False, use_cpu: bool = True,
                         perf: Optional[PerformanceConfig] = None, spec=None) -> list:
    """This rank's model chunks: one stage, or one per virtual stage (interleaved pipeline)."""
    vpp = (perf or PerformanceConfig()).virtual_pipeline_size(
        cfg.num_layers, parallel.pipeline_model_parallel_size)
    if vpp is None:
        return [build_student(cfg, parallel, bf16=bf16, use_cpu=use_cpu, perf=perf, spec=spec)]
    return [build_student(cfg, parallel, bf16=bf16, use_cpu=use_cpu, perf=perf, vp_stage=i, spec=spec)
            for i in range(vpp)]
