"""Preflight: every check a run makes before any compute, shared by the trainer and ``--dry-run``.

``Trainer.setup`` calls :func:`preflight` before the process group, the model or any dataset index
exists, and :func:`megatron_let.training.dry_run.plan_run` calls the very same function, so
``--dry-run`` rejects exactly the configurations a run rejects, with the same message (exit code 2
from ``pretrain_let.py``). In order:

1. parallel sizes against the world size; the global batch against micro-batch x DP;
2. ``--split`` (syntax, a positive sum);
3. the tokenizer, always built (a folder without tokenizer files or a garbage model fails here even
   when ``--vocab-size`` is given), and ``--vocab-size`` not below the tokenizer's size;
4. the objective's own settings and the teacher folder (causal LM, layer range, positions against
   ``--seq-length``, every weight tensor present, shared vocabulary; no weight is loaded);
5. ``--kd-data-selection``: only with an objective that has a KD data phase, a 1-D integer
   ``.npy``, its indices below the training sample count (the dataset's exact length);
6. every ``--data-path`` prefix: token ids within the student vocabulary (from the ``.meta.json``
   written by ``tools/preprocess_data.py``, else a bounded sampled scan of the ``.bin``), no empty
   requested split, and a warning when the run reads its data more than once;
7. ``--save``: a directory that can be written (probe file), and a warning when its filesystem has
   less free space than the planned checkpoints need.

Zero or negative sizes are refused even earlier, at parse time (:func:`check_sizes`), because the
model configuration divides by them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from megatron_let.data.datasets import _check_splits_nonempty, parse_split
from megatron_let.data.indexed import (
    SAMPLED_SCAN_BYTES,
    meta_path,
    parse_data_path,
    read_dataset_meta,
    sampled_token_range,
    validate_indexed_dataset,
)
from megatron_let.data.tokenizers import build_tokenizer
from megatron_let.objectives.base import ObjectiveContext, build_objective
from megatron_let.runtime import device as device_policy
from megatron_let.training.errors import SaveLockError
from megatron_let.training.lr_schedule import schedule_steps
from megatron_let.training.megatron_compat import preflight_warnings
from megatron_let.training.save_lock import check_lock

GIB = 2**30

# flags that must be > 0 when given (argparse dest names)
_POSITIVE = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "seq_length", "max_position_embeddings", "vocab_size", "make_vocab_size_divisible_by",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
    "global_batch_size", "save_interval", "eval_interval", "exit_interval", "log_interval",
    "eval_iters", "rotary_base",
)


def check_sizes(a) -> None:
    """Parse-time: every size flag that was given is a positive integer (0 would divide by zero
    in the model configuration, a negative vocabulary would build an empty embedding)."""
    for name in _POSITIVE:
        value = getattr(a, name, None)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")


@dataclass
class DatasetCheck:
    """One ``--data-path`` prefix as the preflight saw it."""

    prefix: str
    weight: Optional[float]
    num_tokens: int
    num_documents: int
    min_id: int
    max_id: int
    id_source: str  # where max_id comes from: the .meta.json, a full or a sampled scan
    meta: Optional[dict] = None
    summary: object = None  # megatron_let.data.indexed.IndexedDatasetSummary


@dataclass
class PreflightResult:
    tokenizer: object
    vocab_size: int
    objective: object
    world_size: int
    data_parallel_size: int
    num_microbatches: int
    global_batch_size: int
    train_samples: int
    valid_samples: int
    datasets: List[DatasetCheck] = field(default_factory=list)
    checkpoint_bytes: float = 0.0  # estimated size of one checkpoint
    planned_checkpoints: int = 0
    save_free_bytes: Optional[int] = None
    warnings: List[str] = field(default_factory=list)
    spec: object = None  # the student's layer spec and fusions (model/spec.py StudentSpec)

    @property
    def num_tokens(self) -> int:
        return sum(d.num_tokens for d in self.datasets)


def sample_counts(cfg, global_batch_size: int) -> Tuple[int, int]:
    """(train, valid) samples a run requests from its datasets (megatron-core's shuffle depends on
    them, so the trainer, the tools and the preflight must agree)."""
    eval_runs = 0
    if cfg.logging.eval_interval:
        eval_runs = cfg.batch.train_iters // cfg.logging.eval_interval + 1
    train = max(1, cfg.batch.train_iters) * global_batch_size
    valid = eval_runs * cfg.logging.eval_iters * global_batch_size
    return train, valid


# ---------------------------------------------------------------------------------------------
# individual checks
# ---------------------------------------------------------------------------------------------


def read_selection(path: str):
    """A SALT_DS selection file (tools/select_data.py): a non-empty 1-D integer .npy, >= 0."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--kd-data-selection {path} does not exist")
    try:
        sel = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"--kd-data-selection {path} is not a readable .npy file: {e}") from e
    if not isinstance(sel, np.ndarray) or sel.ndim != 1 or sel.size == 0 or \
            not np.issubdtype(sel.dtype, np.integer):
        raise ValueError(f"--kd-data-selection {path} must be a non-empty 1-D integer array")
    if sel.min() < 0:
        raise ValueError(f"--kd-data-selection {path} holds a negative sample index {int(sel.min())}")
    return sel.astype(np.int64)


