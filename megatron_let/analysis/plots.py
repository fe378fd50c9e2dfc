"""Figures of training runs side by side (PNG, matplotlib Agg); ``tools/plot_runs.py`` is the command line.

Figures (a figure is skipped, with a message, when no run logged its scalar):

  train_loss_vs_step.png    train/lm_loss per step (raw, faint) and its moving average
  train_loss_vs_time.png    the same against wall-clock seconds: the cumulative sum of
                            train/step_time when logged, else event time since the first step
  valid_loss_vs_step.png    valid/lm_loss per evaluation
  schedules.png             λ (train/lambda, LET) and ω (train/kd_weight, RKD/SALT) per step
  cosine_similarity.png     train/cosine_similarity of the aligned layers (LET paper fig. 6)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a display: chosen before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from megatron_let.analysis.runs import (  # noqa: E402
    COSINE,
    KD_WEIGHT,
    LAMBDA,
    TRAIN_LOSS,
    VALID_LOSS,
    Run,
    Series,
)


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
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, path: str, dpi: int) -> str:
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
