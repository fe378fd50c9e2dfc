#!/usr/bin/env python
"""Plot the logged scalars of any set of training runs side by side (PNG, matplotlib Agg).

    python tools/plot_runs.py --runs LET=runs/quickstart/let baseline=runs/quickstart/baseline \\
        --out runs/quickstart/plots

Each ``NAME=PATH`` names a run. PATH may be a TensorBoard log folder (``--tensorboard-dir``; event
files are searched below it, so a run folder holding ``tensorboard/`` works too), a
``--metrics-jsonl`` file, or a folder holding ``metrics.jsonl`` but no event files. Scalars are keyed
as in TensorBoard: ``train/<name>`` / ``valid/<name>`` with spaces turned into underscores.

Runs are read by megatron_let.analysis.runs and drawn by megatron_let.analysis.plots (its figures below).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from megatron_let.analysis import plots
from megatron_let.analysis.plots import PlotConfig, plot_all
from megatron_let.analysis.runs import load_runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=plots.__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="NAME=PATH",
                   help="runs to plot: TensorBoard folder, metrics jsonl, or a folder with either")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--smooth", type=int, default=0,
                   help="moving-average window (steps) of the train curves; 0 = 1/20 of the run")
    p.add_argument("--dpi", type=int, default=120)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.smooth < 0 or a.dpi <= 0:
            raise ValueError("--smooth must be >= 0 and --dpi > 0")
        if os.path.exists(a.out) and not os.path.isdir(a.out):
            raise ValueError(f"--out {a.out} exists and is not a folder")
        runs = load_runs(a.runs)
        for r in runs:
            if not r.scalars:
                raise ValueError(f"run {r.name!r} ({r.path}) logged no scalars")
        written = plot_all(runs, PlotConfig(a.out, a.smooth, a.dpi))
    except (ValueError, FileNotFoundError) as err:
        print(f"plot_runs.py: error: {err}", file=sys.stderr)
        return 2
    if not written:
        print("plot_runs.py: error: none of the runs logged a plottable scalar", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
