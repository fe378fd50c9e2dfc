"""Frozen Hugging Face teacher for LET alignment and logit distillation.

The teacher is any ``AutoModelForCausalLM`` stored in a *local* folder (no network access is ever
attempted: every load passes ``local_files_only=True``). It is frozen, in eval mode, and only ever
run under ``torch.no_grad()``.

Layer convention (``TeacherConfig.layer``), identical to Hugging Face's ``output_hidden_states``:

* ``layer=-1`` (default) or ``layer=num_layers``: the model's *final* hidden state, i.e.
  ``outputs.hidden_states[-1]`` == ``base_model(...).last_hidden_state``. For Llama-like models
  (SmolLM2, Qwen2, Gemma3) and GPT-NeoX/OPT this is *after* the final norm.
* ``layer=L`` with ``1 <= L < num_layers``: the raw output of the L-th transformer block
  (1-based), i.e. ``outputs.hidden_states[L]`` (before any final norm). Only blocks 1..L run.

``hidden_states[0]`` (the embedding output) is not a transformer layer and is not selectable.

BOS (``TeacherConfig.bos``, on by default): when the teacher's own tokenizer starts every encoded
text with a BOS token (Gemma, Llama-2; not SmolLM2/GPT-2 style BPE), that token is prepended to
every input row and its output position dropped, so outputs stay aligned with the input positions.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = [
    "TeacherConfig",
    "TeacherInfo",
    "HFTeacher",
    "inspect_teacher",
    "resolve_layer",
    "resolve_dtype",
    "find_weight_files",
    "teacher_tokenizer_size",
    "teacher_bos_token_id",
    "check_vocab_compatible",
    "check_causal_lm",
    "teacher_max_positions",
    "check_finite_weights",
]

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass
class TeacherConfig:
    """Where the teacher lives and how to run it.

    Attributes:
        path: local folder holding ``config.json`` and the weights (``--teacher-path``).
        layer: 1-based teacher layer whose output is used; -1 = final hidden state (see module doc).
        dtype: "auto" (bf16 on CUDA, fp32 on CPU), "float32", "bfloat16" or "float16".
        trust_remote_code: allow model code shipped in the folder to run. Off by default: it executes
            arbitrary Python from the folder.
        bos: prepend the teacher tokenizer's BOS token when its encoding adds one (see
            :func:`teacher_bos_token_id`); ``--no-teacher-bos`` turns it off.
        compile: run the teacher's blocks under ``torch.compile`` (``--teacher-compile``, see
            :mod:`megatron_let.teacher.compile`).
    """

    path: str
    layer: int = -1
    dtype: str = "auto"
    trust_remote_code: bool = False
    bos: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise ValueError("TeacherConfig.path must be a non-empty folder path (--teacher-path)")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise ValueError(f"TeacherConfig.layer must be an int, got {self.layer!r}")
        if self.layer != -1 and self.layer < 1:
            raise ValueError(
                f"TeacherConfig.layer={self.layer} is invalid: use -1 for the final hidden state or a "
                "1-based layer index >= 1"
            )
        if self.dtype != "auto" and self.dtype not in _DTYPE_NAMES:
            raise ValueError(
                f"TeacherConfig.dtype={self.dtype!r} is not one of 'auto', {sorted(_DTYPE_NAMES)}"
            )


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


def _check_folder(path: Union[str, os.PathLike]) -> Path:
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


def _text_config(config: Any) -> Any:
    """The decoder's config (multimodal configs such as Gemma3Config nest it)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _config_int(config: Any, names: tuple[str, ...], what: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(f"teacher config ({type(config).__name__}) has no {what} (looked for {names})")


def _num_layers(config: Any) -> int:
    return _config_int(_text_config(config), ("num_hidden_layers", "n_layer", "num_layers"), "layer count")


