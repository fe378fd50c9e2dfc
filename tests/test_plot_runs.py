"""megatron_let.analysis (runs, compare, plots) and its command lines tools/plot_runs.py and
tools/compare_runs.py on TensorBoard logs with known scalars.

Three fake runs are written with torch's SummaryWriter; every expected number below is worked out
by hand from the scalars written (binary-exact loss values, so float32 storage changes nothing).
"""

import csv
import importlib.util
import json
import math
import os

import numpy as np
import pytest

from megatron_let.analysis import compare as cmp
from megatron_let.analysis import plots
from megatron_let.analysis import runs as runlog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


plot_runs = _load("plot_runs")
compare_runs = _load("compare_runs")

EVAL_STEPS = [20, 40, 60, 80, 100]
# baseline reaches its final 2.0 at step 100; LET at step 60; "slow" never does
VALID = {
    "baseline": [3.0, 2.5, 2.25, 2.125, 2.0],
    "LET": [2.75, 2.5, 2.0, 1.875, 1.75],
    "slow": [3.5, 3.25, 3.0, 2.75, 2.5],
}


def _step_time(name, step):
    if name == "LET":
        return 0.75 if step <= 30 else 0.5  # teacher forward until S_stop = 30
    return 0.5


def write_run(logdir, name):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=logdir)
    for step in range(1, 101):
        wall = 1000.0 + 2.0 * step  # "slow" has no step_time: its clock is the event time
        w.add_scalar("train/lm_loss", 10.0 - 0.05 * step, step, walltime=wall)
        if name != "slow":
            w.add_scalar("train/step_time", _step_time(name, step), step, walltime=wall)
        if name == "LET":
            w.add_scalar("train/lambda", 0.1 * max(0.0, (30 - (step - 1)) / 30), step, walltime=wall)
            w.add_scalar("train/cosine_similarity", min(0.9, 0.01 * step), step, walltime=wall)
    for step, v in zip(EVAL_STEPS, VALID[name]):
        w.add_scalar("valid/lm_loss", v, step, walltime=1000.0 + 2.0 * step + 1)
        if name != "slow":
            w.add_scalar("valid/ppl", math.exp(v), step, walltime=1000.0 + 2.0 * step + 1)
    w.close()


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name in VALID:
        d = root / name / "tensorboard"
        write_run(str(d), name)
        out[name] = str(root / name)  # the run folder: event files are found below it
    return out


def specs(logs, names=("baseline", "LET", "slow")):
    return [f"{n}={logs[n]}" for n in names]


def test_loader_reads_every_scalar(logs):
    run = runlog.load_run("LET", logs["LET"])
    assert run.source == "tensorboard"
    assert set(run.scalars) == {"train/lm_loss", "train/step_time", "train/lambda",
                                "train/cosine_similarity", "valid/lm_loss", "valid/ppl"}
    v = run.scalars["valid/lm_loss"]
    assert v.steps.tolist() == EVAL_STEPS and v.values.tolist() == VALID["LET"]
    lam = run.scalars["train/lambda"]
    assert lam.value_at(1) == pytest.approx(0.1) and lam.value_at(31) == 0.0
    # training seconds = cumulative step_time: 30 x 0.75 + 10 x 0.5 at step 40
    assert run.train_seconds().values[39] == pytest.approx(27.5)
    slow = runlog.load_run("slow", logs["slow"])
    t = slow.train_seconds()  # event-time fallback: 2 s per step since step 1
    assert t.values[0] == 0.0 and t.values[-1] == pytest.approx(198.0)


