"""A run killed with SIGKILL after a checkpoint resumes with exactly the uninterrupted trajectory."""

import os
import signal
import subprocess
import sys
import time

from launch import ROOT, TINY_MODEL, base_env, read_metrics, run_pretrain

ARGS = TINY_MODEL + ["--objective", "baseline", "--mock-data", "--vocab-size", "200",
                     "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "8",
                     "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.25", "--seed", "3"]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    ref_metrics = str(tmp_path / "ref.jsonl")
    run_pretrain(ARGS + ["--metrics-jsonl", ref_metrics])
    ref = read_metrics(ref_metrics)

    save = str(tmp_path / "ckpt")
    metrics = str(tmp_path / "run.jsonl")
    # slow the run down after iteration 3 so the kill lands between checkpoints
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_let.py"), *ARGS, "--save", save,
           "--save-interval", "3", "--metrics-jsonl", metrics]
    env = base_env()
    env["MEGATRON_LET_TEST_STEP_SLEEP"] = "1.0"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    tracker = os.path.join(save, "latest_checkpointed_iteration.txt")
    deadline = time.time() + 240
    while time.time() < deadline:
        if os.path.isfile(tracker) and open(tracker).read().strip() == "3":
            break
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert open(tracker).read().strip() == "3"
    killed_at = max(read_metrics(metrics))
    assert killed_at < 8, "the run finished before it was killed"

    run_pretrain(ARGS + ["--save", save, "--load", save, "--save-interval", "3",
                         "--metrics-jsonl", metrics])
    resumed = read_metrics(metrics)  # later lines (the resumed run) override the killed run's
    for it in range(4, 9):
        assert abs(resumed[it]["lm loss"] - ref[it]["lm loss"]) < 1e-6, (it, resumed[it], ref[it])
        assert abs(resumed[it]["lr"] - ref[it]["lr"]) < 1e-12
    assert open(tracker).read().strip() == "8"
    assert not [n for n in os.listdir(save) if n.endswith(".tmp")]


def test_killed_during_save_keeps_previous_checkpoint(tmp_path):
    """A half-written checkpoint (the .tmp folder of a killed save) is never loaded."""
    save = str(tmp_path / "ckpt")
    run_pretrain(ARGS + ["--train-iters", "2", "--save", save])
    os.makedirs(os.path.join(save, "iter_0000004.tmp"))  # what a kill mid-save leaves behind
    metrics = str(tmp_path / "m.jsonl")
    # a longer run than the checkpoint's: its schedule follows the new --train-iters
    out = run_pretrain(ARGS + ["--train-iters", "3", "--override-opt_param-scheduler", "--save", save,
                               "--load", save, "--metrics-jsonl", metrics])
    assert "resumed from" in out.stdout and "iteration 2" in out.stdout
    assert sorted(read_metrics(metrics)) == [3]
    assert not os.path.exists(os.path.join(save, "iter_0000004.tmp"))
