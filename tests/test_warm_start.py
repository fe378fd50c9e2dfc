"""The suite's warm starts (tests/warm_start.py) run what a cold start runs: the same output and
metrics as a real torchrun launch, torchrun's exit codes, timeouts that leave no process behind, and
a cold start whenever the environment could change what a module does at import."""

import os
import signal
import subprocess
import time

import pytest

import warm_start
from launch import ROOT, TINY_MODEL, base_env, free_port, read_metrics, run_pretrain

# Everything in a metrics record but wall-clock and memory figures (which differ between runs anyway).
TIMING = ("time", "throughput", "per sec", "tflops", "mfu", "elapsed", "ms", "seconds", "memory", "rss")


def _deterministic(record: dict) -> dict:
    return {k: v for k, v in record.items() if not any(t in k.lower() for t in TIMING)}


def _lines_without_timing(text: str) -> list:
    return [line for line in text.splitlines() if "iteration" in line and "loss" in line]


def _let_run(folder, teacher_dir, warm):
    metrics = folder / "m.jsonl"
    args = TINY_MODEL + ["--objective", "let", "--mock-data", "--vocab-size", "200", "--seed", "5",
                         "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
                         "--let-lambda", "1.0", "--let-stop-step", "2", "--let-student-layer", "2",
                         "--teacher-path", teacher_dir, "--tensor-model-parallel-size", "2",
                         "--metrics-jsonl", str(metrics), "--save", str(folder / "ckpt"),
                         "--save-interval", "3"]
    proc = run_pretrain(args, nproc=2, warm=warm)
    return proc, read_metrics(metrics)


