"""megatron_let <-> Hugging Face ``LlamaForCausalLM``: configs, state dicts, folders, tokenizers.

Layouts (megatron-core local spec, TP=1/PP=1, as built by :func:`megatron_let.model.llama.build_student`):

* ``decoder.layers.{i}.self_attention.linear_qkv.weight`` is the fused QKV projection whose rows are
  grouped per KV group: ``[q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]``;
  HF keeps ``q_proj``/``k_proj``/``v_proj`` separately. Both use the rotate-half RoPE convention,
  so no row permutation is needed.
* ``mlp.linear_fc1.weight`` is ``[gate; up]`` stacked along rows (HF ``gate_proj``/``up_proj``).
* The embedding and output layer carry the padded vocabulary (``LlamaConfig.padded_vocab_size``);
  HF gets only the first ``vocab_size`` rows, and the padded rows are filled with zeros on import.

Everything here is plain tensor manipulation: no process group is needed, except by
:func:`shard_for_rank`'s caller, which picks the rank.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import sentencepiece
import torch
import transformers
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import decoders, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from megatron_let.data.tokenizers import build_tokenizer
from megatron_let.model.llama import LlamaConfig

DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Weight dtypes an exported folder may use (names as in ``config.json``'s ``torch_dtype``)."""

SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                      "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                      "chat_template.jinja")

# Probe texts used to check that an exported sentencepiece tokenizer encodes like the original.
TOKENIZER_PROBES = (
    "Hello world, this is a test.",
    "  leading spaces and\nnewlines\n\nhere",
    " signs",
    "ünïcödé — 漢字 emoji 🎉",
    "The quick brown fox.  Two  spaces, digits 1234567 and\ttabs.",
    "end with space ",
)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def _rope_theta(hf: Mapping) -> float:
    """rope_theta from a config.json dict (transformers 4: top level; 5: ``rope_parameters``)."""
    params = hf.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(hf.get("rope_theta", 10000.0))


