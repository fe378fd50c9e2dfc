"""A Hugging Face ``LlamaForCausalLM`` folder imported as a megatron_let checkpoint (iteration 0);
``tools/import_hf.py`` is its command line.

The checkpoint is a model-only dist_checkpointing checkpoint: it loads at any TP/PP whatever layout
wrote it. Tokenizer files found in the HF folder are copied to ``CKPT/tokenizer`` and recorded as the
checkpoint's ``HuggingFaceTokenizer`` (or the tokenizer named explicitly is recorded instead).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_let.data.tokenizers import build_tokenizer
from megatron_let.export.checkpoint_io import TOKENIZER_SUBDIR, save_model_checkpoint
from megatron_let.export.hf_conversion import (
    copy_hf_tokenizer_files,
    hf_to_megatron,
    hf_weight_files,
    llama_config_from_hf,
    megatron_key_is_needed,
    read_hf_config,
    read_hf_state_dict,
    shard_for_rank,
)
from megatron_let.model.llama import build_student
from megatron_let.runtime.device import ParallelConfig, initialize_distributed


@dataclass
class HFImportConfig:
    """What to import and how (the fields of ``tools/import_hf.py``'s flags)."""

    hf: str  # local Hugging Face Llama folder (config.json + weights)
    save: str  # checkpoint root to write
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    seq_length: Optional[int] = None  # training sequence length to record (default: max_position_embeddings)
    make_vocab_size_divisible_by: int = 128
    tokenizer_type: Optional[str] = None  # record this tokenizer instead of the HF folder's own files
    tokenizer_model: Optional[str] = None  # its sentencepiece .model or HF folder


def _choose_tokenizer(args: HFImportConfig, vocab_size: int):
    """(type, source path or None) of the tokenizer to record, validated against the model.

    Explicit --tokenizer-type wins; else the HF folder's tokenizer files; else a NullTokenizer.
    """
    if args.tokenizer_type:
        ttype, source = args.tokenizer_type, args.tokenizer_model
    elif any(os.path.isfile(os.path.join(args.hf, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
        ttype, source = "HuggingFaceTokenizer", args.hf
    else:
        return "NullTokenizer", None
    if ttype == "NullTokenizer":
        return ttype, None
    tok = build_tokenizer(ttype, source)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer ({ttype} {source}) has {tok.vocab_size} tokens but the model's "
                         f"vocab_size is {vocab_size}")
    if ttype == "SentencePieceTokenizer" and os.path.isdir(source):
        source = os.path.join(source, "tokenizer.model")
    return ttype, source


def import_hf(args: HFImportConfig) -> str:
    """Write the checkpoint (run under TP x PP processes); returns its iteration folder."""
    # Validate everything from files before starting the process group.
    hf = read_hf_config(args.hf)
    hf_weight_files(args.hf)
    cfg = llama_config_from_hf(hf, seq_length=args.seq_length,
                               make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                               where=os.path.join(args.hf, "config.json"))
    parallel = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                              pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    cfg.validate(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mp = parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
    if world != mp:
        raise ValueError(f"import_hf.py needs exactly TP x PP = {mp} processes (got WORLD_SIZE={world}); "
                         f"launch with torchrun --nproc_per_node {mp}, or use TP=PP=1 (the checkpoint "
                         "reshards to any layout on load)")
    if os.path.isfile(args.save):
        raise ValueError(f"--save {args.save!r} is a file")
    tok_type, tok_source = _choose_tokenizer(args, cfg.vocab_size)
    save_root = os.path.abspath(args.save)

    initialize_distributed(torch.device("cpu"), parallel, seed=0)
    rank = torch.distributed.get_rank()
    # The tokenizer is copied into the checkpoint so that the checkpoint is self-contained.
    tok_dir = os.path.join(save_root, TOKENIZER_SUBDIR)
    tokenizer = {"type": tok_type, "model": None, "vocab_size": cfg.vocab_size}
    if tok_type == "HuggingFaceTokenizer":
        tokenizer["model"] = tok_dir
        if rank == 0:
            copy_hf_tokenizer_files(tok_source, tok_dir)
    elif tok_type == "SentencePieceTokenizer":
        tokenizer["model"] = os.path.join(tok_dir, "tokenizer.model")
        if rank == 0:
            os.makedirs(tok_dir, exist_ok=True)
            shutil.copy(tok_source, tokenizer["model"])
    stored = read_hf_state_dict(args.hf)
    dtypes = {str(t.dtype).replace("torch.", "") for t in stored.values()}
    hf_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"

    model = build_student(cfg, parallel, use_cpu=True)
    tp_size = parallel.tensor_model_parallel_size
    full = hf_to_megatron(stored, cfg, padded_vocab_size=cfg.padded_vocab_size(tp_size))
    del stored
    layers_per_stage = cfg.num_layers // parallel.pipeline_model_parallel_size
    offset = parallel_state.get_pipeline_model_parallel_rank() * layers_per_stage
    params = {k: v for k, v in model.state_dict(keep_vars=True).items()
              if isinstance(v, torch.Tensor) and megatron_key_is_needed(k)}
    local = shard_for_rank(full, params.keys(), cfg, parallel_state.get_tensor_model_parallel_rank(),
                           tp_size, offset)
    with torch.no_grad():
        for k, dst in params.items():
            if dst.shape != local[k].shape:
                raise ValueError(f"{k}: converted shape {tuple(local[k].shape)} != model shape {tuple(dst.shape)}")
            dst.copy_(local[k])
    extra = {
        "iteration": 0, "consumed_train_samples": 0, "consumed_valid_samples": 0,
        "consumed_selection_samples": 0, "objective": "import_hf",
        "model": dataclasses.asdict(cfg), "tokenizer": tokenizer,
        "hf_source": os.path.abspath(args.hf), "hf_dtype": hf_dtype,
    }
    path = save_model_checkpoint(args.save, 0, model, extra)
    if rank == 0:
        print(f"[import_hf] wrote {path} (TP={tp_size}, PP={parallel.pipeline_model_parallel_size}; "
              f"reshardable), vocab {cfg.vocab_size} padded to {cfg.padded_vocab_size(tp_size)}, "
              f"tokenizer {tokenizer['type']}, source dtype {hf_dtype}", flush=True)
    return path
