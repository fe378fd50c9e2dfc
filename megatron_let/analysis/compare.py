"""Training runs compared from their logs: final validation quality, step, wall-clock and compute
speed-ups (``tools/compare_runs.py`` is the command line). Runs are read by
:mod:`megatron_let.analysis.runs` (TensorBoard event files, or a metrics jsonl).
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

``write_outputs`` writes the markdown table to ``.md`` files and the raw numbers to ``.csv`` /
``.json`` files (chosen by extension).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import numpy as np

from megatron_let.analysis.runs import VALID_LOSS, VALID_PPL, Run

OUT_FORMATS = (".md", ".csv", ".json")
# logged once per run by the trainer (megatron_let.training.estimates.flops_scalars)
STUDENT_FLOPS = "config/student_flops_per_step"
TEACHER_FLOPS = "config/teacher_flops_per_step"
TEACHER_STEPS = "config/teacher_active_steps"


@dataclass
class Comparison:
    run: str
    last_step: int
    final_valid_loss: float
    final_valid_ppl: float
    target_loss: float
    steps_to_target: Optional[int]
    step_speedup: Optional[float]
    train_seconds: Optional[float]
    wallclock_ratio: Optional[float]
    seconds_to_target: Optional[float]
    wallclock_speedup: Optional[float]
    flops_to_target: Optional[float] = None
    compute_speedup: Optional[float] = None


def steps_to_reach(run: Run, target: float) -> Optional[int]:
    """First evaluated step whose validation loss is <= target, or None."""
    s = run.scalars[VALID_LOSS]
    hit = np.nonzero(s.values <= target)[0]
    return int(s.steps[hit[0]]) if hit.size else None


def seconds_at(run: Run, step: int) -> Optional[float]:
    """Training seconds up to ``step`` (the latest timed step at or before it)."""
    t = run.train_seconds()
    if t is None:
        return None
    i = int(np.searchsorted(t.steps, step, side="right")) - 1
    return float(t.values[i]) if i >= 0 else None


def flops_at(run: Run, steps: Optional[int]) -> Optional[float]:
    """Student + teacher FLOPs of the first ``steps`` steps, from the run's logged estimates
    (None for a run logged without them, e.g. by an older trainer)."""
    if steps is None or not run.has(STUDENT_FLOPS):
        return None
    student = float(run.scalars[STUDENT_FLOPS].values[-1])
    teacher = float(run.scalars[TEACHER_FLOPS].values[-1]) if run.has(TEACHER_FLOPS) else 0.0
    active = int(run.scalars[TEACHER_STEPS].values[-1]) if run.has(TEACHER_STEPS) else 0
    return student * steps + teacher * min(steps, active)


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def compare(runs: Sequence[Run], baseline: str) -> List[Comparison]:
    """One :class:`Comparison` per run, measured against the run named ``baseline``."""
    by_name = {r.name: r for r in runs}
    if baseline not in by_name:
        raise ValueError(f"--baseline {baseline!r} is not one of the runs {sorted(by_name)}")
    missing = [r.name for r in runs if not r.has(VALID_LOSS)]
    if missing:
        raise ValueError(f"runs {missing} logged no {VALID_LOSS} (train them with --eval-interval)")
    base = by_name[baseline]
    target = float(base.scalars[VALID_LOSS].values[-1])
    if not math.isfinite(target):
        raise ValueError(f"baseline {baseline!r} ended with a non-finite validation loss ({target})")
    base_steps = steps_to_reach(base, target)  # may precede its last evaluation
    base_total = seconds_at(base, int(base.scalars[VALID_LOSS].steps[-1]))
    base_sec_to_target = seconds_at(base, base_steps)
    base_flops_to_target = flops_at(base, base_steps)
    rows = []
    for r in runs:
        v = r.scalars[VALID_LOSS]
        final_step, final_loss = int(v.steps[-1]), float(v.values[-1])
        if r.has(VALID_PPL) and final_step in r.scalars[VALID_PPL].steps:
            ppl = r.scalars[VALID_PPL].value_at(final_step)
        else:
            ppl = math.exp(min(final_loss, 50.0))
        last_step = max(int(s.steps[-1]) for s in r.scalars.values() if s.steps.size)
        reached = steps_to_reach(r, target)
        total = seconds_at(r, last_step)
        sec_to_target = seconds_at(r, reached) if reached is not None else None
        flops_to_target = flops_at(r, reached)
        rows.append(Comparison(
            run=r.name, last_step=last_step, final_valid_loss=final_loss, final_valid_ppl=ppl,
            target_loss=target, steps_to_target=reached,
            step_speedup=_ratio(base_steps, reached),
            train_seconds=total, wallclock_ratio=_ratio(total, base_total),
            seconds_to_target=sec_to_target,
            wallclock_speedup=_ratio(base_sec_to_target, sec_to_target),
            flops_to_target=flops_to_target,
            compute_speedup=_ratio(base_flops_to_target, flops_to_target),
        ))
    return rows


def _fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def to_markdown(rows: Sequence[Comparison], baseline: str) -> str:
    head = ["run", "steps", "final valid loss", "final valid ppl", "steps to baseline's final loss",
            "speed-up (steps)", "train time (s)", "wall-clock ratio", "time to target (s)",
            "speed-up (wall-clock)", "FLOPs to target", "speed-up (compute)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in rows:
        reached = c.steps_to_target is not None
        cells = [
            c.run + (" (reference)" if c.run == baseline else ""), str(c.last_step),
            f"{c.final_valid_loss:.4f}", f"{c.final_valid_ppl:.2f}",
            str(c.steps_to_target) if reached else "not reached",
            _fmt(c.step_speedup, ".2f") + ("x" if c.step_speedup is not None else ""),
            _fmt(c.train_seconds, ".1f"), _fmt(c.wallclock_ratio, ".3f"),
            _fmt(c.seconds_to_target, ".1f", "not reached" if not reached else "n/a"),
            _fmt(c.wallclock_speedup, ".2f") + ("x" if c.wallclock_speedup is not None else ""),
            _fmt(c.flops_to_target, ".3e", "not reached" if not reached else "n/a"),
            _fmt(c.compute_speedup, ".2f") + ("x" if c.compute_speedup is not None else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"target = {baseline}'s final validation loss {rows[0].target_loss:.4f}; "
                 "speed-up = baseline steps (seconds, FLOPs) to the target / the run's; FLOPs = "
                 "student training + teacher forward (n/a: the run logged no FLOP estimate)")
    return "\n".join(lines) + "\n"


def write_outputs(rows: Sequence[Comparison], baseline: str, paths: Sequence[str]) -> None:
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        ext = os.path.splitext(path)[1].lower()
        if ext == ".md":
            with open(path, "w") as fh:
                fh.write(to_markdown(rows, baseline))
        elif ext == ".csv":
            with open(path, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(asdict(rows[0])))
                w.writeheader()
                for c in rows:
                    w.writerow({k: ("" if v is None else v) for k, v in asdict(c).items()})
        else:
            with open(path, "w") as fh:
                json.dump({"baseline": baseline, "runs": [asdict(c) for c in rows]}, fh, indent=2)
        print(f"[compare_runs] wrote {path}", flush=True)
