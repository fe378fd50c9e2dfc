#!/usr/bin/env python
"""Train a sentencepiece tokenizer on jsonl (``text`` field) or plain-text files.

    python tools/train_tokenizer.py --input a.jsonl b.txt --model-prefix tok/sp \\
        --vocab-size 32000 --model-type bpe

writes ``tok/sp.model`` and ``tok/sp.vocab``. Layout: <unk>=0, <s>=1, </s>=2 (the end-of-document
token), <pad>=3, then 256 byte-fallback pieces, then learned pieces. Identity normalization and
byte fallback make ``decode(encode(text)) == text``. See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys

from megatron_let.data.tokenizers import train_sentencepiece


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help=".jsonl/.json (uses --json-key) or plain text files")
    p.add_argument("--json-key", default="text", help="field holding the text in jsonl inputs")
    p.add_argument("--model-prefix", required=True, help="output prefix: writes <prefix>.model and <prefix>.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument(
        "--max-sentences", type=int, default=1_000_000, help="sample at most this many lines (shuffled)"
    )
    p.add_argument("--num-threads", type=int, default=None, help="trainer threads (default: min(8, cores))")
    p.add_argument("--seed", type=int, default=1234)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = train_sentencepiece(
        inputs=args.input,
        model_prefix=args.model_prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        max_sentences=args.max_sentences,
        json_key=args.json_key,
        num_threads=args.num_threads,
        seed=args.seed,
    )
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"train_tokenizer.py: error: {err}")
