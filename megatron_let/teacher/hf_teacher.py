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
import inspect
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from megatron_let.runtime import device as device_policy
from megatron_let.teacher.compile import check_compile_available, compile_blocks, release_compiled
from megatron_let.teacher.inspection import (
    config_hidden_size,
    config_num_layers,
    config_vocab_size,
    find_weight_files,
    inspect_teacher,
    missing_weights_message,
    model_load_kwargs,
    resolve_layer,
    teacher_bos_token_id,
    teacher_max_positions,
    text_config,
)

__all__ = [
    "TeacherConfig",
    "HFTeacher",
    "resolve_dtype",
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
            :func:`~megatron_let.teacher.inspection.teacher_bos_token_id`); ``--no-teacher-bos``
            turns it off.
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


def resolve_dtype(dtype: str, device: Union[str, torch.device]) -> torch.dtype:
    """"auto" -> bf16 on CUDA, fp32 elsewhere; otherwise the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"teacher dtype {dtype!r} is not one of 'auto', {sorted(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[dtype]

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
        self._num_layers = config_num_layers(config)
        self._layer = resolve_layer(cfg.layer, self._num_layers)
        self._hidden_size = config_hidden_size(config, final=self._layer == self._num_layers)
        self._vocab_size = config_vocab_size(config)
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
        # lazy: transformers takes seconds to import; runs without a teacher never need it
        from transformers import AutoModelForCausalLM, PreTrainedModel

        _, safetensors = find_weight_files(cfg.path)
        kwargs: dict[str, Any] = dict(
            local_files_only=True,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True if safetensors else None,
        )
        if _supports_kwarg(PreTrainedModel.from_pretrained, "weights_only"):
            kwargs["weights_only"] = True
        kwargs.update(model_load_kwargs(dtype))
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
            raise ValueError(missing_weights_message(info.path, missing, total))
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
        return config_hidden_size(self.model.config, final=True)

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
        text = text_config(self.model.config)
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
            release_compiled(self._compiled_blocks)
            self._compiled_blocks = []
        self._model = None
        self._base = None
        self._layers = None
        gc.collect()
        device_policy.release_cached_memory(self._device)

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
        # lazy: transformers takes seconds to import; runs without a teacher never need it
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
