"""Reading and writing megatron_let checkpoints outside the trainer (export, import, evaluation).

A checkpoint written by the trainer holds the sharded model under ``model.`` and an ``extra`` dict
with ``model`` (``dataclasses.asdict(LlamaConfig)``) and ``tokenizer`` (``type``, ``model``,
``vocab_size``); that is enough to rebuild the student at any TP/PP (dist_checkpointing reshards)
and its tokenizer. Model-only checkpoints (written by :func:`save_model_checkpoint`, e.g. by
``tools/import_hf.py``) have the same layout without optimizer/scheduler state: resume training from
them with ``--no-load-optim --no-load-rng``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

import torch
from megatron.core import dist_checkpointing

from megatron_let.data.tokenizers import build_tokenizer
from megatron_let.model.llama import LlamaConfig, build_student
from megatron_let.model.spec import ImplConfig, resolve_spec
from megatron_let.training.checkpoint_integrity import check_metadata_json
from megatron_let.training.checkpointing import (
    EXTRA_STATE_SUFFIX,
    MODEL_PREFIX,
    TRACKER,
    find_checkpoint,
    load_checkpoint,
    older_hint,
    write_checkpoint,
)
from megatron_let.training.errors import CheckpointError

TOKENIZER_SUBDIR = "tokenizer"
"""Folder inside a checkpoint root where import_hf copies the Hugging Face tokenizer files."""


def resolve_checkpoint(root: str, ckpt_step: Optional[int] = None) -> Tuple[int, str]:
    """(iteration, directory) of the checkpoint ``--load root`` selects, as the trainer chooses it:
    the tracker's, ``--ckpt-step``'s, or ``root`` itself when it is an ``iter_N`` folder."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--load {root!r} is not a folder")
    found = find_checkpoint(root, ckpt_step)
    if found is None:
        raise FileNotFoundError(f"--load {root!r} has no {TRACKER} and no complete iter_* folder: "
                                "not a (complete) megatron_let checkpoint")
    return found[0], found[1]


def read_checkpoint_extra(root: str, ckpt_step: Optional[int] = None) -> Dict[str, Any]:
    """The ``extra`` dict of the selected checkpoint (read from its common state; no process group)."""
    iteration, path = resolve_checkpoint(root, ckpt_step)
    check_metadata_json(path)
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as e:
        raise CheckpointError(f"cannot read {os.path.join(path, 'common.pt')} ({type(e).__name__}: "
                              f"{e}); {older_hint(os.path.dirname(path), iteration)}") from e
    extra = common.get("extra") if isinstance(common, dict) else None
    if not isinstance(extra, dict) or "model" not in extra:
        raise ValueError(f"checkpoint {path} has no 'extra' with the model configuration "
                         "(was it written by megatron_let?)")
    return extra


def config_from_extra(extra: Dict[str, Any], seq_length: Optional[int] = None) -> LlamaConfig:
    """The student's LlamaConfig saved in a checkpoint; ``seq_length`` overrides its sequence
    length (evaluation windows), which must not exceed ``max_position_embeddings``."""
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    values = {k: v for k, v in extra["model"].items() if k in fields}
    if seq_length is not None:
        if seq_length < 1:
            raise ValueError(f"--seq-length must be >= 1, got {seq_length}")
        values["seq_length"] = seq_length
    cfg = LlamaConfig(**values)
    if cfg.seq_length > cfg.max_position_embeddings:
        raise ValueError(f"--seq-length {cfg.seq_length} exceeds the checkpoint's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    return cfg


def tokenizer_info_from_extra(extra: Dict[str, Any], root: str) -> Dict[str, Any]:
    """The checkpoint's tokenizer record with ``model`` resolved to an existing path.

    A recorded path that no longer exists falls back to ``ROOT/tokenizer`` (the copy import_hf
    makes), so a moved checkpoint keeps its tokenizer."""
    info = dict(extra.get("tokenizer") or {})
    if not info:
        info = {"type": "NullTokenizer", "model": None, "vocab_size": extra["model"]["vocab_size"]}
    if info.get("type") in ("SentencePieceTokenizer", "HuggingFaceTokenizer"):
        path = info.get("model")
        local = os.path.join(root, TOKENIZER_SUBDIR)
        if not path or not os.path.exists(path):
            if os.path.isdir(local):
                path = local
            else:
                raise FileNotFoundError(
                    f"the checkpoint's tokenizer {info.get('model')!r} ({info.get('type')}) does not exist "
                    f"and {local} is absent; pass --tokenizer-model"
                )
        info["model"] = path
    return info


def build_tokenizer_from_info(info: Dict[str, Any]):
    return build_tokenizer(info["type"], info.get("model"), vocab_size=info.get("vocab_size"))


def load_student(root: str, parallel, use_cpu: bool = True, seq_length: Optional[int] = None,
                 bf16: bool = False, verify: bool = True, transformer_impl: Optional[str] = None):
    """Build this rank's student stage and load the latest checkpoint of ``root`` into it.

    Needs torch.distributed and megatron's parallel state (``initialize_distributed``) for the
    ``parallel`` layout, which may differ from the one the checkpoint was written with.
    Every file is checked against the checkpoint's manifest first unless ``verify`` is False.
    ``transformer_impl`` is ``--transformer-impl`` (default: TE on CUDA, local on CPU; the spec's
    checkpoints load into either). Returns ``(model, cfg, extra)``; the model is in eval mode.
    """
    extra = read_checkpoint_extra(root)
    cfg = config_from_extra(extra, seq_length)
    cfg.validate(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size)
    spec = resolve_spec(ImplConfig(transformer_impl=transformer_impl), "cpu" if use_cpu else "cuda")
    model = build_student(cfg, parallel, bf16=bf16, use_cpu=use_cpu, spec=spec)
    loaded = load_checkpoint(root, model, None, None, load_optim=False, load_rng=False, verify=verify,
                             log=_log_notes)
    if loaded is None:
        raise FileNotFoundError(f"--load {root!r}: no checkpoint found")
    model.eval()
    return model, cfg, extra


def _log_notes(msg: str) -> None:
    """The loader's messages that a tool's user should see (the routine ones stay quiet)."""
    if EXTRA_STATE_SUFFIX in msg:
        print(f"[megatron_let] {msg}", flush=True)


def full_state_dict(model) -> Dict[str, torch.Tensor]:
    """Weights of a TP=1/PP=1 model (no ``_extra_state``), detached on CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def save_model_checkpoint(root: str, iteration: int, model, extra: Dict[str, Any]) -> str:
    """Save only the model (+ ``extra``) in the trainer's layout, collectively on every rank.

    Written exactly as the trainer writes (``iter_XXXXXXX.tmp`` with a manifest, renamed, tracker).
    """
    return write_checkpoint(root, iteration, {"model": model.sharded_state_dict(prefix=MODEL_PREFIX),
                                              "extra": extra}, with_rng=False)
