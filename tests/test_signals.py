"""Graceful stop and resume through the real process chain, on CPU.

A run started with ``--exit-signal-handler`` (the launchers always pass it) that receives SIGUSR1
or SIGTERM mid-run must save a complete checkpoint at the next step boundary and exit 0 without a
traceback; resuming (``--load`` = ``--save``) must reproduce the uninterrupted run's losses.

* SIGTERM to the launcher's pid, as ``kill``/``docker stop`` do, and SIGUSR1 to the torchrun agent
  (the parent of the trainer processes), as SLURM signals every process of a job step: the agent
  (megatron_let.runtime.torchrun) passes them to the trainers, which run in sessions of their own.
* SIGKILL to the agent alone: its trainers die within seconds and write nothing.
* A real one-node SLURM (tests/slurm_cluster.py; Debian's slurm-wlm, installed with apt-get when
  running as root, which CI does): ``examples/slurm/pretrain_let.sbatch`` is submitted with the tiny
  CPU override, ``scancel --signal=USR1 --batch`` delivers what ``#SBATCH --signal=B:USR1@120``
  delivers, and the job checkpoints, requeues itself and resumes within the same job id.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import psutil
import pytest

import warm_start
from launch import ROOT, free_port, read_metrics, run_script
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
    # uninterrupted: its ranks may start warm (tests/warm_torchrun); the interrupted runs start cold
    run_launcher(LAUNCHERS["1b", "let"],
                 warm_start.torchrun_env(tiny_env(ck, tiny_teacher, TRAIN_ITERS=TRAIN_ITERS)))
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


def _trainers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The pretrain_let.py processes started under ``proc`` (torchrun's workers)."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in kids:
        try:
            if any(a.endswith("pretrain_let.py") for a in p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _agent(proc: subprocess.Popen) -> int:
    """The torchrun agent: the parent of the trainer processes."""
    parents = {p.ppid() for p in _trainers(proc)}
    assert len(parents) == 1, parents
    return parents.pop()


def _kill_tree(proc: subprocess.Popen, extra=()) -> None:
    """Never leave a run behind: the trainers run in sessions of their own."""
    for p in [*_trainers(proc), *extra]:
        try:
            p.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _interrupt(cmd, env, metrics_path, sig, log, target=lambda proc: proc.pid) -> tuple[int, str]:
    """Start ``cmd``, send ``sig`` to ``target(proc)`` once 2 iterations are logged, return
    (rc, output)."""
    with open(log, "w") as out:  # a file, not a pipe: nobody reads while the run goes on
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for_iterations(metrics_path, proc, 2, log)
        os.kill(target(proc), sig)
        proc.wait(timeout=300)
    finally:
        _kill_tree(proc)
    return proc.returncode, open(log).read()


def _check_stop(ck: str, rc: int, out: str) -> int:
    """The run stopped early with exit code 0, no traceback, and a complete checkpoint named by the
    tracker; returns its iteration."""
    assert rc == 0, out[-4000:]
    assert "exit signal received: checkpoint saved" in out, out[-4000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-4000:]
    stopped = int(tracker(ck))  # the tracker names the checkpoint written at the signal
    assert 2 <= stopped < TRAIN_ITERS, f"stopped at {stopped}"
    assert os.path.isdir(os.path.join(ck, f"iter_{stopped:07d}"))
    assert not [n for n in os.listdir(ck) if n.endswith(".tmp")], "unfinished checkpoint left"
    assert max(read_metrics(os.path.join(ck, "metrics.jsonl"))) == stopped
    return stopped


def _check_stop_and_resume(ck: str, rc: int, out: str, reference, resume) -> None:
    stopped = _check_stop(ck, rc, out)
    out = resume()
    assert f"resumed from {ck} at iteration {stopped}" in out
    assert tracker(ck) == str(TRAIN_ITERS)
    _check_losses(ck, reference)


def _check_losses(ck: str, reference) -> None:
    recs = read_metrics(os.path.join(ck, "metrics.jsonl"))  # both runs append; last write wins
    assert sorted(recs) == sorted(reference)
    for it in reference:
        assert recs[it]["lm loss"] == pytest.approx(reference[it]["lm loss"], abs=1e-6, rel=0), it
        assert recs[it]["lambda"] == pytest.approx(reference[it]["lambda"], abs=1e-12), it


@pytest.mark.parametrize("sig,to", [(signal.SIGTERM, "launcher"), (signal.SIGUSR1, "agent")])
def test_signal_checkpoints_and_resumes(sig, to, tmp_path, tiny_teacher, reference):
    ck = str(tmp_path / "ck")
    env = tiny_env(ck, tiny_teacher, TRAIN_ITERS=TRAIN_ITERS)
    slow = dict(env, MEGATRON_LET_TEST_STEP_SLEEP=STEP_SLEEP)
    path = LAUNCHERS["1b", "let"]
    rc, out = _interrupt(["bash", path], slow, os.path.join(ck, "metrics.jsonl"), sig,
                         str(tmp_path / "run.log"),
                         target=(lambda proc: proc.pid) if to == "launcher" else _agent)
    assert f"forwarded {sig.name} to worker(s)" in out, out[-4000:]
    if sig == signal.SIGUSR1:  # the stop is the point here; the resume is the same as SIGTERM's
        _check_stop(ck, rc, out)
        return
    _check_stop_and_resume(
        ck, rc, out, reference,
        resume=lambda: run_launcher(path, warm_start.torchrun_env(dict(env, MASTER_PORT=str(free_port())))).stdout)


def test_sigkill_on_agent_takes_the_trainers_down(tmp_path, tiny_teacher):
    ck = str(tmp_path / "ck")
    env = tiny_env(ck, tiny_teacher, TRAIN_ITERS=TRAIN_ITERS, MEGATRON_LET_TEST_STEP_SLEEP="1",
                   SAVE_INTERVAL=2)
    log = str(tmp_path / "run.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", LAUNCHERS["1b", "let"]], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    trainers = []
    try:
        _wait_for_iterations(os.path.join(ck, "metrics.jsonl"), proc, 1, log)
        trainers = _trainers(proc)
        assert len(trainers) == 2
        os.kill(_agent(proc), signal.SIGKILL)
        t0 = time.time()
        gone, alive = psutil.wait_procs(trainers, timeout=5)
        assert not alive, f"trainers {[p.pid for p in alive]} outlived their agent by 5 s"
        print(f"trainers gone {time.time() - t0:.2f}s after the agent's SIGKILL")
        time.sleep(3)  # an orphan would have reached its iteration-2 checkpoint by now
        assert not os.path.exists(os.path.join(ck, "latest_checkpointed_iteration.txt")), \
            open(log).read()[-3000:]
        assert not [n for n in os.listdir(ck) if n.startswith("iter_") and not n.endswith(".tmp")]
    finally:
        _kill_tree(proc, extra=trainers)


# ---------------------------------------------------------------------------------------------
# a real SLURM
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, request):
    from slurm_cluster import SlurmCluster, ensure_installed

    def say(msg: str) -> None:  # past pytest's capture: installing system packages is announced
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\n{msg}", flush=True)

    reason = ensure_installed(say)
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_real_slurm_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path, tiny_teacher, reference):
    ck = str(tmp_path / "ck")
    env = tiny_env(ck, tiny_teacher, TRAIN_ITERS=TRAIN_ITERS, MEGATRON_LET_TEST_STEP_SLEEP=STEP_SLEEP,
                   LAUNCHER=os.path.relpath(LAUNCHERS["1b", "let"], ROOT), RDZV_PORT=free_port())
    log = str(tmp_path / "job.out")
    # the script's own directives ask for 4 nodes x 8 GPUs: a one-node CPU cluster overrides them
    job = slurm.sbatch("--nodes", "1", "--gpus-per-node", "0", "--output", log, SBATCH,
                       env=env, cwd=ROOT)
    try:
        deadline = time.time() + 300
        metrics = os.path.join(ck, "metrics.jsonl")
        while not (os.path.isfile(metrics) and len(read_metrics(metrics)) >= 2):
            state = slurm.job(job).get("JobState")
            assert state in ("PENDING", "RUNNING") and time.time() < deadline, \
                f"job {job} {state} before 2 iterations:\n" + (open(log).read() if os.path.exists(log) else "")
            time.sleep(0.2)
        # what `#SBATCH --signal=B:USR1@120` does 120 s before the time limit
        proc = slurm.run("scancel", "--signal=USR1", "--batch", job)
        assert proc.returncode == 0, proc.stderr
        while True:
            info = slurm.job(job)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                break
            assert time.time() < deadline, f"job {job} still {info.get('JobState')}:\n" + open(log).read()
            time.sleep(0.5)
        out = open(log).read()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, out[-4000:], slurm.logs())
        assert info["Restarts"] == "1", info  # requeued once, by the script's USR1 trap
        assert "pretrain_let.sbatch: requeueing job" in out
        assert f"job {job} (restart 1)" in out
        first, second = out.split(f"job {job} (restart 1)")
        assert "Traceback" not in out and "ChildFailedError" not in out, out[-4000:]
        stopped = int(re.search(r"exit signal received: checkpoint saved at iteration (\d+)",
                                first).group(1))
        assert 2 <= stopped < TRAIN_ITERS, first[-3000:]
        assert f"resumed from {ck} at iteration {stopped}" in second, second[-3000:]
        assert os.path.isdir(os.path.join(ck, f"iter_{stopped:07d}"))
        assert tracker(ck) == str(TRAIN_ITERS)
        _check_losses(ck, reference)
    finally:
        slurm.run("scancel", job)


# ---------------------------------------------------------------------------------------------
# the two mechanisms on their own (no torch): fast
# ---------------------------------------------------------------------------------------------

_LATE_HANDLER = """
import signal, sys, time
time.sleep(1.5)  # still 'importing': a SIGUSR1 now would kill it (default action)
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
t = time.time()
while not got and time.time() - t < 20:
    time.sleep(0.02)
