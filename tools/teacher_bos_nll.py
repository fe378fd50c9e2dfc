#!/usr/bin/env python
"""Teacher NLL and hidden-state agreement on packed text windows, with and without its BOS token.

    python tools/teacher_bos_nll.py --teacher-path ~/.cache/megatron_let/teachers/gemma3-270m \\
        --text data/corpus/valid.jsonl --seq-length 512 --num-windows 8 --out bos.md

Windows are packed as the training data is (documents joined by EOS, most windows start
mid-document; see megatron_let/teacher/bos_fidelity.py). Prints a markdown table (one row per
``--teacher-path``) and writes it to ``--out`` (.md) or the raw numbers (.json).
"""

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-path", nargs="+", required=True, help="teacher folder(s) whose tokenizer adds BOS")
    p.add_argument("--text", nargs="+", required=True, help=".jsonl ('text' field) or plain-text files")
    p.add_argument("--text-key", default="text")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--num-windows", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="teacher dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--out", nargs="*", default=[], help=".md and/or .json files to write")
    a = p.parse_args(argv)
    try:
        if a.seq_length < 1 or a.num_windows < 1:
            raise ValueError("--seq-length and --num-windows must be >= 1")
        bad = [o for o in a.out if os.path.splitext(o)[1] not in (".md", ".json")]
        if bad:
            raise ValueError(f"--out {bad}: use .md or .json file names")
        for path in a.teacher_path:
            if not os.path.isdir(path):
                raise FileNotFoundError(f"--teacher-path {path} is not a folder")
        # lazy: torch, megatron.core, transformers take seconds to import; --help needs none (CLI start-up)
        from megatron_let.teacher.bos_fidelity import measure_bos_fidelity, read_documents, to_markdown

        texts = read_documents(a.text, a.text_key)
        results = [measure_bos_fidelity(t, texts, a.seq_length, a.num_windows, a.device, a.dtype)
                   for t in a.teacher_path]
    except (ValueError, FileNotFoundError) as e:
        print(f"teacher_bos_nll.py: error: {e}", file=sys.stderr)
        return 2
    table = to_markdown(results)
    print(table, end="")
    for out in a.out:
        with open(out, "w") as fh:
            if out.endswith(".md"):
                fh.write(table)
            else:
                json.dump([dataclasses.asdict(r) for r in results], fh, indent=2)
        print(f"[teacher_bos_nll] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