def _check_supported(hf: Mapping, where: str) -> None:
    """Refuse Llama variants megatron_let's student cannot represent, naming the offending field."""
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise ValueError(
            f"{where}: model_type {hf.get('model_type')!r} (architectures {archs}) is not a Llama "
            "causal LM; only LlamaForCausalLM folders can be imported"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (LLaMA uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{where}: {flag}=true is not supported (the student has no biases)")
    head_dim = hf.get("head_dim")  # any value: the student's --kv-channels
    if head_dim is not None and int(head_dim) <= 0:
        raise ValueError(f"{where}: head_dim {head_dim} must be > 0")
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")
    scaling = hf.get("rope_scaling")
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", rope_type))
    if rope_type != "default":
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (only plain RoPE)")


def llama_config_from_hf(hf: Mapping, seq_length: Optional[int] = None,
                         make_vocab_size_divisible_by: int = 128, where: str = "config.json") -> LlamaConfig:
    """The student architecture equal to a HF Llama ``config.json`` dict.

    ``seq_length`` defaults to ``max_position_embeddings`` (HF configs do not record the training
    sequence length; evaluation and training take theirs from the command line anyway).
    """
    _check_supported(hf, where)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size", "max_position_embeddings"):
        if key not in hf:
            raise ValueError(f"{where}: missing {key!r}")
    heads = int(hf["num_attention_heads"])
    kv = int(hf.get("num_key_value_heads") or heads)
    theta = _rope_theta(hf)
    max_pos = int(hf["max_position_embeddings"])
    if seq_length is not None and seq_length > max_pos:
        raise ValueError(f"--seq-length {seq_length} exceeds max_position_embeddings {max_pos} of {where}")
    return LlamaConfig(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=None if kv == heads else kv,
        seq_length=seq_length or max_pos,
        max_position_embeddings=max_pos,
        vocab_size=int(hf["vocab_size"]),
        untie_embeddings_and_output_weights=not bool(hf.get("tie_word_embeddings", False)),
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        kv_channels=int(hf["head_dim"]) if hf.get("head_dim") else None,
    )


def hf_config_dict(cfg: LlamaConfig, dtype: str = "float32", bos_token_id: Optional[int] = None,
                   eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None) -> dict:
    """``config.json`` of the ``LlamaForCausalLM`` equal to ``cfg`` (unpadded vocabulary).

    Built through ``transformers.LlamaConfig`` so the installed transformers fills its defaults;
    ``rope_theta`` and ``torch_dtype`` are also written at the top level so that both transformers 4
    and 5 (which moved them to ``rope_parameters``/``dtype``) read them.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    heads = cfg.num_attention_heads
    # what LlamaForCausalLM cannot express (Megatron-LM flags the student honours)
    if getattr(cfg, "rotary_percent", 1.0) != 1.0:
        raise ValueError(f"--rotary-percent {cfg.rotary_percent}: LlamaForCausalLM rotates every "
                         "head dimension; this student cannot be exported as Llama")
    if getattr(cfg, "apply_layernorm_1p", False):
        raise ValueError("--apply-layernorm-1p: the student's norm weights are zero-centred; the "
                         "Llama export does not convert them")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=cfg.num_query_groups or heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_method_std,
        rms_norm_eps=cfg.norm_epsilon,
        rope_theta=float(cfg.rotary_base),
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    d = hf_cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    d["model_type"] = "llama"
    d["rope_theta"] = float(cfg.rotary_base)
    d["torch_dtype"] = dtype
    d["dtype"] = dtype
    d["transformers_version"] = transformers.__version__
    return d


# ---------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------

def _attn_dims(cfg: LlamaConfig):
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    return heads, groups, cfg.head_dim  # --kv-channels (default hidden / heads)


def _take(sd: Mapping[str, torch.Tensor], key: str, shape: Sequence[int], source: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"{source} has no tensor {key!r}")
    t = sd[key]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{source}: {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def megatron_to_hf(sd: Mapping[str, torch.Tensor], cfg: LlamaConfig,
                   dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """Full (TP=1/PP=1) megatron state dict -> HF ``LlamaForCausalLM`` state dict.

    The embedding/output rows beyond ``cfg.vocab_size`` (megatron's padding) are dropped. Tied
    models get no ``lm_head.weight`` (HF re-ties it on load). Tensors are fresh copies.
    """
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    heads, groups, hd = _attn_dims(cfg)
    per_group = heads // groups
    padded = cfg.padded_vocab_size()
    src = "megatron state dict"

    def emb_rows(key: str) -> torch.Tensor:
        t = sd.get(key)
        if t is None:
            raise ValueError(f"{src} has no tensor {key!r}")
        if t.dim() != 2 or t.shape[1] != h or t.shape[0] < v:
            raise ValueError(f"{src}: {key!r} has shape {tuple(t.shape)}, expected [>= {v}, {h}] "
                             f"(vocab_size {v}, padded {padded})")
        return t[:v]

    out: Dict[str, torch.Tensor] = {"model.embed_tokens.weight": emb_rows("embedding.word_embeddings.weight")}
    for i in range(cfg.num_layers):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = _take(sd, p + "self_attention.linear_qkv.weight", ((heads + 2 * groups) * hd, h), src)
        qkv = qkv.view(groups, (per_group + 2) * hd, h)
        out[q + "self_attn.q_proj.weight"] = qkv[:, : per_group * hd].reshape(heads * hd, h)
        out[q + "self_attn.k_proj.weight"] = qkv[:, per_group * hd: (per_group + 1) * hd].reshape(groups * hd, h)
        out[q + "self_attn.v_proj.weight"] = qkv[:, (per_group + 1) * hd:].reshape(groups * hd, h)
        out[q + "self_attn.o_proj.weight"] = _take(sd, p + "self_attention.linear_proj.weight", (h, heads * hd), src)
        gate, up = _take(sd, p + "mlp.linear_fc1.weight", (2 * f, h), src).chunk(2, dim=0)
        out[q + "mlp.gate_proj.weight"] = gate
        out[q + "mlp.up_proj.weight"] = up
        out[q + "mlp.down_proj.weight"] = _take(sd, p + "mlp.linear_fc2.weight", (h, f), src)
        out[q + "input_layernorm.weight"] = _take(sd, p + "input_layernorm.weight", (h,), src)
        out[q + "post_attention_layernorm.weight"] = _take(sd, p + "pre_mlp_layernorm.weight", (h,), src)
    out["model.norm.weight"] = _take(sd, "decoder.final_layernorm.weight", (h,), src)
    if cfg.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = emb_rows("output_layer.weight")
    return {k: t.detach().to(dtype or t.dtype).contiguous().clone() for k, t in out.items()}


def hf_to_megatron(hf_sd: Mapping[str, torch.Tensor], cfg: LlamaConfig, padded_vocab_size: Optional[int] = None,
                   dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` state dict -> full (TP=1/PP=1 layout) megatron state dict.

    Embedding/output rows are zero-padded to ``padded_vocab_size`` (default: the TP=1 padding).
    A tied HF model whose file nevertheless holds ``lm_head.weight`` is accepted (it equals the
    embedding); an untied one must have it.
    """
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    heads, groups, hd = _attn_dims(cfg)
    per_group = heads // groups
    padded = padded_vocab_size or cfg.padded_vocab_size()
    if padded < v:
        raise ValueError(f"padded_vocab_size {padded} is smaller than vocab_size {v}")
    src = "Hugging Face state dict"

    def pad_rows(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype)
        if padded == v:
            return t.clone()
        return torch.cat([t, torch.zeros(padded - v, h, dtype=dtype)], dim=0)

    out: Dict[str, torch.Tensor] = {
        "embedding.word_embeddings.weight": pad_rows(_take(hf_sd, "model.embed_tokens.weight", (v, h), src))
    }
    for i in range(cfg.num_layers):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        wq = _take(hf_sd, q + "self_attn.q_proj.weight", (heads * hd, h), src).to(dtype)
        wk = _take(hf_sd, q + "self_attn.k_proj.weight", (groups * hd, h), src).to(dtype)
        wv = _take(hf_sd, q + "self_attn.v_proj.weight", (groups * hd, h), src).to(dtype)
        qkv = torch.cat([wq.view(groups, per_group * hd, h), wk.view(groups, hd, h), wv.view(groups, hd, h)], dim=1)
        out[p + "self_attention.linear_qkv.weight"] = qkv.reshape((heads + 2 * groups) * hd, h)
        out[p + "self_attention.linear_proj.weight"] = _take(hf_sd, q + "self_attn.o_proj.weight", (h, heads * hd), src)
        out[p + "mlp.linear_fc1.weight"] = torch.cat([
            _take(hf_sd, q + "mlp.gate_proj.weight", (f, h), src).to(dtype),
            _take(hf_sd, q + "mlp.up_proj.weight", (f, h), src).to(dtype),
        ], dim=0)
        out[p + "mlp.linear_fc2.weight"] = _take(hf_sd, q + "mlp.down_proj.weight", (h, f), src)
        out[p + "input_layernorm.weight"] = _take(hf_sd, q + "input_layernorm.weight", (h,), src)
        out[p + "pre_mlp_layernorm.weight"] = _take(hf_sd, q + "post_attention_layernorm.weight", (h,), src)
    out["decoder.final_layernorm.weight"] = _take(hf_sd, "model.norm.weight", (h,), src)
    if cfg.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = pad_rows(_take(hf_sd, "lm_head.weight", (v, h), src))
    return {k: t.detach().to(dtype).contiguous().clone() for k, t in out.items()}


def megatron_key_is_needed(key: str) -> bool:
    """State-dict entries that hold weights (``_extra_state`` entries are TE/fp8 metadata)."""
    return not key.endswith("_extra_state")


def shard_for_rank(full: Mapping[str, torch.Tensor], local_keys: Iterable[str], cfg: LlamaConfig,
                   tp_rank: int, tp_size: int, layer_offset: int) -> Dict[str, torch.Tensor]:
    """The tensors of one (TP rank, PP stage) model, cut from the full TP=1 state dict.

    ``local_keys`` are the keys of that rank's ``build_student`` model (local layer numbering;
    ``layer_offset`` = index of its first global layer). ``full`` must be padded for ``tp_size``
    (``hf_to_megatron(..., padded_vocab_size=cfg.padded_vocab_size(tp_size))``).
    Slicing follows megatron-core's tensor-parallel layers: column-parallel weights (QKV grouped by
    KV group, fc1 as [gate shard; up shard], vocabulary rows) split rows; row-parallel weights
    (attention output, fc2) split columns; norms are replicated.
    """
    out: Dict[str, torch.Tensor] = {}
    for key in local_keys:
        gkey = key
        if key.startswith("decoder.layers."):
            idx, rest = key[len("decoder.layers."):].split(".", 1)
            gkey = f"decoder.layers.{int(idx) + layer_offset}.{rest}"
        if gkey == "output_layer.weight" and not cfg.untie_embeddings_and_output_weights:
            gkey = "embedding.word_embeddings.weight"  # last stage's copy of the tied embedding
        if gkey not in full:
            raise ValueError(f"no source tensor for parameter {key!r} (global name {gkey!r})")
        t = full[gkey]
        if gkey.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
            t = t.chunk(tp_size, dim=0)[tp_rank]
        elif gkey.endswith("linear_fc1.weight"):
            gate, up = t.chunk(2, dim=0)
            t = torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
        elif gkey.endswith(("linear_proj.weight", "linear_fc2.weight")):
            t = t.chunk(tp_size, dim=1)[tp_rank]
        elif not gkey.endswith("layernorm.weight"):
            raise ValueError(f"do not know how to shard parameter {key!r}")
        out[key] = t.contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face folders
# ---------------------------------------------------------------------------------------------

def dtype_kwargs(dtype: torch.dtype) -> dict:
    """``from_pretrained`` dtype argument: ``dtype`` on transformers >= 4.56, ``torch_dtype`` before."""
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def read_hf_config(hf_dir: str) -> dict:
    """``config.json`` of a local HF folder as a dict (FileNotFoundError names what is missing)."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"--hf {hf_dir!r} is not a folder")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--hf {hf_dir!r} has no config.json")
    with open(path) as f:
        return json.load(f)


def hf_weight_files(hf_dir: str) -> List[str]:
    """The weight files of a HF folder: safetensors (single or sharded) or pytorch_model*.bin."""
    names = sorted(os.listdir(hf_dir))
    safet = [n for n in names if n.endswith(".safetensors")]
    if safet:
        return [os.path.join(hf_dir, n) for n in safet]
    bins = [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
    if bins:
        return [os.path.join(hf_dir, n) for n in bins]
    raise FileNotFoundError(f"--hf {hf_dir!r} has no *.safetensors or pytorch_model*.bin weights")


def read_hf_state_dict(hf_dir: str, keys: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Tensors of a HF folder in their stored dtype; only ``keys`` when given (saves memory on
    pipeline stages that need a few layers)."""
    wanted = None if keys is None else set(keys)
    out: Dict[str, torch.Tensor] = {}
    for path in hf_weight_files(hf_dir):
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    if wanted is None or k in wanted:
                        out[k] = f.get_tensor(k)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            out.update({k: t for k, t in sd.items() if wanted is None or k in wanted})
    return out


def write_hf_model(out_dir: str, config: dict, state_dict: Mapping[str, torch.Tensor],
                   max_shard_bytes: int = 5 * 1024 ** 3) -> List[str]:
    """Write ``config.json``, ``generation_config.json`` and safetensors weights (sharded with an
    index above ``max_shard_bytes``). Returns the weight file names."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)

    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    for stale in os.listdir(out_dir):  # a previous export with another sharding
        if stale.endswith(".safetensors") or stale == SAFETENSORS_INDEX:
            os.remove(os.path.join(out_dir, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

def _sentencepiece_to_hf(model_file: str, out_dir: str, eod_piece: str):
    """A fast HF tokenizer that encodes like the sentencepiece model (add_dummy_prefix, spaces
    kept, byte fallback): transformers' Llama converter builds the BPE model from the .model file,
    then normalizer/pre-tokenizer/decoder are set to sentencepiece's own behaviour (prepend "▁",
    every space -> "▁"), which the converter's Metaspace pre-tokenizer does not reproduce for text
    that starts with a space."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model_file, os.path.join(tmp, "tokenizer.model"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": False,
                       "add_eos_token": False}, f)
        converted = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        backend = converted.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.post_processor = None  # training data had no BOS; do not add one

    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    specials = {}
    for name, idx in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("pad_token", sp.pad_id())):
        if idx >= 0:
            specials[name] = sp.id_to_piece(idx)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eod_piece, **specials)
    tok.save_pretrained(out_dir)
    shutil.copy(model_file, os.path.join(out_dir, "tokenizer.model"))  # the original, for reference
    return tok