def _hidden_size(config: Any, final: bool) -> int:
    text = _text_config(config)
    size = _config_int(text, ("hidden_size", "n_embd", "d_model"), "hidden size")
    # OPT-350m projects its final hidden state down to the embedding width.
    proj = getattr(text, "word_embed_proj_dim", None)
    if final and isinstance(proj, int) and proj != size:
        return proj
    return size


def _vocab_size(config: Any) -> int:
    return _config_int(_text_config(config), ("vocab_size",), "vocab_size")


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


def resolve_dtype(dtype: str, device: Union[str, torch.device]) -> torch.dtype:
    """"auto" -> bf16 on CUDA, fp32 elsewhere; otherwise the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"teacher dtype {dtype!r} is not one of 'auto', {sorted(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[dtype]


def teacher_tokenizer_size(path: Union[str, os.PathLike]) -> Optional[int]:
    """``len(tokenizer)`` for the tokenizer stored in the teacher folder, or None if there is none."""
    folder = Path(path)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return len(tokenizer)


def teacher_bos_token_id(path: Union[str, os.PathLike]) -> Optional[int]:
    """The BOS id the teacher folder's tokenizer puts before every encoded text, else None.

    Decided by encoding a probe text with and without special tokens (what the tokenizer really
    does, whatever its ``add_bos_token`` attribute says). None when the folder has no tokenizer,
    the tokenizer has no BOS token, or its encoding does not add it.
    """
    folder = Path(path)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    bos = tokenizer.bos_token_id
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
    text = _text_config(config)
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
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                f.keys()
            return
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    except Exception as err:
        raise ValueError(f"teacher weight file {path} is unreadable (corrupt or not a weight file): "
                         f"{type(err).__name__}: {err}") from None


def _format_missing(folder: str, missing: list[str], total: int) -> str:
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    return (f"teacher {folder!r} (--teacher-path) lacks {len(missing)} of its {total} weight tensors "
            f"({shown}): transformers would initialise them randomly; the folder is incomplete")


def check_weights_present(folder: str, weights: list[str], trust_remote_code: bool = False
                          ) -> Optional[int]:
    """Every weight tensor of the teacher is stored, and every weight file is readable.

    The model is "loaded" onto the meta device (no tensor is read or allocated), so transformers'
    own key matching (base-model prefixes, legacy names, tied weights) decides what is missing.
    Returns the parameter count, or None when the architecture cannot be built on meta."""
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
            trust_remote_code=trust_remote_code)
    except Exception:  # every file is readable: an architecture meta loading does not support
        return None
    finally:
        hf_logging.set_verbosity(previous)
        if bar:
            hf_logging.enable_progress_bar()
    missing = sorted(loading.get("missing_keys") or [])
    total = len({id(p) for p in model.parameters()})
    if missing:
        raise ValueError(_format_missing(folder, missing, total))
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
    folder = _check_folder(path)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:  # garbage JSON, unknown model_type
        raise ValueError(f"teacher config {folder / 'config.json'} is unreadable: {err}") from None
    check_causal_lm(config, str(folder), trust_remote_code)
    num_layers = _num_layers(config)
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
        hidden_size=_hidden_size(config, final=resolved == num_layers),
        num_layers=num_layers,
        vocab_size=_vocab_size(config),
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


# ----------------------------------------------------------------------------------------------
# Runtime
# ----------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a forward hook to end the teacher forward early, carrying the layer output."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__("teacher forward stopped after the requested layer")
        self.output = output


def _find_layer_list(base: nn.Module, num_layers: int) -> nn.ModuleList:
    """The ModuleList of transformer blocks inside a base model (Llama: .layers, OPT: .decoder.layers)."""
    for dotted in ("layers", "h", "decoder.layers", "blocks", "layer", "encoder.layer"):
        module: Any = base
        for part in dotted.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    candidates = [
        (name, m)
        for name, m in base.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == num_layers
    ]
    if not candidates:
        raise ValueError(
            f"cannot find the {num_layers} transformer blocks inside {type(base).__name__}; "
            "middle-layer extraction is not supported for this architecture (use layer=-1)"
        )
    return min(candidates, key=lambda item: item[0].count("."))[1]


def _supports_kwarg(fn: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def check_finite_weights(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """NaN/inf teacher weights would poison every student step: refuse them once, at load."""
    bad = [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"teacher {str(path)!r} has non-finite (NaN/inf) weights in {len(bad)} "
                         f"tensor(s), e.g. {', '.join(bad[:3])}")


class HFTeacher:
    """A frozen, eval-mode Hugging Face causal LM that serves hidden states and logits."""

    def __init__(self, model: nn.Module, cfg: TeacherConfig) -> None:
        """Wrap an already-loaded model (use :meth:`load` to read one from a folder)."""
        self.cfg = cfg
        self._model: Optional[nn.Module] = model
        config = model.config
        self._num_layers = _num_layers(config)
        self._layer = resolve_layer(cfg.layer, self._num_layers)
        self._hidden_size = _hidden_size(config, final=self._layer == self._num_layers)
        self._vocab_size = _vocab_size(config)
        self._device = next(model.parameters()).device
        self._dtype = next(model.parameters()).dtype
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        self._num_parameters = sum(p.numel() for p in model.parameters())
        base = model.base_model
        self._base: Optional[nn.Module] = base
        self._layers: Optional[nn.ModuleList] = (
            None if self._layer == self._num_layers else _find_layer_list(base, self._num_layers)
        )
        # BOS prefix (module doc): outputs drop the first ``_prefix`` positions
        self._bos_token_id = teacher_bos_token_id(cfg.path) if cfg.bos else None
        self._prefix = 0 if self._bos_token_id is None else 1
        positions = teacher_max_positions(config)
        self._max_positions = positions[1] if positions is not None else None
        self._head_ok: Optional[bool] = None  # vocabulary-sliced LM head checked (first use)
        self._compiled_blocks: list = []  # reset at release (teacher/compile.py)
        if cfg.compile:
            from megatron_let.teacher.compile import check_compile_available, compile_blocks

            check_compile_available(self._device)
            blocks = self._layers if self._layers is not None else _find_layer_list(base, self._num_layers)
            self._compiled_blocks = list(blocks)[: self._layer]  # the blocks after layer k never run
            compile_blocks(self._compiled_blocks)

    @classmethod
    def load(cls, cfg: TeacherConfig, device: Union[str, torch.device] = "cpu") -> "HFTeacher":
        """Load the teacher from ``cfg.path`` onto ``device``; never touches the network.

        Safetensors weights are loaded with ``use_safetensors=True``. ``pytorch_model*.bin`` weights
        go through ``torch.load(weights_only=True)``: transformers >= 4.50 does so by default and we
        pass ``weights_only=True`` explicitly where ``from_pretrained`` accepts it.
        """
        device = torch.device(device)
        info = inspect_teacher(
            cfg.path, cfg.layer, trust_remote_code=cfg.trust_remote_code, read_tokenizer=False
        )
        dtype = resolve_dtype(cfg.dtype, device)
        from transformers import AutoModelForCausalLM

        _, safetensors = find_weight_files(cfg.path)
        kwargs: dict[str, Any] = dict(
            local_files_only=True,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True if safetensors else None,
        )
        from transformers import PreTrainedModel

        if _supports_kwarg(PreTrainedModel.from_pretrained, "weights_only"):
            kwargs["weights_only"] = True
        # transformers 5 renamed torch_dtype to dtype (the old name still works with a warning).
        kwargs["dtype" if _transformers_major() >= 5 else "torch_dtype"] = dtype
        try:
            model, loading = AutoModelForCausalLM.from_pretrained(
                info.path, output_loading_info=True, **kwargs)
        except Exception as err:  # e.g. SafetensorError, which names no file
            raise ValueError(f"teacher weights in {info.path} ({', '.join(info.weight_files)}) "
                             f"could not be loaded: {type(err).__name__}: {err}") from err
        # the authoritative check behind inspect_teacher's header comparison: transformers
        # initialises missing tensors randomly and only prints a report
        missing = sorted(loading.get("missing_keys") or [])
        if missing:
            total = len({id(p) for p in model.parameters()})
            raise ValueError(_format_missing(info.path, missing, total))
        model.to(device)
        check_finite_weights(model, info.path)  # on the device: fast on GPU
        return cls(model, cfg)

    # ------------------------------------------------------------------ properties
    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("teacher released")
        return self._model

    @property
    def hidden_size(self) -> int:
        """Width of the tensors :meth:`hidden_states` returns."""
        return self._hidden_size

    @property
    def final_hidden_size(self) -> int:
        """Width of the final hidden state (what the LM head reads, :meth:`final_hidden_states`)."""
        return _hidden_size(self.model.config, final=True)

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def layer(self) -> int:
        """Resolved 1-based layer (``num_layers`` for the final hidden state)."""
        return self._layer

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def num_parameters(self) -> int:
        return self._num_parameters

    @property
    def bos_token_id(self) -> Optional[int]:
        """The BOS id prepended to every input, or None (no BOS convention, or ``bos=False``)."""
        return self._bos_token_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    # ------------------------------------------------------------------ forward
    def _check_inputs(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self._model is None:
            raise RuntimeError("teacher released")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be a 2-D [batch, seq] tensor, got "
                f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}"
            )
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty")
        # Checked on the device without a host sync (it runs every micro-batch): on CPU it raises
        # at once; on a GPU it is a device-side assert reported at the next synchronisation.
        torch._assert_async(
            ((input_ids >= 0) & (input_ids < self._vocab_size)).all(),
            f"input_ids contain token ids outside [0, {self._vocab_size}): the teacher vocabulary "
            f"has {self._vocab_size} entries",
        )
        length = input_ids.shape[1] + self._prefix
        if self._max_positions is not None and length > self._max_positions:
            bos = f" ({input_ids.shape[1]} + the BOS token)" if self._prefix else ""
            raise ValueError(
                f"teacher input of {length} tokens{bos} exceeds the teacher's "
                f"{self._max_positions} positions: shorten --seq-length"
                + (" or pass --no-teacher-bos" if self._prefix else "")
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        # host-to-device copies never wait for the device (asynchronous from pinned memory)
        input_ids = input_ids.to(self._device, dtype=torch.long, non_blocking=True)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self._device, non_blocking=True)
        return input_ids, attention_mask

    def _with_bos(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Prepend the BOS column (attended) when the teacher's convention has one."""
        if self._bos_token_id is None:
            return input_ids, attention_mask
        rows = input_ids.shape[0]
        input_ids = torch.cat([input_ids.new_full((rows, 1), self._bos_token_id), input_ids], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones((rows, 1)), attention_mask], dim=1)
        return input_ids, attention_mask

    def _final_hidden(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The base model's last hidden state (what the LM head reads); call under no_grad."""
        assert self._base is not None
        if self._base is self._model:  # no separate base model (unusual remote code)
            with _one_sequence_per_row():
                out = self._base(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                    output_hidden_states=True,
                )
            return out.hidden_states[-1]
        with _one_sequence_per_row():
            out = self._base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Teacher hidden state at ``cfg.layer``: ``[batch, seq, hidden_size]``, no grad.

        Only the blocks up to the requested layer run; the LM head never runs. With a BOS
        convention the teacher reads ``[BOS] + input_ids`` and the BOS position is dropped.
        """
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask)
        input_ids, attention_mask = self._with_bos(input_ids, attention_mask)
        # no_grad rather than inference_mode: the result is used as a constant inside the
        # student's autograd graph, which inference tensors are not allowed to enter.
        with torch.no_grad():
            if self._layers is None:
                return self._final_hidden(input_ids, attention_mask)[:, self._prefix:]
            handle = self._layers[self._layer - 1].register_forward_hook(_raise_output)
            try:
                assert self._base is not None
                with _one_sequence_per_row():
                    self._base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopForward as stop:
                return stop.output[:, self._prefix:]
            finally:
                handle.remove()
        raise RuntimeError(
            f"teacher layer {self._layer} never ran during the forward of {type(self._base).__name__}"
        )

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        vocab_range: Optional[tuple[int, int]] = None,
    ) -> torch.Tensor:
        """Logits ``[batch, seq, vocab_size]`` under no_grad; with ``vocab_range=(start, stop)``
        only columns ``start..stop-1`` (``[batch, seq, stop - start]``).

        A vocabulary slice is the final hidden state times those rows of the LM head (plus the
        family's logit post-processing: Gemma's soft-capping, Cohere's / Granite's scaling), so the
        full-vocabulary tensor never exists; an empty range runs nothing. The first sliced call
        checks this against the model's own forward on a few tokens and, for an architecture
        whose logits it does not reproduce, warns and slices the full logits instead.
        """
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask)
        start, stop = self._check_vocab_range(vocab_range)
        if vocab_range is None and not self._prefix:
            with torch.no_grad(), _one_sequence_per_row():
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits
        if start == stop:  # this rank's shard is all padding: nothing to compute
            return torch.empty((*input_ids.shape, 0), dtype=self._dtype, device=self._device)
        input_ids, attention_mask = self._with_bos(input_ids, attention_mask)
        with torch.no_grad():
            if self._sliced_head_ok(input_ids):
                hidden = self._final_hidden(input_ids, attention_mask)[:, self._prefix:]
                return self._head_logits(hidden, start, stop)
            with _one_sequence_per_row():
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits[:, self._prefix:, start:stop].contiguous()

    def final_hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final hidden state ``[batch, seq, final_hidden_size]`` the LM head reads (BOS
        position dropped), under no_grad: :meth:`head_logits` turns it into a vocabulary slice,
        so TP ranks can exchange it instead of logits (teacher/step_prefetch.py)."""
        input_ids, _ = self._check_inputs(input_ids, None)
        input_ids, _ = self._with_bos(input_ids, None)
        with torch.no_grad():
            return self._final_hidden(input_ids, None)[:, self._prefix:]

    def head_logits(self, final_hidden: torch.Tensor,
                    vocab_range: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Columns ``vocab_range`` of the logits for a :meth:`final_hidden_states` output: the
        same values :meth:`logits` returns (when :meth:`sliced_head_ok`)."""
        start, stop = self._check_vocab_range(vocab_range)
        if start == stop:
            return final_hidden.new_empty((*final_hidden.shape[:2], 0))
        with torch.no_grad():
            return self._head_logits(final_hidden, start, stop)

    def sliced_head_ok(self, input_ids: torch.Tensor) -> bool:
        """Whether :meth:`head_logits` reproduces this family's logits (checked once)."""
        input_ids, _ = self._check_inputs(input_ids, None)
        input_ids, _ = self._with_bos(input_ids, None)
        return self._sliced_head_ok(input_ids)

    def _check_vocab_range(self, vocab_range: Optional[tuple[int, int]]) -> tuple[int, int]:
        if vocab_range is None:
            return 0, self._vocab_size
        try:
            start, stop = (int(v) for v in vocab_range)
        except (TypeError, ValueError):
            raise ValueError(f"vocab_range must be a (start, stop) pair, got {vocab_range!r}") from None
        if not 0 <= start <= stop <= self._vocab_size:
            raise ValueError(
                f"vocab_range ({start}, {stop}) is outside the teacher vocabulary "
                f"[0, {self._vocab_size}]"
            )
        return start, stop

    def _head_logits(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Columns ``start..stop-1`` of the LM head's output for ``hidden`` (rows of its weight)."""
        head = self.model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        logits = torch.nn.functional.linear(
            hidden, head.weight[start:stop], None if bias is None else bias[start:stop]
        )
        # the same element-wise steps, in the same order, as the families' own forward
        text = _text_config(self.model.config)
        cap = getattr(text, "final_logit_softcapping", None)
        if cap is not None:  # Gemma 2/3
            logits = logits / cap
            logits = torch.tanh(logits)
            logits = logits * cap
        scale = getattr(self.model, "logit_scale", None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):  # Cohere
            logits = logits * scale
        scaling = getattr(text, "logits_scaling", None)
        if isinstance(scaling, (int, float)) and not isinstance(scaling, bool):  # Granite
            logits = logits / scaling
        return logits

    def _sliced_head_ok(self, input_ids: torch.Tensor) -> bool:
        """Whether :meth:`_head_logits` reproduces this model's logits; checked once, on up to 16
        tokens of the first row (no mask: the comparison is of the head, not of the masking)."""
        if self._head_ok is None:
            head = self.model.get_output_embeddings()
            ok = self._base is not self._model and isinstance(
                getattr(head, "weight", None), torch.Tensor
            )
            diff = float("nan")
            if ok:
                probe = input_ids[:1, :16]
                # eager: a check of the head, at a shape --teacher-compile need not compile for
                with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                    ref = self.model(input_ids=probe, use_cache=False).logits.float()
                    got = self._head_logits(self._final_hidden(probe, None), 0, self._vocab_size)
                diff = float((got.float() - ref).abs().max()) if got.shape == ref.shape else float("inf")
                # half-precision matmuls of a weight slice may round differently in the last bit
                tol = (1e-4 if self._dtype == torch.float32 else 2e-2) * max(1.0, float(ref.abs().max()))
                ok = diff <= tol
            if not ok:
                print(
                    f"[megatron_let] warning: the vocabulary-sliced LM head does not reproduce "
                    f"{type(self.model).__name__}'s logits (max difference {diff:.3g}); the "
                    "teacher computes full logits and slices them (no memory saving)",
                    flush=True,
                )
            self._head_ok = ok
        return self._head_ok

    def release(self) -> None:
        """Drop the model and free its memory; later forwards raise RuntimeError("teacher released")."""
        if self._compiled_blocks:  # dynamo's caches outlive the module unless reset
            from megatron_let.teacher.compile import release_compiled

            release_compiled(self._compiled_blocks)
            self._compiled_blocks = []
        self._model = None
        self._base = None
        self._layers = None
        gc.collect()
        if self._device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __repr__(self) -> str:
        state = "loaded" if self.is_loaded else "released"
        return (
            f"HFTeacher(path={self.cfg.path!r}, layer={self._layer}/{self._num_layers}, "
            f"hidden={self._hidden_size}, vocab={self._vocab_size}, params={self._num_parameters}, "
            f"dtype={self._dtype}, device={self._device}, {state})"
        )


def _no_packed_sequences(position_ids: Any) -> None:
    return None


@contextlib.contextmanager
def _one_sequence_per_row():
    """The teacher's forwards skip transformers' packed-sequence probe of ``position_ids``.

    transformers' mask preparation (``masking_utils.find_packed_sequence_indices``) tests the
    positions with a data-dependent ``.all()``: a host-device sync in every teacher forward, which
    on GPU stalls the host until the side stream has caught up (``--teacher-overlap`` then overlaps
    nothing). The teacher never passes ``position_ids``: the model makes them 0..s-1, one
    sequence per row, where the probe returns None - what this returns without looking."""
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    real = getattr(masking_utils, "find_packed_sequence_indices", None)
    if real is None:  # another transformers version: nothing to skip
        yield
        return
    masking_utils.find_packed_sequence_indices = _no_packed_sequences
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = real


def _raise_output(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook: stop the forward right after this block, handing its hidden state out."""
    raise _StopForward(output[0] if isinstance(output, (tuple, list)) else output)


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])
