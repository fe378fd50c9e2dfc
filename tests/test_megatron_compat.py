"""Megatron-LM's flag surface for Llama-family pretraining (issue 21, docs/megatron-compat.md).

``CASES`` is the table: every flag of Megatron-LM's Llama launchers (examples/llama/
train_llama3_8b_h100_fp8.sh, examples/megatron_fsdp/train_llama3_8b_fsdp_h100_fp8.sh, the Llama-3.1/
3.2 model configurations of examples/post_training/modelopt/conf/meta-llama/ and the Llama-3.1 RL model
options), plus the model, training, parallelism, data, checkpointing and logging flags of
Megatron-LM's megatron/training/arguments.py (tag core_v0.16.1) that concern Llama-family GPT
pretraining, each with the class it must have:

* ``honoured``: accepted and does what Megatron-LM does;
* ``ours``: accepted because it states what the student already is; a contradicting value is refused
  (``CONTRADICTIONS``);
* ``refused``: refused before any compute with a message naming the flag and what to do instead.

docs/megatron-compat.md is generated from this table (tools/megatron_compat_table.py;
test_megatron_compat_doc_is_current keeps it current). Every case goes through ``pretrain_let.main``
with ``--dry-run`` in-process (the code path of ``pretrain_let.py --dry-run``) at the launchers' world
size of 8.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

WORLD_SIZE = 8  # the launchers' GPUS_PER_NODE x NUM_NODES


@dataclass(frozen=True)
class Case:
    flag: str
    cls: str  # honoured | ours | refused
    argv: Tuple[str, ...] = ()  # the flag as a launcher writes it (default: the flag alone)
    context: Tuple[str, ...] = ()  # other flags it needs to be valid (not the flag under test)
    megatron: bool = True  # False: megatron_let's own flag of the same family

    @property
    def args(self) -> Tuple[str, ...]:
        return self.argv or (self.flag,)


def C(flag, cls, *argv, context=(), megatron=True):
    return Case(flag, cls, tuple(argv), tuple(context), megatron)


H, O, R = "honoured", "ours", "refused"
SAMPLES = ("--train-samples", "1600")
BF16 = ("--bf16",)

CASES = [
    # ---------------- model (examples/llama MODEL_ARGS, modelopt Llama-3.x MODEL_ARGS)
    C("--use-mcore-models", O),
    C("--num-layers", H, "--num-layers", "4"),
    C("--hidden-size", H, "--hidden-size", "64"),
    C("--ffn-hidden-size", H, "--ffn-hidden-size", "176"),
    C("--num-attention-heads", H, "--num-attention-heads", "4"),
    C("--group-query-attention", H),
    C("--num-query-groups", H, "--num-query-groups", "2"),
    C("--kv-channels", H, "--kv-channels", "16"),
    C("--seq-length", H, "--seq-length", "64"),
    C("--max-position-embeddings", H, "--max-position-embeddings", "64"),
    C("--position-embedding-type", O, "--position-embedding-type", "rope"),
    C("--use-rotary-position-embeddings", O),
    C("--no-position-embedding", O),
    C("--rotary-base", H, "--rotary-base", "500000"),
    C("--rotary-percent", H, "--rotary-percent", "1.0"),
    C("--use-rope-scaling", R),
    C("--rope-scaling-factor", R, "--rope-scaling-factor", "8.0"),
    C("--rotary-seq-len-interpolation-factor", R, "--rotary-seq-len-interpolation-factor", "2"),
    C("--rotary-interleaved", R),
    C("--attention-dropout", H, "--attention-dropout", "0.0"),
    C("--hidden-dropout", H, "--hidden-dropout", "0.0"),
    C("--swiglu", O),
    C("--normalization", O, "--normalization", "RMSNorm"),
    C("--norm-epsilon", H, "--norm-epsilon", "1e-5"),
    C("--init-method-std", H, "--init-method-std", "0.0134"),
    C("--attention-backend", H, "--attention-backend", "fused"),
    C("--apply-layernorm-1p", H),
    C("--untie-embeddings-and-output-weights", H),
    C("--disable-bias-linear", O),
    C("--add-qkv-bias", R),
    C("--qk-layernorm", R),
    C("--make-vocab-size-divisible-by", H, "--make-vocab-size-divisible-by", "128"),
    C("--openai-gelu", R),
    C("--squared-relu", R),
    C("--quick-geglu", R),
    C("--apply-residual-connection-post-layernorm", R),
    C("--fp32-residual-connection", R),
    C("--embedding-init-method-std", R, "--embedding-init-method-std", "0.02"),
    C("--init-model-with-meta-device", R),
    C("--multi-latent-attention", R),
    C("--num-experts", R, "--num-experts", "8"),
    C("--moe-router-topk", R, "--moe-router-topk", "2"),
    C("--use-cpu-initialization", R),
    C("--transformer-impl", H, "--transformer-impl", "local"),
    C("--no-rope-fusion", H),
    C("--no-bias-swiglu-fusion", H),
    C("--no-masked-softmax-fusion", H),
    C("--no-gradient-accumulation-fusion", H),
    C("--no-bias-dropout-fusion", H),
    C("--attention-softmax-in-fp32", O),
    # ---------------- training (TRAINING_ARGS)
    C("--micro-batch-size", H, "--micro-batch-size", "1"),
    C("--global-batch-size", H, "--global-batch-size", "16"),
    C("--train-iters", H, "--train-iters", "20"),
    C("--train-samples", H, "--train-samples", "1600"),
    C("--lr-decay-samples", H, "--lr-decay-samples", "1500", context=SAMPLES),
    C("--lr-warmup-samples", H, "--lr-warmup-samples", "100", context=SAMPLES),
    C("--lr-wsd-decay-samples", H, "--lr-wsd-decay-samples", "400",
      context=SAMPLES + ("--lr-decay-style", "WSD")),
    C("--lr-decay-iters", H, "--lr-decay-iters", "15"),
    C("--lr-warmup-iters", H, "--lr-warmup-iters", "2"),
    C("--lr-wsd-decay-iters", H, "--lr-wsd-decay-iters", "4", context=("--lr-decay-style", "WSD")),
    C("--lr-wsd-decay-style", H, "--lr-wsd-decay-style", "linear",
      context=("--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "4")),
    C("--lr-warmup-fraction", H, "--lr-warmup-fraction", "0.01"),
    C("--lr-warmup-init", H, "--lr-warmup-init", "1e-6"),
    C("--lr", H, "--lr", "0.00015"),
    C("--min-lr", H, "--min-lr", "0.00001"),
    C("--decoupled-lr", H, "--decoupled-lr", "5.0e-4"),
    C("--decoupled-min-lr", H, "--decoupled-min-lr", "4.5e-5"),
    C("--lr-decay-style", H, "--lr-decay-style", "cosine"),
    C("--clip-grad", H, "--clip-grad", "1.0"),
    C("--weight-decay", H, "--weight-decay", "0.1"),
    C("--start-weight-decay", H, "--start-weight-decay", "0.01",
      context=("--end-weight-decay", "0.1", "--weight-decay-incr-style", "linear")),
    C("--end-weight-decay", H, "--end-weight-decay", "0.1",
      context=("--start-weight-decay", "0.01", "--weight-decay-incr-style", "linear")),
    C("--weight-decay-incr-style", H, "--weight-decay-incr-style", "cosine",
      context=("--start-weight-decay", "0.01", "--end-weight-decay", "0.1")),
    C("--adam-beta1", H, "--adam-beta1", "0.9"),
    C("--adam-beta2", H, "--adam-beta2", "0.95"),
    C("--adam-eps", H, "--adam-eps", "1e-8"),
    C("--optimizer", O, "--optimizer", "adam"),
    C("--bf16", H),
    C("--fp16", R),
    C("--grad-reduce-in-bf16", H, context=BF16),
    C("--accumulate-allreduce-grads-in-fp32", O),
    C("--cross-entropy-loss-fusion", H),
    C("--cross-entropy-fusion-impl", H, "--cross-entropy-fusion-impl", "native",
      context=("--cross-entropy-loss-fusion",)),
    C("--calculate-per-token-loss", O),
    C("--manual-gc", H),
    C("--manual-gc-interval", H, "--manual-gc-interval", "100", context=("--manual-gc",)),
    C("--no-manual-gc-eval", H, context=("--manual-gc",)),
    C("--empty-unused-memory-level", H, "--empty-unused-memory-level", "1"),
    C("--exit-duration-in-mins", H, "--exit-duration-in-mins", "235"),
    C("--exit-interval", H, "--exit-interval", "10"),
    C("--exit-signal-handler", H, context=("--save", "{tmp}/ckpt")),
    C("--no-check-for-nan-in-loss-and-grad", H),
    C("--seed", H, "--seed", "1234"),
    C("--override-opt_param-scheduler", H),
    C("--override-opt-param-scheduler", H),
    C("--use-checkpoint-opt_param-scheduler", H),
    C("--use-checkpoint-opt-param-scheduler", H),
    C("--recompute-granularity", H, "--recompute-granularity", "selective"),
    C("--recompute-method", H, "--recompute-method", "uniform",
      context=("--recompute-granularity", "full", "--recompute-num-layers", "1")),
    C("--recompute-num-layers", H, "--recompute-num-layers", "1",
      context=("--recompute-granularity", "full", "--recompute-method", "block")),
    C("--rampup-batch-size", R, "--rampup-batch-size", "16", "16", "1000"),
    C("--skip-train", R),
    C("--dataloader-type", O, "--dataloader-type", "single"),
    C("--fp8-format", R, "--fp8-format", "hybrid"),
    C("--fp8-amax-history-len", R, "--fp8-amax-history-len", "1024"),
    C("--fp8-amax-compute-algo", R, "--fp8-amax-compute-algo", "max"),
    C("--fp8-param-gather", R),
    C("--fp8-recipe", R, "--fp8-recipe", "delayed"),
    # ---------------- parallelism (MODEL_PARALLEL_ARGS, DDP_ARGS)
    C("--tensor-model-parallel-size", H, "--tensor-model-parallel-size", "1"),
    C("--pipeline-model-parallel-size", H, "--pipeline-model-parallel-size", "1"),
    C("--context-parallel-size", H, "--context-parallel-size", "1"),
    C("--sequence-parallel", H),
    C("--use-distributed-optimizer", H),
    C("--overlap-grad-reduce", H),
    C("--overlap-param-gather", H, context=("--use-distributed-optimizer",)),
    C("--ddp-bucket-size", H, "--ddp-bucket-size", "40000000"),
    C("--num-layers-per-virtual-pipeline-stage", H, "--num-layers-per-virtual-pipeline-stage", "1",
      context=("--pipeline-model-parallel-size", "2")),
    C("--distributed-timeout-minutes", H, "--distributed-timeout-minutes", "60"),
    C("--distributed-backend", O, "--distributed-backend", "nccl"),
    C("--expert-model-parallel-size", O, "--expert-model-parallel-size", "1"),
    C("--use-torch-fsdp2", R),
    C("--use-megatron-fsdp", R),
    C("--data-parallel-sharding-strategy", R, "--data-parallel-sharding-strategy",
      "optim_grads_params"),
    C("--tp-comm-overlap", R),
    C("--decoder-first-pipeline-num-layers", R, "--decoder-first-pipeline-num-layers", "2"),
    C("--num-virtual-stages-per-pipeline-rank", R, "--num-virtual-stages-per-pipeline-rank", "2"),
    C("--use-nccl-ub", R),
    C("--fsdp-double-buffer", R),
    C("--fsdp-manual-registration", R),
    # ---------------- data and tokenizer (DATA_ARGS_LIST)
    C("--mock-data", H),
    C("--data-path", H, "--data-path", "{data}", context=("--tokenizer-type", "NullTokenizer")),
    C("--split", H, "--split", "'99,1,0'"),
    C("--tokenizer-type", H, "--tokenizer-type", "NullTokenizer"),
    C("--tokenizer-model", H, "--tokenizer-model", "{tokenizer}",
      context=("--tokenizer-type", "HuggingFaceTokenizer")),
    C("--vocab-size", H, "--vocab-size", "128"),
    C("--data-cache-path", H, "--data-cache-path", "{tmp}/cache"),
    C("--tiktoken-pattern", H, "--tiktoken-pattern", "v2"),
    C("--no-create-attention-mask-in-dataloader", O),
    C("--no-mmap-bin-files", H),
    C("--num-workers", H, "--num-workers", "1"),
    C("--reset-position-ids", H),
    C("--eod-mask-loss", H),
    C("--reset-attention-mask", R),
    C("--train-data-path", R, "--train-data-path", "{tmp}/train"),
    C("--vocab-file", R, "--vocab-file", "{tmp}/vocab.json"),
    C("--merge-file", R, "--merge-file", "{tmp}/merges.txt"),
    C("--fim-data", R),
    # ---------------- checkpointing
    C("--save", H, "--save", "{tmp}/ckpt"),
    C("--load", H, "--load", "{tmp}/ckpt", context=("--save", "{tmp}/ckpt")),
    C("--save-interval", H, "--save-interval", "1000", context=("--save", "{tmp}/ckpt")),
    C("--ckpt-format", O, "--ckpt-format", "torch_dist"),
    C("--ckpt-step", H, "--ckpt-step", "5", context=("--save", "{tmp}/ckpt", "--load", "{tmp}/ckpt")),
    C("--no-load-optim", H),
    C("--no-load-rng", H),
    C("--no-save-optim", R),
    C("--no-save-rng", R),
    C("--finetune", R),
    C("--pretrained-checkpoint", R, "--pretrained-checkpoint", "{tmp}/ckpt"),
    C("--non-persistent-save-interval", R, "--non-persistent-save-interval", "100"),
    C("--use-dist-ckpt", O),
    C("--auto-detect-ckpt-format", O),
    C("--use-checkpoint-args", R),
    C("--exit-on-missing-checkpoint", R),
    C("--async-save", H, context=("--save", "{tmp}/ckpt")),
    C("--override-data-on-resume", H, megatron=False),
    # ---------------- logging and profiling (EVAL_AND_LOGGING_ARGS)
    C("--log-interval", H, "--log-interval", "1"),
    C("--eval-iters", H, "--eval-iters", "32"),
    C("--eval-interval", H, "--eval-interval", "100"),
    C("--tensorboard-dir", H, "--tensorboard-dir", "{tmp}/tb"),
    C("--wandb-project", H, "--wandb-project", "p",
      context=("--wandb-exp-name", "e", "--wandb-save-dir", "{tmp}/wandb")),
    C("--wandb-exp-name", H, "--wandb-exp-name", "e",
      context=("--wandb-project", "p", "--wandb-save-dir", "{tmp}/wandb")),
    C("--wandb-save-dir", H, "--wandb-save-dir", "{tmp}/wandb",
      context=("--wandb-project", "p", "--wandb-exp-name", "e")),
    C("--log-validation-ppl-to-tensorboard", O),
    C("--log-throughput", H),
    C("--peak-tflops", H, "--peak-tflops", "989", context=("--log-throughput",), megatron=False),
    C("--profile", H, context=("--tensorboard-dir", "{tmp}/tb")),
    C("--profile-step-start", H, "--profile-step-start", "4",
      context=("--profile", "--tensorboard-dir", "{tmp}/tb")),
    C("--profile-step-end", H, "--profile-step-end", "16",
      context=("--profile", "--tensorboard-dir", "{tmp}/tb")),
    C("--profile-ranks", H, "--profile-ranks", "0",
      context=("--profile", "--tensorboard-dir", "{tmp}/tb")),
    C("--log-params-norm", H),
    C("--log-num-zeros-in-grad", H),
    C("--log-timers-to-tensorboard", H, context=("--tensorboard-dir", "{tmp}/tb")),
    C("--log-memory-to-tensorboard", H, context=("--tensorboard-dir", "{tmp}/tb")),
    C("--one-logger-project", R, "--one-logger-project", "x"),
    C("--log-straggler", R),
    C("--inprocess-restart", R),
    C("--enable-ft-package", R),
    C("--adlr-autoresume", R),
]

# Values that contradict what the student is: refused, naming the flag.
CONTRADICTIONS = [
    ("--normalization", "LayerNorm"),
    ("--position-embedding-type", "learned_absolute"),
    ("--ckpt-format", "torch"),
    ("--ckpt-format", "fsdp_dtensor"),
    ("--optimizer", "sgd"),
    ("--expert-model-parallel-size", "2"),
    ("--dataloader-type", "cyclic"),
    ("--context-parallel-size", "2"),
    ("--tokenizer-type", "Llama2Tokenizer"),
]

BASE = ["--model-preset", "tiny", "--objective", "baseline", "--mock-data", "--vocab-size", "128",
        "--micro-batch-size", "1", "--global-batch-size", "16", "--seq-length", "64",
        "--device", "cpu", "--dry-run"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths a case may need: a scratch folder, a tiny tokenizer folder, a tiny indexed dataset."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from tiny_teachers import save_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("megatron_compat")
    tok = tmp / "tokenizer"
    save_tiny_tokenizer(str(tok), vocab_size=100, adds_bos=True)
    prefix = str(tmp / "data")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    rng = np.random.default_rng(0)
    for _ in range(200):
        builder.add_document(rng.integers(0, 100, size=80, dtype=np.int32), [80])
    builder.finalize(prefix + ".idx")
    return {"tmp": str(tmp), "tokenizer": str(tok), "data": prefix}


def _fill(args, files):
    return [a.format(**files) for a in args]


def _argv(case: Case, files) -> list:
    base = list(BASE)
    args = _fill(case.args, files) + _fill(case.context, files)
    if "--data-path" in args or "--tokenizer-model" in args:
        base = [a for a in base if a != "--mock-data"]
        if "--tokenizer-model" in args:
            i = base.index("--vocab-size")
            del base[i:i + 2]
    return base + args


def dry_run(argv, monkeypatch) -> Tuple[int, str]:
    """``pretrain_let.py --dry-run`` in-process at the launchers' world size: (exit code, stderr)."""
    import pretrain_let

    monkeypatch.setenv("WORLD_SIZE", str(WORLD_SIZE))
    for name in ("RANK", "TORCHELASTIC_RUN_ID", "MEGATRON_LET_AGENT_PID"):
        monkeypatch.delenv(name, raising=False)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = pretrain_let.main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    return rc, err.getvalue() + out.getvalue()[-2000:]


