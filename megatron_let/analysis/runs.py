"""Training runs read back from their logs: every logged scalar of a run as a step-indexed series.

A run is read from TensorBoard event files (``--tensorboard-dir``; searched below the given folder, so
a run folder holding ``tensorboard/`` works too), a ``--metrics-jsonl`` file, or a folder holding
``metrics.jsonl`` but no event files. Scalars are keyed as in TensorBoard: ``train/<name>`` /
``valid/<name>`` with spaces turned into underscores. ``tools/plot_runs.py``, ``tools/compare_runs.py``
and ``examples/reproduce`` read runs through here.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

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
