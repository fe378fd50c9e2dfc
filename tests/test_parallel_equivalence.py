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
