#!/usr/bin/env python
"""Plot the logged scalars of any set of training runs side by side (PNG, matplotlib Agg).

    python tools/plot_runs.py --runs LET=runs/quickstart/let baseline=runs/quickstart/baseline \\
        --out runs/quickstart/plots

Each ``NAME=PATH`` names a run. PATH may be a TensorBoard log folder (``--tensorboard-dir``; event
files are searched below it, so a run folder holding ``tensorboard/`` works too), a
``--metrics-jsonl`` file, or a folder holding ``metrics.jsonl`` but no event files. Scalars are keyed
as in TensorBoard: ``train/<name>`` / ``valid/<name>`` with spaces turned into underscores.

Figures (a figure is skipped, with a message, when no run logged its scalar):

  train_loss_vs_step.png    train/lm_loss per step (raw, faint) and its moving average
  train_loss_vs_time.png    the same against wall-clock seconds: the cumulative sum of
                            train/step_time when logged, else event time since the first step
  valid_loss_vs_step.png    valid/lm_loss per evaluation
  schedules.png             λ (train/lambda, LET) and ω (train/kd_weight, RKD/SALT) per step
  cosine_similarity.png     train/cosine_similarity of the aligned layers (LET paper fig. 6)

The loaders (:func:`load_run`, :func:`parse_run_specs`) are shared with ``tools/compare_runs.py``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

TRAIN_LOSS = "train/lm_loss"
VALID_LOSS = "valid/lm_loss"
VALID_PPL = "valid/ppl"
STEP_TIME = "train/step_time"
LAMBDA = "train/lambda"
KD_WEIGHT = "train/kd_weight"
COSINE = "train/cosine_similarity"


@dataclass
class Series:
    """One scalar of one run: steps ascending, one value per step (the latest logged wins)."""

    steps: np.ndarray
    values: np.ndarray
    wall_times: np.ndarray

    def value_at(self, step: int) -> float:
        idx = np.nonzero(self.steps == step)[0]
        if idx.size == 0:
            raise KeyError(f"no value logged at step {step}")
        return float(self.values[idx[0]])


@dataclass
class Run:
    name: str
    path: str
    source: str  # "tensorboard" or "jsonl"
    scalars: Dict[str, Series] = field(default_factory=dict)

    def has(self, tag: str) -> bool:
        return tag in self.scalars and self.scalars[tag].steps.size > 0

    def train_seconds(self) -> Optional[Series]:
        """Wall-clock seconds of training up to each train step (x axis of the time plots).

        With train/step_time: its cumulative sum (pure training time; evaluation and start-up are
        not counted). Otherwise the event time of each train/lm_loss point since the first one."""
        if self.has(STEP_TIME):
            st = self.scalars[STEP_TIME]
            return Series(st.steps, np.cumsum(st.values), st.wall_times)
        if self.has(TRAIN_LOSS):
            tl = self.scalars[TRAIN_LOSS]
            return Series(tl.steps, tl.wall_times - tl.wall_times[0], tl.wall_times)
        return None


def _series(points: List[Tuple[float, int, float]]) -> Series:
    """(wall_time, step, value) points -> Series; a step logged twice (a resumed run) keeps the
    latest write."""
    latest: Dict[int, Tuple[float, float]] = {}
    for wall, step, value in sorted(points):
        latest[int(step)] = (wall, float(value))
    steps = np.array(sorted(latest), dtype=np.int64)
    return Series(steps, np.array([latest[s][1] for s in steps], dtype=np.float64),
                  np.array([latest[s][0] for s in steps], dtype=np.float64))


def event_dirs(path: str) -> List[str]:
    """Folders at or below ``path`` that hold TensorBoard event files, sorted."""
    files = glob.glob(os.path.join(path, "**", "events.out.tfevents.*"), recursive=True)
    return sorted({os.path.dirname(f) for f in files})


def load_tensorboard(path: str) -> Dict[str, Series]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    dirs = event_dirs(path)
    if len(dirs) > 1:
        raise ValueError(f"{path} holds event files in several folders ({dirs}); name one of them")
    acc = EventAccumulator(dirs[0], size_guidance={SCALARS: 0})  # 0 = keep every point
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        out[tag] = _series([(e.wall_time, e.step, e.value) for e in acc.Scalars(tag)])
    return out


def load_jsonl(path: str) -> Dict[str, Series]:
    """A ``--metrics-jsonl`` file: {"iteration", "split", "time", <metric>: value, ...} per line."""
    points: Dict[str, List[Tuple[float, int, float]]] = {}
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                step, split, wall = int(rec["iteration"]), str(rec["split"]), float(rec["time"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{lineno} is not a metrics line "
                                 f"(needs iteration, split, time): {err}") from err
            for key, value in rec.items():
                if key in ("iteration", "split", "time") or not isinstance(value, (int, float)):
                    continue
                tag = f"{split}/{key.replace(' ', '_')}"
                points.setdefault(tag, []).append((wall, step, float(value)))
    return {tag: _series(p) for tag, p in points.items()}


def load_run(name: str, path: str) -> Run:
    """Read a run from TensorBoard event files, else from a metrics jsonl (see module doc)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"run {name!r}: {path} does not exist")
    if os.path.isfile(path):
        if os.path.basename(path).startswith("events.out.tfevents."):
            return Run(name, path, "tensorboard", load_tensorboard(os.path.dirname(path)))
        return Run(name, path, "jsonl", load_jsonl(path))
    if event_dirs(path):
        return Run(name, path, "tensorboard", load_tensorboard(path))
    jsonl = os.path.join(path, "metrics.jsonl")
    if os.path.isfile(jsonl):
        return Run(name, path, "jsonl", load_jsonl(jsonl))
    raise FileNotFoundError(f"run {name!r}: no TensorBoard event files below {path} and no "
                            f"{jsonl} (pass --tensorboard-dir or --metrics-jsonl to the run)")


