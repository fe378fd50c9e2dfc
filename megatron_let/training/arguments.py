"""Megatron-LM-style command line -> nested configuration dataclasses, validated before any compute."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_let.data.indexed import parse_data_path, validate_indexed_dataset
from megatron_let.model import spec as model_spec
from megatron_let.model.llama import PRESETS, LlamaConfig, PerformanceConfig
from megatron_let.model.spec import ImplConfig
from megatron_let.objectives import registry
from megatron_let.runtime.device import ParallelConfig
from megatron_let.training import megatron_compat
from megatron_let.training.observability_config import (
    ObservabilityConfig,
    add_observability_args,
    observability_config_from_args,
)
from megatron_let.training.wandb_writer import WandbConfig, wandb_config_from_args


@dataclass
class OptimConfig:
    """Paper appendix B defaults: AdamW (0.9, 0.999), wd 0.01, clip 1.0, cosine to 10% with 10% warmup."""

    lr: float = 4e-4
    min_lr: Optional[float] = None  # None = 10% of lr
    lr_warmup_fraction: Optional[float] = 0.1  # None: --lr-warmup-iters/-samples give the warmup
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # resuming: the flags' schedule wins / the checkpoint's wins / neither: they must agree
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    # Megatron-LM's other LR/WD schedule flags
    schedule: megatron_compat.ScheduleConfig = field(default_factory=megatron_compat.ScheduleConfig)

    def resolved_min_lr(self) -> float:
        return 0.1 * self.lr if self.min_lr is None else self.min_lr


@dataclass
class BatchConfig:
    micro_batch_size: int = 4
    global_batch_size: Optional[int] = None  # None = micro_batch_size × data-parallel size
    train_iters: int = 100

    def num_microbatches(self, data_parallel_size: int) -> int:
        gbs = self.global_batch_size or self.micro_batch_size * data_parallel_size
        per_step = self.micro_batch_size * data_parallel_size
        if gbs % per_step:
            raise ValueError(
                f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
                f"{self.micro_batch_size} x data-parallel size {data_parallel_size}"
            )
        return gbs // per_step


@dataclass
class DataArgs:
    data_path: Optional[List[str]] = None
    split: str = "969,30,1"
    mock_data: bool = False
    tokenizer_type: Optional[str] = None
    tokenizer_model: Optional[str] = None
    vocab_size: Optional[int] = None
    data_cache_path: Optional[str] = None
    kd_data_selection: Optional[str] = None


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    exit_signal_handler: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    ckpt_step: Optional[int] = None  # load this iteration instead of the tracker's
    verify: bool = True  # check the manifest's sizes and CRC-32s at load
    override_data_on_resume: bool = False  # resume although data/split/seed differ (logged)
    async_save: bool = False  # shards written by a background process (Megatron-LM's --async-save)


@dataclass
class LoggingConfig:
    log_interval: int = 10
    eval_interval: Optional[int] = None
    eval_iters: int = 10
    tensorboard_dir: Optional[str] = None
    metrics_jsonl: Optional[str] = None
    eval_downstream_interval: Optional[int] = None
    eval_downstream_limit: int = 100
    eval_downstream_tasks: Optional[List[str]] = None
    wandb: Optional[WandbConfig] = None  # set by --wandb-project
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)


@dataclass
class TeacherArgs:
    path: Optional[str] = None
    trust_remote_code: bool = False
    tokenizer_mismatch: bool = False
    bos: bool = True  # prepend the teacher tokenizer's BOS when it adds one (--no-teacher-bos)
    compile: bool = False  # the teacher's blocks under torch.compile (--teacher-compile)
    tp_split: Optional[bool] = None  # --[no-]teacher-tp-split; None: on when TP > 1
    overlap: Optional[bool] = None  # --[no-]teacher-overlap; None: on with CUDA (no-op on CPU)


@dataclass
class RunConfig:
    model: LlamaConfig
    parallel: ParallelConfig
    batch: BatchConfig
    optim: OptimConfig
    data: DataArgs
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    teacher: TeacherArgs
    objective: str = "let"
    objective_config: object = None
    device: str = "auto"
    bf16: bool = False
    seed: int = 1234
    dry_run: bool = False
    exit_interval: Optional[int] = None
    check_for_nan_in_loss_and_grad: bool = True
    raw: Optional[argparse.Namespace] = field(default=None, repr=False)
    perf: PerformanceConfig = field(default_factory=PerformanceConfig)
    impl: ImplConfig = field(default_factory=ImplConfig)  # --transformer-impl, fusions (model/spec.py)
    runtime: megatron_compat.RuntimeConfig = field(default_factory=megatron_compat.RuntimeConfig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_let.py",
        description="Pretrain a LLaMA student with megatron-core, optionally guided by a small "
        "frozen teacher (LET, RKD, SALT).",
        allow_abbrev=False,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model-preset", choices=sorted(PRESETS), default=None,
                   help="named architecture; explicit size flags override its fields")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--num-query-groups", type=int, help="GQA groups (default: no GQA)")
    g.add_argument("--seq-length", type=int, default=256)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--untie-embeddings-and-output-weights", dest="untie", action="store_true",
                   default=True)
    g.add_argument("--tie-embeddings-and-output-weights", dest="untie", action="store_false")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                   help="interleaved 1F1B: layers per model chunk (chunks per stage = layers per "
                   "stage / N)")

    g = p.add_argument_group("memory and speed")
    g.add_argument("--recompute-granularity", choices=("full", "selective"),
                   help="activation recompute: whole layers (full) or core attention (selective)")
    g.add_argument("--recompute-method", choices=("uniform", "block"),
                   help="full recompute: checkpoint groups of N layers (uniform) or the first N "
                   "layers of each stage (block)")
    g.add_argument("--recompute-num-layers", type=int)
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the data-parallel gradient reduction with backward (bucketed)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="overlap the distributed optimizer's parameter all-gather with forward")
    g.add_argument("--ddp-bucket-size", type=int,
                   help="gradient bucket size in elements (default: megatron-core's)")

    model_spec.add_arguments(p)

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int)
    g.add_argument("--train-iters", type=int, help="default 100 (or from --train-samples)")
    g.add_argument("--lr", type=float, default=4e-4)
    g.add_argument("--min-lr", type=float, help="default: 10%% of --lr (paper recipe)")
    g.add_argument("--lr-warmup-fraction", type=float,
                   help="default 0.1 unless --lr-warmup-iters/--lr-warmup-samples is given")
    g.add_argument("--lr-decay-style", default="cosine",
                   choices=("cosine", "linear", "constant", "inverse-square-root", "WSD"))
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="on resume, take the LR/WD schedule from the flags, not the checkpoint")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="on resume, keep the checkpoint's LR/WD schedule whatever the flags say")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--exit-interval", type=int,
                   help="save (with --save) and exit once the iteration is a multiple of N")
    g.add_argument("--dry-run", action="store_true",
                   help="validate flags and print the layout without initialising anything")
    g.add_argument("--check-for-nan-in-loss-and-grad", action="store_true", default=True,
                   help="stop when a loss term or the grad norm is NaN/inf on any rank (default)")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="prefixes of .bin/.idx files, optionally weighted")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--tokenizer-type",  # Megatron-LM's other types: refused with what to use
                   choices=("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer",
                            *megatron_compat.TOKENIZER_INSTEAD))
    g.add_argument("--tokenizer-model", help=".model file or a Hugging Face folder")
    g.add_argument("--vocab-size", type=int, help="vocabulary size for NullTokenizer/mock data")
    g.add_argument("--data-cache-path")
    g.add_argument("--kd-data-selection",
                   help="selection index (.npy from tools/select_data.py) used during the KD phase")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM/SIGUSR1 save a checkpoint at the next step and exit")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--ckpt-step", type=int,
                   help="load iteration N of --load instead of the one its tracker names")
    g.add_argument("--no-verify-checkpoint", dest="verify_checkpoint", action="store_false",
                   help="skip the size/CRC-32 check of every checkpoint file at load")
    g.add_argument("--override-data-on-resume", action="store_true",
                   help="resume although --data-path/--split/--seed/--kd-data-selection differ "
                        "from the checkpoint's (logged)")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in a background process while training goes on "
                        "(the tracker names one only once it is complete)")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--tensorboard-dir")
    g.add_argument("--metrics-jsonl", help="append one JSON line of metrics per iteration here")
    g.add_argument("--eval-downstream-interval", type=int,
                   help="run a limited one-shot lm-eval of the paper's tasks every N iterations")
    g.add_argument("--eval-downstream-limit", type=int, default=100,
                   help="examples per task for the in-training downstream evaluation")
    g.add_argument("--eval-downstream-tasks", default=None,
                   help="comma-separated lm-eval tasks (default: the paper's nine)")
    g.add_argument("--wandb-project", help="log the TensorBoard scalars to this W&B project too")
    g.add_argument("--wandb-exp-name", help="the W&B run's name (required with --wandb-project)")
    g.add_argument("--wandb-save-dir", help="W&B run directory (default: <--save>/wandb)")
    add_observability_args(g)

    g = p.add_argument_group("objective and teacher")
    objectives = registry()
    g.add_argument("--objective", choices=sorted(objectives), default="let")
    g.add_argument("--teacher-path", help="local Hugging Face causal-LM folder")
    g.add_argument("--teacher-trust-remote-code", action="store_true")
    g.add_argument("--no-teacher-bos", action="store_true",
                   help="do not prepend the teacher tokenizer's BOS token to the teacher's input")
    g.add_argument("--teacher-compile", action="store_true",
                   help="run the frozen teacher's transformer blocks under torch.compile")
    g.add_argument("--teacher-tp-split", action=argparse.BooleanOptionalAction, default=None,
                   help="share the step's teacher micro-batches out among the TP ranks and "
                        "exchange the results (default: on when TP > 1)")
    g.add_argument("--teacher-overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="run the step's teacher forwards on a side CUDA stream, overlapped with "
                        "the student (default: on with CUDA; no-op on CPU)")
    g.add_argument("--let-tokenizer-mismatch", action="store_true",
                   help="teacher and student tokenizers differ: align by character offsets (LET†)")
    for cls in objectives.values():
        cls.add_arguments(p)
    megatron_compat.add_arguments(p)  # the rest of Megatron-LM's flags (docs/megatron-compat.md)
    return p


def _model_config(a: argparse.Namespace, vocab_size: int) -> LlamaConfig:
    fields = dict(
        num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads, num_query_groups=a.num_query_groups,
    )
    base = dict(PRESETS[a.model_preset]) if a.model_preset else {}
    base.update({k: v for k, v in fields.items() if v is not None})
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if k not in base]
    if missing:
        raise ValueError(
            "model size not given: pass --model-preset or " +
            ", ".join("--" + m.replace("_", "-") for m in missing)
        )
    return LlamaConfig(
        **base, seq_length=a.seq_length, max_position_embeddings=a.max_position_embeddings,
        vocab_size=vocab_size, untie_embeddings_and_output_weights=a.untie,
        rotary_base=a.rotary_base, norm_epsilon=a.norm_epsilon,
        init_method_std=a.init_method_std, make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
        **megatron_compat.model_fields(a),
    )


def parse_args(argv: Optional[List[str]] = None,
               parser: Optional[argparse.ArgumentParser] = None) -> RunConfig:
    """Parse and validate everything that can be checked without touching data or weights.

    Vocabulary size comes from --vocab-size, else is filled in later from the tokenizer. Tools that
    share the training flags pass ``build_parser()`` extended with their own."""
    parser = parser or build_parser()
    a, extras = parser.parse_known_args(argv)
    megatron_compat.refuse_unknown(extras)  # a Megatron-LM flag we do not take: say why
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return config_from_namespace(a)


def check_finite_floats(a: argparse.Namespace) -> None:
    """Every float flag (the objectives' included) must be finite: argparse's float() takes 'nan'."""
    for name, value in vars(a).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                # the flag as typed (a Megatron-LM flag's dest differs from its name)
                flag = next((act.option_strings[0] for act in build_parser()._actions
                             if act.dest == name and act.option_strings), f"--{name.replace('_', '-')}")
                raise ValueError(f"{flag} {v} is not a finite number")


def config_from_namespace(a: argparse.Namespace) -> RunConfig:
    # lazy: preflight pulls in megatron.core (seconds to import): kept off pretrain_let.py --help
    from megatron_let.training.preflight import check_sizes

    check_sizes(a)  # zero/negative sizes: a clear error before anything divides by them
    check_finite_floats(a)
    megatron_compat.apply(a)  # Megatron-LM's flags: refusals, GQA switch, samples -> iterations
    if a.sequence_parallel and a.tensor_model_parallel_size == 1:
        a.sequence_parallel = False  # as Megatron-LM: SP is meaningless without TP
    model = _model_config(a, vocab_size=a.vocab_size or 0)
    parallel = ParallelConfig(
        tensor_model_parallel_size=a.tensor_model_parallel_size,
        pipeline_model_parallel_size=a.pipeline_model_parallel_size,
        sequence_parallel=a.sequence_parallel,
        use_distributed_optimizer=a.use_distributed_optimizer,
    )
    model.validate(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size)
    perf = PerformanceConfig(
        recompute_granularity=a.recompute_granularity, recompute_method=a.recompute_method,
        recompute_num_layers=a.recompute_num_layers,
        num_layers_per_virtual_pipeline_stage=a.num_layers_per_virtual_pipeline_stage,
        overlap_grad_reduce=a.overlap_grad_reduce, overlap_param_gather=a.overlap_param_gather,
        ddp_bucket_size=a.ddp_bucket_size, attention_backend=a.attention_backend or "auto",
        grad_reduce_in_bf16=bool(a.grad_reduce_in_bf16),
        cross_entropy_loss_fusion=bool(a.cross_entropy_loss_fusion),
        cross_entropy_fusion_impl=a.cross_entropy_fusion_impl or "native",
    )
    perf.validate(model, parallel.pipeline_model_parallel_size, a.use_distributed_optimizer)
    parallel.virtual_pipeline_model_parallel_size = perf.virtual_pipeline_size(
        model.num_layers, parallel.pipeline_model_parallel_size)
    if a.sequence_parallel and a.seq_length % a.tensor_model_parallel_size:
        raise ValueError(
            f"--seq-length {a.seq_length} is not divisible by --tensor-model-parallel-size "
            f"{a.tensor_model_parallel_size} (needed by --sequence-parallel)"
        )
    if a.train_iters < 0:
        raise ValueError("--train-iters must be >= 0 (0 writes the initial checkpoint and exits)")
    for name in ("micro_batch_size", "log_interval", "eval_iters"):
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    if not a.mock_data and not a.data_path and not a.dry_run:
        raise ValueError("no training data: pass --data-path PREFIX [PREFIX ...] or --mock-data")
    if a.mock_data and a.data_path:
        raise ValueError("--mock-data and --data-path are mutually exclusive")
    if a.data_path and not a.tokenizer_type:
        raise ValueError("--data-path needs --tokenizer-type (and --tokenizer-model)")
    if a.tokenizer_type in ("SentencePieceTokenizer", "HuggingFaceTokenizer") and not a.tokenizer_model:
        raise ValueError(f"--tokenizer-type {a.tokenizer_type} needs --tokenizer-model")
    if a.tokenizer_model and not os.path.exists(a.tokenizer_model):
        raise FileNotFoundError(f"--tokenizer-model {a.tokenizer_model} does not exist")
    if (a.mock_data or a.tokenizer_type == "NullTokenizer") and not a.vocab_size:
        raise ValueError("--mock-data / NullTokenizer need --vocab-size")
    if a.eval_downstream_interval is not None and a.eval_downstream_interval <= 0:
        raise ValueError("--eval-downstream-interval must be > 0")
    if a.eval_downstream_limit <= 0:
        raise ValueError("--eval-downstream-limit must be > 0")
    if a.eval_downstream_interval and a.tokenizer_type in (None, "NullTokenizer"):
        raise ValueError("--eval-downstream-interval needs a real tokenizer (--tokenizer-type/--tokenizer-model)")
    if a.override_opt_param_scheduler and a.use_checkpoint_opt_param_scheduler:
        raise ValueError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler "
                         "are mutually exclusive")
    if a.exit_interval is not None and a.exit_interval <= 0:
        raise ValueError("--exit-interval must be > 0")
    if a.eval_downstream_interval and a.num_layers_per_virtual_pipeline_stage:
        raise ValueError("--eval-downstream-interval scores one model stage per rank and does not "
                         "support --num-layers-per-virtual-pipeline-stage; evaluate the saved "
                         "checkpoint with tools/evaluate.py instead")
    if a.save_interval is not None and a.save_interval <= 0:
        raise ValueError("--save-interval must be > 0")
    if a.save_interval and not a.save:
        raise ValueError("--save-interval needs --save DIR")
    if a.exit_signal_handler and not a.save:
        raise ValueError("--exit-signal-handler needs --save DIR")
    if a.data_path:
        for _, prefix in parse_data_path(a.data_path):
            validate_indexed_dataset(prefix)  # missing or corrupt .bin/.idx: clear error now
    try:
        world = int(os.environ.get("WORLD_SIZE", "0"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None
    if world:  # under torchrun/SLURM the data-parallel size is known before anything starts
        parallel_check = ParallelConfig(a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                                        a.sequence_parallel)
        parallel_check.validate(world)
        perf.check_microbatches(
            BatchConfig(a.micro_batch_size, a.global_batch_size, a.train_iters).num_microbatches(
                parallel_check.data_parallel_size(world)),
            a.pipeline_model_parallel_size)
    if a.load and not os.path.isdir(a.load) and (
            not a.save or os.path.normpath(a.load) != os.path.normpath(a.save)):
        raise FileNotFoundError(f"--load {a.load} does not exist")
    if a.ckpt_step is not None and (not a.load or a.ckpt_step < 0):
        raise ValueError("--ckpt-step N needs --load DIR and N >= 0")

    objective_cls = registry()[a.objective]
    objective_config = objective_cls.config_from_args(a)
    return RunConfig(
        model=model, parallel=parallel,
        batch=BatchConfig(a.micro_batch_size, a.global_batch_size, a.train_iters),
        optim=OptimConfig(a.lr, a.min_lr, a.lr_warmup_fraction, a.lr_decay_style, a.weight_decay,
                          a.adam_beta1, a.adam_beta2, a.adam_eps, a.clip_grad,
                          a.override_opt_param_scheduler, a.use_checkpoint_opt_param_scheduler,
                          megatron_compat.schedule_config(a)),
        data=DataArgs(a.data_path, a.split, a.mock_data, a.tokenizer_type, a.tokenizer_model,
                      a.vocab_size, a.data_cache_path, a.kd_data_selection),
        checkpoint=CheckpointConfig(a.save, a.load, a.save_interval, a.exit_signal_handler,
                                    a.no_load_optim, a.no_load_rng, ckpt_step=a.ckpt_step,
                                    verify=a.verify_checkpoint, async_save=a.async_save,
                                    override_data_on_resume=a.override_data_on_resume),
        logging=LoggingConfig(
            a.log_interval, a.eval_interval, a.eval_iters, a.tensorboard_dir, a.metrics_jsonl,
            a.eval_downstream_interval, a.eval_downstream_limit,
            a.eval_downstream_tasks.split(",") if a.eval_downstream_tasks else None,
            wandb=wandb_config_from_args(a.wandb_project, a.wandb_exp_name, a.wandb_save_dir, a.save),
            observability=observability_config_from_args(a)),
        teacher=TeacherArgs(a.teacher_path, a.teacher_trust_remote_code, a.let_tokenizer_mismatch,
                            not a.no_teacher_bos, compile=a.teacher_compile,
                            tp_split=a.teacher_tp_split, overlap=a.teacher_overlap),
        objective=a.objective, objective_config=objective_config, device=a.device, bf16=a.bf16,
        seed=a.seed, dry_run=a.dry_run, exit_interval=a.exit_interval,
        check_for_nan_in_loss_and_grad=a.check_for_nan_in_loss_and_grad, raw=a, perf=perf,
        impl=model_spec.config_from_args(a),
        runtime=megatron_compat.runtime_config(a),
    )

