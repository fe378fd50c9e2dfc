"""What a resumed run must share with its checkpoint: the model's computation and the data stream.

The model check is generic over :class:`~megatron_let.model.llama.LlamaConfig`: every field is
compared (a field added later is covered without touching this file) except those in
:data:`MAY_CHANGE_ON_RESUME`, each with its reason. A field an older checkpoint does not record is
compared against the field's default, the value that checkpoint was trained with.

The data record (``--data-path`` prefixes and weights, ``--split``, ``--seed``, the per-document
flags, the ``--kd-data-selection`` file's content) is compared the same way; a difference is
refused unless ``--override-data-on-resume`` is given, and then logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Dict, List, Optional

from megatron_let.data.datasets import parse_split
from megatron_let.data.epochs import ORDER_VERSION
from megatron_let.data.indexed import parse_data_path

# LlamaConfig fields that may differ between a checkpoint and the run resuming it
MAY_CHANGE_ON_RESUME = {
    "init_method_std": "only draws the initial weights, which the checkpoint replaces",
    # (with learned absolute positions the embedding's shape would change: the strict load refuses)
    "max_position_embeddings": "RoPE computes positions per sequence: it only bounds --seq-length",
    "attention_dropout": "regularisation of the training steps only; the weights mean the same",
    "hidden_dropout": "regularisation of the training steps only; the weights mean the same",
}
# fields compared only when the optimizer state is loaded (a model-only start may change them)
MODEL_ONLY_START_MAY_CHANGE = {
    "seq_length": "a model-only start (--no-load-optim) may train at a new sequence length",
}
_FLAG_NAMES = {"untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights"}


def flag_name(field_name: str) -> str:
    return _FLAG_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


def _normalised(record: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(record)
    if "num_query_groups" in out and not out["num_query_groups"]:  # None = one group per head
        out["num_query_groups"] = out.get("num_attention_heads")
    if "kv_channels" in out and not out["kv_channels"] and out.get("num_attention_heads"):
        out["kv_channels"] = out["hidden_size"] // out["num_attention_heads"]  # None = hidden / heads
    return out


def model_problems(saved_model: Dict[str, Any], model_cfg, check_seq_length: bool = True) -> List[str]:
    """Every computation-relevant LlamaConfig field that differs, as 'flag: checkpoint A, this run B'."""
    if not saved_model:
        return []
    run = _normalised(dataclasses.asdict(model_cfg))
    defaults = {f.name: f.default for f in dataclasses.fields(model_cfg)
                if f.default is not dataclasses.MISSING}
    saved = _normalised({**{k: v for k, v in defaults.items() if k not in saved_model}, **saved_model})
    problems = []
    for f in dataclasses.fields(model_cfg):
        name = f.name
        if name in MAY_CHANGE_ON_RESUME or (name in MODEL_ONLY_START_MAY_CHANGE and not check_seq_length):
            continue
        if name not in saved:
            continue
        a, b = saved[name], run[name]
        if a != b:
            problems.append(f"{flag_name(name)}: checkpoint {a}, this run {b}")
    return problems


def padded_vocab_problem(saved: Dict[str, Any], padded: int) -> Optional[str]:
    a = saved.get("padded_vocab_size")
    if a is not None and a != padded:
        return (f"padded vocabulary (--make-vocab-size-divisible-by x --tensor-model-parallel-size): "
                f"checkpoint {a}, this run {padded}")
    return None


# ------------------------------------------------------------------------------------------ data

def _file_digest(path: Optional[str]) -> Optional[str]:
    if not path or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_record(cfg) -> Dict[str, Any]:
    """What decides which sample a position reads (saved with every checkpoint)."""
    d = cfg.data
    blend = None
    if d.data_path and not d.mock_data:
        blend = [[w, os.path.abspath(p)] for w, p in parse_data_path(d.data_path)]
    return {
        "data_path": blend,
        "mock_data": bool(d.mock_data),
        "split": [round(x, 12) for x in parse_split(d.split)],
        "seed": cfg.seed,
        # Megatron-LM's per-document flags (training/megatron_compat.py's RuntimeConfig)
        "reset_position_ids": bool(cfg.runtime.reset_position_ids),
        "reset_attention_mask": False,  # refused (megatron_compat)
        "eod_mask_loss": bool(cfg.runtime.eod_mask_loss),
        "kd_data_selection": _file_digest(d.kd_data_selection),
        "kd_data_selection_path": d.kd_data_selection,
        "order": ORDER_VERSION,
    }


_DATA_FLAGS = {
    "data_path": "--data-path", "mock_data": "--mock-data", "split": "--split", "seed": "--seed",
    "reset_position_ids": "--reset-position-ids", "reset_attention_mask": "--reset-attention-mask",
    "eod_mask_loss": "--eod-mask-loss", "kd_data_selection": "--kd-data-selection",
}


def _show(key: str, value, record: Dict[str, Any]) -> str:
    if key == "data_path" and value:
        return " ".join(p if w is None else f"{w} {p}" for w, p in value)
    if key == "kd_data_selection":
        path = record.get("kd_data_selection_path")
        return "none" if value is None else f"{path} (sha256 {value[:12]})"
    if key == "split" and value:
        return ",".join(f"{x:g}" for x in value)
    return str(value)


def data_problems(saved: Optional[Dict[str, Any]], run: Dict[str, Any]) -> List[str]:
    """Differences of the data record, as 'flag: checkpoint A, this run B'."""
    if not saved:
        return []
    problems = []
    for key, flag in _DATA_FLAGS.items():
        if key not in saved:
            continue
        a, b = saved[key], run[key]
        if key == "data_path" and a and b:
            a, b = [list(x) for x in a], [list(x) for x in b]
        if a != b:
            problems.append(f"{flag}: checkpoint {_show(key, a, saved)}, this run {_show(key, b, run)}")
    return problems
