#!/usr/bin/env python
"""Export a megatron_let checkpoint (any TP/PP) as a Hugging Face ``LlamaForCausalLM`` folder.

    python tools/export_hf.py --load checkpoints/run1 --out exported/run1 [--dtype bfloat16] [--verify]

The checkpoint is loaded in one process at TP=1/PP=1 (dist_checkpointing merges the shards), the
weights are converted (fused QKV and [gate; up] split, padded vocabulary rows dropped) and written
as safetensors with a config.json and the tokenizer (Hugging Face folder copied through
save_pretrained; a sentencepiece .model converted to a fast tokenizer). ``--verify`` reloads the
folder with transformers and compares its logits with megatron_let's forward. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_let.runtime.cli import quiet_backend_warnings, run_tool

quiet_backend_warnings()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--load", required=True, help="megatron_let checkpoint root (holds latest_checkpointed_iteration.txt)")
    p.add_argument("--out", required=True, help="output folder for the Hugging Face model")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weight dtype of the export; auto = the dtype recorded by import_hf, else float32")
    p.add_argument("--tokenizer-model", help="override the tokenizer path recorded in the checkpoint")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0, help="split weights into files of this size")
    p.add_argument("--no-verify-checkpoint", dest="verify_checkpoint", action="store_false",
                   help="skip the size/CRC-32 check of every checkpoint file at load (as pretrain_let.py)")
    p.add_argument("--verify", action="store_true",
                   help="reload the export with transformers and compare logits with megatron_let's forward")
    return p


def export(args: argparse.Namespace) -> dict:
    # lazy: torch, megatron.core, transformers take seconds to import; --help needs none (CLI start-up)
    import torch

    from megatron_let.export.checkpoint_io import (
        build_tokenizer_from_info, config_from_extra, full_state_dict, load_student,
        read_checkpoint_extra, tokenizer_info_from_extra,
    )
    from megatron_let.export.hf_conversion import (
        DTYPES, export_tokenizer, hf_config_dict, megatron_to_hf, write_hf_model,
    )
    from megatron_let.runtime.device import ParallelConfig, initialize_distributed

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ValueError("export_hf.py runs in a single process (it merges any TP/PP itself); do not use torchrun")
    if args.max_shard_size_gb <= 0:
        raise ValueError("--max-shard-size-gb must be > 0")
    # Everything that can be checked from files is checked before any weight is touched.
    extra = read_checkpoint_extra(args.load)
    cfg = config_from_extra(extra)
    tok_info = dict(extra.get("tokenizer") or {})
    if args.tokenizer_model:
        tok_info["model"] = args.tokenizer_model
        extra = {**extra, "tokenizer": tok_info}
    tok_info = tokenizer_info_from_extra(extra, args.load)
    tokenizer = build_tokenizer_from_info(tok_info)
    dtype = args.dtype if args.dtype != "auto" else extra.get("hf_dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"checkpoint records hf_dtype {dtype!r}; pass --dtype")
    if os.path.isfile(args.out):
        raise ValueError(f"--out {args.out!r} is a file")

    initialize_distributed(torch.device("cpu"), ParallelConfig(), seed=0)
    model, cfg, _ = load_student(args.load, ParallelConfig(), use_cpu=True, verify=args.verify_checkpoint)
    hf_sd = megatron_to_hf(full_state_dict(model), cfg, dtype=DTYPES[dtype])
    bos = tokenizer.bos if tokenizer.bos >= 0 else None
    pad = tokenizer.pad if tokenizer.pad >= 0 else None
    config = hf_config_dict(cfg, dtype=dtype, bos_token_id=bos, eos_token_id=tokenizer.eod, pad_token_id=pad)
    files = write_hf_model(args.out, config, hf_sd, max_shard_bytes=int(args.max_shard_size_gb * 1024 ** 3))
    tok_report = export_tokenizer(tok_info, args.out)
    report = {"out": args.out, "weights": files, "dtype": dtype, "tokenizer": tok_report,
              "vocab_size": cfg.vocab_size, "padded_vocab_size": cfg.padded_vocab_size()}
    print(f"[export_hf] wrote {args.out}: {', '.join(files)} ({dtype}), vocab {cfg.vocab_size} "
          f"(megatron padded {cfg.padded_vocab_size()}), tokenizer {tok_report['type']} "
          f"files {tok_report['files']}", flush=True)
    if tok_report["probe_mismatches"]:
        print(f"[export_hf] warning: the exported tokenizer encodes {len(tok_report['probe_mismatches'])} probe "
              f"text(s) differently from the original: {tok_report['probe_mismatches']}", flush=True)
    if args.verify:
        report["max_abs_logit_diff"] = verify(model, cfg, args.out)
        print(f"[export_hf] verify: max |logits(HF) - logits(megatron_let)| = {report['max_abs_logit_diff']:.3e}",
              flush=True)
    return report


def verify(model, cfg, out_dir: str) -> float:
    """Max abs logit difference between the export (loaded by transformers) and our forward."""
    # lazy: torch, megatron.core, transformers take seconds to import; --help needs none (CLI start-up)
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_let.export.hf_conversion import dtype_kwargs

    hf = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True, **dtype_kwargs(torch.float32)).eval()
    gen = torch.Generator().manual_seed(0)
    seq = min(cfg.seq_length, 64)
    ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=gen)
    with torch.no_grad():
        ours = model(ids, torch.arange(seq).expand(2, seq), None)[..., : cfg.vocab_size].float()
        theirs = hf(input_ids=ids).logits.float()
    return float((ours - theirs).abs().max())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool("export_hf.py", lambda: export(args))


if __name__ == "__main__":  # guarded: dist_checkpointing workers may re-import this file
    sys.exit(main())