def export_tokenizer(tokenizer_info: Mapping, out_dir: str) -> dict:
    """Write the checkpoint's tokenizer into ``out_dir`` and check that it loads with AutoTokenizer.

    ``tokenizer_info`` is the checkpoint's ``extra['tokenizer']`` (``type``, ``model``), with
    ``model`` already resolved to an existing path. Returns a report dict: ``files``, and for
    sentencepiece ``probe_mismatches`` (probe texts the HF tokenizer encodes differently; literal
    special-token text such as "</s>" is one known case). A NullTokenizer writes nothing.
    """
    ttype = tokenizer_info.get("type")
    path = tokenizer_info.get("model")
    report: dict = {"type": ttype, "files": [], "probe_mismatches": []}
    if ttype in (None, "NullTokenizer"):
        return report
    if ttype == "HuggingFaceTokenizer":
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        tok.save_pretrained(out_dir)
    elif ttype == "SentencePieceTokenizer":
        ours = build_tokenizer("SentencePieceTokenizer", path)
        model_file = path if os.path.isfile(path) else os.path.join(path, "tokenizer.model")
        _sentencepiece_to_hf(model_file, out_dir, ours.inv_vocab[ours.eod])
        tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
        report["probe_mismatches"] = [
            t for t in TOKENIZER_PROBES if tok.encode(t, add_special_tokens=False) != ours.tokenize(t)
        ]
    else:
        raise ValueError(f"unknown tokenizer type {ttype!r} in the checkpoint")
    # The folder must load on its own (the check the issue asks for).
    AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    report["files"] = sorted(n for n in os.listdir(out_dir) if n in HF_TOKENIZER_FILES)
    return report


def copy_hf_tokenizer_files(hf_dir: str, dest: str) -> List[str]:
    """Copy the tokenizer files of a HF folder (those present) into ``dest``."""
    names = [n for n in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
    if names:
        os.makedirs(dest, exist_ok=True)
        for n in names:
            shutil.copy(os.path.join(hf_dir, n), os.path.join(dest, n))
    return names
