#!/usr/bin/env python
"""Tables and figures of the seed study (docs/results.md), computed from the runs' own logs.

    python examples/reproduce/study.py seeds --root RUNS/all --seeds 1234 2345 3456 \\
        --runs baseline=baseline LET=let SALT=salt --out REPORT/main_all --title "mix all"
    python examples/reproduce/study.py grid --runs-dir RUNS/all/s1234 --grid 0.1:10=grid_l0.1_s10 ... \\
        --train-iters 200 --out REPORT/grid
    python examples/reproduce/study.py best --runs-dir RUNS/all/s1234 --grid 0.1:10=grid_l0.1_s10 ... --top 2

``seeds``: run NAME of seed S is ``ROOT/sS/DIR`` (its TensorBoard logs). Every seed is compared with
its own baseline by ``tools/compare_runs.py`` (same initial checkpoint and batches within a seed), the
per-seed tables are written to ``OUT_sSEED.csv``, and ``OUT.md`` / ``OUT.csv`` give over the seeds:
mean ± standard deviation (n - 1) of the final validation loss, of its paired difference to the
baseline and of the step and compute speed-ups, and whether the difference exceeds the seed-to-seed
spread: a paired t-test on the per-seed differences, two-sided at 95 % (|t| above the t
distribution's 97.5 % point for n - 1 degrees of freedom); ``--pairs A:B`` adds the same test between
two methods. ``OUT.png``: mean ± sd validation loss
and its difference to the baseline against the step.

Resolution of the step speed-up: a run's validation loss is known only at its evaluations, so the
step at which it first reaches the target lies in (previous evaluation, first evaluation at or below
it]; the speed-up B/T is then known to within [B/T_hit, B/T_prev). The tables report, per run, the
largest relative width over the seeds (T_hit/T_prev − 1) and a speed-up from the linearly
interpolated crossing step (an estimate between two evaluations, stated as such); study.py warns on
stderr when the width exceeds 5 % (set a smaller EVAL_INTERVAL in run.sh).

``grid``: the λ0 x S_stop grid at one seed against that seed's baseline (``OUT.md``, ``OUT.csv``,
heat map ``OUT.png``); its columns name the real S_stop in steps, read from the runs' commands.
``best``: prints the ``--top`` settings (``LAMBDA:PERCENT``) of lowest final validation loss, one per
line (run.sh reruns them at the other seeds).

``crossover``: where each run's validation curve crosses the teacher's final validation loss (same
held-out documents: the teacher trains on mix all), and the difference to the same seed's baseline
at the baseline's crossing and at the end (does LET's advantage persist, fade or reverse once the
student is better than its teacher?) (``OUT.md``, ``OUT.csv``, ``OUT.png``).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_let.analysis.compare import Comparison, compare, write_outputs
from megatron_let.analysis.runs import VALID_LOSS, Run, load_run

RESOLUTION_GOAL = 0.05  # issue 23: speed-ups resolved to <= 5 %

# two-sided 95 % critical values of Student's t for 1..10 degrees of freedom
T_CRIT_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t_critical(dof: int) -> float:
    if dof < 1:
        raise ValueError("a t-test needs at least two seeds")
    return T_CRIT_95[dof - 1] if dof <= len(T_CRIT_95) else 1.96


def parse_specs(specs: Sequence[str]) -> List[Tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"run spec {spec!r} must be NAME=DIR")
        out.append((name, path))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    return out


def _load(name: str, run_dir: Path) -> Optional[Run]:
    """The run's logs, or None when that run was not made (no finished marker)."""
    if not (run_dir / ".done").is_file():
        return None
    return load_run(name, str(run_dir / "tensorboard"))


def fmt_pm(mean: Optional[float], sd: Optional[float], spec: str, suffix: str = "") -> str:
    """``mean ± sd`` (just the mean without an sd; "n/a" without a mean)."""
    if mean is None:
        return "n/a"
    return f"{mean:{spec}}" + (f" ± {sd:{spec.lstrip('+')}}" if sd is not None else "") + suffix


def exceeds_spread(t: float, n: int) -> bool:
    """Whether a t statistic over ``n`` seeds rejects "no difference" (two-sided 95 %)."""
    return abs(t) > t_critical(n - 1)