@pytest.mark.parametrize("case", CASES, ids=[c.flag for c in CASES])
def test_flag_class(case, files, monkeypatch):
    """Each flag, as a Megatron-LM launcher writes it, has its class under --dry-run at world 8."""
    from megatron_let.training.arguments import build_parser
    from megatron_let.training.megatron_compat import classify

    rc, err = dry_run(_argv(case, files), monkeypatch)
    assert "unrecognized arguments" not in err and "invalid choice" not in err, err
    if case.cls == R:
        assert rc == 2, f"{case.flag} was accepted, expected a refusal\n{err}"
        assert case.flag in err and "error:" in err, err
    else:
        assert rc == 0, f"{case.flag} was refused:\n{err}"
    if case.megatron:
        assert classify(case.flag, build_parser())[0] == case.cls


@pytest.mark.parametrize("flag,value", CONTRADICTIONS, ids=[" ".join(c) for c in CONTRADICTIONS])
def test_contradicting_value_refused(flag, value, files, monkeypatch):
    rc, err = dry_run(BASE + [flag, value], monkeypatch)
    assert rc == 2 and f"{flag} {value}" in err, err
    assert "invalid choice" not in err and "unrecognized" not in err, err


def test_every_megatron_lm_flag_is_taken_or_refused_with_a_reason(monkeypatch):
    """No flag of Megatron-LM's parser (core_v0.16.1) meets argparse's bare 'unrecognized
    arguments': it parses, or it is refused naming the flag and a reason."""
    from megatron_let.training.arguments import build_parser
    from megatron_let.training.megatron_compat import refuse_unknown
    from megatron_let.training.megatron_lm_flags import MEGATRON_LM_FLAGS

    parser = build_parser()
    names = ["--" + n for names in MEGATRON_LM_FLAGS.values() for n in names]
    assert len(names) > 600
    for name in names:
        if name in parser._option_string_actions:
            continue
        with pytest.raises(ValueError, match=f"^{name} \\(a Megatron-LM flag\\) is not supported"):
            refuse_unknown([name, "1"])
    # an unknown non-Megatron flag still gets argparse's message
    rc, err = dry_run(BASE + ["--no-such-flag"], monkeypatch)
    assert rc == 2 and "unrecognized arguments: --no-such-flag" in err


