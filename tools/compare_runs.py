#!/usr/bin/env python
"""Compare training runs from their logs: final validation quality, step and wall-clock speed-ups.

    python tools/compare_runs.py --runs LET=runs/quickstart/let baseline=runs/quickstart/baseline \\
        --baseline baseline --out runs/quickstart/comparison.md runs/quickstart/comparison.csv

Runs are read exactly as by ``tools/plot_runs.py`` (TensorBoard event files, or a metrics jsonl);
the columns are defined below (megatron_let.analysis.compare).

The markdown table is printed; ``--out`` also writes it to ``.md`` files and the raw numbers to
``.csv`` / ``.json`` files (chosen by extension).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from megatron_let.analysis import compare as compare_mod
from megatron_let.analysis.compare import OUT_FORMATS, compare, to_markdown, write_outputs
from megatron_let.analysis.runs import load_runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=compare_mod.__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="NAME=PATH")
    p.add_argument("--baseline", help="name of the reference run (default: 'baseline' if present, "
                                      "else the first run)")
    p.add_argument("--out", nargs="+", default=[], help="files to write: .md, .csv and/or .json")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        bad = [p for p in a.out if os.path.splitext(p)[1].lower() not in OUT_FORMATS]
        if bad:
            raise ValueError(f"--out {bad}: use a .md, .csv or .json file name")
        runs = load_runs(a.runs)
        names = [r.name for r in runs]
        baseline = a.baseline or ("baseline" if "baseline" in names else names[0])
        rows = compare(runs, baseline)
    except (ValueError, FileNotFoundError) as err:
        print(f"compare_runs.py: error: {err}", file=sys.stderr)
        return 2
    print(to_markdown(rows, baseline), end="", flush=True)
    write_outputs(rows, baseline, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