sys.exit(0 if got else 3)
"""


def test_forwarder_waits_until_the_worker_catches_the_signal():
    import sys

    from megatron_let.runtime.torchrun import StopForwarder

    child = subprocess.Popen([sys.executable, "-c", _LATE_HANDLER])
    try:
        forwarder = StopForwarder(workers=lambda: [child.pid])
        forwarder.request(signal.SIGUSR1)  # at once, long before the child's handler exists
        assert child.wait(timeout=30) == 0  # -10 had it been signalled before it was ready
        assert forwarder.delivered == {(child.pid, signal.SIGUSR1)}
    finally:
        if child.poll() is None:
            child.kill()


_TRAINER_WITH_HELPERS = """
import os, time
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron_let.runtime.signal_shield import start_checkpoint_helpers
start_checkpoint_helpers()
print(filesystem_async._results_queue._manager._process.pid, flush=True)
time.sleep(120)
"""


def test_checkpoint_helpers_die_with_a_sigkilled_trainer():
    """A trainer killed by SIGKILL (OOM killer, kill -9) runs no finaliser: the write-results Manager
    it started must not live on as an orphan (its stop signals are blocked: only SIGKILL ends it)."""
    import sys

    from launch import base_env
    from test_faults import _case

    _case("sigkill-trainer-helpers")

    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER_WITH_HELPERS], env=base_env(),
                               stdout=subprocess.PIPE, text=True, cwd=ROOT)
    manager = None
    try:
        manager = psutil.Process(int(trainer.stdout.readline()))
        assert manager.ppid() == trainer.pid
        os.kill(manager.pid, signal.SIGTERM)  # shielded: the stop signal stays pending there
        time.sleep(0.5)
        assert manager.is_running() and manager.status() != psutil.STATUS_ZOMBIE
        trainer.kill()
        trainer.wait()
        _, alive = psutil.wait_procs([manager], timeout=10)
        assert not alive, "the checkpoint helper outlived its SIGKILLed trainer"
    finally:
        if trainer.poll() is None:
            trainer.kill()
        if manager is not None and manager.is_running():
            manager.kill()


_FAKE_AGENT = """
import os, subprocess, sys, time
env = dict(os.environ)
if sys.argv[1] == "torchrun":
    env["TORCHELASTIC_RUN_ID"] = "test"