def test_unknown_megatron_flag_refused_through_main(monkeypatch):
    rc, err = dry_run(BASE + ["--moe-aux-loss-coeff", "0.01"], monkeypatch)
    assert rc == 2 and "--moe-aux-loss-coeff (a Megatron-LM flag)" in err and "dense" in err, err


# ----------------------------------------------------------------------------------------------
# One whole Megatron-LM launcher: examples/llama/train_llama3_8b_h100_fp8.sh (core_v0.16.1), MOCK
# data, its arrays as bash expands them (unquoted ${ARR[@]}: "--split '99,1,0'" keeps its quotes).
# DTYPE="bf16" (the script's own switch) leaves DTYPE_ARGS empty; the fp8 flags are refused (table).
# ----------------------------------------------------------------------------------------------

LLAMA3_8B_LAUNCHER = """
--use-mcore-models --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336
--num-attention-heads 32 --group-query-attention --num-query-groups 8 --kv-channels 128
--seq-length 8192 --max-position-embeddings 8192 --position-embedding-type rope
--rotary-base 1000000 --rotary-percent 1.0 --attention-dropout 0.0 --hidden-dropout 0.0 --swiglu
--normalization RMSNorm --init-method-std 0.0134 --attention-backend fused --apply-layernorm-1p
--untie-embeddings-and-output-weights --disable-bias-linear
--micro-batch-size 1 --global-batch-size 128 --train-samples 1953125000
--lr-decay-samples 1949218748 --lr-warmup-samples 3906252 --lr 0.00015 --min-lr 0.00001
--decoupled-lr 5.0e-4 --decoupled-min-lr 4.5e-5 --lr-decay-style cosine --clip-grad 1.0
--weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --bf16 --grad-reduce-in-bf16
--cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc --empty-unused-memory-level 1
--exit-duration-in-mins 235 --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
--tensor-model-parallel-size 1 --context-parallel-size 1 --sequence-parallel
--mock-data --tokenizer-type NullTokenizer --vocab-size 128256 --data-cache-path {tmp}/cache
--tiktoken-pattern v2 --split '99,1,0' --no-create-attention-mask-in-dataloader --no-mmap-bin-files
--num-workers 1
--log-interval 1 --eval-iters 32 --eval-interval 100 --save-interval 1000 --log-throughput --profile
--profile-step-start 4 --profile-step-end 6 --ckpt-format torch_dist --distributed-timeout-minutes 60
--save {tmp}/checkpoints/llama3_8b_fp8 --load {tmp}/checkpoints/llama3_8b_fp8
--tensorboard-dir {tmp}/tensorboard_logs/llama3_8b_fp8
"""