def test_warm_torchrun_run_matches_a_cold_one(tmp_path, teacher_dir):
    """TP=2 LET (teacher, capture, release, checkpoint): a forked run's losses, printed iterations and
    checkpoint are a real torchrun run's, to the digit."""
    if os.environ.get(warm_start.COLD_ENV) != "1":
        assert warm_start.server_socket() is not None, warm_start._unavailable
    (tmp_path / "warm").mkdir()
    (tmp_path / "cold").mkdir()
    warm_proc, warm = _let_run(tmp_path / "warm", teacher_dir, warm=True)
    cold_proc, cold = _let_run(tmp_path / "cold", teacher_dir, warm=False)
    assert sorted(warm) == sorted(cold) == [1, 2, 3]
    for i in cold:
        assert _deterministic(warm[i]) == _deterministic(cold[i]), i
    assert "teacher loaded on rank 0" in warm_proc.stdout and "teacher loaded on rank 1" in warm_proc.stdout
    assert len(_lines_without_timing(warm_proc.stdout)) == len(_lines_without_timing(cold_proc.stdout)) > 0
    for ckpt in ("warm", "cold"):
        assert (tmp_path / ckpt / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_exit_codes_are_torchrun_s_and_python_s():
    bad = TINY_MODEL + ["--mock-data", "--vocab-size", "200", "--train-iters", "1",
                        "--micro-batch-size", "2", "--global-batch-size", "6"]
    single = run_pretrain(bad[:-2] + ["--global-batch-size", "3"], check=False)
    assert single.returncode == 2, single.stderr[-2000:]  # pretrain_let.py's own code for bad input
    assert "--global-batch-size 3 is not divisible" in single.stderr
    multi = run_pretrain(bad, nproc=2, check=False)
    assert multi.returncode == 1, multi.stderr[-2000:]  # torchrun's when a worker fails
    assert "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2" \
        in multi.stderr


def _processes_with(marker: str) -> list:
    """Pids whose environment holds ``marker`` (a run's TORCHELASTIC_RUN_ID)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:  # gone, or not ours
            pass
    return found


def test_a_timeout_raises_and_leaves_no_process(tmp_path):
    env = base_env()
    env["MEGATRON_LET_TEST_STEP_SLEEP"] = "30"
    args = TINY_MODEL + ["--objective", "baseline", "--mock-data", "--vocab-size", "200", "--train-iters", "50",
                         "--micro-batch-size", "2", "--global-batch-size", "4"]
    port = free_port()
    script = os.path.join(ROOT, "pretrain_let.py")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        proc = warm_start.run(script, args, 2, env, str(tmp_path), 8, ["pretrain_let.py"], torchrun=True,
                              port=port)
        pytest.fail(f"not a warm start, or no timeout: {proc}")
    assert time.monotonic() - started < 40
    assert _processes_with(f"TORCHELASTIC_RUN_ID=warm-{port}\0") == []


def test_an_import_time_variable_starts_cold():
    env = base_env()
    assert warm_start.differing_keys(env, env) == []
    assert warm_start.differing_keys(dict(env, OMP_NUM_THREADS="7", MEGATRON_LET_TEST_X="1",
                                          PYTEST_CURRENT_TEST="t"), env) == []
    assert warm_start.differing_keys(dict(env, TRITON_CACHE_DIR="/elsewhere"), env) == ["TRITON_CACHE_DIR"]
    # what an import sets: missing or the same in the run is no difference; another value is
    imports = {"TORCHINDUCTOR_CACHE_DIR": "/tmp/x"}
    assert warm_start.differing_keys(dict(env, TORCHINDUCTOR_CACHE_DIR="/tmp/x"), env, imports) == []
    assert warm_start.differing_keys(dict(env, TORCHINDUCTOR_CACHE_DIR="/y"), env, imports) == [
        "TORCHINDUCTOR_CACHE_DIR"]
    assert warm_start.differing_keys(dict(env, KMP_DUPLICATE_LIB_OK="True"), env) == []
    no_path = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    assert warm_start.differing_keys(no_path, env) == ["PYTHONPATH"]
    out = warm_start.run("/nonexistent.py", [], 1, dict(env, TRITON_CACHE_DIR="/elsewhere"), "/", 10, ["x"],
                         torchrun=False)
    assert out is None


def test_warm_python_passes_streams_exit_code_and_signals(tmp_path):
    """tests/warm_python (a shell script's $PYTHON): a script's output reaches the caller's streams,
    its exit code and a forwarded SIGTERM behave as with the real interpreter; -c runs the real one."""
    env = warm_start.python_env(base_env())
    shim = env["PYTHON"]
    script = tmp_path / "job.py"
    script.write_text("import os, signal, sys, time\n"
                      "def stop(signum, frame):\n"
                      "    print('stopped by', signum, flush=True); sys.exit(0)\n"
                      "signal.signal(signal.SIGTERM, stop)\n"
                      "print('pid', os.getpid(), 'parent', os.getppid(), flush=True)\n"
                      "print('to stderr', file=sys.stderr)\n"
                      "if sys.argv[1] == 'wait':\n"
                      "    time.sleep(60)\n"
                      "sys.exit(int(sys.argv[1]))\n")
    done = subprocess.run([shim, str(script), "3"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and done.stderr == "to stderr\n", done
    words = done.stdout.split()
    assert int(words[3]) != os.getpid()  # forked from the server, not a child of this test
    real = subprocess.run([shim, "-c", "import sys; print(sys.flags.no_site)"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert real.returncode == 0 and real.stdout == "0\n"  # the real interpreter, with its site
    waiting = subprocess.Popen([shim, str(script), "wait"], env=env, stdout=subprocess.PIPE, text=True)
    assert waiting.stdout.readline().startswith("pid ")
    waiting.send_signal(signal.SIGTERM)
    assert waiting.stdout.readline() == f"stopped by {int(signal.SIGTERM)}\n"
    assert waiting.wait(timeout=30) == 0


def test_warm_torchrun_takes_single_node_command_lines_only():
    script = os.path.join(ROOT, "pretrain_let.py")
    one_node = ["--nproc_per_node", "2", "--nnodes", "1", "--node_rank", "0", "--master_addr", "localhost",
                "--master_port", "1234", script, "--train-iters", "2"]
    request = warm_start._torchrun_request(one_node)
    assert (request["nproc"], request["port"], request["args"], request["torchrun"]) == (
        2, 1234, ["--train-iters", "2"], True)
    assert warm_start._torchrun_request(["--nproc-per-node=2", "--master-port=99", script])["port"] == 99
    for other in (["--nnodes", "2"], ["--rdzv_backend", "c10d"], ["--node_rank", "1"],
                  ["--master_addr", "node7"], ["--max-restarts", "3"]):
        assert warm_start._torchrun_request(one_node[:-3] + other + one_node[-3:]) is None, other
