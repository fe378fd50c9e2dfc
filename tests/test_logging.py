"""TensorBoard scalars and the console line carry the same numbers as the per-iteration metrics."""

import math

import pytest

from launch import TINY_MODEL, base_env, read_metrics, run_script


def test_tensorboard_console_and_validation(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb, metrics = str(tmp_path / "tb"), str(tmp_path / "m.jsonl")
    env = base_env()
    env.pop("PYTHONWARNINGS")  # as users run it
    proc = run_script("pretrain_let.py",
                      TINY_MODEL + ["--objective", "baseline", "--mock-data", "--vocab-size", "200",
                                    "--micro-batch-size", "2", "--train-iters", "4",
                                    "--eval-interval", "2", "--eval-iters", "2",
                                    "--tensorboard-dir", tb, "--metrics-jsonl", metrics], env=env)
    out = proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr  # a clean log: no library noise
    acc = EventAccumulator(tb)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/lm_loss", "train/total_loss", "train/lr", "train/grad_norm",
                "train/tokens_per_sec", "train/step_time", "train/peak_memory_MB",
                "valid/lm_loss", "valid/ppl"):
        assert tag in tags, tag
    m = read_metrics(metrics)
    tb_loss = {e.step: e.value for e in acc.Scalars("train/lm_loss")}
    assert sorted(tb_loss) == [1, 2, 3, 4]
    for i in range(1, 5):
        assert abs(tb_loss[i] - m[i]["lm loss"]) < 1e-5
    valid = read_metrics(metrics, split="valid")
    assert sorted(valid) == [2, 4]
    assert abs(valid[4]["ppl"] - math.exp(valid[4]["lm loss"])) < 1e-3 * valid[4]["ppl"]
    # Megatron-style console line with progress and ETA
    lines = [l for l in out.splitlines() if "iteration        4/       4" in l]
    assert lines and "lm loss:" in lines[0] and "ETA" in lines[0] and "tokens/s" in lines[0]
    assert "validation at iteration        4" in out


def test_interval_timer_reports_the_last_interval_without_pauses():
    from megatron_let.training.metrics import IntervalTimer

    now = [100.0]
    timer = IntervalTimer(iteration=5, clock=lambda: now[0])
    now[0] += 30.0  # 10 slow steps: 3 s each
    assert timer.per_iteration(15) == pytest.approx(3.0)
    timer.restart(15)
    now[0] += 4.0   # 4 fast steps: 1 s each ...
    with timer.paused():
        now[0] += 50.0  # ... and an evaluation that is not a training step
    now[0] += 6.0   # 6 more fast steps
    assert timer.per_iteration(25) == pytest.approx(1.0)  # not (30 + 60) / 20, not 6.0


def test_interval_average_is_the_mean_of_the_interval_without_skipped_steps():
    from megatron_let.training.metrics import IntervalAverage

    avg = IntervalAverage(["lm loss", "kd loss"])
    avg.add({"lm loss": 4.0, "kd loss": 1.0, "lr": 9.0})
    avg.add({"lm loss": 100.0}, skipped=True)  # a skipped update is left out, as in Megatron-LM
    avg.add({"lm loss": 2.0})
    assert avg.pop() == {"lm loss": 3.0, "kd loss": 1.0}
    avg.add({"lm loss": 5.0})
    assert avg.pop() == {"lm loss": 5.0}  # pop started a new interval