def test_llama3_launcher_passes_dry_run_unchanged(files, monkeypatch):
    """The whole argument list, with pretrain_gpt.py replaced by pretrain_let.py, at world size 8;
    ``--objective baseline`` added (a Megatron-LM launcher trains without a teacher)."""
    argv = _fill(LLAMA3_8B_LAUNCHER.split(), files)
    rc, out = dry_run(argv + ["--objective", "baseline", "--dry-run"], monkeypatch)
    assert rc == 0, out
    assert "dry run OK" in out
    # the launcher's values are what the run uses
    from megatron_let.training.arguments import parse_args

    monkeypatch.setenv("WORLD_SIZE", str(WORLD_SIZE))
    cfg = parse_args(argv + ["--objective", "baseline", "--dry-run"])
    assert cfg.batch.train_iters == 1953125000 // 128
    assert cfg.model.kv_channels == 128 and cfg.model.apply_layernorm_1p
    assert cfg.perf.attention_backend == "fused" and cfg.perf.grad_reduce_in_bf16
    assert cfg.runtime.manual_gc and cfg.runtime.num_workers == 1 and not cfg.runtime.mmap_bin_files
    assert cfg.runtime.distributed_timeout_minutes == 60 and cfg.runtime.exit_duration_in_mins == 235


def test_llama3_launcher_fp8_arguments_are_refused(files, monkeypatch):
    """With the script's default DTYPE="fp8" its DTYPE_ARGS are refused, naming FP8 and --bf16."""
    argv = _fill(LLAMA3_8B_LAUNCHER.split(), files) + ["--fp8-format", "hybrid"]
    rc, err = dry_run(argv + ["--objective", "baseline"], monkeypatch)
    assert rc == 2 and "--fp8-format" in err and "--bf16" in err, err



