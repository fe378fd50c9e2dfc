"""Megatron-LM's flag surface for Llama-family pretraining (docs/megatron-compat.md).

A Megatron-LM launcher's arguments are taken by ``pretrain_let.py`` under the same names and value
syntax. Each Megatron-LM flag is one of:

* ``honoured``: it does what it does in Megatron-LM (most are our own flags of the same name);
* ``ours``: it states what the LLaMA student already is (``--swiglu``, ``--normalization RMSNorm``);
  a value that contradicts the student is refused;
* ``refused``: refused before any compute with a message saying what it would change and what to do
  instead. Flags of Megatron-LM's parser that are not listed here are refused by their argument
  group (:data:`megatron_let.training.megatron_lm_flags.MEGATRON_LM_FLAGS`), never with argparse's
  bare "unrecognized arguments".

:func:`add_arguments` declares the flags, :func:`apply` checks them and resolves what they mean
(sample-based schedules into iterations, Megatron-LM's GQA switch) on the parsed namespace, and
:func:`refuse_unknown` turns an unknown Megatron-LM flag into a clear error.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from megatron_let.model.llama import PRESETS, transformer_engine_available
from megatron_let.runtime import device as device_policy
from megatron_let.runtime.torchrun import plain_torchrun_warning
from megatron_let.training.megatron_lm_flags import MEGATRON_LM_FLAGS

HONOURED, OURS, REFUSED = "honoured", "ours", "refused"
CLASSES = (HONOURED, OURS, REFUSED)
ATTENTION_BACKENDS = ("flash", "fused", "unfused", "local", "auto")


@dataclass(frozen=True)
class Flag:
    """One Megatron-LM flag this module declares: its class, why, and its argparse syntax."""

    name: str
    cls: str
    reason: str
    kwargs: dict = field(default_factory=dict)  # add_argument() keywords (Megatron-LM's syntax)
    accepted: Optional[tuple] = None  # OURS with a value: the values the student is


def _switch(name, cls, reason, dest=None, accepted=None):
    """A flag without a value (Megatron-LM's store_true/store_false): None unless given."""
    dest = dest or "mlm_" + name[2:].replace("-", "_")
    return Flag(name, cls, reason, dict(action="store_const", const=True, default=None, dest=dest),
                accepted)


def _value(name, cls, reason, dest=None, accepted=None, **kwargs):
    dest = dest or "mlm_" + name[2:].replace("-", "_")
    return Flag(name, cls, reason, dict(default=None, dest=dest, **kwargs), accepted)


_DENSE = "the student is a dense LLaMA (no mixture of experts)"
_PRECISION = ("megatron_let trains in bf16 (--bf16) or fp32; FP8/FP4 training of the student next to "
              "the teacher's alignment is not supported: drop the flag and use --bf16")

# Megatron-LM flags that are not (or not under this name) in our own parser.
FLAGS: List[Flag] = [
    # ---- model: what the student is
    _switch("--use-mcore-models", OURS, "the student is megatron-core's GPTModel (Megatron-LM's "
            "default; the flag is deprecated there)"),
    _switch("--swiglu", OURS, "the student's MLP is SwiGLU"),
    _switch("--disable-bias-linear", OURS, "the student's linear layers have no biases"),
    _switch("--group-query-attention", HONOURED,
            "as Megatron-LM: grouped-query attention with --num-query-groups (which it needs); "
            "ours also applies --num-query-groups alone", dest="group_query_attention"),
    _value("--position-embedding-type", OURS, "the student uses rotary position embeddings",
           accepted=("rope",), choices=["learned_absolute", "rope", "yarn", "mrope", "relative",
                                        "none"]),
    _switch("--use-rotary-position-embeddings", OURS,
            "the student uses rotary position embeddings (deprecated Megatron-LM spelling)"),
    _switch("--no-position-embedding", OURS, "the student has no learned absolute position "
            "embedding (rotary only)"),
    _value("--normalization", OURS, "the student normalises with RMSNorm", accepted=("RMSNorm",),
           choices=["LayerNorm", "RMSNorm"]),
    _switch("--calculate-per-token-loss", OURS, "the loss is already the sum over tokens divided "
            "by the global batch's token count (per-token loss), with or without the flag"),
    _switch("--no-create-attention-mask-in-dataloader", OURS, "the data loader makes no attention "
            "mask; the causal mask is built inside attention"),
    _value("--kv-channels", HONOURED, "attention head dimension (default --hidden-size / "
           "--num-attention-heads): the Q/K/V projection widths follow it", dest="kv_channels",
           type=int),
    _value("--rotary-percent", HONOURED, "fraction of each head's dimensions that RoPE rotates",
           dest="rotary_percent", type=float),
    _value("--attention-dropout", HONOURED, "dropout on the attention probabilities (ours "
           "defaults to 0.0; Megatron-LM to 0.1)", dest="attention_dropout", type=float),
    _value("--hidden-dropout", HONOURED, "dropout on each sub-layer's output (ours defaults to 0.0; "
           "Megatron-LM to 0.1)", dest="hidden_dropout", type=float),
    _switch("--apply-layernorm-1p", HONOURED, "zero-centred norm weights: RMSNorm scales by "
            "(1 + weight), weight initialised to 0", dest="apply_layernorm_1p"),
    _value("--attention-backend", HONOURED, "Transformer Engine's attention backend on GPU "
           "(NVTE_* switches as in Megatron-LM); 'local' selects megatron-core's local layer spec; "
           "without Transformer Engine (CPU) the local spec's attention runs whatever the value",
           dest="attention_backend", choices=list(ATTENTION_BACKENDS)),
    _switch("--openai-gelu", REFUSED, "would replace the student's SwiGLU MLP with GeLU; drop it"),
    _switch("--squared-relu", REFUSED, "would replace the student's SwiGLU MLP with squared ReLU; "
            "drop it"),
    _switch("--quick-geglu", REFUSED, "would replace the student's SwiGLU MLP with quick-GeGLU; "
            "drop it"),
    _switch("--add-qkv-bias", REFUSED, "would add biases to the Q/K/V projections (Qwen-style); "
            "the LLaMA student and its Hugging Face export have none: drop it"),
    _switch("--qk-layernorm", REFUSED, "would normalise queries and keys; the LLaMA student and its "
            "Hugging Face export do not: drop it"),
    _switch("--rotary-interleaved", REFUSED, "would rotate interleaved pairs instead of halves; the "
            "student and its Hugging Face export use LLaMA's layout: drop it"),
    _switch("--use-rope-scaling", REFUSED, "would apply Llama-3.1's RoPE frequency scaling; "
            "megatron_let's Hugging Face export and teacher alignment assume plain RoPE: drop it "
            "(train at --seq-length without scaling)"),
    _value("--rope-scaling-factor", REFUSED, "only used with --use-rope-scaling (refused)",
           type=float),
    _value("--rotary-seq-len-interpolation-factor", REFUSED, "would interpolate RoPE positions; "
           "plain RoPE only: drop it", type=int),
    _switch("--apply-residual-connection-post-layernorm", REFUSED, "would take the residual after "
            "the norm; the student is pre-norm LLaMA: drop it"),
    _switch("--fp32-residual-connection", REFUSED, "would keep the residual stream in fp32; not "
            "supported with the student's layer spec: drop it"),
    _value("--embedding-init-method-std", REFUSED, "a separate embedding init std is not "
           "supported; --init-method-std initialises every weight", type=float),
    _switch("--init-model-with-meta-device", REFUSED, "meta-device initialisation is for "
            "Megatron-FSDP; not supported: drop it"),
    _value("--num-experts", REFUSED, "would make the MLPs mixtures of experts; " + _DENSE, type=int),
    _value("--expert-model-parallel-size", OURS, "the student has no experts: 1 is what it is",
           accepted=(1,), type=int),
    _switch("--multi-latent-attention", REFUSED, "would use DeepSeek's multi-latent attention; the "
            "student is LLaMA (GQA): drop it"),
    # ---- precision
    _switch("--fp16", REFUSED, "fp16 with loss scaling is not supported; use --bf16"),
    _value("--fp8-format", REFUSED, _PRECISION, choices=["e4m3", "hybrid"]),
    _value("--fp8-recipe", REFUSED, _PRECISION),
    _value("--fp8-amax-history-len", REFUSED, _PRECISION, type=int),
    _value("--fp8-amax-compute-algo", REFUSED, _PRECISION, choices=["most_recent", "max"]),
    _switch("--fp8-param-gather", REFUSED, _PRECISION),
    _value("--fp4-format", REFUSED, _PRECISION),
    _switch("--grad-reduce-in-bf16", HONOURED, "with --bf16 the data-parallel gradient buffer and "
            "its reduction are bf16 instead of fp32", dest="grad_reduce_in_bf16"),
    _switch("--accumulate-allreduce-grads-in-fp32", OURS, "gradients are accumulated and reduced in "
            "fp32 unless --grad-reduce-in-bf16"),
    _switch("--attention-softmax-in-fp32", OURS, "megatron-core's attention computes the softmax "
            "in fp32 with bf16 inputs (query-key scaling is off)"),
    _switch("--cross-entropy-loss-fusion", HONOURED, "megatron-core's fused vocab-parallel cross "
            "entropy (torch.compile'd on a CUDA build of torch, eager on a CPU-only one; its logit "
            "gradients are bf16, so an fp32 run gets a warning)",
            dest="cross_entropy_loss_fusion"),
    _value("--cross-entropy-fusion-impl", HONOURED, "'native' (megatron-core's fused kernel) or "
           "'te' (Transformer Engine's, needs it: refused without)", dest="cross_entropy_fusion_impl",
           choices=["native", "te"]),
    # ---- parallelism
    _value("--context-parallel-size", HONOURED, "1 is honoured; > 1 is refused: LET's layer capture "
           "and teacher alignment do not support context parallelism yet",
           dest="context_parallel_size", type=int),
    _value("--distributed-timeout-minutes", HONOURED, "timeout of the process groups' collectives",
           dest="distributed_timeout_minutes", type=int),
    _value("--distributed-backend", OURS, "NCCL on GPU, gloo on CPU, chosen by the device",
           accepted=("nccl", "gloo"), choices=["nccl", "gloo"]),
    _switch("--use-torch-fsdp2", REFUSED, "FSDP is not supported; use "
            "--use-distributed-optimizer (ZeRO-1) or tensor/pipeline parallelism"),
    _switch("--use-megatron-fsdp", REFUSED, "Megatron-FSDP is not supported; use "
            "--use-distributed-optimizer (ZeRO-1) or tensor/pipeline parallelism"),
    _switch("--tp-comm-overlap", REFUSED, "Transformer Engine's TP communication overlap (userbuffers) "
            "is not supported; use --sequence-parallel with --overlap-grad-reduce"),
    _value("--decoder-first-pipeline-num-layers", REFUSED, "uneven pipeline stages are not "
           "supported (LET places layer k by an even split): drop it", type=int),
    _value("--decoder-last-pipeline-num-layers", REFUSED, "uneven pipeline stages are not "
           "supported (LET places layer k by an even split): drop it", type=int),
    _value("--num-virtual-stages-per-pipeline-rank", REFUSED, "give the interleaved pipeline as "
           "--num-layers-per-virtual-pipeline-stage N instead", type=int),
    # ---- training
    _value("--train-samples", HONOURED, "run length in samples: --train-iters = samples / global "
           "batch; the LR schedule counts samples", dest="train_samples", type=int),
    _value("--lr-warmup-samples", HONOURED, "LR warmup length in samples", dest="lr_warmup_samples",
           type=int),
    _value("--lr-decay-samples", HONOURED, "LR decay length in samples (default --train-samples)",
           dest="lr_decay_samples", type=int),
    _value("--lr-warmup-iters", HONOURED, "LR warmup length in iterations", dest="lr_warmup_iters",
           type=int),
    _value("--lr-decay-iters", HONOURED, "LR decay length in iterations (default --train-iters)",
           dest="lr_decay_iters", type=int),
    _value("--lr-warmup-init", HONOURED, "LR at the start of the warmup (default 0)",
           dest="lr_warmup_init", type=float),
    _value("--lr-wsd-decay-style", HONOURED, "decay shape of --lr-decay-style WSD",
           dest="lr_wsd_decay_style", choices=["exponential", "linear", "cosine", "minus_sqrt"]),
    _value("--lr-wsd-decay-iters", HONOURED, "decay phase of --lr-decay-style WSD, in iterations",
           dest="lr_wsd_decay_iters", type=int),
    _value("--lr-wsd-decay-samples", HONOURED, "decay phase of --lr-decay-style WSD, in samples",
           dest="lr_wsd_decay_samples", type=int),
    _value("--start-weight-decay", HONOURED, "weight decay at the start (with "
           "--weight-decay-incr-style; default --weight-decay)", dest="start_weight_decay",
           type=float),
    _value("--end-weight-decay", HONOURED, "weight decay at the end (default --weight-decay)",
           dest="end_weight_decay", type=float),
    _value("--weight-decay-incr-style", HONOURED, "how weight decay goes from start to end",
           dest="weight_decay_incr_style", choices=["constant", "linear", "cosine"]),
    _value("--decoupled-lr", HONOURED, "separate peak LR of the embedding and output layer",
           dest="decoupled_lr", type=float),
    _value("--decoupled-min-lr", HONOURED, "separate minimum LR of the embedding and output layer",
           dest="decoupled_min_lr", type=float),
    _switch("--override-opt-param-scheduler", HONOURED, "spelling of "
            "--override-opt_param-scheduler", dest="override_opt_param_scheduler"),
    _switch("--use-checkpoint-opt-param-scheduler", HONOURED, "spelling of "
            "--use-checkpoint-opt_param-scheduler", dest="use_checkpoint_opt_param_scheduler"),
    _value("--optimizer", OURS, "the optimizer is Adam(W)", accepted=("adam",),
           choices=["adam", "sgd", "muon", "dist_muon"]),
    _switch("--manual-gc", HONOURED, "Python's garbage collector is disabled and run every "
            "--manual-gc-interval steps (and around evaluations) on all ranks together",
            dest="manual_gc"),
    _value("--manual-gc-interval", HONOURED, "steps between --manual-gc collections (0: only "
           "around evaluations)", dest="manual_gc_interval", type=int),
    _switch("--no-manual-gc-eval", HONOURED, "no --manual-gc collection around evaluations",
            dest="no_manual_gc_eval"),
    _value("--empty-unused-memory-level", HONOURED, "release cached CUDA memory after the "
           "forward-backward (1) and also after the optimizer step (2); nothing to release on CPU",
           dest="empty_unused_memory_level", type=int, choices=[0, 1, 2]),
    _value("--exit-duration-in-mins", HONOURED, "save (with --save) and exit once the run has lasted "
           "this long, decided on all ranks together", dest="exit_duration_in_mins", type=int),
    _switch("--use-cpu-initialization", REFUSED, "weights are initialised on the device that trains "
            "(deterministic per seed); CPU initialisation of a GPU run is not supported: drop it"),
    _value("--rampup-batch-size", REFUSED, "a batch-size ramp-up is not supported (LET's schedule "
           "is in steps of a fixed global batch): drop it", nargs="*"),
    _switch("--skip-train", REFUSED, "evaluation-only runs are tools/evaluate.py's job"),
    _value("--dataloader-type", OURS, "the training data loader is Megatron-LM's 'single' pass "
           "pretraining sampler", accepted=("single",), choices=["single", "cyclic", "external"]),
    # ---- data and tokenizer
    _value("--num-workers", HONOURED, "DataLoader worker processes (ours defaults to 0, "
           "Megatron-LM to 2)", dest="num_workers", type=int),
    _switch("--no-mmap-bin-files", HONOURED, "read the .bin files with reads instead of a memory "
            "map", dest="no_mmap_bin_files"),
    _switch("--reset-position-ids", HONOURED, "positions restart after each end-of-document token",
            dest="reset_position_ids"),
    _switch("--eod-mask-loss", HONOURED, "no loss on end-of-document tokens", dest="eod_mask_loss"),
    _switch("--reset-attention-mask", REFUSED, "per-document attention masks are not passed to the "
            "student or the teacher (LET aligns full-context states): drop it"),
    _value("--tiktoken-pattern", HONOURED, "read by Megatron-LM's TikTokenizer only, which is "
           "refused; ignored with other tokenizers, as in Megatron-LM"),
    _value("--train-data-path", REFUSED, "separate train/valid/test paths are not supported: give "
           "--data-path with --split", nargs="*"),
    _value("--valid-data-path", REFUSED, "separate train/valid/test paths are not supported: give "
           "--data-path with --split", nargs="*"),
    _value("--test-data-path", REFUSED, "separate train/valid/test paths are not supported: give "
           "--data-path with --split", nargs="*"),
    _value("--data-args-path", REFUSED, "give the prefixes as --data-path instead"),
    _value("--vocab-file", REFUSED, "GPT-2 BPE files are not supported: use --tokenizer-type "
           "HuggingFaceTokenizer --tokenizer-model <folder>"),
    _value("--merge-file", REFUSED, "GPT-2 BPE files are not supported: use --tokenizer-type "
           "HuggingFaceTokenizer --tokenizer-model <folder>"),
    # ---- checkpointing
    _value("--ckpt-format", OURS, "checkpoints are megatron-core dist-checkpointing torch_dist",
           accepted=("torch_dist",), choices=["torch", "torch_dist", "zarr", "torch_dcp",
                                              "fsdp_dtensor"]),
    _switch("--no-save-optim", REFUSED, "every checkpoint holds the optimizer state (resumes are "
            "exact); to start a new run from the weights only, use --no-load-optim when loading"),
    _switch("--no-save-rng", REFUSED, "every checkpoint holds the RNG state; use --no-load-rng when "
            "loading instead"),
    _switch("--finetune", REFUSED, "use --no-load-optim --no-load-rng (weights only); the "
            "iteration count is kept"),
    _value("--pretrained-checkpoint", REFUSED, "use --load DIR --no-load-optim --no-load-rng"),
    _value("--non-persistent-save-interval", REFUSED, "non-persistent (local) checkpoints are not "
           "supported: use --save-interval", type=int),
    _switch("--use-dist-ckpt", OURS, "checkpoints are distributed (torch_dist) already"),
    _switch("--auto-detect-ckpt-format", OURS, "only torch_dist checkpoints are written and read"),
    _switch("--use-checkpoint-args", REFUSED, "the model is built from the flags and checked "
            "against the checkpoint's record instead: pass the same model flags"),
    _switch("--exit-on-missing-checkpoint", REFUSED, "an empty --load starts from scratch with a "
            "message; check the directory before launching (--dry-run)"),
    # ---- logging (ours besides the owners' flags)
    _switch("--log-validation-ppl-to-tensorboard", OURS, "validation perplexity is always logged "
            "(valid/ppl)"),
]

# Flags of our own parser (under Megatron-LM's names) whose semantics differ in a detail.
NOTES: Dict[str, str] = {
    "--untie-embeddings-and-output-weights": "the student's default is untied (LLaMA's); "
    "Megatron-LM's is tied: pass --tie-embeddings-and-output-weights for that",
    "--lr-warmup-fraction": "fraction of the decay length; default 0.1 when no --lr-warmup-* is "
    "given (Megatron-LM: no warmup)",
    "--lr-decay-style": "constant, linear, cosine, inverse-square-root, WSD (megatron-core's "
    "scheduler)",
    "--tokenizer-type": "SentencePieceTokenizer, HuggingFaceTokenizer, NullTokenizer; Megatron-LM's "
    "other types are refused with the one to use instead",
    "--vocab-size": "with NullTokenizer: ids 0..N-1, end-of-document N-1 (Megatron-LM's "
    "NullTokenizer has N+1 ids, end-of-document N: data it tokenized needs --vocab-size N+1 here; "
    "the preflight refuses ids outside the vocabulary)",
    "--split": "as Megatron-LM (the numbers are read from the string, so \"'99,1,0'\" from a shell "
    "array is 99,1,0)",
}

# Megatron-LM tokenizer types we do not build, and what to use instead.
TOKENIZER_INSTEAD = {
    "Llama2Tokenizer": "SentencePieceTokenizer --tokenizer-model <tokenizer.model>",
    "GPTSentencePieceTokenizer": "SentencePieceTokenizer --tokenizer-model <tokenizer.model>",
    "GPT2BPETokenizer": "HuggingFaceTokenizer --tokenizer-model <folder of the GPT-2 tokenizer>",
    "TikTokenizer": "HuggingFaceTokenizer --tokenizer-model <folder with tokenizer.json>",
    "BertWordPieceLowerCase": "HuggingFaceTokenizer (a causal LM's tokenizer)",
    "BertWordPieceCase": "HuggingFaceTokenizer (a causal LM's tokenizer)",
    "MultimodalTokenizer": "HuggingFaceTokenizer (text-only pretraining)",
    "NullMultimodalTokenizer": "NullTokenizer --vocab-size N (text-only pretraining)",
    "SFTTokenizer": "HuggingFaceTokenizer (pretraining, not SFT)",
}

# Reasons for the rest of Megatron-LM's parser, by flag-name pattern then by argument group.
_PATTERN_REASONS = [
    (r"--(num-experts|moe-|expert-)", _DENSE),
    (r"--(fp8|fp4|first-last-layers-bf16|num-layers-at-(start|end)-in-bf16|keep-fp8)", _PRECISION),
    (r"--(mamba-|is-hybrid-model|hybrid-)", "hybrid Mamba models are not supported; the student is "
     "a LLaMA transformer"),
    (r"--mtp-", "multi-token prediction is not supported"),
    (r"--(tp-comm-|disable-tp-comm|no-tp-comm)", "Transformer Engine's TP communication overlap is "
     "not supported"),
    (r"--(enable-cuda-graph|cuda-graph|external-cuda-graph)", "CUDA graphs are not supported"),
    (r"--(q-lora|kv-lora|qk-head|qk-pos|v-head|mscale|rotary-scaling|cache-mla)",
     "multi-latent attention is not supported; the student is LLaMA (GQA)"),
    (r"--(inference-|flash-decode)", "inference settings: use tools/evaluate.py or the Hugging Face "
     "export for inference"),
    (r"--(.*fsdp|data-parallel-sharding|outer-dp|num-distributed-optimizer-instances)",
     "FSDP is not supported; use --use-distributed-optimizer"),
    (r"--(fim-)", "fill-in-the-middle data is not supported"),
    (r"--(kitchen|use-kitchen)", "quantisation recipes are not supported"),
    (r"--(hierarchical-context|hybrid-context|cp-comm|max-seqlen-per-dp-cp)",
     "context parallelism is not supported yet (LET's capture)"),
]
_GROUP_REASONS = {
    "rl": "reinforcement learning is not part of pretraining",
    "inference": "inference settings: use tools/evaluate.py or the Hugging Face export",
    "biencoder": "retrieval models are not supported",
    "vision": "vision models are not supported",
    "moe": _DENSE,
    "mla": "multi-latent attention is not supported; the student is LLaMA (GQA)",
    "experimental_attention_variant": "experimental attention variants are not supported",
    "heterogeneous architecture": "heterogeneous layers are not supported",
    "experimental": "experimental Megatron-LM features are not supported",
    "one logger": "NVIDIA's one-logger is not supported; use --tensorboard-dir / --wandb-project",
    "In-process restart": "in-process restart is not supported; use the checkpoint lifecycle of "
    "docs/reliability.md (--save-interval, --exit-signal-handler, --load)",
    "ft_package": "NVIDIA's fault-tolerance package is not supported; see docs/reliability.md",
    "rerun engine": "the rerun state machine is not supported; non-finite losses stop the run "
    "(--check-for-nan-in-loss-and-grad)",
    "straggler": "straggler detection is not supported",
    "workload inspector": "the workload inspector is not supported",
    "msc": "multi-storage client paths are not supported; use local or mounted paths",
    "sft": "supervised fine-tuning is not part of pretraining",
    "autoresume": "ADLR autoresume is not supported; use --exit-signal-handler (docs/launching.md)",
    "Transformer-Engine": "Transformer Engine precision settings are not supported",
}
_DEFAULT_REASON = "this Megatron-LM setting is not supported by megatron_let"


def by_name() -> Dict[str, Flag]:
    return {f.name: f for f in FLAGS}


def _megatron_lm_groups() -> Dict[str, str]:
    return {"--" + name: group for group, names in MEGATRON_LM_FLAGS.items() for name in names}


def unsupported_reason(flag: str) -> Optional[str]:
    """Why a Megatron-LM flag absent from our parser is refused; None if it is no Megatron-LM flag."""
    group = _megatron_lm_groups().get(flag)
    if group is None:
        return None
    for pattern, reason in _PATTERN_REASONS:
        if re.match(pattern, flag):
            return reason
    return _GROUP_REASONS.get(group, _DEFAULT_REASON)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the Megatron-LM flags the parser does not have yet (ours keep their definitions)."""
    have = set(parser._option_string_actions)
    group = parser.add_argument_group("Megatron-LM compatibility (docs/megatron-compat.md)")
    for f in FLAGS:
        if f.name in have:
            continue
        kwargs = dict(f.kwargs)
        kwargs.setdefault("help", f"[{f.cls}] {f.reason}")
        group.add_argument(f.name, **kwargs)


def refuse_unknown(extras: Sequence[str]) -> None:
    """Raise ValueError for the first Megatron-LM flag among argparse's leftovers."""
    for token in extras:
        name = token.split("=", 1)[0]
        if not name.startswith("--"):
            continue
        reason = unsupported_reason(name)
        if reason is not None:
            raise ValueError(f"{name} (a Megatron-LM flag) is not supported by megatron_let: "
                             f"{reason}. Drop it to run (docs/megatron-compat.md)")


def _given(a, f: Flag):
    return getattr(a, f.kwargs["dest"], None)


def _world_size(a) -> int:
    """The run's world size as known at parse time: WORLD_SIZE, else TP x PP (one replica)."""
    text = os.environ.get("WORLD_SIZE", "")
    if text.strip().isdigit() and int(text) > 0:
        return int(text)
    return a.tensor_model_parallel_size * a.pipeline_model_parallel_size


def apply(a: argparse.Namespace) -> None:
    """Check the Megatron-LM flags of ``a`` and resolve them in place (before any compute).

    Refused flags and contradicting values raise ValueError naming the flag; sample-based lengths
    become iterations (``a.train_iters``) so that everything downstream (objective schedules,
    dataset sizes) sees one run length."""
    for f in FLAGS:
        value = _given(a, f)
        if value is None:
            continue
        if f.cls == REFUSED:
            raise ValueError(f"{f.name} is not supported by megatron_let: {f.reason}")
        if f.cls == OURS and f.accepted is not None and value not in f.accepted:
            raise ValueError(f"{f.name} {value} contradicts the student: {f.reason} "
                             f"({f.name} {f.accepted[0]}); drop the flag or pass that value")
    if a.tokenizer_type in TOKENIZER_INSTEAD:
        raise ValueError(f"--tokenizer-type {a.tokenizer_type} is not supported by megatron_let: use "
                         f"--tokenizer-type {TOKENIZER_INSTEAD[a.tokenizer_type]}")
    cp = getattr(a, "context_parallel_size", None)
    if cp is not None and cp != 1:
        raise ValueError(f"--context-parallel-size {cp} is not supported: LET's layer capture and "
                         "teacher alignment do not support context parallelism yet; use 1 (or "
                         "--tensor-model-parallel-size/--sequence-parallel to fit long sequences)")
    if a.group_query_attention and a.num_query_groups is None:
        if not (a.model_preset and PRESETS[a.model_preset].get("num_query_groups")):
            raise ValueError("--group-query-attention needs --num-query-groups N")
    if a.kv_channels is not None and a.kv_channels <= 0:
        raise ValueError(f"--kv-channels must be > 0, got {a.kv_channels}")
    if a.rotary_percent is not None and not 0.0 < a.rotary_percent <= 1.0:
        raise ValueError(f"--rotary-percent must be in (0, 1], got {a.rotary_percent}")
    for name in ("attention_dropout", "hidden_dropout"):
        v = getattr(a, name)
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
    if a.cross_entropy_fusion_impl is not None and not a.cross_entropy_loss_fusion:
        raise ValueError("--cross-entropy-fusion-impl needs --cross-entropy-loss-fusion")
    if a.grad_reduce_in_bf16 and a.mlm_accumulate_allreduce_grads_in_fp32:
        raise ValueError("--grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32 contradict "
                         "each other: keep one")
    if a.grad_reduce_in_bf16 and not a.bf16:
        raise ValueError("--grad-reduce-in-bf16 needs --bf16 (the gradients of an fp32 run are fp32)")
    for name in ("manual_gc_interval", "distributed_timeout_minutes", "exit_duration_in_mins",
                 "num_workers"):
        v = getattr(a, name)
        if v is not None and v < (0 if name in ("manual_gc_interval", "num_workers") else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= "
                             f"{0 if name in ('manual_gc_interval', 'num_workers') else 1}, got {v}")
    if (a.manual_gc_interval is not None or a.no_manual_gc_eval) and not a.manual_gc:
        raise ValueError("--manual-gc-interval / --no-manual-gc-eval need --manual-gc")
    if a.weight_decay_incr_style in (None, "constant"):
        if a.start_weight_decay is not None or a.end_weight_decay is not None:
            raise ValueError("--start-weight-decay/--end-weight-decay need --weight-decay-incr-style "
                             "linear or cosine (constant uses --weight-decay)")
    elif a.start_weight_decay is None or a.end_weight_decay is None:
        raise ValueError(f"--weight-decay-incr-style {a.weight_decay_incr_style} needs "
                         "--start-weight-decay and --end-weight-decay")
    _resolve_schedule(a)


def _resolve_schedule(a) -> None:
    """Megatron-LM's run length and LR schedule flags: iterations xor samples (validate_args)."""
    samples = {n: getattr(a, n) for n in ("train_samples", "lr_warmup_samples", "lr_decay_samples",
                                         "lr_wsd_decay_samples")}
    iters = {n: getattr(a, n) for n in ("lr_warmup_iters", "lr_decay_iters", "lr_wsd_decay_iters")}
    for n, v in list(samples.items()) + list(iters.items()):
        if v is not None and v < 0:
            raise ValueError(f"--{n.replace('_', '-')} must be >= 0, got {v}")
    if a.train_samples is not None:
        if a.train_iters is not None:
            raise ValueError("--train-iters and --train-samples are mutually exclusive")
        bad = [n for n, v in iters.items() if v is not None]
        if bad:
            raise ValueError(f"--train-samples counts the schedule in samples: use "
                             f"--{bad[0].replace('_iters', '_samples').replace('_', '-')} instead of "
                             f"--{bad[0].replace('_', '-')}")
        gbs = a.global_batch_size
        if gbs is None:
            dp = _world_size(a) // (a.tensor_model_parallel_size * a.pipeline_model_parallel_size)
            gbs = a.micro_batch_size * max(1, dp)
        a.train_iters = a.train_samples // gbs  # Megatron-LM's update_train_iters
        if a.train_iters < 1:
            raise ValueError(f"--train-samples {a.train_samples} is less than one global batch "
                             f"({gbs} samples)")
        a.schedule_global_batch = gbs
    else:
        bad = [n for n, v in samples.items() if v is not None]
        if bad:
            raise ValueError(f"--{bad[0].replace('_', '-')} needs --train-samples (the run's length "
                             "in samples); with --train-iters use "
                             f"--{bad[0].replace('_samples', '_iters').replace('_', '-')}")
        if a.train_iters is None:
            a.train_iters = 100
        a.schedule_global_batch = None
    warmups = [n for n in ("lr_warmup_iters", "lr_warmup_samples") if getattr(a, n) is not None]
    if warmups and a.lr_warmup_fraction is not None:
        raise ValueError(f"--lr-warmup-fraction and --{warmups[0].replace('_', '-')} are mutually "
                         "exclusive")
    if not warmups and a.lr_warmup_fraction is None:
        a.lr_warmup_fraction = 0.1  # the paper's recipe (appendix B)
    if a.lr_decay_style == "WSD" and a.lr_wsd_decay_iters is None and a.lr_wsd_decay_samples is None:
        raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters (or -samples)")


@dataclass
class ScheduleConfig:
    """Megatron-LM's LR/WD schedule flags beyond the paper's recipe (lr_schedule.schedule_steps).
    ``*_samples`` are set with --train-samples, ``*_iters`` otherwise; None: the default."""

    lr_warmup_iters: Optional[int] = None
    lr_warmup_samples: Optional[int] = None
    lr_decay_iters: Optional[int] = None
    lr_decay_samples: Optional[int] = None
    train_samples: Optional[int] = None
    lr_warmup_init: float = 0.0
    lr_wsd_decay_style: str = "exponential"
    lr_wsd_decay_iters: Optional[int] = None
    lr_wsd_decay_samples: Optional[int] = None
    start_weight_decay: Optional[float] = None
    end_weight_decay: Optional[float] = None
    weight_decay_incr_style: str = "constant"
    decoupled_lr: Optional[float] = None
    decoupled_min_lr: Optional[float] = None


@dataclass
class RuntimeConfig:
    """Megatron-LM's run-time switches (flags of the same names), read by the trainer."""

    manual_gc: bool = False
    manual_gc_interval: int = 0
    manual_gc_eval: bool = True
    empty_unused_memory_level: int = 0
    exit_duration_in_mins: Optional[int] = None
    distributed_timeout_minutes: Optional[int] = None  # None: runtime.device's default
    num_workers: int = 0
    mmap_bin_files: bool = True
    reset_position_ids: bool = False
    eod_mask_loss: bool = False


def runtime_config(a) -> RuntimeConfig:
    return RuntimeConfig(
        manual_gc=bool(a.manual_gc), manual_gc_interval=a.manual_gc_interval or 0,
        manual_gc_eval=not a.no_manual_gc_eval,
        empty_unused_memory_level=a.empty_unused_memory_level or 0,
        exit_duration_in_mins=a.exit_duration_in_mins,
        distributed_timeout_minutes=a.distributed_timeout_minutes,
        num_workers=a.num_workers or 0, mmap_bin_files=not a.no_mmap_bin_files,
        reset_position_ids=bool(a.reset_position_ids), eod_mask_loss=bool(a.eod_mask_loss),
    )


def classify(flag: str, parser: argparse.ArgumentParser):
    """(class, reason) of a Megatron-LM flag as ``parser`` (pretrain_let.py's) takes it, for
    docs/megatron-compat.md. A flag of our own parser not declared here is honoured; its help text
    is the reason. (The parser is passed in: training.arguments imports this module.)"""
    f = by_name().get(flag)
    if f is not None:
        return f.cls, f.reason
    action = parser._option_string_actions.get(flag)
    if action is not None:
        return HONOURED, NOTES.get(flag) or (action.help or "as in Megatron-LM").replace("%%", "%")
    reason = unsupported_reason(flag)
    if reason is not None:
        return REFUSED, reason
    return None, "not a Megatron-LM flag"


def model_fields(a) -> dict:
    """LlamaConfig fields set by Megatron-LM's architecture flags (only those given)."""
    out = {}
    for name in ("kv_channels", "rotary_percent", "attention_dropout", "hidden_dropout"):
        if getattr(a, name, None) is not None:
            out[name] = getattr(a, name)
    if getattr(a, "apply_layernorm_1p", None):
        out["apply_layernorm_1p"] = True
    return out


class StepHooks:
    """What Megatron-LM's training loop does around each step for --manual-gc, --empty-unused-memory-
    level and --exit-duration-in-mins (its ``train``/``train_step``), for the trainer to call."""

    def __init__(self, runtime: RuntimeConfig, device, start_time: float) -> None:
        self.runtime = runtime
        self.device = device
        self.start_time = start_time  # when the process started training (Megatron-LM: at launch)

    def start(self) -> None:
        if self.runtime.manual_gc:
            gc.disable()  # collections only at step boundaries, on every rank at once
            gc.collect()

    def after_forward_backward(self) -> None:
        if self.runtime.empty_unused_memory_level >= 1:
            self._empty_cache()

    def after_step(self, iteration: int) -> None:
        if self.runtime.empty_unused_memory_level >= 2:
            self._empty_cache()
        n = self.runtime.manual_gc_interval
        if self.runtime.manual_gc and n and iteration % n == 0:
            gc.collect()

    def around_eval(self) -> None:
        """Before and after an evaluation (Megatron-LM collects on both sides)."""
        if self.runtime.manual_gc and self.runtime.manual_gc_eval:
            gc.collect()

    def _empty_cache(self) -> None:
        device_policy.release_cached_memory(self.device)

    def duration_expired(self, now: float) -> bool:
        """--exit-duration-in-mins: the longest-running rank decides (one MAX all-reduce)."""
        minutes = self.runtime.exit_duration_in_mins
        if minutes is None:
            return False

        elapsed = torch.tensor([(now - self.start_time) / 60.0], dtype=torch.float64,
                               device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        return float(elapsed.item()) > minutes


def fused_cross_entropy(impl: str):
    """--cross-entropy-loss-fusion: megatron-core's fused vocab-parallel cross entropy, called as
    ``f(logits, labels)`` like ``vocab_parallel_cross_entropy``. 'native' is torch.compile'd (eager
    on a CPU-only torch: runtime/jit_fusions.py) and returns bf16 logit gradients; 'te' is
    Transformer Engine's (checked at preflight)."""
    # lazy: megatron.core takes seconds to import; arguments.py imports this module (CLI start-up)
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    if impl == "te":
        # lazy: Transformer Engine is optional (and megatron.core slow to import: CLI start-up)
        from megatron.core.extensions.transformer_engine import te_parallel_cross_entropy

        def te_loss(logits, labels):
            labels = torch.as_strided(labels, labels.size(), (labels.size()[1], 1))
            return te_parallel_cross_entropy(logits, labels, group, False)

        return te_loss
    # lazy: megatron.core takes seconds to import; arguments.py imports this module (CLI start-up)
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    return lambda logits, labels: fused_vocab_parallel_cross_entropy(logits, labels, group)


def preflight_warnings(cfg, device_type: str) -> List[str]:
    """Checks of the Megatron-LM flags that need the device (run by the shared preflight)."""
    out = []
    if cfg.perf.cross_entropy_loss_fusion and cfg.perf.cross_entropy_fusion_impl == "te":
        if device_type != "cuda" or not transformer_engine_available():
            raise ValueError("--cross-entropy-fusion-impl te needs Transformer Engine on a GPU; use "
                             "--cross-entropy-fusion-impl native")
    if cfg.perf.cross_entropy_loss_fusion and cfg.perf.cross_entropy_fusion_impl == "native" and not cfg.bf16:
        out.append("--cross-entropy-loss-fusion: megatron-core's fused cross entropy returns bf16 "
                   "logit gradients, so this fp32 run's output-layer gradients are rounded to bf16 "
                   "(pass --bf16, or drop the flag for exact fp32 gradients)")
    if cfg.perf.attention_backend not in ("auto", "local", "unfused") and device_type != "cuda":
        out.append(f"--attention-backend {cfg.perf.attention_backend}: on CPU megatron-core's local "
                   "attention runs instead (the backend applies to Transformer Engine on GPU)")

    w = plain_torchrun_warning(cfg.checkpoint.exit_signal_handler)
    if w:
        out.append(w)
    return out


def render_table(cases, parser: argparse.ArgumentParser) -> List[str]:
    """Markdown rows of docs/megatron-compat.md for ``cases`` (tests/test_megatron_compat.py's
    ``CASES``: objects with flag, cls, megatron), class and reason as ``parser`` has them."""
    lines = ["| flag | class | what it does here / why |", "|---|---|---|"]
    for case in cases:
        cls, reason = classify(case.flag, parser)
        name = f"`{case.flag}`" + ("" if case.megatron else " (megatron_let's own)")
        lines.append(f"| {name} | {cls} | {reason.replace('|', '/')} |")
    return lines


def render_groups(parser: argparse.ArgumentParser) -> List[str]:
    """The rest of Megatron-LM's parser, refused by argument group (one row per group)."""
    have = set(parser._option_string_actions)
    lines = ["| Megatron-LM argument group | flags not taken | reason (unless a flag's own) |",
             "|---|---|---|"]
    for group, names in MEGATRON_LM_FLAGS.items():
        rest = [n for n in names if "--" + n not in have]
        if rest:
            reason = _GROUP_REASONS.get(group, _DEFAULT_REASON)
            lines.append(f"| {group} | {len(rest)} of {len(names)} | {reason} |")
    return lines


def schedule_config(a: argparse.Namespace) -> ScheduleConfig:
    """The run's :class:`ScheduleConfig` from the parsed flags."""
    return ScheduleConfig(
        a.lr_warmup_iters, a.lr_warmup_samples, a.lr_decay_iters, a.lr_decay_samples, a.train_samples,
        a.lr_warmup_init or 0.0, a.lr_wsd_decay_style or "exponential", a.lr_wsd_decay_iters,
        a.lr_wsd_decay_samples, a.start_weight_decay, a.end_weight_decay,
        a.weight_decay_incr_style or "constant", a.decoupled_lr, a.decoupled_min_lr)
