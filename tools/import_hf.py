#!/usr/bin/env python
"""Import a Hugging Face ``LlamaForCausalLM`` folder as a megatron_let checkpoint (iteration 0).

    python tools/import_hf.py --hf exported/run1 --save checkpoints/from_hf
    torchrun --nproc_per_node 4 tools/import_hf.py --hf DIR --save CKPT \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

The checkpoint is a model-only dist_checkpointing checkpoint: it loads at any TP/PP whatever layout
wrote it. Continue training from it with
``pretrain_let.py --load CKPT --no-load-optim --no-load-rng <the same architecture flags>``.
Tokenizer files found in the HF folder are copied to ``CKPT/tokenizer`` and recorded as the
checkpoint's ``HuggingFaceTokenizer``. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys

from megatron_let.runtime.cli import quiet_backend_warnings, run_tool

quiet_backend_warnings()  # before megatron-core is imported

from megatron_let.export.hf_import import HFImportConfig, import_hf  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--hf", required=True, help="local Hugging Face Llama folder (config.json + weights)")
    p.add_argument("--save", required=True, help="checkpoint root to write")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--seq-length", type=int, help="training sequence length to record (default: max_position_embeddings)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"),
                   help="record this tokenizer instead of the HF folder's own tokenizer files")
    p.add_argument("--tokenizer-model", help="sentencepiece .model or HF tokenizer folder for --tokenizer-type")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool("import_hf.py", lambda: import_hf(HFImportConfig(**vars(args))))


if __name__ == "__main__":  # guarded: dist_checkpointing workers may re-import this file
    sys.exit(main())