# ----------------------------------------------------------------------------------------------
# Honoured flags change what runs
# ----------------------------------------------------------------------------------------------

TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "16",
        "--max-position-embeddings", "16", "--device", "cpu", "--objective", "baseline",
        "--mock-data", "--vocab-size", "96", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--log-interval", "1", "--lr", "1e-3", "--min-lr", "1e-4", "--seed", "7"]


import torch  # noqa: E402
from test_model import reference_llama  # noqa: E402


def test_kv_channels_rotary_percent_layernorm_1p_match_reference(megatron_single_process):
    """--kv-channels 32 (not hidden/heads = 16) widens Q/K/V; --rotary-percent 0.5 rotates half of
    each head; --apply-layernorm-1p scales by 1 + w: the student equals a plain-PyTorch forward."""
    from megatron_let.model.llama import build_student
    from megatron_let.training.arguments import parse_args

    cfg = parse_args(TINY + ["--kv-channels", "32", "--rotary-percent", "0.5",
                             "--apply-layernorm-1p", "--dry-run"])
    m = cfg.model
    assert (m.kv_channels, m.rotary_percent, m.apply_layernorm_1p) == (32, 0.5, True)
    m.vocab_size = 96
    torch.manual_seed(0)
    model = build_student(m, cfg.parallel, use_cpu=True).eval()
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    assert qkv.shape == ((4 + 2 * 2) * 32, 64)  # (heads + 2 groups) x kv-channels rows
    assert model.decoder.layers[0].self_attention.linear_proj.weight.shape == (64, 4 * 32)
    assert float(model.decoder.layers[0].input_layernorm.weight.abs().sum()) == 0.0  # 1p: init 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    ids = torch.randint(0, 96, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        out = model(ids, pos, None)
        ref = reference_llama(sd, m, ids)  # tests/test_model.py's plain-PyTorch LLaMA
    torch.testing.assert_close(out[..., :96], ref[..., :96], rtol=1e-4, atol=1e-4)


def test_dropout_flags_reach_the_transformer_config(megatron_single_process):
    from megatron_let.model.llama import build_student, build_transformer_config
    from megatron_let.training.arguments import parse_args

    cfg = parse_args(TINY + ["--attention-dropout", "0.25", "--hidden-dropout", "0.5", "--dry-run"])
    tc = build_transformer_config(cfg.model, cfg.parallel, bf16=False, use_cpu=True)
    assert (tc.attention_dropout, tc.hidden_dropout) == (0.25, 0.5)
    cfg.model.vocab_size = 96
    model = build_student(cfg.model, cfg.parallel, use_cpu=True)
    ids = torch.randint(0, 96, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        model.train()
        a, b = model(ids, pos, None), model(ids, pos, None)
        model.eval()
        c, d = model(ids, pos, None), model(ids, pos, None)
    assert not torch.equal(a, b)  # dropout active in training
    assert torch.equal(c, d)


def test_attention_backend_reaches_megatron_core(megatron_single_process, monkeypatch):
    """--attention-backend is megatron-core's AttnBackend: the model sets TE's NVTE_* switches."""
    from megatron.core.transformer.enums import AttnBackend

    from megatron_let.model.llama import build_student
    from megatron_let.training.arguments import parse_args

    for name in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        monkeypatch.delenv(name, raising=False)
    cfg = parse_args(TINY + ["--attention-backend", "fused", "--dry-run"])
    assert cfg.perf.attention_backend == "fused"
    cfg.model.vocab_size = 96
    model = build_student(cfg.model, cfg.parallel, use_cpu=True, perf=cfg.perf)
    assert model.config.attention_backend == AttnBackend.fused
    assert os.environ.get("NVTE_FUSED_ATTN") == "1" and os.environ.get("NVTE_FLASH_ATTN") == "0"


def test_grad_reduce_in_bf16_makes_the_gradient_buffer_bf16():
    from megatron_let.model.llama import build_ddp_config
    from megatron_let.training.arguments import parse_args

    on = parse_args(TINY + ["--bf16", "--grad-reduce-in-bf16", "--dry-run"])
    off = parse_args(TINY + ["--bf16", "--dry-run"])
    assert build_ddp_config(on.perf, False).grad_reduce_in_fp32 is False
    assert build_ddp_config(off.perf, False).grad_reduce_in_fp32 is True
    with pytest.raises(ValueError, match="--grad-reduce-in-bf16 needs --bf16"):
        parse_args(TINY + ["--grad-reduce-in-bf16", "--dry-run"])


def test_fused_cross_entropy_on_cpu(megatron_single_process):
    """megatron-core's fused cross entropy (torch.compile'd) on CPU: the loss equals PyTorch's; its
    logit gradient is PyTorch's rounded to bf16 (megatron-core casts it), hence the fp32 warning."""
    from megatron_let.training.megatron_compat import fused_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 40, requires_grad=True)
    labels = torch.randint(0, 40, (3, 5))
    loss = fused_cross_entropy("native")(logits.clone(), labels)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1),
                                            reduction="none").reshape(3, 5)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(loss.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, g_ref.to(torch.bfloat16).float(), rtol=0, atol=1e-6)


