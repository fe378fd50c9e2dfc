"""Real 2-process runs (torchrun, gloo) reproduce a single process's per-step losses."""

import os

import pytest

from launch import TINY_MODEL, read_metrics, run_pretrain

COMMON = TINY_MODEL + ["--objective", "baseline", "--mock-data", "--vocab-size", "200",
                       "--micro-batch-size", "2", "--global-batch-size", "4", "--seed", "7"]
STEPS = 5


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    """Initial weights from a single process, so every layout starts from the same model."""
    d = str(tmp_path_factory.mktemp("init"))
    run_pretrain(COMMON + ["--train-iters", "0", "--save", d])
    assert os.path.isfile(os.path.join(d, "latest_checkpointed_iteration.txt"))
    return d


def _losses(tmp_path, init, extra, nproc):
    metrics = str(tmp_path / f"m{nproc}_{'_'.join(extra) or 'single'}.jsonl")
    run_pretrain(COMMON + ["--train-iters", str(STEPS), "--load", init, "--no-load-optim",
                           "--no-load-rng", "--metrics-jsonl", metrics] + extra, nproc=nproc)
    m = read_metrics(metrics)
    assert sorted(m) == list(range(1, STEPS + 1))
    return [m[i]["lm loss"] for i in range(1, STEPS + 1)], [m[i]["grad norm"] for i in range(1, STEPS + 1)]


@pytest.fixture(scope="module")
def single(init_checkpoint, tmp_path_factory):
    return _losses(tmp_path_factory.mktemp("single"), init_checkpoint, [], 1)


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2"],
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ["--pipeline-model-parallel-size", "2"],
    [],  # DP=2
])
def test_two_process_layout_matches_single_process(layout, single, init_checkpoint, tmp_path):
    losses, norms = _losses(tmp_path, init_checkpoint, layout, 2)
    ref_losses, ref_norms = single
    assert losses[0] > 4.0  # a real language-modelling loss, not a zero
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) < 1e-4, (losses, ref_losses)
    for a, b in zip(norms, ref_norms):
        assert abs(a - b) < 1e-3 * max(1.0, b), (norms, ref_norms)
    assert ref_losses[-1] < ref_losses[0]  # it learns


@pytest.mark.parametrize("layout", [[], ["--tensor-model-parallel-size", "2"]], ids=["dp2", "tp2"])
def test_two_nodes_match_single_process(layout, single, init_checkpoint, tmp_path):
    """Two torchrun agents on this machine (--nnodes 2, c10d rendezvous, one process each), as two
    nodes of a cluster run them: DP=2 and TP=2 across the "nodes" give the single process's losses."""
    import subprocess
    import sys

    from launch import ROOT, base_env, free_port

    metrics = str(tmp_path / "metrics.jsonl")
    args = COMMON + ["--train-iters", str(STEPS), "--load", init_checkpoint, "--no-load-optim",
                     "--no-load-rng", "--metrics-jsonl", metrics] + layout
    endpoint = f"127.0.0.1:{free_port()}"
    agents, logs = [], []
    for node in range(2):
        logs.append(str(tmp_path / f"node{node}.log"))
        with open(logs[-1], "w") as out:
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "megatron_let.runtime.torchrun", "--nnodes", "2",
                 "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                 "--rdzv_id", "two-nodes", "--rdzv_conf", f"is_host={int(node == 0)}",
                 os.path.join(ROOT, "pretrain_let.py"), *args],
                env=base_env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
    try:
        rcs = [a.wait(timeout=600) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    texts = [open(p).read() for p in logs]
    assert rcs == [0, 0], "\n\n".join(t[-3000:] for t in texts)
    dp = 2 if not layout else 1
    assert any(f"x dp {dp} x" in t for t in texts), texts  # the layout really spans both agents
    m = read_metrics(metrics)
    assert sorted(m) == list(range(1, STEPS + 1))
    ref_losses, ref_norms = single
    for i, (a, b) in enumerate(zip(ref_losses, ref_norms), start=1):
        assert abs(m[i]["lm loss"] - a) < 1e-4, (i, m[i]["lm loss"], a)
        assert abs(m[i]["grad norm"] - b) < 1e-3 * max(1.0, b), (i, m[i]["grad norm"], b)
