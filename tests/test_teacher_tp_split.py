"""The teacher's micro-batches shared out among the TP ranks (teacher/step_prefetch.py).

Each case runs the same layout twice from the same seed, with the split (the default at TP > 1)
and with ``--no-teacher-tp-split`` (every rank runs the whole teacher), with m = 3 micro-batches,
which TP = 2 does not divide. On CPU every rank computes the same teacher forward bit for bit,
so the runs must agree to float rounding (rel 1e-6), and the counted teacher forwards must be
⌈3/2⌉ = 2 on the busiest rank and 3 in all (6 without the split) on the teacher's stage.
"""

import pytest

from launch import TINY_MODEL, read_metrics, run_pretrain
from tiny_teachers import save_tiny_llama_teacher

STEPS = 2
BASE = TINY_MODEL + ["--mock-data", "--vocab-size", "200", "--seed", "13",
                     "--train-iters", str(STEPS)]
LET = ["--objective", "let", "--let-lambda", "1.0", "--let-student-layer", "2"]
SALT = ["--objective", "salt", "--kd-weight", "0.5", "--kd-stop-step", str(STEPS),
        "--kd-chunk-size", "16"]
TP2 = ["--tensor-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]


def _batch(mbs):  # 3 micro-batches at DP = 1
    return ["--micro-batch-size", str(mbs), "--global-batch-size", str(3 * mbs)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("split_teacher")
    save_tiny_llama_teacher(d, vocab_size=200)
    return str(d)


def _run(tmp_path, teacher_dir, args, nproc, name):
    metrics = str(tmp_path / f"{name}.jsonl")
    run_pretrain(BASE + args + ["--teacher-path", teacher_dir, "--metrics-jsonl", metrics],
                 nproc=nproc)
    m = read_metrics(metrics)
    assert sorted(m) == list(range(1, STEPS + 1))
    return m


@pytest.mark.parametrize("args,nproc,loss", [
    (LET + TP2 + ["--sequence-parallel"] + _batch(2), 2, "align loss"),  # all-to-all of shards
    # KD: the final hidden state exchanged, each rank's own vocabulary slice; --teacher-overlap
    # is a no-op on CPU
    (SALT + TP2 + _batch(2) + ["--teacher-overlap"], 2, "kd loss"),
    # all-gather, micro-batch size 1, the teacher on layer 2's stage (0)
    (LET + TP2 + PP2 + _batch(1), 4, "align loss"),
    (SALT + TP2 + PP2 + _batch(1), 4, "kd loss"),  # teacher on the last stage
], ids=["let-tp2-sp", "salt-tp2-overlap-flag", "let-tp2-pp2-mbs1", "salt-tp2-pp2-mbs1"])
def test_split_equals_replicated_teacher(args, nproc, loss, tmp_path, teacher_dir):
    split = _run(tmp_path, teacher_dir, args, nproc, "split")
    replicated = _run(tmp_path, teacher_dir, args + ["--no-teacher-tp-split"], nproc, "replicated")
    for i in range(1, STEPS + 1):
        for key in ("lm loss", "total loss", loss, "grad norm"):
            assert split[i][key] == pytest.approx(replicated[i][key], rel=1e-6, abs=1e-7), (i, key)
        assert abs(split[i][loss]) > 0  # the teacher really entered the loss
        assert split[i]["teacher micro-batches"] == 2  # ⌈3/2⌉ on rank 0, 1 on rank 1
        assert split[i]["teacher micro-batches total"] == 3
        assert replicated[i]["teacher micro-batches"] == 3
        assert replicated[i]["teacher micro-batches total"] == 6


def test_flags_parse_and_overlap_is_a_no_op_on_cpu():
    import torch

    from megatron_let.teacher.step_prefetch import StepTeacher, owned_microbatches
    from megatron_let.training.arguments import parse_args

    def teacher(**kw):
        return parse_args(TINY_MODEL + ["--mock-data", "--vocab-size", "200", *kw.get("argv", [])]).teacher

    assert (teacher().tp_split, teacher().overlap) == (None, None)  # auto
    t = teacher(argv=["--no-teacher-tp-split", "--teacher-overlap"])
    assert (t.tp_split, t.overlap) == (False, True)
    assert teacher(argv=["--teacher-tp-split", "--no-teacher-overlap"]).overlap is False

    class CPUTeacher:
        device = torch.device("cpu")

    st = StepTeacher(CPUTeacher(), overlap=True)
    assert not st.overlap and not st.eager  # runs inline, as without the flag
    assert [owned_microbatches(5, 2, r) for r in (0, 1)] == [[0, 2, 4], [1, 3]]
    assert owned_microbatches(1, 2, 1) == []