def train_in_process(argv, setup_hook=None):
    """A tiny run inside the test process; returns (trainer, metrics by iteration)."""
    from launch import read_metrics

    from megatron_let.training.arguments import parse_args
    from megatron_let.training.trainer import Trainer

    trainer = Trainer(parse_args(argv))
    try:
        trainer.setup()
        if setup_hook:
            setup_hook(trainer)
        trainer.train()
    finally:
        trainer.close()
    path = trainer.cfg.logging.metrics_jsonl
    return trainer, (read_metrics(path) if path else {})


def _lrs(metrics):
    return [metrics[i]["lr"] for i in sorted(metrics)]


def test_sample_schedule_equals_iteration_schedule(tmp_path):
    """--train-samples/--lr-warmup-samples/--lr-decay-samples that are whole global batches give
    the LR per step of --train-iters/--lr-warmup-iters/--lr-decay-iters (global batch 4)."""
    it = ["--train-iters", "12", "--lr-warmup-iters", "3", "--lr-decay-iters", "10"]
    sm = ["--train-samples", "48", "--lr-warmup-samples", "12", "--lr-decay-samples", "40"]
    _, a = train_in_process(TINY + it + ["--metrics-jsonl", str(tmp_path / "it.jsonl")])
    t, b = train_in_process(TINY + sm + ["--metrics-jsonl", str(tmp_path / "sm.jsonl")])
    assert t.cfg.batch.train_iters == 12 and len(b) == 12
    assert _lrs(a) == _lrs(b)
    # and they are Megatron-LM's: warmup from 0 over 3 steps, cosine to min-lr at step 10
    assert _lrs(a)[0] == 0.0 and _lrs(a)[3] == pytest.approx(1e-3) and _lrs(a)[-1] == pytest.approx(1e-4)


class _Opt:
    def __init__(self):
        self.param_groups = [{"lr": 0.0}]


@pytest.mark.parametrize("warmup,decay,train", [(3906252, 1949218748, 1953125000), (10, 1000, 1280),
                                                (0, 700, 1280)])
def test_sample_schedule_is_megatron_lms(warmup, decay, train):
    """Against megatron-core's OptimizerParamScheduler counted in samples and stepped by the global
    batch (Megatron-LM's get_optimizer_param_scheduler), sample counts that are not whole batches
    included (the Llama-3 launcher's): the same LR at every step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_let.training.arguments import parse_args
    from megatron_let.training.lr_schedule import build_scheduler

    gbs = 128
    argv = ["--model-preset", "tiny", "--objective", "baseline", "--mock-data", "--vocab-size", "96",
            "--micro-batch-size", "1", "--global-batch-size", str(gbs), "--dry-run",
            "--lr", "1.5e-4", "--min-lr", "1e-5", "--lr-warmup-init", "1e-7",
            "--train-samples", str(train), "--lr-warmup-samples", str(warmup),
            "--lr-decay-samples", str(decay)]
    cfg = parse_args(argv)
    ours = build_scheduler(_Opt(), cfg.optim, cfg.batch.train_iters, gbs)
    ref = OptimizerParamScheduler(
        _Opt(), init_lr=1e-7, max_lr=1.5e-4, min_lr=1e-5, lr_warmup_steps=warmup,
        lr_decay_steps=decay, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
        wd_incr_steps=train, wd_incr_style="constant")
    iters = cfg.batch.train_iters
    checks = sorted(set(list(range(0, 50)) + [iters // 3, iters // 2, iters - 1, iters]))
    done = 0
    for i in checks:
        ours.step(i - done)
        ref.step((i - done) * gbs)
        done = i
        assert ours.optimizer.param_groups[0]["lr"] == pytest.approx(
            ref.optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-18), i


def test_schedule_flag_errors():
    from megatron_let.training.arguments import parse_args

    base = ["--model-preset", "tiny", "--objective", "baseline", "--mock-data", "--vocab-size", "96",
            "--dry-run"]
    for extra, msg in [
        (["--train-samples", "100", "--train-iters", "5"], "mutually exclusive"),
        (["--lr-warmup-samples", "10"], "needs --train-samples"),
        (["--train-samples", "100", "--lr-warmup-iters", "2"], "use --lr-warmup-samples"),
        (["--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"], "mutually exclusive"),
        (["--group-query-attention", "--num-layers", "2", "--hidden-size", "64",
          "--num-attention-heads", "4", "--model-preset", "llama-1b"], "needs --num-query-groups"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_args(base + extra)


def test_manual_gc_exit_duration_and_runtime_flags(tmp_path, monkeypatch):
    """--manual-gc disables Python's collector and collects every --manual-gc-interval steps;
    --exit-duration-in-mins saves and stops once the run is older than that; --num-workers reaches
    the DataLoader; --distributed-timeout-minutes the process group; --decoupled-lr the embedding
    and output layer's parameter group."""
    import gc

    import megatron_let.runtime.device as device

    calls, timeouts = [], []
    real_collect, real_init = gc.collect, device.initialize_distributed
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(gc.isenabled()) or real_collect(*a))

    def init(*a, **k):
        timeouts.append(k.get("timeout_minutes"))
        return real_init(*a, **k)

    monkeypatch.setattr(device, "initialize_distributed", init)

    def older(trainer):  # the run started two minutes ago
        trainer._start_time -= 120
        assert trainer._iterator(False)._num_workers == 1

    save = str(tmp_path / "ckpt")
    try:
        trainer, metrics = train_in_process(
            TINY + ["--train-iters", "6", "--manual-gc", "--manual-gc-interval", "2",
                    "--exit-duration-in-mins", "1", "--save", save, "--num-workers", "1",
                    "--distributed-timeout-minutes", "7", "--decoupled-lr", "5e-3",
                    "--metrics-jsonl", str(tmp_path / "m.jsonl")], setup_hook=older)
    finally:
        gc.enable()
    assert timeouts == [7]
    assert trainer.iteration == 1 and sorted(metrics) == [1]  # stopped after the first step
    assert os.path.isdir(os.path.join(save, "iter_0000001"))
    assert not any(calls)  # every collection ran with the automatic collector disabled
    assert len(calls) == 1  # the start; the next one is due at iteration 2
    assert {g["max_lr"] for g in trainer.optimizer.param_groups} == {1e-3, 5e-3}


