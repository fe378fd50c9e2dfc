#!/usr/bin/env python
"""Compare training runs from their logs: final validation quality, step and wall-clock speed-ups.

    python tools/compare_runs.py --runs LET=runs/quickstart/let baseline=runs/quickstart/baseline \\
        --baseline baseline --out runs/quickstart/comparison.md runs/quickstart/comparison.csv

Runs are read exactly as by ``tools/plot_runs.py`` (TensorBoard event files, or a metrics jsonl).
Every number is computed from the logged scalars:

  final valid loss / ppl   the last ``valid/lm_loss`` (and ``valid/ppl``, else exp of the loss)
  target                   the baseline's final valid loss
  steps to target          the first evaluated step whose ``valid/lm_loss`` <= target ("not
                           reached" if none); its resolution is the run's --eval-interval
  speed-up (steps)         baseline's steps to target / run's steps to target (paper: LET reaches
                           the baseline's final quality in < 67% of the steps, ≈ 1.6x)
  train time               training wall-clock: the cumulative ``train/step_time`` (evaluation and
                           start-up excluded); without it, event time since the first train step
  wall-clock ratio         run's train time / baseline's train time (whole run)
  speed-up (wall-clock)    baseline's train time to target / run's train time to target
  FLOPs to target          student training + teacher forward FLOPs spent up to the steps to
                           target: the trainer logs the dry run's per-step estimates
                           (``config/student_flops_per_step``, ``config/teacher_flops_per_step``,
                           ``config/teacher_active_steps``; megatron_let.training.dry_run), so
                           FLOPs(n) = student·n + teacher·min(n, active steps). The teacher is
                           counted once per token (as the dry run's teacher FLOPs)
  speed-up (compute)       baseline's FLOPs to target / run's FLOPs to target (the paper counts
                           steps only; this charges LET/SALT for their teacher)

The markdown table is printed; ``--out`` also writes it to ``.md`` files and the raw numbers to
``.csv`` / ``.json`` files (chosen by extension).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from megatron_let.analysis.compare import OUT_FORMATS, compare, to_markdown, write_outputs
from megatron_let.analysis.runs import load_runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