def parse_run_specs(specs: Sequence[str]) -> List[Tuple[str, str]]:
    """``["NAME=PATH", ...]`` -> [(name, path)], checked for form and duplicate names."""
    out, seen = [], set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--runs entry {spec!r} is not NAME=PATH")
        if name in seen:
            raise ValueError(f"--runs names run {name!r} twice")
        seen.add(name)
        out.append((name, path))
    if not out:
        raise ValueError("--runs needs at least one NAME=PATH")
    return out


def load_runs(specs: Sequence[str]) -> List[Run]:
    pairs = parse_run_specs(specs)
    for name, path in pairs:  # every path is checked before anything is read
        if not os.path.exists(path):
            raise FileNotFoundError(f"run {name!r}: {path} does not exist")
    return [load_run(name, path) for name, path in pairs]


# ---------------------------------------------------------------------------------------- plotting
def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` points (shorter at the start), same length as input."""
    if window <= 1 or values.size == 0:
        return values.astype(np.float64)
    c = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


@dataclass
class PlotConfig:
    out: str
    smooth: int = 0  # moving-average window of the train curves; 0 = about 1/20 of the run
    dpi: int = 120


def _new_axes(title: str, xlabel: str, ylabel: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, path: str, dpi: int) -> str:
    import matplotlib.pyplot as plt

    fig.axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"[plot_runs] wrote {path}", flush=True)
    return path


def _skip(what: str, tags: Sequence[str]) -> None:
    print(f"[plot_runs] skipped {what}: no run logged {' or '.join(tags)}", flush=True)


def _color(i: int) -> str:
    return f"C{i % 10}"


def _window(cfg: PlotConfig, n: int) -> int:
    return cfg.smooth if cfg.smooth > 0 else max(1, n // 20)


def plot_train_loss(runs: Sequence[Run], cfg: PlotConfig, against_time: bool) -> Optional[str]:
    have = [(i, r) for i, r in enumerate(runs) if r.has(TRAIN_LOSS)]
    what = "train loss vs wall-clock" if against_time else "train loss vs step"
    if not have:
        _skip(what, [TRAIN_LOSS])
        return None
    xlabel = "training wall-clock (s)" if against_time else "step"
    fig, ax = _new_axes(f"Training LM loss ({'wall-clock' if against_time else 'steps'})",
                        xlabel, "LM loss (nats/token)")
    for i, r in have:
        s = r.scalars[TRAIN_LOSS]
        x = s.steps.astype(np.float64)
        if against_time:
            t = r.train_seconds()
            lookup = dict(zip(t.steps.tolist(), t.values.tolist()))
            keep = np.array([st in lookup for st in s.steps.tolist()])
            x = np.array([lookup[st] for st in s.steps[keep].tolist()])
            s = Series(s.steps[keep], s.values[keep], s.wall_times[keep])
        ax.plot(x, s.values, color=_color(i), alpha=0.25, linewidth=0.8)
        ax.plot(x, moving_average(s.values, _window(cfg, s.values.size)), color=_color(i),
                linewidth=1.8, label=r.name)
    name = "train_loss_vs_time.png" if against_time else "train_loss_vs_step.png"
    return _save(fig, os.path.join(cfg.out, name), cfg.dpi)


def plot_lines(runs: Sequence[Run], cfg: PlotConfig, tag: str, filename: str, title: str,
               ylabel: str, marker: Optional[str] = None) -> Optional[str]:
    have = [(i, r) for i, r in enumerate(runs) if r.has(tag)]
    if not have:
        _skip(title, [tag])
        return None
    fig, ax = _new_axes(title, "step", ylabel)
    for i, r in have:
        s = r.scalars[tag]
        ax.plot(s.steps, s.values, color=_color(i), marker=marker, markersize=3, label=r.name)
    return _save(fig, os.path.join(cfg.out, filename), cfg.dpi)


def plot_schedules(runs: Sequence[Run], cfg: PlotConfig) -> Optional[str]:
    have = [(i, r) for i, r in enumerate(runs) if r.has(LAMBDA) or r.has(KD_WEIGHT)]
    if not have:
        _skip("Teacher-weight schedules", [LAMBDA, KD_WEIGHT])
        return None
    fig, ax = _new_axes("Teacher-weight schedules", "step", "weight")
    for i, r in have:
        for tag, style, sym in ((LAMBDA, "-", "λ"), (KD_WEIGHT, "--", "ω")):
            if r.has(tag):
                s = r.scalars[tag]
                ax.plot(s.steps, s.values, style, color=_color(i), label=f"{r.name} {sym}")
    return _save(fig, os.path.join(cfg.out, "schedules.png"), cfg.dpi)


def plot_all(runs: Sequence[Run], cfg: PlotConfig) -> List[str]:
    """Every figure of the module doc that some run has data for; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(cfg.out, exist_ok=True)
    written = [
        plot_train_loss(runs, cfg, against_time=False),
        plot_train_loss(runs, cfg, against_time=True),
        plot_lines(runs, cfg, VALID_LOSS, "valid_loss_vs_step.png", "Validation LM loss (held-out)",
                   "LM loss (nats/token)", marker="o"),
        plot_schedules(runs, cfg),
        plot_lines(runs, cfg, COSINE, "cosine_similarity.png",
                   "Cosine similarity of aligned hidden states", "cos(interp(h_M), h_T)"),
    ]
    return [w for w in written if w is not None]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