def test_empty_unused_memory_level_with_a_recording_cuda(monkeypatch):
    """On GPU, as Megatron-LM's train_step: level 1 empties the CUDA cache after the forward-backward,
    level 2 also after the optimizer step (recording stand-in for torch.cuda.empty_cache; on CPU
    there is nothing to release)."""
    from megatron_let.training.megatron_compat import RuntimeConfig, StepHooks

    from megatron_let.runtime import device as device_policy

    calls = []
    monkeypatch.setattr(device_policy, "cuda_usable", lambda: True)  # a stand-in GPU
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(where))
    for level, expected in ((0, []), (1, ["fwd-bwd"]), (2, ["fwd-bwd", "step"])):
        calls.clear()
        hooks = StepHooks(RuntimeConfig(empty_unused_memory_level=level), torch.device("cuda"), 0.0)
        where = "fwd-bwd"
        hooks.after_forward_backward()
        where = "step"
        hooks.after_step(1)
        assert calls == expected
    calls.clear()
    StepHooks(RuntimeConfig(empty_unused_memory_level=2), torch.device("cpu"), 0.0).after_step(1)
    assert calls == []


def test_data_flags_reach_megatron_core(files, tmp_path):
    """--no-mmap-bin-files reads the .bin with file reads; --reset-position-ids/--eod-mask-loss reach
    megatron-core's GPT dataset config; the shell-quoted --split is read as its numbers."""
    from megatron_let.data.datasets import parse_split
    from megatron_let.data.tokenizers import build_tokenizer
    from megatron_let.training.arguments import parse_args
    from megatron_let.data.run_datasets import build_run_datasets

    argv = [a for a in TINY if a != "--mock-data"] + [
        "--data-path", files["data"], "--tokenizer-type", "NullTokenizer", "--train-iters", "2",
        "--data-cache-path", str(tmp_path), "--split", "'99,1,0'"]
    tok = build_tokenizer("NullTokenizer", None, vocab_size=96)
    kinds = {}
    for extra in ([], ["--no-mmap-bin-files", "--reset-position-ids", "--eod-mask-loss"]):
        cfg = parse_args(argv + extra)
        train, _ = build_run_datasets(cfg, tok, 4)
        gpt = train.dataset  # megatron-core's one-epoch GPTDataset inside our EpochCycle
        kinds[bool(extra)] = (type(gpt.dataset.bin_reader).__name__, gpt.config.reset_position_ids,
                              gpt.config.eod_mask_loss)
    assert kinds[False] == ("_MMapBinReader", False, False)
    assert kinds[True] == ("_FileBinReader", True, True)
    assert parse_split("'99,1,0'") == parse_split("99,1,0")


def test_plain_torchrun_warns_about_sigusr1(files, monkeypatch):
    """Under plain torchrun (TORCHELASTIC_RUN_ID, no agent pid) --exit-signal-handler warns at
    start-up (the preflight, so --dry-run too); under megatron_let.runtime.torchrun it does not."""
    import pretrain_let

    argv = BASE + ["--exit-signal-handler", "--save", files["tmp"] + "/sig"]

    def run(env):
        monkeypatch.setenv("WORLD_SIZE", "1")
        for k in ("TORCHELASTIC_RUN_ID", "MEGATRON_LET_AGENT_PID", "RANK"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr("megatron_let.runtime.lifeline.exit_with_agent", lambda: False)
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            assert pretrain_let.main(argv) == 0
        return err.getvalue()

    plain = run({"TORCHELASTIC_RUN_ID": "x"})
    assert "SIGUSR1" in plain and "python -m megatron_let.runtime.torchrun" in plain, plain
    assert "SIGUSR1" not in run({"TORCHELASTIC_RUN_ID": "x", "MEGATRON_LET_AGENT_PID": "123"})
    assert "SIGUSR1" not in run({})  # not under torchrun
    assert "SIGUSR1" not in run({"TORCHELASTIC_RUN_ID": "x", "RANK": "1"})  # rank 0 prints


def test_new_model_fields_are_checked_on_resume():
    from megatron_let.model.llama import LlamaConfig
    from megatron_let.training.checkpointing import compatibility_problems
    import dataclasses

    saved = dataclasses.asdict(LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4))
    run = LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=32,
                      rotary_percent=0.5, apply_layernorm_1p=True)
    problems = " ".join(compatibility_problems({"model": saved}, run, {}))
    for flag in ("--kv-channels", "--rotary-percent", "--apply-layernorm-1p"):
        assert flag in problems, problems
    old = {k: v for k, v in saved.items() if k not in ("kv_channels", "rotary_percent",
                                                         "apply_layernorm_1p")}
    assert compatibility_problems({"model": old}, LlamaConfig(num_layers=2, hidden_size=64,
                                                               num_attention_heads=4), {}) == []


