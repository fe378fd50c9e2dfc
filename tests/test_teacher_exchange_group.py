"""The teacher's TP exchange (teacher/step_prefetch.py) runs on a process group of its own, with
the TP group's ranks, not on megatron's TP group: on NCCL the student's TP collectives would
otherwise queue behind every exchange round. A 2-rank run records every collective the step
teacher issues with its group (tests/workers/teacher_exchange_worker.py); that the results are
those of the replicated teacher is tests/test_teacher_tp_split.py's check."""

import json

import pytest

from launch import TINY_MODEL, run_script
from tiny_teachers import save_tiny_llama_teacher

BASE = TINY_MODEL + ["--mock-data", "--vocab-size", "200", "--seed", "13", "--train-iters", "1",
                     "--micro-batch-size", "2", "--global-batch-size", "6",
                     "--tensor-model-parallel-size", "2"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("exchange_teacher")
    save_tiny_llama_teacher(d, vocab_size=200)
    return str(d)


@pytest.mark.parametrize("args,collective", [
    (["--objective", "let", "--let-student-layer", "2", "--sequence-parallel"], "all_to_all_single"),
    (["--objective", "salt", "--kd-stop-step", "1", "--kd-chunk-size", "16"], "all_gather_into_tensor"),
], ids=["let-sp-all-to-all", "kd-all-gather"])
def test_exchange_runs_on_its_own_group(args, collective, tmp_path, teacher_dir):
    run_script("tests/workers/teacher_exchange_worker.py",
               [str(tmp_path), *BASE, *args, "--teacher-path", teacher_dir], nproc=2, timeout=300)
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [c["fn"] for c in calls] == [collective] * 2  # m = 3 micro-batches: 2 rounds
        for c in calls:
            assert not c["is_megatron_tp_group"] and not c["is_default_group"], c
            assert c["ranks"] == c["tp_ranks"] == [0, 1]
