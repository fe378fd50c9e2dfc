"""Evaluate a megatron_let checkpoint (or a Hugging Face folder) as ``tools/evaluate.py``'s flags
say: perplexity and bits per byte on an indexed dataset (data-parallel, TP/PP-aware) or one-shot
lm-eval accuracy on the paper's nine tasks, offline. ``args`` is that tool's parsed command line.
lm-eval is imported only when a downstream evaluation starts (it is optional and slow to import).
"""

from __future__ import annotations

import json
import os

import torch

from megatron_let.evaluation import PAPER_TASKS
from megatron_let.evaluation.downstream import (
    DownstreamConfig,
    check_task_data,
    evaluate_hf,
    evaluate_megatron,
    format_table,
)
from megatron_let.evaluation.perplexity import PerplexityConfig, build_eval_dataset, evaluate_perplexity
from megatron_let.export.checkpoint_io import (
    build_tokenizer_from_info,
    config_from_extra,
    load_student,
    read_checkpoint_extra,
    tokenizer_info_from_extra,
)
from megatron_let.model.spec import ImplConfig, resolve_spec
from megatron_let.runtime.device import ParallelConfig, initialize_distributed, resolve_device


def _parallel(args):
    return ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                          pipeline_model_parallel_size=args.pipeline_model_parallel_size)


def _load(args):
    """Validate the checkpoint, then start the process group and load the student."""
    extra = read_checkpoint_extra(args.load)
    if args.tokenizer_model:
        extra = {**extra, "tokenizer": {**(extra.get("tokenizer") or {}), "model": args.tokenizer_model}}
    cfg = config_from_extra(extra, args.seq_length)
    parallel = _parallel(args)
    cfg.validate(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size)
    tok_info = tokenizer_info_from_extra(extra, args.load)
    tokenizer = build_tokenizer_from_info(tok_info)
    device = resolve_device(args.device)
    resolve_spec(ImplConfig(args.transformer_impl), device.type)  # a missing TE: an error before any compute
    initialize_distributed(device, parallel, args.seed)
    model, cfg, extra = load_student(args.load, parallel, use_cpu=device.type == "cpu", seq_length=args.seq_length,
                                     transformer_impl=args.transformer_impl, verify=args.verify_checkpoint)
    return model, cfg, tokenizer, tok_info


def run_ppl(args) -> dict:
    """``--task ppl``: perplexity and bits per byte of a checkpoint on an indexed dataset."""
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
    """``--task downstream``: one-shot lm-eval accuracy of a checkpoint or a Hugging Face folder."""
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else PAPER_TASKS
    dcfg = DownstreamConfig(tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                            batch_size=args.batch_size, log_samples=args.log_samples)
    dcfg.validate()
    check_task_data(dcfg.tasks)
    # lazy: lm-eval is an optional dependency, slow to import, and its adapter imports it at once
    from megatron_let.evaluation.lm_eval_adapter import import_lm_eval

    try:
        import_lm_eval()
    except ImportError as e:
        raise ValueError(str(e)) from None
    if args.hf:
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise ValueError("--hf runs lm-eval's hf model in a single process; do not use torchrun")
        summary = evaluate_hf(args.hf, dcfg, dtype=args.hf_dtype, device=str(resolve_device(args.device)))
    else:
        model, cfg, tokenizer, _ = _load(args)
        summary = evaluate_megatron(model, cfg, tokenizer, dcfg, micro_batch_size=args.micro_batch_size)
    _print(f"[evaluate] {dcfg.num_fewshot}-shot lm-eval, limit {dcfg.limit or 'all'} per task, "
           f"source {args.load or args.hf}\n{format_table(summary)}")
    return {"task": "downstream", "load": args.load, "hf": args.hf, "num_fewshot": dcfg.num_fewshot,
            "limit": dcfg.limit, **summary}


def _is_reporting_rank() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _print(msg: str) -> None:
    if _is_reporting_rank():
        print(msg, flush=True)


def evaluate(args) -> dict:
    """Run ``args.task`` and write the results to ``args.output`` (rank 0) when set; returns them."""
    if args.output and os.path.isdir(args.output):
        raise ValueError(f"--output {args.output!r} is a folder")
    out = run_ppl(args) if args.task == "ppl" else run_downstream(args)
    if args.output and _is_reporting_rank():
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(out, f, indent=2)
    return out
