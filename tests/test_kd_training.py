"""RKD/SALT objectives in training: schedules, TP/PP equivalence, release, SALT_DS selection."""

import numpy as np
import pytest
import torch

from launch import TINY_MODEL, read_metrics, run_pretrain, run_script
from tiny_teachers import save_tiny_llama_teacher

from megatron_let.objectives.rkd import KDSchedule


def test_kd_schedules_at_boundaries():
    step = KDSchedule(weight=0.6, stop_step=10, transition="step")
    assert [step(s) for s in (0, 9, 10, 11)] == [0.6, 0.6, 0.0, 0.0]
    lin = KDSchedule(weight=0.6, stop_step=10, transition="linear", decay_start=6)
    assert [lin(s) for s in (0, 5, 6, 8, 10, 12)] == pytest.approx([0.6, 0.6, 0.6, 0.3, 0.0, 0.0])
    assert KDSchedule(weight=0.667)(10**6) == 0.667  # rkd: the whole run
    with pytest.raises(ValueError, match="--kd-decay-start"):
        KDSchedule(stop_step=5, transition="linear", decay_start=7).validate()
    with pytest.raises(ValueError, match="--kd-weight"):
        KDSchedule(weight=1.5).validate()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("kd_teacher")
    save_tiny_llama_teacher(d, vocab_size=200)
    return str(d)


KD = TINY_MODEL + ["--mock-data", "--vocab-size", "200", "--micro-batch-size", "2",
                   "--global-batch-size", "4", "--seed", "5", "--kd-weight", "0.5",
                   "--kd-temperature", "0.5", "--kd-chunk-size", "16"]


@pytest.fixture(scope="module")
def rkd_init(tmp_path_factory, teacher_dir):
    d = str(tmp_path_factory.mktemp("rkd_init"))
    run_pretrain(KD + ["--objective", "rkd", "--teacher-path", teacher_dir, "--train-iters", "0",
                       "--save", d])
    return d


def _rkd(tmp_path, teacher_dir, init, extra, nproc):
    metrics = str(tmp_path / "m.jsonl")
    run_pretrain(KD + ["--objective", "rkd", "--teacher-path", teacher_dir, "--train-iters", "3",
                       "--load", init, "--no-load-optim", "--no-load-rng",
                       "--metrics-jsonl", metrics] + extra, nproc=nproc)
    return read_metrics(metrics)


@pytest.fixture(scope="module")
def rkd_single_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rs")


@pytest.fixture(scope="module")
def rkd_single(rkd_single_dir, teacher_dir, rkd_init):
    return _rkd(rkd_single_dir, teacher_dir, rkd_init, [], 1)


def test_rkd_run_logs_the_dry_runs_flop_estimate(rkd_single, rkd_single_dir, teacher_dir):
    """The config/ record tools/compare_runs.py counts compute from is the dry run's estimate."""
    from megatron_let.training.arguments import parse_args
    from megatron_let.training.dry_run import plan_run

    logged = read_metrics(str(rkd_single_dir / "m.jsonl"), split="config")[0]
    plan = plan_run(parse_args(KD + ["--objective", "rkd", "--teacher-path", teacher_dir,
                                     "--train-iters", "3"]), world_size=1)
    assert plan.flops.teacher_per_step > 0
    assert logged["student flops per step"] == pytest.approx(plan.flops.student_per_step, rel=1e-12)
    assert logged["teacher flops per step"] == pytest.approx(plan.flops.teacher_per_step, rel=1e-12)
    assert logged["teacher active steps"] == 3 == plan.flops.active_steps


def test_rkd_total_loss_mixes_nll_and_kd(rkd_single):
    for i in (1, 2, 3):
        m = rkd_single[i]
        assert m["kd weight"] == pytest.approx(0.5)
        assert m["total loss"] == pytest.approx(0.5 * m["lm loss"] + 0.5 * m["kd loss"], rel=1e-5)


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"],
                                    ["--pipeline-model-parallel-size", "2"]])
def test_rkd_two_process_layout_matches_single(layout, tmp_path, teacher_dir, rkd_init, rkd_single):
    m = _rkd(tmp_path, teacher_dir, rkd_init, layout, 2)
    for i in (1, 2, 3):
        for key in ("total loss", "lm loss", "kd loss", "grad norm"):
            assert m[i][key] == pytest.approx(rkd_single[i][key], rel=1e-4, abs=1e-5), (i, key)


