#!/usr/bin/env python
"""Tokenize a jsonl corpus into megatron indexed datasets (``P_<key>_document.bin/.idx``).

Megatron-LM style flags, e.g.::

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --output-prefix data/corpus --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model tok/sp.model --append-eod --workers 4

writes ``data/corpus_text_document.bin`` and ``.idx`` (one document per jsonl line). See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys

from megatron_let.runtime.cli import quiet_backend_warnings

quiet_backend_warnings()

from megatron_let.data.indexed import MAX_LINE_BYTES, preprocess_jsonl
from megatron_let.data.tokenizers import TOKENIZER_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, help="jsonl file, one JSON object per line")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize (one dataset per key)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument(
        "--tokenizer-model",
        default=None,
        help="sentencepiece .model file, or a local Hugging Face tokenizer folder",
    )
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (NullTokenizer only)")
    g.add_argument("--append-eod", action="store_true", help="append the EOD (=EOS) id to every document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--log-interval", type=int, default=1000, help="report progress every N documents")
    g.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES,
                   help="refuse a jsonl line longer than this, naming it (memory per line is bounded: "
                        "tokenizing a line takes a few tens of times its size); default 16 MiB")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    preprocess_jsonl(
        input_path=args.input,
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_size=args.vocab_size,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        log_interval=args.log_interval,
        max_line_bytes=args.max_line_bytes,
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"preprocess_data.py: error: {err}")