worker = subprocess.Popen([sys.executable, "-c",
    "from megatron_let.runtime.lifeline import exit_with_agent; import sys, time;"
    "print(exit_with_agent(), flush=True); time.sleep(60)"], env=env, start_new_session=True)
print(worker.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("launched_by", ["torchrun", "shell"])
def test_worker_dies_with_its_agent_only_under_torchrun(launched_by):
    import sys

    from launch import base_env

    agent = subprocess.Popen([sys.executable, "-c", _FAKE_AGENT, launched_by], env=base_env(),
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    worker = None
    try:
        worker = psutil.Process(int(agent.stdout.readline()))
        assert agent.stdout.readline().strip() == str(launched_by == "torchrun")  # armed?
        agent.kill()
        agent.wait()
        if launched_by == "torchrun":
            _, alive = psutil.wait_procs([worker], timeout=5)
            assert not alive, "the worker outlived its agent"
        else:  # a plain run's parent (a shell, nohup) may go away: the run goes on
            time.sleep(1)
            assert worker.is_running()
    finally:
        if agent.poll() is None:
            agent.kill()
        if worker is not None and worker.is_running():
            worker.kill()


# ---------------------------------------------------------------------------------------------
# the stop signal delivered to every process of the job step (SLURM's time limit, scancel without
# --batch, --signal=USR1 without B:), megatron-core's helper processes included
# ---------------------------------------------------------------------------------------------

STEP_ARGS = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
             "--num-attention-heads", "4", "--seq-length", "32", "--max-position-embeddings", "32",
             "--device", "cpu", "--log-interval", "1", "--lr", "3e-3", "--lr-warmup-fraction", "0.0",
             "--lr-decay-style", "constant", "--objective", "baseline", "--mock-data",
             "--vocab-size", "200", "--micro-batch-size", "2", "--global-batch-size", "4",
             "--seed", "5", "--save-interval", "2", "--exit-signal-handler"]
STEP_ITERS = 8


def _step_args(ck: str, metrics: str, iters: int = STEP_ITERS) -> list[str]:
    return [*STEP_ARGS, "--train-iters", str(iters), "--save", ck, "--load", ck, "--metrics-jsonl", metrics]


def _uninterrupted(world: int, ck: str, metrics: str, extra=()) -> str:
    """An uninterrupted run (a reference, or a resume), forked warm where it can be (tests/launch.py);
    returns its stdout."""
    return run_script("pretrain_let.py", [*_step_args(ck, metrics), *extra], nproc=world, timeout=600).stdout


def _step_cmd(launcher: str, ck: str, metrics: str, iters: int = STEP_ITERS) -> list[str]:
    import sys

    script = [os.path.join(ROOT, "pretrain_let.py"), *_step_args(ck, metrics, iters)]
    if launcher == "python --async-save":  # the signal may find a background save in flight
        return [sys.executable, *script, "--async-save"]
    if launcher == "python":
        return [sys.executable, *script]
    module = "megatron_let.runtime.torchrun" if launcher == "megatron_let.torchrun" else "torch.distributed.run"
    return [sys.executable, "-m", module, "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *script]


def _signal_job_step(proc: subprocess.Popen, sig: int) -> list[str]:
    """What SLURM does: ``sig`` to every process of the step (its process tracking follows every
    descendant, whatever its session). Returns the signalled processes' names."""
    root = psutil.Process(proc.pid)
    every = [root, *root.children(recursive=True)]
    names = []
    for p in every:
        try:
            names.append(" ".join(p.cmdline())[-60:])
            p.send_signal(sig)
        except psutil.Error:
            pass
    return names


@pytest.fixture(scope="module")
def step_reference(tmp_path_factory):
    """Uninterrupted runs' losses, one process and two (data parallel)."""
    out = {}
    for world in (1, 2):
        d = tmp_path_factory.mktemp(f"step_ref{world}")
        metrics = str(d / "m.jsonl")
        _uninterrupted(world, str(d / "ck"), metrics)
        out[world] = read_metrics(metrics)
    return out


@pytest.mark.parametrize("launcher,sig", [
    ("python", signal.SIGTERM), ("python", signal.SIGUSR1),
    ("megatron_let.torchrun", signal.SIGUSR1), ("megatron_let.torchrun", signal.SIGTERM),
    ("torchrun", signal.SIGTERM), ("python --async-save", signal.SIGUSR1)])
def test_stop_signal_to_every_process_of_the_step(launcher, sig, tmp_path, step_reference):
    """After a periodic save (so megatron-core's helpers exist), the signal reaches the trainers and
    every helper process: the run still checkpoints the step it arrived in, exits 0, and resumes
    exactly. Before the helpers were shielded, the save died with BrokenPipeError, exit 1."""
    from launch import base_env
    from test_faults import _case

    _case("stop-signal-every-process")

    ck, metrics, log = str(tmp_path / "ck"), str(tmp_path / "m.jsonl"), str(tmp_path / "run.log")
    env = dict(base_env(), MEGATRON_LET_TEST_STEP_SLEEP="0.5")
    with open(log, "w") as out:
        proc = subprocess.Popen(_step_cmd(launcher, ck, metrics), env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (os.path.isfile(os.path.join(ck, "latest_checkpointed_iteration.txt"))
                   and os.path.isfile(metrics) and len(read_metrics(metrics)) >= 3):
            assert proc.poll() is None, open(log).read()[-4000:]
            assert time.time() < deadline, open(log).read()[-4000:]
            time.sleep(0.05)
        if launcher.startswith("python"):
            os.killpg(proc.pid, sig)  # one process group: the trainer and its helpers
        else:  # torchrun starts each worker in a session of its own
            signalled = _signal_job_step(proc, sig)
            assert any("multiprocessing" in n for n in signalled), signalled  # the helpers too
        rc = proc.wait(timeout=300)
    finally:
        _kill_tree(proc)
    out = open(log).read()
    assert "BrokenPipeError" not in out and not re.search(r"\[rank\d+\]: Traceback", out), out[-4000:]
    if launcher == "torchrun":
        # plain torchrun's agent turns its own SIGTERM into SignalException and exit 1 (torch's
        # code), after its workers finished: the checkpoint is complete all the same
        assert rc == 1 and "SignalException" in out, out[-4000:]
        assert out.count("exit signal received: checkpoint saved") == 1, out[-4000:]
    else:
        assert rc == 0 and "Traceback" not in out, out[-4000:]
    assert "exit signal received: checkpoint saved" in out, out[-4000:]
    stopped = int(tracker(ck))
    assert 3 <= stopped < STEP_ITERS and max(read_metrics(metrics)) == stopped, (stopped, out[-3000:])
    assert os.path.isfile(os.path.join(ck, f"iter_{stopped:07d}", "manifest.json"))
    assert not [n for n in os.listdir(ck) if n.endswith(".tmp")], os.listdir(ck)
    if (launcher, sig) not in (("python", signal.SIGTERM), ("megatron_let.torchrun", signal.SIGUSR1),
                               ("python --async-save", signal.SIGUSR1)):
        return  # the resume is the same for every stop; two are enough
    world = 1 if launcher.startswith("python") else 2
    resumed = str(tmp_path / "resumed.jsonl")
    extra = ["--async-save"] if launcher == "python --async-save" else []  # resumed as it ran
    assert f"resumed from {ck} at iteration {stopped}" in _uninterrupted(world, ck, resumed, extra)
    got, ref = read_metrics(resumed), step_reference[world]
    assert sorted(got) == list(range(stopped + 1, STEP_ITERS + 1))
    for it in got:
        assert got[it]["lm loss"] == pytest.approx(ref[it]["lm loss"], abs=1e-6, rel=0), it