def test_jsonl_fallback_equals_tensorboard(logs, tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as fh:
        for step in range(1, 101):
            fh.write(json.dumps({"iteration": step, "split": "train", "time": 1000.0 + step,
                                 "lm loss": 10.0 - 0.05 * step, "step time": _step_time("LET", step),
                                 "lambda": 0.1 * max(0.0, (30 - (step - 1)) / 30)}) + "\n")
        for step, v in zip(EVAL_STEPS, VALID["LET"]):
            fh.write(json.dumps({"iteration": step, "split": "valid", "time": 1000.0 + step,
                                 "lm loss": v, "ppl": math.exp(v)}) + "\n")
    from_jsonl = runlog.load_run("LET", str(tmp_path))  # a folder with metrics.jsonl only
    from_tb = runlog.load_run("LET", logs["LET"])
    assert from_jsonl.source == "jsonl"
    for tag in ("valid/lm_loss", "train/lambda", "train/step_time", "train/lm_loss"):
        np.testing.assert_array_equal(from_jsonl.scalars[tag].steps, from_tb.scalars[tag].steps)
        np.testing.assert_allclose(from_jsonl.scalars[tag].values, from_tb.scalars[tag].values, rtol=1e-6)


def test_plots_are_valid_images(logs, tmp_path):
    import matplotlib.image

    out = tmp_path / "plots"
    assert plot_runs.main(["--runs", *specs(logs), "--out", str(out)]) == 0
    names = sorted(os.listdir(out))
    assert names == ["cosine_similarity.png", "schedules.png", "train_loss_vs_step.png",
                     "train_loss_vs_time.png", "valid_loss_vs_step.png"]
    for n in names:
        img = matplotlib.image.imread(str(out / n))
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300 and img.shape[2] in (3, 4)
        assert img[..., :3].std() > 0.01, f"{n} is blank"


def test_panels_without_data_are_skipped(logs, tmp_path, capsys):
    out = tmp_path / "plots"
    assert plot_runs.main(["--runs", *specs(logs, ("baseline", "slow")), "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["train_loss_vs_step.png", "train_loss_vs_time.png",
                                       "valid_loss_vs_step.png"]
    msg = capsys.readouterr().out
    assert "skipped Teacher-weight schedules" in msg and "skipped Cosine similarity" in msg


def test_moving_average_by_hand():
    got = plots.moving_average(np.array([1.0, 2.0, 3.0, 4.0]), 2)
    np.testing.assert_allclose(got, [1.0, 1.5, 2.5, 3.5])


def test_comparison_numbers_by_hand(logs, tmp_path):
    md, csv_path, js = (str(tmp_path / f"t.{e}") for e in ("md", "csv", "json"))
    # no --baseline: the run named "baseline" is the reference
    assert compare_runs.main(["--runs", *specs(logs), "--out", md, csv_path, js]) == 0
    with open(csv_path) as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    b, let, slow = rows["baseline"], rows["LET"], rows["slow"]
    assert float(b["target_loss"]) == 2.0
    assert int(b["steps_to_target"]) == 100 and int(let["steps_to_target"]) == 60
    assert slow["steps_to_target"] == "" and slow["step_speedup"] == ""
    assert float(let["step_speedup"]) == pytest.approx(100 / 60)       # 1.67x
    assert float(b["step_speedup"]) == 1.0
    # whole-run training time: baseline 100 x 0.5; LET 30 x 0.75 + 70 x 0.5; slow 99 x 2 s
    assert float(b["train_seconds"]) == pytest.approx(50.0)
    assert float(let["train_seconds"]) == pytest.approx(57.5)
    assert float(slow["train_seconds"]) == pytest.approx(198.0)
    assert float(let["wallclock_ratio"]) == pytest.approx(57.5 / 50.0)
    assert float(slow["wallclock_ratio"]) == pytest.approx(198.0 / 50.0)
    # time to the target: LET at step 60 = 22.5 + 15; baseline at 100 = 50
    assert float(let["seconds_to_target"]) == pytest.approx(37.5)
    assert float(let["wallclock_speedup"]) == pytest.approx(50.0 / 37.5)
    assert float(let["final_valid_loss"]) == 1.75
    assert float(let["final_valid_ppl"]) == pytest.approx(math.exp(1.75), rel=1e-6)
    assert float(slow["final_valid_ppl"]) == pytest.approx(math.exp(2.5))  # no valid/ppl: exp(loss)
    table = open(md).read()
    assert "| LET | 100 | 1.7500 | 5.75 | 60 | 1.67x |" in table
    assert "| slow | 100 | 2.5000 | 12.18 | not reached | n/a |" in table
    assert json.load(open(js))["baseline"] == "baseline"


def test_compute_to_target_counts_the_teacher(tmp_path):
    """FLOPs to the target from the per-step estimates the trainer logs under config/."""
    from torch.utils.tensorboard import SummaryWriter

    paths = {}
    # (student FLOPs/step, teacher FLOPs/step, teacher active steps); LET's teacher runs 30 steps
    flops = {"baseline": (6e12, 0.0, 0), "LET": (6e12, 1.5e12, 30), "slow": (6e12, 0.0, 0)}
    for name in VALID:
        d = tmp_path / name
        write_run(str(d), name)
        if name != "slow":  # "slow" is an older log without the estimates
            w = SummaryWriter(log_dir=str(d))
            s, t, n = flops[name]
            w.add_scalar("config/student_flops_per_step", s, 0)
            w.add_scalar("config/teacher_flops_per_step", t, 0)
            w.add_scalar("config/teacher_active_steps", n, 0)
            w.close()
        paths[name] = str(d)
    runs = runlog.load_runs([f"{n}={p}" for n, p in paths.items()])
    rows = {c.run: c for c in cmp.compare(runs, "baseline")}
    # baseline: 100 steps x 6e12; LET: 60 x 6e12 + 30 x 1.5e12 (its teacher stopped at step 30)
    assert rows["baseline"].flops_to_target == pytest.approx(6e14)
    assert rows["LET"].flops_to_target == pytest.approx(3.6e14 + 4.5e13)
    assert rows["LET"].compute_speedup == pytest.approx(6e14 / 4.05e14)  # 1.48x, vs 1.67x in steps
    assert rows["LET"].step_speedup == pytest.approx(100 / 60)
    assert rows["baseline"].compute_speedup == 1.0
    assert rows["slow"].flops_to_target is None and rows["slow"].compute_speedup is None
    table = cmp.to_markdown(list(rows.values()), "baseline")
    assert "| 4.050e+14 | 1.48x |" in table and "| not reached | n/a |" in table


def test_another_baseline_changes_the_target(logs):
    runs = runlog.load_runs(specs(logs, ("LET", "slow")))
    rows = cmp.compare(runs, "slow")  # target 2.5: slow reaches at 100, LET at 40
    let = rows[0]
    assert let.target_loss == 2.5 and let.steps_to_target == 40
    assert let.step_speedup == pytest.approx(100 / 40)


def test_bad_inputs_raise_clear_errors(logs, tmp_path, capsys):
    with pytest.raises(ValueError, match="not NAME=PATH"):
        runlog.parse_run_specs(["justapath"])
    with pytest.raises(ValueError, match="twice"):
        runlog.parse_run_specs(["a=x", "a=y"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runlog.load_runs([f"a={tmp_path / 'missing'}"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        runlog.load_run("e", str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"iteration": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        runlog.load_run("b", str(bad))
    runs = runlog.load_runs(specs(logs, ("LET",)))
    with pytest.raises(ValueError, match="--baseline 'nope'"):
        cmp.compare(runs, "nope")
    assert compare_runs.main(["--runs", *specs(logs), "--out", str(tmp_path / "t.txt")]) == 2
    assert "use a .md, .csv or .json" in capsys.readouterr().err
    assert plot_runs.main(["--runs", f"x={tmp_path / 'missing'}", "--out", str(tmp_path / "p")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_without_validation_is_refused(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(tmp_path / "tb"))
    w.add_scalar("train/lm_loss", 3.0, 1)
    w.close()
    runs = runlog.load_runs([f"a={tmp_path}"])
    with pytest.raises(ValueError, match="logged no valid/lm_loss"):
        cmp.compare(runs, "a")