def test_hf_export_refuses_what_llama_cannot_express():
    from megatron_let.export.hf_conversion import hf_config_dict
    from megatron_let.model.llama import LlamaConfig

    d = hf_config_dict(LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=32))
    assert d["head_dim"] == 32
    with pytest.raises(ValueError, match="--rotary-percent"):
        hf_config_dict(LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                   rotary_percent=0.5))
    with pytest.raises(ValueError, match="--apply-layernorm-1p"):
        hf_config_dict(LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                   apply_layernorm_1p=True))


def test_megatron_compat_doc_is_current():
    import megatron_compat_table

    with open(os.path.join(ROOT, "docs", "megatron-compat.md")) as f:
        current = megatron_compat_table.SECTION.current(f.read())
    assert current == megatron_compat_table.render(), \
        "docs/megatron-compat.md is stale: run python tools/megatron_compat_table.py"


@pytest.mark.parametrize("path", ["model", "logits"])
def test_cross_entropy_loss_fusion_is_the_runs_loss(tmp_path, monkeypatch, path):
    """With --cross-entropy-loss-fusion every micro-batch's loss goes through megatron-core's fused
    kernel, and the first step's loss equals the unfused run's (same weights, same batch). Both loss
    paths: ``model`` (NLL-only objectives pass the labels in; megatron-core's GPTModel computes the
    loss, told by the TransformerConfig) and ``logits`` (objectives that read the logits, e.g. KD:
    the trainer's own cross entropy, forced here on the baseline objective)."""
    import megatron.core.models.common.language_module.language_module as language_module

    import megatron_let.training.megatron_compat as compat
    from megatron_let.training.trainer import Trainer

    used = []
    if path == "model":
        real_kernel = language_module.fused_vocab_parallel_cross_entropy
        monkeypatch.setattr(language_module, "fused_vocab_parallel_cross_entropy",
                            lambda *a, **k: used.append("native") or real_kernel(*a, **k))
    else:
        monkeypatch.setattr(Trainer, "_reads_logits", lambda self: not self._forward_only)
        real = compat.fused_cross_entropy

        def recording(impl):
            f = real(impl)
            return lambda logits, labels: used.append(impl) or f(logits, labels)

        monkeypatch.setattr(compat, "fused_cross_entropy", recording)
    run = TINY + ["--train-iters", "2", "--lr-warmup-iters", "0"]
    _, plain = train_in_process(run + ["--metrics-jsonl", str(tmp_path / "a.jsonl")])
    assert used == []
    _, fused = train_in_process(run + ["--cross-entropy-loss-fusion",
                                       "--metrics-jsonl", str(tmp_path / "b.jsonl")])
    assert used == ["native"] * 4  # 2 steps x 2 micro-batches
    assert fused[1]["lm loss"] == pytest.approx(plain[1]["lm loss"], rel=1e-6)


@pytest.mark.parametrize("agent", ["torch.distributed.run", "megatron_let.runtime.torchrun"])
def test_sigusr1_warning_under_a_real_torchrun(agent, tmp_path):
    """The start-up warning in a real launch (``--dry-run``, one worker): plain torchrun warns,
    megatron_let's torchrun does not."""
    import subprocess

    from launch import base_env, free_port

    cmd = [sys.executable, "-m", agent, "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(ROOT, "pretrain_let.py"),
           *BASE, "--global-batch-size", "1", "--exit-signal-handler", "--save", str(tmp_path / "c")]
    proc = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = "python -m megatron_let.runtime.torchrun" in proc.stderr and "SIGUSR1" in proc.stderr
    assert warned == (agent == "torch.distributed.run"), proc.stderr[-3000:]


def test_kv_channels_student_exports_to_an_equal_hf_llama(megatron_single_process):
    """A --kv-channels 32 student (head_dim 32, not hidden/heads = 16) exported to Hugging Face: HF's
    own LlamaForCausalLM forward gives the student's logits, and the import reads head_dim back."""
    import transformers

    from megatron_let.export.hf_conversion import hf_config_dict, llama_config_from_hf, megatron_to_hf
    from megatron_let.model.llama import build_student
    from megatron_let.training.arguments import parse_args

    cfg = parse_args(TINY + ["--kv-channels", "32", "--dry-run"]).model
    cfg.vocab_size = 96
    torch.manual_seed(1)
    student = build_student(cfg, parse_args(TINY + ["--dry-run"]).parallel, use_cpu=True).eval()
    d = hf_config_dict(cfg)
    assert d["head_dim"] == 32
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        k: v for k, v in d.items() if k not in ("architectures", "transformers_version")})).eval()
    sd = {k: v for k, v in student.state_dict().items() if not k.endswith("_extra_state")}
    hf.load_state_dict(megatron_to_hf(sd, cfg), strict=True)
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        ours = student(ids, torch.arange(16).expand(2, 16), None)[..., :96]
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert llama_config_from_hf(d).kv_channels == 32