def test_salt_tp2_vocab_sliced_teacher_matches_single(tmp_path, teacher_dir, rkd_init):
    """SALT at TP=2: each rank's teacher computes only its vocabulary columns (vocab 200 padded to
    256: rank 0 ids 0-127, rank 1 ids 128-199); the KD phase (steps 1-2) and the NLL phase after
    the teacher is released (step 3) equal a single process's full-vocabulary run."""
    salt = ["--objective", "salt", "--kd-stop-step", "2"]
    runs = []
    for nproc, extra in ((1, []), (2, ["--tensor-model-parallel-size", "2"])):
        metrics = str(tmp_path / f"salt{nproc}.jsonl")
        run_pretrain(KD + salt + ["--teacher-path", teacher_dir, "--train-iters", "3", "--load", rkd_init,
                                  "--no-load-optim", "--no-load-rng", "--metrics-jsonl", metrics] + extra,
                     nproc=nproc)
        runs.append(read_metrics(metrics))
    single, tp2 = runs
    assert "kd loss" in tp2[2] and "kd loss" not in tp2[3]
    for i in (1, 2, 3):
        for key in ("total loss", "lm loss", "grad norm") + (("kd loss",) if i < 3 else ()):
            assert tp2[i][key] == pytest.approx(single[i][key], rel=1e-4, abs=1e-5), (i, key)


def test_salt_stops_distilling_and_frees_teacher(tmp_path, teacher_dir):
    metrics = str(tmp_path / "m.jsonl")
    out = run_pretrain(KD + ["--objective", "salt", "--teacher-path", teacher_dir,
                             "--train-iters", "4", "--kd-stop-step", "2",
                             "--metrics-jsonl", metrics]).stdout
    m = read_metrics(metrics)
    assert [m[i]["kd weight"] for i in (1, 2, 3, 4)] == [0.5, 0.5, 0.0, 0.0]
    assert "kd loss" in m[2] and "kd loss" not in m[3]
    assert m[3]["total loss"] == pytest.approx(m[3]["lm loss"])
    assert "teacher released at iteration 2" in out


def _reference_salt_score(logits, labels, k):
    """Eq. 11 written directly: median over positions of 1[y in top-k] * (-log p(y))."""
    logp = torch.log_softmax(logits.double(), -1)
    vals = []
    for j in range(labels.shape[0]):
        y = int(labels[j])
        rank = int((logits[j] > logits[j, y]).sum())
        vals.append((-logp[j, y]).item() if rank < k else 0.0)
    vals = sorted(vals)
    return vals[(len(vals) - 1) // 2]  # lower median, as torch.median


def test_select_data_scores_and_selection_is_consumed(tmp_path, teacher_dir, megatron_single_process):
    out = str(tmp_path / "sel.npy")
    args = KD + ["--objective", "salt", "--teacher-path", teacher_dir, "--train-iters", "6",
                 "--kd-stop-step", "2", "--select-output", out, "--select-top-k", "5",
                 "--select-num-candidates", "24", "--select-count", "8"]
    run_script("tools/select_data.py", args, nproc=2)
    sel = np.load(out)
    scores = np.load(str(tmp_path / "sel.scores.npy"))
    assert sel.shape == (8,) and scores.shape == (24,)
    assert list(sel) == list(np.argsort(-scores, kind="stable")[:8])

    # independent reference for a few sequences, with Hugging Face's own forward
    from transformers import AutoModelForCausalLM

    from megatron_let.data.tokenizers import build_tokenizer
    from megatron_let.training.arguments import parse_args
    from megatron_let.data.run_datasets import build_run_datasets

    cfg = parse_args(KD + ["--objective", "salt", "--teacher-path", teacher_dir, "--train-iters", "6",
                           "--kd-stop-step", "2"])
    train_ds, _ = build_run_datasets(cfg, build_tokenizer("NullTokenizer", None, 200), 4)
    hf = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    for i in (0, 5, 17):
        s = train_ds[i]
        with torch.no_grad():
            logits = hf(s["tokens"][None]).logits[0]
        assert scores[i] == pytest.approx(_reference_salt_score(logits, s["labels"], 5), rel=1e-4)

    # training draws the KD phase from the selection, then the full data
    from megatron_let.training.trainer import Trainer

    # the selection's run: its indices are positions of that run's training samples
    cfg = parse_args(KD + ["--objective", "salt", "--teacher-path", teacher_dir, "--train-iters", "6",
                           "--kd-stop-step", "2", "--kd-data-selection", out, "--log-interval", "10"])
    trainer = Trainer(cfg)
    trainer.setup()
    seen = []

    def fake_step(iterator):
        for _ in range(trainer.num_microbatches):
            seen.append(next(iterator)["tokens"])
        return {"grad norm": 0.0, "skipped": 0.0}

    trainer._train_step = fake_step
    trainer.train()
    trainer.close()
    selected = {tuple(train_ds[int(j)]["tokens"].tolist()) for j in sel}
    kd_phase = [tuple(r.tolist()) for t in seen[:4] for r in t]  # 2 steps x 2 micro-batches x 2
    assert all(row in selected for row in kd_phase)
    later = [tuple(r.tolist()) for t in seen[4:] for r in t]
    expected_later = [tuple(train_ds[j]["tokens"].tolist()) for j in range(16)]
    assert later == expected_later
    assert trainer.consumed_selection_samples == 8 and trainer.consumed_train_samples == 16