def check_selection_range(path: str, selection, train_samples: int) -> None:
    """The training dataset holds exactly ``train_samples`` samples (data/epochs.py), so a
    selection's range is known before any dataset is built."""
    if int(selection.max()) >= train_samples:
        raise ValueError(
            f"--kd-data-selection {path} indexes sample {int(selection.max())} but the training "
            f"dataset has {train_samples} samples (--train-iters x --global-batch-size): was it made "
            "with the same --train-iters/--global-batch-size?")


def _existing_ancestor(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def check_save_dir(save: str) -> str:
    """``--save`` must be (or be creatable as) a writable directory: a probe file is written and
    removed in it, or in its nearest existing parent when it does not exist yet (nothing is
    created). Returns the directory probed."""
    if os.path.exists(save) and not os.path.isdir(save):
        raise ValueError(f"--save {save} is a file, not a directory")
    where = _existing_ancestor(save)
    if not os.path.isdir(where):
        raise ValueError(f"--save {save} cannot be created: {where} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=".megatron_let_write_probe.") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        what = "is not writable" if where == os.path.abspath(save) else \
            f"cannot be created: its parent {where} is not writable"
        raise ValueError(f"--save {save} {what} ({e.strerror or e})") from None
    return where


def checkpoint_bytes(model, tp: int, bf16: bool) -> float:
    """Estimated bytes of one checkpoint: the weights (padded vocabulary) plus the optimizer state
    megatron-core saves with them (Adam moments in fp32, and the fp32 master copy under bf16)."""
    params = model.num_parameters()
    extra_rows = model.padded_vocab_size(tp) - model.vocab_size
    params += extra_rows * model.hidden_size * (2 if model.untie_embeddings_and_output_weights else 1)
    per_param = (2 + 4 + 8) if bf16 else (4 + 8)
    return float(params * per_param)


def planned_checkpoints(cfg) -> int:
    ck = cfg.checkpoint
    if not ck.save:
        return 0
    iters = cfg.batch.train_iters
    if ck.save_interval:
        return iters // ck.save_interval + (1 if iters % ck.save_interval else 0) or 1
    return 1


def check_dataset_ids(prefix: str, weight, vocab_size: int, padded_vocab: int, tokenizer_desc: str,
                      warnings: List[str], scan_bytes: int) -> DatasetCheck:
    """Token ids of one prefix against the student vocabulary, from its .meta.json when there is a
    current one, else from a sampled scan of at most ``scan_bytes`` of the .bin."""
    summary = validate_indexed_dataset(prefix)
    meta = read_dataset_meta(prefix)
    if meta is not None and meta["num_tokens"] != summary.num_tokens:
        warnings.append(
            f"{meta_path(prefix)} describes {meta['num_tokens']} tokens but {prefix}.bin holds "
            f"{summary.num_tokens}: the metadata is stale and is ignored (token ids are sampled)"
        )
        meta = None
    if meta is not None:
        lo, hi, source = meta["min_token_id"], meta["max_token_id"], f"recorded in {meta_path(prefix)}"
    else:
        lo, hi, exact = sampled_token_range(prefix, budget_bytes=scan_bytes, summary=summary)
        source = "full scan of the .bin" if exact else \
            f"sampled scan of {scan_bytes / 2**20:.0f} MiB of the .bin"
    made_with = ""
    if meta is not None:
        made_with = (f"; it was tokenized with {meta.get('tokenizer_type')} "
                     f"{meta.get('tokenizer_model') or ''} ({meta['vocab_size']} ids)")
    if summary.num_tokens and (hi >= vocab_size or lo < 0):
        bad = hi if hi >= vocab_size else lo
        raise ValueError(
            f"--data-path {prefix!r} holds token id {bad} ({source}) outside the student vocabulary "
            f"[0, {vocab_size}) ({tokenizer_desc}, padded to {padded_vocab}){made_with}: re-run "
            "tools/preprocess_data.py with the run's tokenizer, or pass the matching "
            "--tokenizer-model / --vocab-size"
        )
    if meta is not None and meta["vocab_size"] != vocab_size:
        warnings.append(
            f"--data-path {prefix!r} was tokenized with a vocabulary of {meta['vocab_size']} ids "
            f"({meta.get('tokenizer_type')}) but the run's is {vocab_size} ({tokenizer_desc})"
        )
    return DatasetCheck(prefix, weight, summary.num_tokens, summary.num_documents, lo, hi, source, meta,
                        summary)


def repetition_warning(datasets: List[DatasetCheck], train_fraction: float, train_samples: int,
                       seq_length: int) -> Optional[str]:
    """A warning when the run reads (about) more than one epoch of a dataset's train split.

    megatron-core blends weighted datasets by weight and unweighted ones by size; a dataset's train
    split holds about ``tokens x train fraction / seq_length`` samples."""
    if not datasets:
        return None
    weights = [d.weight for d in datasets]
    if weights[0] is None:
        total = sum(d.num_tokens for d in datasets) or 1
        weights = [d.num_tokens / total for d in datasets]
    else:
        s = sum(weights)
        weights = [w / s for w in weights]
    worst = None
    for d, w in zip(datasets, weights):
        available = d.num_tokens * train_fraction / seq_length
        wanted = w * train_samples
        epochs = wanted / available if available > 0 else float("inf")
        if worst is None or epochs > worst[0]:
            worst = (epochs, d, wanted, available)
    epochs, d, wanted, available = worst
    if epochs <= 1.0:
        return None
    return (f"the run repeats its data: about {wanted:,.0f} training samples of --seq-length "
            f"{seq_length} are drawn from --data-path {d.prefix!r}, whose train split holds about "
            f"{available:,.0f} ({epochs:.1f} epochs); add data or lower --train-iters")


# ---------------------------------------------------------------------------------------------
# the preflight
# ---------------------------------------------------------------------------------------------


def world_size_from_env(cfg) -> int:
    """``WORLD_SIZE`` from the environment (torchrun/SLURM/launchers), else TP x PP."""
    text = os.environ.get("WORLD_SIZE")
    if text is None or text == "":
        return cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE={text!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"environment variable WORLD_SIZE={value} must be >= 1")
    return value


def emit_warnings(warnings: List[str]) -> None:
    if int(os.environ.get("RANK", "0") or 0) == 0:
        for w in warnings:
            print(f"pretrain_let.py: warning: {w}", file=sys.stderr, flush=True)


def preflight(cfg, trainer, world_size: Optional[int] = None, emit: bool = True) -> PreflightResult:
    """Validate ``cfg`` before any compute; see the module docstring for the order.

    ``trainer`` is a :class:`~megatron_let.training.trainer.Trainer` that is not set up: its
    ``build_tokenizer`` and ``validate_teacher`` are the checks a run makes; ``trainer.tokenizer``
    and ``trainer.objective`` are filled in. ``cfg.model.vocab_size`` is resolved in place.
    Raises ValueError / FileNotFoundError naming the flag and the values."""
    warnings: List[str] = []
    par = cfg.parallel
    world = world_size if world_size is not None else world_size_from_env(cfg)
    par.validate(world)
    dp = world // (par.tensor_model_parallel_size * par.pipeline_model_parallel_size)
    num_microbatches = cfg.batch.num_microbatches(dp)
    gbs = cfg.batch.micro_batch_size * dp * num_microbatches
    # recompute / interleaving / overlap flags against the model and the pipeline
    cfg.perf.validate(cfg.model, par.pipeline_model_parallel_size, par.use_distributed_optimizer)
    cfg.perf.check_microbatches(num_microbatches, par.pipeline_model_parallel_size)
    fractions = parse_split(cfg.data.split)
    # --transformer-impl against the device (TE on CUDA must import); a dry run plans the GPU job
    from megatron_let.model.spec import planned_spec, resolve_spec

    device = getattr(trainer, "device", None)
    spec = resolve_spec(cfg.impl, device.type) if device is not None else planned_spec(cfg.impl, cfg.device)

    if cfg.data.tokenizer_type or cfg.data.mock_data:
        tokenizer = trainer.build_tokenizer()
    else:  # a dry run without data: the vocabulary must be given
        if not cfg.model.vocab_size:
            raise ValueError("vocabulary size unknown: pass --vocab-size, or --tokenizer-type with "
                             "--tokenizer-model")

        tokenizer = build_tokenizer("NullTokenizer", None, vocab_size=cfg.model.vocab_size)
    tok_type = cfg.data.tokenizer_type or "NullTokenizer"
    if cfg.model.vocab_size:
        if tok_type != "NullTokenizer" and cfg.model.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"--vocab-size {cfg.model.vocab_size} is smaller than the {tokenizer.vocab_size} ids "
                f"of --tokenizer-model {cfg.data.tokenizer_model}: its tokens would not fit the "
                "student's embedding (omit --vocab-size to use the tokenizer's)"
            )
    else:
        cfg.model.vocab_size = tokenizer.vocab_size
    vocab = cfg.model.vocab_size
    padded = cfg.model.padded_vocab_size(par.tensor_model_parallel_size)
    tokenizer_desc = f"--vocab-size {vocab}" if cfg.data.vocab_size else \
        f"{tok_type} {cfg.data.tokenizer_model}"
    trainer.tokenizer = tokenizer

    objective = build_objective(
        cfg.objective, cfg.objective_config,
        ObjectiveContext(train_iters=cfg.batch.train_iters, vocab_size=vocab,
                         student_num_layers=cfg.model.num_layers, padded_vocab_size=padded),
    )
    objective.validate(cfg.model.num_layers)
    trainer.objective = objective
    try:
        trainer.validate_teacher()
    except NotADirectoryError as e:  # an OSError, but it means a bad --teacher-path
        raise FileNotFoundError(str(e)) from e

    if cfg.data.kd_data_selection:
        if not objective.needs(0).kd_data_selection:
            raise ValueError(
                f"--kd-data-selection is only used by an objective with a KD data phase "
                f"(--objective salt), not --objective {cfg.objective}"
            )
        selection = read_selection(cfg.data.kd_data_selection)

    schedule_steps(cfg.optim, cfg.batch.train_iters, gbs)  # warmup shorter than decay, as a run
    train_samples, valid_samples = sample_counts(cfg, gbs)
    if cfg.data.kd_data_selection:
        check_selection_range(cfg.data.kd_data_selection, selection, train_samples)
    datasets: List[DatasetCheck] = []
    if cfg.data.data_path and not cfg.data.mock_data:
        entries = parse_data_path(cfg.data.data_path)
        # every rank checks (an error must stop them all); the scan budget is shared by the prefixes
        scan_bytes = max(1 << 20, SAMPLED_SCAN_BYTES // len(entries))
        for weight, prefix in entries:
            datasets.append(check_dataset_ids(prefix, weight, vocab, padded, tokenizer_desc, warnings,
                                              scan_bytes))
        _check_splits_nonempty([d.summary for d in datasets], fractions,
                               [train_samples, valid_samples, 0], cfg.data.split)
        w = repetition_warning(datasets, fractions[0], train_samples, cfg.model.seq_length)
        if w:
            warnings.append(w)

    result = PreflightResult(
        tokenizer=tokenizer, vocab_size=vocab, objective=objective, world_size=world,
        data_parallel_size=dp, num_microbatches=num_microbatches, global_batch_size=gbs,
        train_samples=train_samples, valid_samples=valid_samples, datasets=datasets,
        warnings=warnings, spec=spec,
    )
    if cfg.checkpoint.save:
        where = check_save_dir(cfg.checkpoint.save)

        held = check_lock(cfg.checkpoint.save)  # a live holder: the run would stop at its lock
        if held:
            raise SaveLockError(held)
        result.checkpoint_bytes = checkpoint_bytes(cfg.model, par.tensor_model_parallel_size, cfg.bf16)
        result.planned_checkpoints = planned_checkpoints(cfg)
        result.save_free_bytes = free_bytes(where)
        need = result.checkpoint_bytes * result.planned_checkpoints
        if result.save_free_bytes < need:
            warnings.append(
                f"--save {cfg.checkpoint.save}: {result.save_free_bytes / GIB:.2f} GiB free on its "
                f"filesystem, but {result.planned_checkpoints} checkpoint(s) of about "
                f"{result.checkpoint_bytes / GIB:.2f} GiB each are planned ({need / GIB:.2f} GiB): "
                "the run may fail at a save"
            )

    # the device the run will use (a dry run on a login node may describe a GPU run)
    warnings.extend(preflight_warnings(cfg, device_policy.planned_device_type(cfg.device)))
    if emit:
        emit_warnings(warnings)
    return result


def free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free
