"""Graceful stop and resume through the launchers and the SLURM script, on CPU.

A run started with ``--exit-signal-handler`` (the launchers always pass it) that receives SIGUSR1
or SIGTERM mid-run must save a complete checkpoint at the next step boundary and exit 0; resuming
(``--load`` = ``--save``) must reproduce the uninterrupted run's per-iteration loss.

* SIGTERM goes to the launcher's pid, as ``kill``/``docker stop`` do; the launcher forwards it to
  the trainers, which torchrun runs in sessions of their own.
* SIGUSR1 goes to the batch shell of ``examples/slurm/pretrain_let.sbatch``, as
  ``#SBATCH --signal=B:USR1@120`` does. ``srun`` and ``scontrol`` are stand-ins on PATH: ``srun``
  drops its options and runs the task in place, ``scontrol`` answers ``show hostnames`` and records
  ``requeue``. The script then really runs torchrun with c10d rendezvous on this machine, and a
  second submission (what the requeue does) resumes from the checkpoint.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

import pytest

from launch import ROOT, free_port, read_metrics
from test_launchers import LAUNCHERS, SBATCH, run_launcher, tiny_env, tracker

TRAIN_ITERS = 6
STEP_SLEEP = "0.5"  # the trainer sleeps this long per step, so the signal lands mid-run


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from tiny_teachers import save_tiny_llama_teacher

    path = tmp_path_factory.mktemp("tiny_teacher")
    save_tiny_llama_teacher(path, vocab_size=200)
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher):
    """Per-iteration metrics of the uninterrupted run (LET launcher, tiny override)."""
    ck = str(tmp_path_factory.mktemp("reference") / "ck")
    run_launcher(LAUNCHERS["1b", "let"], tiny_env(ck, tiny_teacher, TRAIN_ITERS=TRAIN_ITERS))
    recs = read_metrics(os.path.join(ck, "metrics.jsonl"))
    assert sorted(recs) == list(range(1, TRAIN_ITERS + 1))
    return recs


def _wait_for_iterations(metrics_path: str, proc: subprocess.Popen, n: int, log: str,
                         timeout=300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isfile(metrics_path) and len(read_metrics(metrics_path)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {n} iterations:\n"
                                 + open(log).read()[-4000:])
        time.sleep(0.1)
    raise AssertionError(f"no {n} iterations in {timeout}s:\n" + open(log).read()[-4000:])


def _interrupt(cmd, env, metrics_path, sig, log) -> tuple[int, str]:
    """Start ``cmd``, send ``sig`` to it once 2 iterations are logged, return (rc, output)."""
    with open(log, "w") as out:  # a file, not a pipe: nobody reads while the run goes on
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for_iterations(metrics_path, proc, 2, log)
        os.kill(proc.pid, sig)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:  # never leave a run behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, open(log).read()


def _check_stop_and_resume(ck: str, rc: int, out: str, reference, resume) -> None:
    assert rc == 0, out[-4000:]
    assert "exit signal received: checkpoint saved" in out, out[-4000:]
    stopped = int(tracker(ck))  # the tracker names the checkpoint written at the signal
    assert 2 <= stopped < TRAIN_ITERS, f"stopped at {stopped}"
    assert os.path.isdir(os.path.join(ck, f"iter_{stopped:07d}"))
    assert not [n for n in os.listdir(ck) if n.endswith(".tmp")], "unfinished checkpoint left"
    assert max(read_metrics(os.path.join(ck, "metrics.jsonl"))) == stopped

    out = resume()
    assert f"resumed from {ck} at iteration {stopped}" in out
    assert tracker(ck) == str(TRAIN_ITERS)
    recs = read_metrics(os.path.join(ck, "metrics.jsonl"))  # both runs append; last write wins
    assert sorted(recs) == sorted(reference)
    for it in reference:
        assert recs[it]["lm loss"] == pytest.approx(reference[it]["lm loss"], abs=1e-6, rel=0), it
        assert recs[it]["lambda"] == pytest.approx(reference[it]["lambda"], abs=1e-12), it


def test_sigterm_to_launcher_checkpoints_and_resumes(tmp_path, tiny_teacher, reference):
    ck = str(tmp_path / "ck")
    env = tiny_env(ck, tiny_teacher, TRAIN_ITERS=TRAIN_ITERS)
    slow = dict(env, MEGATRON_LET_TEST_STEP_SLEEP=STEP_SLEEP)
    path = LAUNCHERS["1b", "let"]
    rc, out = _interrupt(["bash", path], slow, os.path.join(ck, "metrics.jsonl"), signal.SIGTERM,
                         str(tmp_path / "run.log"))
    assert "forwarding SIGTERM" in out
    _check_stop_and_resume(
        ck, rc, out, reference,
        resume=lambda: run_launcher(path, dict(env, MASTER_PORT=str(free_port()))).stdout)


def _fake_slurm(bin_dir, requeue_log) -> None:
    os.makedirs(bin_dir, exist_ok=True)
    scripts = {
        # srun: drop srun's own options, run the task in place (one node)
        "srun": """#!/bin/bash
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in
        --nodes|--ntasks-per-node|--container-image|--container-mounts|--container-workdir) shift 2 ;;
        *) shift ;;
    esac
done
exec "$@"
""",
        "scontrol": f"""#!/bin/bash
case $1 in
    show) echo localhost ;;
    requeue) echo "$2" >> {requeue_log} ;;
    *) echo "scontrol stand-in: unexpected $*" >&2; exit 1 ;;
esac
""",
    }
    for name, text in scripts.items():
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def test_sbatch_usr1_checkpoints_requeues_and_resumes(tmp_path, tiny_teacher, reference):
    ck = str(tmp_path / "ck")
    bin_dir, requeue_log = str(tmp_path / "bin"), str(tmp_path / "requeued")
    _fake_slurm(bin_dir, requeue_log)

    def sbatch_env(**extra):
        env = tiny_env(ck, tiny_teacher, TRAIN_ITERS=TRAIN_ITERS,
                       LAUNCHER=os.path.relpath(LAUNCHERS["1b", "let"], ROOT),
                       SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES=1, SLURM_JOB_NODELIST="localhost",
                       SLURM_SUBMIT_DIR=ROOT, RDZV_PORT=free_port(), **extra)
        env["PATH"] = bin_dir + os.pathsep + env["PATH"]
        return env

    env = sbatch_env(MEGATRON_LET_TEST_STEP_SLEEP=STEP_SLEEP)
    rc, out = _interrupt(["bash", SBATCH], env, os.path.join(ck, "metrics.jsonl"), signal.SIGUSR1,
                         str(tmp_path / "job.log"))
    assert "rendezvous localhost:" in out
    assert "--rdzv_backend c10d" in out
    assert open(requeue_log).read().split() == ["4242"]  # the job asked to be requeued

    def resubmit():  # what the requeue does: the same job script again
        proc = subprocess.run(["bash", SBATCH], env=sbatch_env(), cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert open(requeue_log).read().split() == ["4242"]  # a finished job does not requeue
        return proc.stdout + proc.stderr

    _check_stop_and_resume(ck, rc, out, reference, resume=resubmit)