@dataclass
class Stat:
    values: List[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def sd(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n >= 2 else math.nan

    def fmt(self, spec: str = ".4f", suffix: str = "") -> str:
        return fmt_pm(self.mean if self.values else None, self.sd if self.n >= 2 else None, spec, suffix)

    def t(self, null: float = 0.0) -> Optional[float]:
        """Paired / one-sample t statistic against ``null`` (None below two values)."""
        if self.n < 2:
            return None
        sd = self.sd
        if sd == 0.0:
            return math.copysign(math.inf, self.mean - null) if self.mean != null else 0.0
        return (self.mean - null) / (sd / math.sqrt(self.n))


def verdict(stat: Stat, null: float, lower: str, higher: str) -> str:
    t = stat.t(null)
    if t is None:
        return "one seed: no spread"
    crit = t_critical(stat.n - 1)
    tt = "inf" if math.isinf(t) else f"{t:+.1f}"
    if exceeds_spread(t, stat.n):
        return f"yes: {lower if t < 0 else higher} (t = {tt}, |t| > {crit})"
    return f"no (t = {tt}, |t| <= {crit})"


def reach_bracket(steps: Sequence[int], values: Sequence[float], target: float
                  ) -> Optional[Tuple[int, int, float]]:
    """``(T_prev, T_hit, T_interp)``: the evaluation before the first one at or below ``target``
    (0 when it is the first), that one, and the linearly interpolated crossing step (from step 0
    when the first evaluation already reaches it); None if never reached."""
    for i, (t, v) in enumerate(zip(steps, values)):
        if v <= target:
            if i == 0:
                return 0, int(t), float(t)
            t0, v0 = steps[i - 1], values[i - 1]
            frac = (v0 - target) / (v0 - v) if v0 != v else 1.0
            return int(t0), int(t), float(t0 + frac * (t - t0))
    return None


def speedup_resolution(base_steps: float, bracket: Tuple[int, int, float]) -> Tuple[float, float]:
    """(relative width T_hit/T_prev − 1 of the speed-up's interval, interpolated speed-up)."""
    t_prev, t_hit, t_interp = bracket
    width = math.inf if t_prev <= 0 else t_hit / t_prev - 1.0
    return width, base_steps / t_interp


@dataclass
class SeedSummary:
    name: str
    seeds: List[int]
    final: Stat
    delta: Stat  # final loss - the same seed's baseline
    step_speedup: Stat
    compute_speedup: Stat
    reached: int
    interp_speedup: Stat = field(default_factory=Stat)
    resolution: List[float] = field(default_factory=list)  # per seed that reached the target

    @property
    def worst_resolution(self) -> Optional[float]:
        return max(self.resolution) if self.resolution else None

    def row(self, baseline: str) -> List[str]:
        if not self.seeds:
            return [self.name, "0", "not run", "", "", "", "", ""]
        n = len(self.seeds)
        base = self.name == baseline
        return [
            self.name + (" (reference)" if base else ""), str(n), self.final.fmt(),
            "0" if base else self.delta.fmt("+.4f"),
            "" if base else verdict(self.delta, 0.0, "lower", "higher"),
            f"{self.reached}/{n}",
            self.step_speedup.fmt(".2f", "x") if self.reached else "not reached",
            self.compute_speedup.fmt(".2f", "x") if self.reached else "not reached",
            (self.interp_speedup.fmt(".2f", "x") + f" (up to +{_pct(self.worst_resolution)})")
            if self.reached and not base else "",
        ]


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else ("first evaluation" if math.isinf(v) else f"{100 * v:.0f}%")


def summarize_seeds(root: Path, seeds: Sequence[int], specs: Sequence[Tuple[str, str]],
                    out: Optional[Path] = None) -> Tuple[List[SeedSummary], Dict[int, Dict[str, Run]]]:
    """Compare every seed's runs with that seed's baseline (the first spec) and aggregate."""
    baseline = specs[0][0]
    per_seed: Dict[int, Dict[str, Run]] = {}
    rows: Dict[int, Dict[str, Comparison]] = {}
    for sd in seeds:
        runs = {}
        for name, sub in specs:
            run = _load(name, root / f"s{sd}" / sub)
            if run is not None:
                runs[name] = run
        if baseline not in runs:
            raise FileNotFoundError(f"seed {sd}: the baseline run {root / f's{sd}' / specs[0][1]} was not made")
        per_seed[sd] = runs
        comp = compare(list(runs.values()), baseline)
        rows[sd] = {c.run: c for c in comp}
        if out is not None:
            write_outputs(comp, baseline, [f"{out}_s{sd}.csv"])
    summaries = []
    for name, sub in specs:
        seen = [sd for sd in seeds if name in rows[sd]]
        if not seen:
            print(f"study: run {name!r} ({sub}) was not made at any seed: reported as not run", file=sys.stderr)
        s = SeedSummary(name, seen, Stat(), Stat(), Stat(), Stat(), 0)
        for sd in seen:
            c, b = rows[sd][name], rows[sd][baseline]
            s.final.values.append(c.final_valid_loss)
            s.delta.values.append(c.final_valid_loss - b.final_valid_loss)
            if c.step_speedup is not None:
                s.reached += 1
                s.step_speedup.values.append(c.step_speedup)
            if c.step_speedup is not None and name != baseline:  # the baseline's is 1 by definition
                bracket = reach_bracket(*_curve(per_seed[sd][name]), b.final_valid_loss)
                width, interp = speedup_resolution(c.step_speedup * c.steps_to_target, bracket)
                s.resolution.append(width)
                s.interp_speedup.values.append(interp)
            if c.compute_speedup is not None:
                s.compute_speedup.values.append(c.compute_speedup)
        summaries.append(s)
    return summaries, per_seed


HEAD = ["run", "seeds", "final valid loss", "Δ vs baseline (paired)", "Δ exceeds the seed spread?",
        "reached baseline's final loss", "speed-up (steps)", "speed-up (compute)",
        "speed-up (steps, interpolated; resolution)"]


def seeds_markdown(summaries: Sequence[SeedSummary], baseline: str, title: str, seeds: Sequence[int]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for s in summaries:
        lines.append("| " + " | ".join(s.row(baseline)) + " |")
    lines.append("")
    lines.append(f"{title}; seeds {', '.join(map(str, seeds))} (initialisation and data order); mean ± sd over "
                 "the seeds (sd with n - 1). Δ = final validation loss minus the same seed's baseline; it exceeds "
                 "the spread when a paired t-test over the seeds rejects Δ = 0 at 95 % (two-sided). Speed-ups: "
                 "baseline's steps (FLOPs: student training + teacher forward) to its own final validation loss / "
                 "the run's, over the seeds that reached it. Resolution: the step speed-up is known only to within "
                 "one evaluation interval where the run reaches the target, i.e. up to T_hit/T_prev − 1 higher "
                 "(the largest over the seeds); the interpolated speed-up places the crossing on the straight line "
                 "between those two evaluations (an estimate).")
    return "\n".join(lines) + "\n"


def warn_resolution(summaries: Sequence[SeedSummary], title: str) -> None:
    for s in summaries:
        w = s.worst_resolution
        if w is not None and w > RESOLUTION_GOAL:
            print(f"study: {title}: {s.name}'s step speed-up is resolved only to within +{_pct(w)} "
                  f"(> {RESOLUTION_GOAL:.0%}): evaluate more often (EVAL_INTERVAL)", file=sys.stderr)


def pair_stats(summaries: Sequence[SeedSummary], pairs: Sequence[str]) -> List[Tuple[str, str, Stat]]:
    """Paired difference of the final validation loss between two runs over their common seeds."""
    by_name = {s.name: s for s in summaries}
    out = []
    for pair in pairs:
        a, sep, b = pair.partition(":")
        if not sep or a not in by_name or b not in by_name:
            raise ValueError(f"--pairs {pair!r} must be A:B with A and B among the runs {sorted(by_name)}")
        sa, sb = by_name[a], by_name[b]
        common = [sd for sd in sa.seeds if sd in sb.seeds]
        da = dict(zip(sa.seeds, sa.final.values))
        db = dict(zip(sb.seeds, sb.final.values))
        out.append((a, b, Stat([da[sd] - db[sd] for sd in common])))
    return out


def pairs_markdown(pairs: Sequence[Tuple[str, str, Stat]]) -> str:
    lines = ["| comparison | seeds | Δ final valid loss (paired) | exceeds the seed spread? |", "|---|---|---|---|"]
    for a, b, st in pairs:
        cell = st.fmt("+.4f") if st.n else "no common seed"
        v = verdict(st, 0.0, f"{a} lower", f"{b} lower") if st.n else ""
        lines.append(f"| {a} − {b} | {st.n} | {cell} | {v} |")
    return "\n".join(lines) + "\n"


def write_seeds_csv(path: Path, summaries: Sequence[SeedSummary]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "seeds", "final_loss_mean", "final_loss_sd", "delta_mean", "delta_sd", "delta_t",
                    "reached", "step_speedup_mean", "step_speedup_sd", "compute_speedup_mean",
                    "compute_speedup_sd", "interp_speedup_mean", "interp_speedup_sd", "speedup_resolution"])
        for s in summaries:
            t = s.delta.t()
            w.writerow([s.name, " ".join(map(str, s.seeds)), _num(s.final.mean), _num(s.final.sd),
                        _num(s.delta.mean), _num(s.delta.sd), "" if t is None else _num(t), s.reached,
                        _num(s.step_speedup.mean), _num(s.step_speedup.sd),
                        _num(s.compute_speedup.mean), _num(s.compute_speedup.sd),
                        _num(s.interp_speedup.mean), _num(s.interp_speedup.sd), _num(s.worst_resolution)])


def _num(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))


def _curve(run: Run) -> Tuple[np.ndarray, np.ndarray]:
    s = run.scalars[VALID_LOSS]
    return np.asarray(s.steps), np.asarray(s.values, dtype=float)


def plot_seeds(path: Path, summaries: Sequence[SeedSummary], per_seed: Dict[int, Dict[str, Run]],
               baseline: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, s in enumerate(summaries):
        if not s.seeds:
            continue
        steps, curves, deltas = None, [], []
        for sd in s.seeds:
            st, v = _curve(per_seed[sd][s.name])
            bst, bv = _curve(per_seed[sd][baseline])
            if steps is None:
                steps = st
            if not (np.array_equal(st, steps) and np.array_equal(bst, steps)):
                raise ValueError(f"{s.name}: seeds were evaluated at different steps; cannot average curves")
            curves.append(v)
            deltas.append(v - bv)
        color = f"C{i}"
        label = f"{s.name} (n={len(s.seeds)})"
        for axis, data in ((ax, np.array(curves)), (dax, np.array(deltas))):
            mean = data.mean(axis=0)
            axis.plot(steps, mean, color=color, label=label)
            if len(data) > 1:
                sd_ = data.std(axis=0, ddof=1)
                axis.fill_between(steps, mean - sd_, mean + sd_, color=color, alpha=0.2)
    ax.set(title=f"validation loss, mean ± sd over seeds ({title})", xlabel="step", ylabel="lm loss")
    dax.set(title="difference to the same seed's baseline", xlabel="step", ylabel="Δ lm loss")
    dax.axhline(0.0, color="black", lw=0.8)
    ax.legend(fontsize=8)
    dax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_seeds(a: argparse.Namespace) -> None:
    specs = parse_specs(a.runs)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summaries, per_seed = summarize_seeds(Path(a.root), a.seeds, specs, out)
    baseline = specs[0][0]
    md = seeds_markdown(summaries, baseline, a.title, a.seeds)
    warn_resolution(summaries, a.title or str(out))
    if a.pairs:
        pairs = pair_stats(summaries, a.pairs)
        md += "\n" + pairs_markdown(pairs)
        with open(f"{out}_pairs.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["a", "b", "seeds", "diff_mean", "diff_sd", "t"])
            for x, y, st in pairs:
                t = st.t()
                w.writerow([x, y, st.n, _num(st.mean), _num(st.sd), "" if t is None else _num(t)])
    Path(f"{out}.md").write_text(md)
    write_seeds_csv(Path(f"{out}.csv"), summaries)
    plot_seeds(Path(f"{out}.png"), summaries, per_seed, baseline, a.title)
    print(md)


# ------------------------------------------------------------------------------------------------ grid
def parse_grid(specs: Sequence[str]) -> List[Tuple[str, str, str]]:
    """``LAMBDA:PERCENT=DIR`` -> (lambda, percent, dir)."""
    out = []
    for spec in specs:
        key, sep, path = spec.partition("=")
        lam, colon, pct = key.partition(":")
        if not sep or not colon or not path:
            raise ValueError(f"grid spec {spec!r} must be LAMBDA:PERCENT=DIR")
        float(lam), int(pct)  # noqa: B018  (validates)
        out.append((lam, pct, path))
    return out


def stop_step_of(run_dir: Path) -> Optional[int]:
    """The run's real S_stop: ``--let-stop-step`` in the command run.sh recorded (None if absent)."""
    import shlex

    cmd = run_dir / "command.sh"
    if not cmd.is_file():
        return None
    tok = shlex.split(cmd.read_text())
    return int(tok[tok.index("--let-stop-step") + 1]) if "--let-stop-step" in tok else None


def grid_rows(runs_dir: Path, grid: Sequence[Tuple[str, str, str]]) -> List[dict]:
    base = _load("baseline", runs_dir / "baseline")
    if base is None:
        raise FileNotFoundError(f"{runs_dir / 'baseline'} was not made")
    runs = [base]
    keys, stops = {}, {}
    for lam, pct, sub in grid:
        run = _load(f"{lam}:{pct}", runs_dir / sub)
        if run is None:
            raise FileNotFoundError(f"grid run {runs_dir / sub} (λ0 {lam}, S_stop {pct}%) was not made")
        runs.append(run)
        keys[run.name] = (lam, pct)
        stops[run.name] = stop_step_of(runs_dir / sub)
    comp = {c.run: c for c in compare(runs, "baseline")}
    b = comp["baseline"]
    rows = []
    for name, (lam, pct) in keys.items():
        c = comp[name]
        rows.append({"lambda": lam, "stop_percent": pct, "stop_step": stops[name],
                     "final_valid_loss": c.final_valid_loss,
                     "delta": c.final_valid_loss - b.final_valid_loss, "steps_to_target": c.steps_to_target,
                     "step_speedup": c.step_speedup, "compute_speedup": c.compute_speedup,
                     "baseline_final_valid_loss": b.final_valid_loss})
    return rows


def best_settings(rows: Sequence[dict], top: int) -> List[str]:
    if top > len(rows):
        raise ValueError(f"--top {top} exceeds the {len(rows)} grid settings")
    ranked = sorted(rows, key=lambda r: r["final_valid_loss"])
    return [f"{r['lambda']}:{r['stop_percent']}" for r in ranked[:top]]


def grid_markdown(rows: Sequence[dict], train_iters: int) -> str:
    lams = sorted({r["lambda"] for r in rows}, key=float)
    pcts = sorted({r["stop_percent"] for r in rows}, key=int)
    cell = {(r["lambda"], r["stop_percent"]): r for r in rows}
    def steps(p: str) -> str:  # the real S_stop of that column's runs (as run.sh recorded them)
        real = {r["stop_step"] for r in rows if r["stop_percent"] == p and r["stop_step"] is not None}
        if len(real) == 1:
            return f"{real.pop()} steps"
        return f"{max(1, (train_iters * int(p) + 50) // 100)} steps" if not real else \
            "/".join(map(str, sorted(real))) + " steps"

    head = ["λ0 \\ S_stop"] + [f"{steps(p)} ({p}% of {train_iters})" for p in pcts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lam in lams:
        cells = [lam]
        for p in pcts:
            r = cell.get((lam, p))
            if r is None:
                cells.append("not run")
                continue
            sp = f"{r['step_speedup']:.2f}x" if r["step_speedup"] is not None else "not reached"
            cells.append(f"{r['final_valid_loss']:.4f} (Δ {r['delta']:+.4f}, {sp})")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Each cell: final validation loss (difference to the baseline's "
                 f"{rows[0]['baseline_final_valid_loss']:.4f}, step speed-up to the baseline's final loss); "
                 "one seed, so a difference smaller than the main table's seed spread is not a finding.")
    return "\n".join(lines) + "\n"


def plot_grid(path: Path, rows: Sequence[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = sorted({r["lambda"] for r in rows}, key=float)
    pcts = sorted({r["stop_percent"] for r in rows}, key=int)
    data = np.full((len(lams), len(pcts)), np.nan)
    for r in rows:
        data[lams.index(r["lambda"]), pcts.index(r["stop_percent"])] = r["delta"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    lim = float(np.nanmax(np.abs(data))) or 1.0
    im = ax.imshow(data, cmap="RdBu_r", vmin=-lim, vmax=lim)
    for i in range(len(lams)):
        for j in range(len(pcts)):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:+.3f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(pcts)), [f"{p}%" for p in pcts])
    ax.set_yticks(range(len(lams)), lams)
    ax.set(xlabel="S_stop (share of the run)", ylabel="λ0", title="final valid loss − baseline's")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_grid(a: argparse.Namespace) -> None:
    rows = grid_rows(Path(a.runs_dir), parse_grid(a.grid))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = grid_markdown(rows, a.train_iters)
    Path(f"{out}.md").write_text(md)
    with open(f"{out}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    plot_grid(Path(f"{out}.png"), rows)
    print(md)


def cmd_best(a: argparse.Namespace) -> None:
    for s in best_settings(grid_rows(Path(a.runs_dir), parse_grid(a.grid)), a.top):
        print(s)


# ------------------------------------------------------------------------------------------------ crossover
def teacher_final_loss(metrics_jsonl: Path) -> Tuple[int, float]:
    """(step, validation loss) of the teacher's last evaluation, from its metrics.jsonl."""
    import json

    if not metrics_jsonl.is_file():
        raise FileNotFoundError(f"{metrics_jsonl} missing: run the teachers stage first")
    valid = [r for r in map(json.loads, metrics_jsonl.read_text().splitlines())
             if r.get("split") == "valid" and "lm loss" in r]
    if not valid:
        raise ValueError(f"{metrics_jsonl} has no validation loss")
    return int(valid[-1]["iteration"]), float(valid[-1]["lm loss"])


def _value_at(run: Run, step: int) -> Optional[float]:
    st, v = _curve(run)
    hit = np.nonzero(st == step)[0]
    return float(v[hit[0]]) if hit.size else None


def _at_baseline_crossing(run: Run, other: Run, base: Run, teacher_loss: float) -> Optional[float]:
    """``run`` − ``other`` at the first evaluation where ``base`` is below the teacher's loss (None when
    the baseline never crosses it or either run has no evaluation at that step)."""
    br = reach_bracket(*_curve(base), teacher_loss)
    if br is None:
        return None
    here, there = _value_at(run, br[1]), _value_at(other, br[1])
    return None if here is None or there is None else here - there


def teacher_lines(seeds: Sequence[int], final: float, windows: Sequence[str]) -> Dict[int, float]:
    """The teacher's loss each seed's runs are compared with: its loss on that seed's own
    evaluation windows (``SEED=JSON`` of tools/evaluate.py) where given, else its final validation
    loss on its own windows."""
    import json

    given = {}
    for spec in windows:
        sd, sep, path = spec.partition("=")
        if not sep or not sd.isdigit():
            raise ValueError(f"--teacher-windows {spec!r} must be SEED=JSON")
        given[int(sd)] = float(json.loads(Path(path).read_text())["loss"])
    missing = [sd for sd in seeds if given and sd not in given]
    if missing:
        raise ValueError(f"--teacher-windows has no evaluation for seed(s) {missing}")
    return {sd: given.get(sd, final) for sd in seeds}


def crossover_rows(root: Path, seeds: Sequence[int], specs: Sequence[Tuple[str, str]],
                   teacher_loss: Dict[int, float]) -> Tuple[List[dict], Dict[int, Dict[str, Run]]]:
    """Per run: crossing step of the teacher's loss (``teacher_loss[seed]``: first evaluation below
    it and the interpolated step), and Δ to the same seed's baseline at the baseline's crossing and
    at the end."""
    baseline = specs[0][0]
    per_seed: Dict[int, Dict[str, Run]] = {}
    for sd in seeds:
        runs = {n: r for n, sub in specs if (r := _load(n, root / f"s{sd}" / sub)) is not None}
        if baseline not in runs:
            raise FileNotFoundError(f"seed {sd}: the baseline run {root / f's{sd}' / specs[0][1]} was not made")
        per_seed[sd] = runs
    rows = []
    for name, _ in specs:
        cross, interp, d_cross, d_final, seen = Stat(), Stat(), Stat(), Stat(), []
        for sd in seeds:
            run = per_seed[sd].get(name)
            if run is None:
                continue
            seen.append(sd)
            base = per_seed[sd][baseline]
            br = reach_bracket(*_curve(run), teacher_loss[sd])
            if br is not None:
                cross.values.append(br[1])
                interp.values.append(br[2])
            if name != baseline:
                d = _at_baseline_crossing(run, base, base, teacher_loss[sd])
                if d is not None:
                    d_cross.values.append(d)
            if name != baseline:
                d_final.values.append(float(_curve(run)[1][-1] - _curve(base)[1][-1]))
        change = Stat([f - c for f, c in zip(d_final.values, d_cross.values)]) \
            if len(d_final.values) == len(d_cross.values) else Stat()
        rows.append({"run": name, "seeds": seen, "crossed": cross.n, "cross_step": cross,
                     "cross_interp": interp, "delta_at_baseline_cross": d_cross, "delta_final": d_final,
                     "change": change})
    return rows, per_seed


def crossover_markdown(rows: Sequence[dict], teacher: Tuple[int, float], lines_by_seed: Dict[int, float],
                       title: str, windows: bool = False) -> str:
    head = ["run", "seeds", "crossed the teacher", "first evaluation below the teacher",
            "interpolated crossing step", "Δ vs baseline at the baseline's crossing", "Δ vs baseline, final",
            "final − at crossing (paired)", "after the crossing, LET's advantage"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = len(r["seeds"])
        base = r is rows[0]
        ch = r["change"]
        if base:
            trend = ""
        elif ch.n < 2 or r["delta_final"].n == 0:
            trend = "n/a (needs the crossing at ≥ 2 seeds)"
        elif not exceeds_spread(ch.t(0.0) or 0.0, ch.n):
            trend = "persists (no change beyond the seed spread)" if r["delta_final"].mean < 0 else \
                "no advantage either side of the crossing"
        elif ch.mean > 0:  # the advantage shrinks after the crossing: by how much does the end say
            t_final = r["delta_final"].t(0.0)
            if t_final is not None and exceeds_spread(t_final, r["delta_final"].n):
                trend = "reverses (ends worse, beyond the spread)" if t_final > 0 else "fades (still ahead at the end)"
            else:
                trend = "fades to level (final Δ within the spread)"
        else:
            trend = "grows"
        lines.append("| " + " | ".join([
            r["run"] + (" (reference)" if base else ""), str(n), f"{r['crossed']}/{n}",
            r["cross_step"].fmt(".0f") if r["crossed"] else "not reached",
            r["cross_interp"].fmt(".1f") if r["crossed"] else "not reached",
            "0" if base else r["delta_at_baseline_cross"].fmt("+.4f"),
            "0" if base else r["delta_final"].fmt("+.4f") + (
                f" ({verdict(r['delta_final'], 0.0, 'lower', 'higher')})" if r["delta_final"].n else ""),
            "" if base else (ch.fmt("+.4f") if ch.n else "n/a"), trend]) + " |")
    lines.append("")
    if windows:
        vals = Stat(list(lines_by_seed.values()))
        where = (f"its validation loss on each seed's own evaluation windows (tools/evaluate.py): "
                 f"{vals.fmt('.4f')} (" + ", ".join(f"{v:.4f}" for v in lines_by_seed.values())
                 + f"); on its own windows {teacher[1]:.4f} (step {teacher[0]})")
    else:
        where = f"final validation loss {teacher[1]:.4f} (step {teacher[0]}) on the same held-out documents"
    lines.append(f"{title}. Teacher: {where}. Crossing: the first evaluation whose validation loss is below the "
                 "teacher's (interpolated: on the straight line between the two evaluations around it). Δ: "
                 "the run's validation loss minus the same seed's baseline's, at the baseline's crossing step "
                 "and at the end; the last column tests the change between the two (paired t, 95 %).")
    return "\n".join(lines) + "\n"


def crossover_pairs(per_seed: Dict[int, Dict[str, Run]], baseline: str, teacher_loss: Dict[int, float],
                    pairs: Sequence[str]) -> List[Tuple[str, str, Stat, Stat]]:
    """Per pair A:B, the paired difference A − B of the validation loss at the baseline's crossing
    step (before the student outgrows the teacher) and at the end (after), over the common seeds."""
    names = {n for runs in per_seed.values() for n in runs}
    out = []
    for pair in pairs:
        a, sep, b = pair.partition(":")
        if not sep or a not in names or b not in names:
            raise ValueError(f"--pairs {pair!r} must be A:B with A and B among the runs {sorted(names)}")
        at_cross, final = Stat(), Stat()
        for sd, runs in per_seed.items():
            if a not in runs or b not in runs:
                continue
            final.values.append(float(_curve(runs[a])[1][-1] - _curve(runs[b])[1][-1]))
            d = _at_baseline_crossing(runs[a], runs[b], runs[baseline], teacher_loss[sd])
            if d is not None:
                at_cross.values.append(d)
        out.append((a, b, at_cross, final))
    return out


def crossover_pairs_markdown(pairs: Sequence[Tuple[str, str, Stat, Stat]]) -> str:
    lines = ["| comparison | seeds | Δ at the baseline's crossing (paired) | exceeds the seed spread? "
             "| Δ final (paired) | exceeds the seed spread? |", "|---|---|---|---|---|---|"]
    for a, b, cross, final in pairs:
        def cell(st: Stat) -> Tuple[str, str]:
            if not st.n:
                return "n/a", ""
            return st.fmt("+.4f"), verdict(st, 0.0, f"{a} lower", f"{b} lower")
        lines.append("| " + " | ".join([f"{a} − {b}", str(final.n), *cell(cross), *cell(final)]) + " |")
    return "\n".join(lines) + "\n"


def plot_crossover(path: Path, rows: Sequence[dict], per_seed: Dict[int, Dict[str, Run]],
                   lines_by_seed: Dict[int, float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        curves, steps = [], None
        for sd in r["seeds"]:
            st, v = _curve(per_seed[sd][r["run"]])
            steps = st if steps is None else steps
            if np.array_equal(st, steps):
                curves.append(v)
        if not curves:
            continue
        data = np.array(curves)
        ax.plot(steps, data.mean(0), color=f"C{i}", label=f"{r['run']} (n={len(curves)})")
        if len(curves) > 1:
            sd_ = data.std(0, ddof=1)
            ax.fill_between(steps, data.mean(0) - sd_, data.mean(0) + sd_, color=f"C{i}", alpha=0.2)
    lo, hi = min(lines_by_seed.values()), max(lines_by_seed.values())
    ax.axhline((lo + hi) / 2, color="black", ls="--", lw=1,
               label=f"teacher's loss {lo:.3f}" + (f"-{hi:.3f} (per seed)" if hi > lo else ""))
    if hi > lo:
        ax.axhspan(lo, hi, color="black", alpha=0.1)
    ax.set(title=f"validation loss vs the teacher ({title})", xlabel="step", ylabel="lm loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_crossover(a: argparse.Namespace) -> None:
    specs = parse_specs(a.runs)
    teacher = teacher_final_loss(Path(a.teacher_metrics))
    by_seed = teacher_lines(a.seeds, teacher[1], a.teacher_windows)
    rows, per_seed = crossover_rows(Path(a.root), a.seeds, specs, by_seed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = crossover_markdown(rows, teacher, by_seed, a.title, windows=bool(a.teacher_windows))
    if a.pairs:
        pairs = crossover_pairs(per_seed, specs[0][0], by_seed, a.pairs)
        md += "\n" + crossover_pairs_markdown(pairs)
        with open(f"{out}_pairs.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["a", "b", "seeds", "at_cross_mean", "at_cross_sd", "at_cross_t", "final_mean",
                        "final_sd", "final_t"])
            for pa, pb, cross, final in pairs:
                w.writerow([pa, pb, final.n, _num(cross.mean), _num(cross.sd),
                            "" if cross.t() is None else _num(cross.t()), _num(final.mean), _num(final.sd),
                            "" if final.t() is None else _num(final.t())])
    Path(f"{out}.md").write_text(md)
    with open(f"{out}.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run", "seeds", "crossed", "cross_step_mean", "cross_interp_mean", "cross_interp_sd",
                    "delta_at_baseline_cross_mean", "delta_at_baseline_cross_sd", "delta_final_mean",
                    "delta_final_sd", "change_mean", "change_sd", "change_t", "teacher_final_loss",
                    "teacher_loss_by_seed"])
        for r in rows:
            t = r["change"].t()
            w.writerow([r["run"], " ".join(map(str, r["seeds"])), r["crossed"], _num(r["cross_step"].mean),
                        _num(r["cross_interp"].mean), _num(r["cross_interp"].sd),
                        _num(r["delta_at_baseline_cross"].mean), _num(r["delta_at_baseline_cross"].sd),
                        _num(r["delta_final"].mean), _num(r["delta_final"].sd), _num(r["change"].mean),
                        _num(r["change"].sd), "" if t is None else _num(t), repr(teacher[1]),
                        " ".join(f"{sd}:{v!r}" for sd, v in by_seed.items())])
    plot_crossover(Path(f"{out}.png"), rows, per_seed, by_seed, a.title)
    print(md)


# ------------------------------------------------------------------------------------------------ claims
def _read_csv(path: Path) -> List[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: run the report stage first")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _f(row: dict, key: str) -> Optional[float]:
    v = row.get(key, "")
    return float(v) if v not in ("", None) else None


def _verdict_t(t: Optional[float], n: int) -> str:
    if t is None or n < 2:
        return "one seed"
    return "exceeds the seed spread" if exceeds_spread(t, n) else "within the seed spread"


def claims_markdown(report: Path, mixes: Sequence[str]) -> str:
    """One computed line per claim of the paper, from the report's CSV files."""
    out: List[str] = []
    let_sd: Dict[str, Optional[float]] = {}
    for mix in mixes:
        rows = {r["run"]: r for r in _read_csv(report / f"main_{mix}.csv")}
        let = rows["LET"]
        n = len(let["seeds"].split())
        let_sd[mix] = _f(let, "delta_sd")
        sp = fmt_pm(_f(let, "step_speedup_mean"), _f(let, "step_speedup_sd"), ".2f", "x")
        cp = fmt_pm(_f(let, "compute_speedup_mean"), _f(let, "compute_speedup_sd"), ".2f", "x")
        out.append(f"- **Claim 1, mix `{mix}`** (LET ends better than the baseline): Δ final validation loss "
                   f"{fmt_pm(_f(let, 'delta_mean'), _f(let, 'delta_sd'), '+.4f')} over {n} seeds, "
                   f"{_verdict_t(_f(let, 'delta_t'), n)}; LET reached the baseline's final loss in "
                   f"{let['reached']}/{n} seeds, step speed-up {sp}, compute speed-up {cp} (over the seeds that reached it).")
        for r in _read_csv(report / f"main_{mix}_pairs.csv"):
            k = int(r["seeds"])
            if k == 0:
                continue
            claim = {"SALT": "2", "RKD": "2", "LET-logsum": "5"}.get(r["b"], "?")
            out.append(f"- **Claim {claim}, mix `{mix}`** ({r['a']} vs {r['b']}): {r['a']} − {r['b']} = "
                       f"{fmt_pm(_f(r, 'diff_mean'), _f(r, 'diff_sd'), '+.4f')} over {k} seed(s), "
                       f"{_verdict_t(_f(r, 't'), k)}.")
    grid = _read_csv(report / "grid.csv")
    ranked = sorted(grid, key=lambda r: float(r["final_valid_loss"]))
    best = ranked[0]
    default = [r for r in grid if float(r["lambda"]) == 0.1]
    out.append(f"- **Claim 3** (λ0 = 0.1 is best): in the one-seed grid the lowest final loss is at λ0 "
               f"{best['lambda']}, S_stop {best['stop_percent']}% (Δ {float(best['delta']):+.4f} vs the "
               f"baseline); the best λ0 = 0.1 cell has Δ "
               + (f"{min(float(r['delta']) for r in default):+.4f}" if default else "n/a (not in the grid)")
               + "; over the seeds, see the best-settings table:")
    for r in _read_csv(report / "best.csv"):
        if r["run"] == "baseline":
            continue
        n = len(r["seeds"].split())
        out.append(f"  - {r['run']}: Δ {fmt_pm(_f(r, 'delta_mean'), _f(r, 'delta_sd'), '+.4f')} over {n} seeds, "
                   f"{_verdict_t(_f(r, 'delta_t'), n)}")
    layers = [r for r in _read_csv(report / "layers.csv") if r["run"] != "baseline" and r["seeds"]]
    if layers:
        order = sorted(layers, key=lambda r: float(r["final_loss_mean"]))
        spread = max(float(r["final_loss_mean"]) for r in layers) - min(float(r["final_loss_mean"]) for r in layers)
        sd = let_sd.get(mixes[0])
        out.append(f"- **Claim 4** (L2E best): one seed; order by final loss "
                   f"{' < '.join(r['run'] for r in order)}; the pairs span {spread:.4f} nats"
                   + (f", against a seed sd of LET's Δ of {sd:.4f} on mix `{mixes[0]}`" if sd is not None else ""))
    for mix in mixes:
        rows = {r["run"]: r for r in _read_csv(report / f"teacher_{mix}.csv")}
        same, dis = rows.get("LET (same-data teacher)"), rows.get("LET (disjoint teacher)")
        if same and dis and same["seeds"] and dis["seeds"]:
            diff = float(dis["final_loss_mean"]) - float(same["final_loss_mean"])
            sd = let_sd.get(mix)
            out.append(f"- **Disjoint teacher, mix `{mix}`**: LET with the disjoint teacher − LET with the "
                       f"same-data teacher = {diff:+.4f} (one seed; Δ vs the baseline "
                       f"{float(dis['delta_mean']):+.4f} vs {float(same['delta_mean']):+.4f})"
                       + (f"; LET's seed sd on this mix is {sd:.4f}" if sd is not None else ""))
    out.append("")
    out.append("Lines computed by `examples/reproduce/study.py claims` from the CSV files behind the tables "
               "(paired t-test over seeds, two-sided 95 %).")
    return "\n".join(out) + "\n"


def cmd_claims(a: argparse.Namespace) -> None:
    md = claims_markdown(Path(a.report), a.mixes)
    Path(a.report, "claims.md").write_text(md)
    print(md)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("seeds", help="mean ± sd tables over seeds")
    s.add_argument("--root", required=True, help="folder holding sSEED/DIR runs")
    s.add_argument("--seeds", type=int, nargs="+", required=True)
    s.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR", help="the first is the baseline")
    s.add_argument("--out", required=True, help="output prefix (.md, .csv, .png, _sSEED.csv)")
    s.add_argument("--title", default="")
    s.add_argument("--pairs", nargs="*", default=[], metavar="A:B",
                   help="also test run A against run B (paired over their common seeds)")
    s.set_defaults(func=cmd_seeds)
    for name, func in (("grid", cmd_grid), ("best", cmd_best)):
        g = sub.add_parser(name)
        g.add_argument("--runs-dir", required=True, help="one seed's runs (holds baseline/)")
        g.add_argument("--grid", nargs="+", required=True, metavar="LAMBDA:PERCENT=DIR")
        if name == "grid":
            g.add_argument("--train-iters", type=int, required=True)
            g.add_argument("--out", required=True)
        else:
            g.add_argument("--top", type=int, default=2)
        g.set_defaults(func=func)
    x = sub.add_parser("crossover", help="where the runs cross the teacher's loss, Δ before/after")
    x.add_argument("--root", required=True, help="folder holding sSEED/DIR runs")
    x.add_argument("--seeds", type=int, nargs="+", required=True)
    x.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR", help="the first is the baseline")
    x.add_argument("--teacher-metrics", required=True, help="the teacher's metrics.jsonl")
    x.add_argument("--out", required=True)
    x.add_argument("--title", default="")
    x.add_argument("--pairs", nargs="*", default=[], metavar="A:B",
                   help="paired A − B at the baseline's crossing and at the end")
    x.add_argument("--teacher-windows", nargs="*", default=[], metavar="SEED=JSON",
                   help="the teacher's loss on each seed's evaluation windows (tools/evaluate.py --output); "
                        "default: its final validation loss on its own windows")
    x.set_defaults(func=cmd_crossover)
    c = sub.add_parser("claims", help="one computed line per claim of the paper (REPORT/claims.md)")
    c.add_argument("--report", required=True)
    c.add_argument("--mixes", nargs="+", required=True)
    c.set_defaults(func=cmd_claims)
    a = p.parse_args(argv)
    a.func(a)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"study.py: error: {err}")
