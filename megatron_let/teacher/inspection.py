"""Teacher folder inspection and validation, before (or without) loading any weights.

Everything here reads ``config.json``, tokenizer files and weight-file headers only: the checks that
``pretrain_let.py``'s preflight, ``--dry-run`` and the tools run on ``--teacher-path``
(:func:`inspect_teacher`, :func:`check_vocab_compatible`), and the config readers the runtime
teacher (:mod:`megatron_let.teacher.hf_teacher`) shares. Layer convention: see that module's doc.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open

__all__ = [
    "TeacherInfo",
    "inspect_teacher",
    "check_teacher_folder",
    "find_weight_files",
    "text_config",
    "config_num_layers",
    "config_hidden_size",
    "config_vocab_size",
    "resolve_layer",
    "teacher_tokenizer_size",
    "teacher_bos_token_id",
    "teacher_max_positions",
    "check_causal_lm",
    "check_weights_present",
    "missing_weights_message",
    "check_vocab_compatible",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass
class TeacherInfo:
    """What a teacher folder holds, read from ``config.json`` alone (no weights loaded)."""

    path: str
    model_type: str
    architectures: list[str]
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_parameters: Optional[int]
    weight_files: list[str] = field(default_factory=list)
    tokenizer_size: Optional[int] = None
    layer: int = -1  # resolved 1-based layer (num_layers for the final hidden state)


# ----------------------------------------------------------------------------------------------
# Folder inspection
# ----------------------------------------------------------------------------------------------


def find_weight_files(path: Union[str, os.PathLike]) -> tuple[list[str], bool]:
    """Return (weight files, are_safetensors) in a teacher folder; safetensors are preferred."""
    folder = Path(path)
    safetensors = sorted(str(p) for p in folder.glob("*.safetensors"))
    if safetensors:
        return safetensors, True
    bins = sorted(str(p) for p in folder.glob("pytorch_model*.bin"))
    return bins, False


def check_teacher_folder(path: Union[str, os.PathLike]) -> Path:
    """Validate a teacher folder before anything is loaded; return it as a Path."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"teacher folder {str(folder)!r} does not exist (--teacher-path)")
    if not folder.is_dir():
        raise NotADirectoryError(
            f"teacher path {str(folder)!r} is not a folder (--teacher-path must be a Hugging Face "
            "model folder; convert a .gguf file with tools/prepare_teacher.py)"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"teacher folder {str(folder)!r} has no config.json: not a Hugging Face model folder "
            "(use tools/prepare_teacher.py to build one)"
        )
    weights, _ = find_weight_files(folder)
    if not weights:
        raise FileNotFoundError(
            f"teacher folder {str(folder)!r} has no weights (*.safetensors or pytorch_model*.bin)"
        )
    return folder


def text_config(config: Any) -> Any:
    """The decoder's config (multimodal configs such as Gemma3Config nest it)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _config_int(config: Any, names: tuple[str, ...], what: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(f"teacher config ({type(config).__name__}) has no {what} (looked for {names})")


def config_num_layers(config: Any) -> int:
    return _config_int(text_config(config), ("num_hidden_layers", "n_layer", "num_layers"), "layer count")


def config_hidden_size(config: Any, final: bool) -> int:
    text = text_config(config)
    size = _config_int(text, ("hidden_size", "n_embd", "d_model"), "hidden size")
    # OPT-350m projects its final hidden state down to the embedding width.
    proj = getattr(text, "word_embed_proj_dim", None)
    if final and isinstance(proj, int) and proj != size:
        return proj
    return size


def config_vocab_size(config: Any) -> int:
    return _config_int(text_config(config), ("vocab_size",), "vocab_size")


def resolve_layer(layer: int, num_layers: int) -> int:
    """Map a ``TeacherConfig.layer`` value to a 1-based layer in ``1..num_layers``.

    -1 means the final hidden state, which is layer ``num_layers`` in HF's indexing.
    """
    if layer == -1:
        return num_layers
    if not 1 <= layer <= num_layers:
        raise ValueError(
            f"teacher layer {layer} is out of range: the teacher has {num_layers} layers "
            f"(use -1 for the final hidden state or 1..{num_layers})"
        )
    return layer



def _folder_tokenizer(path: Union[str, os.PathLike]) -> Any:
    """The tokenizer stored in the teacher folder, or None if there is none."""
    folder = Path(path)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    # lazy: transformers takes seconds to import; runs without a teacher never need it
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def teacher_tokenizer_size(path: Union[str, os.PathLike]) -> Optional[int]:
    """``len(tokenizer)`` for the tokenizer stored in the teacher folder, or None if there is none."""
    tokenizer = _folder_tokenizer(path)
    return None if tokenizer is None else len(tokenizer)


def teacher_bos_token_id(path: Union[str, os.PathLike]) -> Optional[int]:
    """The BOS id the teacher folder's tokenizer puts before every encoded text, else None.

    Decided by encoding a probe text with and without special tokens (what the tokenizer really
    does, whatever its ``add_bos_token`` attribute says). None when the folder has no tokenizer,
    the tokenizer has no BOS token, or its encoding does not add it.
    """
    tokenizer = _folder_tokenizer(path)
    bos = None if tokenizer is None else tokenizer.bos_token_id
    if bos is None:
        return None
    probe = "The teacher reads this."
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    encoded = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    if encoded[:1] == [bos] and plain[:1] != [bos]:
        return int(bos)
    return None


def _count_parameters_meta(config: Any, trust_remote_code: bool) -> Optional[int]:
    """Exact parameter count by building the model on the meta device (no memory, no weights)."""
    # lazy: transformers takes seconds to import; runs without a teacher never need it
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # an exotic architecture that cannot be built on meta: count is optional
        return None
    return sum(p.numel() for p in model.parameters())


# Config fields holding the longest sequence a model was built for (Llama-likes, GPT-2, others).
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length",
                    "seq_length")


def teacher_max_positions(config: Any) -> Optional[tuple[str, int]]:
    """(config field, value) of the teacher's maximum sequence length, or None if it declares none."""
    text = text_config(config)
    for name in _POSITION_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            # the name config.json uses (GPT-2 aliases max_position_embeddings to n_positions)
            return (getattr(text, "attribute_map", None) or {}).get(name, name), value
    return None


def check_causal_lm(config: Any, folder: str, trust_remote_code: bool = False) -> None:
    """Refuse teachers that are not causal (left-to-right) language models.

    transformers maps some encoders (BERT, RoBERTa, ...) to a causal-LM class that is only causal
    with ``is_decoder=True``; loaded otherwise they attend bidirectionally and the alignment target
    would see future tokens."""
    # lazy: transformers takes seconds to import; runs without a teacher never need it
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = str(getattr(config, "model_type", ""))
    archs = list(getattr(config, "architectures", None) or [])
    what = f"teacher {folder!r} (--teacher-path) is a {model_type or 'unknown'} model"
    if archs:
        what += f" ({', '.join(archs)})"
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{what}, an encoder-decoder: the teacher must be a causal (decoder-only) LM")
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        raise ValueError(f"{what}, which transformers has no causal-LM class for: the teacher must "
                         "be a causal (decoder-only) LM")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise ValueError(f"{what}, an encoder with bidirectional attention (is_decoder is not set): "
                         "the teacher must be a causal (decoder-only) LM")


def _check_weight_file(path: str) -> None:
    """Read one weight file's index without loading its tensors (safetensors: the header; .bin:
    memory-mapped); an unreadable file is a ValueError naming it."""
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                f.keys()
            return
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    except Exception as err:
        raise ValueError(f"teacher weight file {path} is unreadable (corrupt or not a weight file): "
                         f"{type(err).__name__}: {err}") from None


def missing_weights_message(folder: str, missing: list[str], total: int) -> str:
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    return (f"teacher {folder!r} (--teacher-path) lacks {len(missing)} of its {total} weight tensors "
            f"({shown}): transformers would initialise them randomly; the folder is incomplete")


@functools.lru_cache(maxsize=None)
def _from_pretrained_takes(name: str) -> bool:
    # lazy: transformers takes seconds to import; runs without a teacher never need it
    import inspect as _inspect

    from transformers import PreTrainedModel

    # from_pretrained pops most of its options from **kwargs, so the signature does not list them
    return name in _inspect.getsource(PreTrainedModel.from_pretrained)


def model_load_kwargs(dtype: Optional[torch.dtype] = None) -> dict:
    """Keyword arguments for every ``AutoModelForCausalLM.from_pretrained`` of ours: the dtype under
    this transformers version's name (5.x renamed ``torch_dtype`` to ``dtype``) and no Hub kernels.
    transformers 5 kernelizes models by default with kernels fetched from the Hugging Face Hub: a
    download at run time (refused here), other numerics than the teacher's own layers, and on the
    meta device an error that would hide a teacher's missing weights."""
    # lazy: transformers takes seconds to import; runs without a teacher never need it
    import transformers

    kwargs: dict = {}
    if dtype is not None:
        kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = dtype
    if _from_pretrained_takes("use_kernels"):
        kwargs["use_kernels"] = False
    return kwargs


def check_weights_present(folder: str, weights: list[str], trust_remote_code: bool = False
                          ) -> Optional[int]:
    """Every weight tensor of the teacher is stored, and every weight file is readable.

    The model is "loaded" onto the meta device (no tensor is read or allocated), so transformers'
    own key matching (base-model prefixes, legacy names, tied weights) decides what is missing.
    Returns the parameter count, or None when the architecture cannot be built on meta."""
    # lazy: transformers takes seconds to import; runs without a teacher never need it
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    for w in weights:
        _check_weight_file(w)
    previous, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report is replaced by our error below
    hf_logging.disable_progress_bar()
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            folder, device_map="meta", output_loading_info=True, local_files_only=True,
            trust_remote_code=trust_remote_code, **model_load_kwargs())
    except Exception:  # every file is readable: an architecture meta loading does not support
        return None
    finally:
        hf_logging.set_verbosity(previous)
        if bar:
            hf_logging.enable_progress_bar()
    missing = sorted(loading.get("missing_keys") or [])
    total = len({id(p) for p in model.parameters()})
    if missing:
        raise ValueError(missing_weights_message(folder, missing, total))
    return sum(p.numel() for p in model.parameters())


def inspect_teacher(
    path: Union[str, os.PathLike],
    layer: int = -1,
    trust_remote_code: bool = False,
    read_tokenizer: bool = True,
    seq_length: Optional[int] = None,
    bos: bool = False,
) -> TeacherInfo:
    """Describe and validate a teacher folder without loading its weights (run preflight, dry runs).

    Checked: a causal LM (no encoder), ``layer`` within its depth, its maximum positions against
    ``seq_length`` (when given; plus one for the BOS token with ``bos=True`` when the teacher's
    tokenizer adds one, as ``TeacherConfig.bos`` does), and every weight tensor present in readable
    weight files (file headers only).

    Raises:
        FileNotFoundError: folder, config.json or weight files missing.
        ValueError: not a causal LM, ``layer`` outside the teacher's depth, too few positions,
            missing tensors, or an unreadable config/weight file (naming it).
    """
    folder = check_teacher_folder(path)
    # lazy: transformers takes seconds to import; runs without a teacher never need it
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:  # garbage JSON, unknown model_type
        raise ValueError(f"teacher config {folder / 'config.json'} is unreadable: {err}") from None
    check_causal_lm(config, str(folder), trust_remote_code)
    num_layers = config_num_layers(config)
    resolved = resolve_layer(layer, num_layers)
    positions = teacher_max_positions(config)
    if seq_length is not None and positions is not None and positions[1] < seq_length:
        raise ValueError(
            f"teacher {str(folder)!r} (--teacher-path) handles at most {positions[1]} positions "
            f"({positions[0]} in config.json) but --seq-length is {seq_length}"
        )
    if (bos and seq_length is not None and positions is not None and positions[1] == seq_length
            and teacher_bos_token_id(folder) is not None):
        raise ValueError(
            f"teacher {str(folder)!r} (--teacher-path) handles at most {positions[1]} positions "
            f"({positions[0]} in config.json) but reads --seq-length {seq_length} + the BOS token "
            "its tokenizer adds: shorten --seq-length or pass --no-teacher-bos"
        )
    weights, _ = find_weight_files(folder)
    num_parameters = check_weights_present(str(folder), weights, trust_remote_code)
    if num_parameters is None:
        num_parameters = _count_parameters_meta(config, trust_remote_code)
    return TeacherInfo(
        path=str(folder),
        model_type=str(getattr(config, "model_type", "")),
        architectures=list(getattr(config, "architectures", None) or []),
        hidden_size=config_hidden_size(config, final=resolved == num_layers),
        num_layers=num_layers,
        vocab_size=config_vocab_size(config),
        num_parameters=num_parameters,
        weight_files=[os.path.basename(w) for w in weights],
        tokenizer_size=teacher_tokenizer_size(folder) if read_tokenizer else None,
        layer=resolved,
    )


def check_vocab_compatible(
    teacher_vocab: int,
    student_vocab: int,
    padded_student_vocab: int,
    teacher_tokenizer_size: Optional[int] = None,
) -> int:
    """Check that student and teacher share a vocabulary; return the shared size.

    Args:
        teacher_vocab: rows of the teacher's embedding (``config.vocab_size``).
        student_vocab: the student's real (unpadded) vocabulary size, i.e. its tokenizer's size.
        padded_student_vocab: the student's embedding rows after padding for TP divisibility.
        teacher_tokenizer_size: ``len(tokenizer)`` of the teacher's tokenizer, if it has one. A
            teacher's embedding may be padded beyond its tokenizer (Qwen2: 151936 rows for 151665
            tokens); the student may then match either number.

    Returns:
        The number of leading vocabulary entries both models share (the columns to compare in KD).
        Student columns beyond it (padding) and teacher columns beyond it must be masked.
    """
    for name, value in (
        ("teacher_vocab", teacher_vocab),
        ("student_vocab", student_vocab),
        ("padded_student_vocab", padded_student_vocab),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if padded_student_vocab < student_vocab:
        raise ValueError(
            f"padded student vocabulary ({padded_student_vocab}) is smaller than the student "
            f"vocabulary ({student_vocab})"
        )
    if teacher_tokenizer_size is not None and teacher_tokenizer_size > teacher_vocab:
        raise ValueError(
            f"teacher tokenizer has {teacher_tokenizer_size} tokens but its embedding only "
            f"{teacher_vocab} rows: the teacher folder is inconsistent"
        )
    if student_vocab == teacher_vocab or student_vocab == teacher_tokenizer_size:
        return student_vocab
    tok = f" (tokenizer: {teacher_tokenizer_size} tokens)" if teacher_tokenizer_size is not None else ""
    raise ValueError(
        f"student vocabulary size {student_vocab} (padded to {padded_student_vocab}) differs from "
        f"the teacher's vocabulary size {teacher_vocab}{tok}: logit distillation and the paper's "
        "setup need the student to use the teacher's tokenizer"
    )
