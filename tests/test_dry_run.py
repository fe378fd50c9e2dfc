"""``--dry-run``: layout against megatron-core's own rank generator, parameter counts against a built
GPTModel and hand-computed numbers, the memory/FLOP estimates against their formulas worked by hand,
the documented error messages (exit code 2, stderr), and the paper-scale launchers' dry runs."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import warm_start
from launch import ROOT, base_env
from test_launchers import LAUNCHERS, launcher_env, run_launcher, save_config_only_teacher

GIB = 2**30


@pytest.fixture(scope="module")
def smollm2_135m(tmp_path_factory):
    return save_config_only_teacher(tmp_path_factory.mktemp("smollm2-135m"), "135m")


@pytest.fixture(scope="module")
def smollm2_17b(tmp_path_factory):
    return save_config_only_teacher(tmp_path_factory.mktemp("smollm2-1.7b"), "1.7b")


def _cfg(argv):
    from megatron_let.training.arguments import parse_args

    return parse_args(["--dry-run", *argv])


PAPER_1B = ["--model-preset", "llama-1b", "--seq-length", "1280", "--micro-batch-size", "16",
            "--global-batch-size", "2048", "--train-iters", "7630", "--bf16", "--vocab-size", "49152"]
PAPER_7B = ["--model-preset", "llama-7b", "--seq-length", "1280", "--micro-batch-size", "4",
            "--global-batch-size", "2048", "--train-iters", "7630", "--bf16", "--vocab-size", "49152"]


# ---------------------------------------------------------------------------------------------
# layout and parameter counts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world,tp,pp", [(64, 2, 4), (16, 1, 4), (8, 2, 1), (24, 2, 3), (8, 8, 1)])
def test_layout_matches_megatron_rank_generator(world, tp, pp):
    from megatron.core.parallel_state import RankGenerator

    from megatron_let.training.estimates import ParallelLayout

    layout = ParallelLayout(world, tp, pp, num_layers=24)
    dp = world // (tp * pp)
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    expected = {}
    for name in ("tp", "dp", "pp"):
        for group in gen.get_ranks(name):
            for index, rank in enumerate(group):
                expected.setdefault(rank, {})[name] = index
    for rank in range(world):
        e = expected[rank]
        assert layout.coordinates(rank) == (e["tp"], e["dp"], e["pp"]), rank
    rows = layout.placements(teacher_stages={0})
    assert [r.teacher for r in rows] == [layout.coordinates(r.rank)[2] == 0 for r in rows]


def test_stage_layers_and_teacher_stage():
    from megatron_let.training.estimates import ParallelLayout

    layout = ParallelLayout(64, 2, 4, num_layers=32)
    assert [layout.stage_layers(p) for p in range(4)] == [(1, 8), (9, 16), (17, 24), (25, 32)]
    assert layout.stage_of_layer(3) == 0 and layout.stage_of_layer(9) == 1
    assert layout.stage_of_layer(32) == 3


def test_stage_parameters_hand_computed_llama_7b_tp2_pp4():
    from megatron_let.training.estimates import stage_parameters

    model = _cfg(PAPER_7B + ["--tensor-model-parallel-size", "2",
                             "--pipeline-model-parallel-size", "4"]).model
    # one layer: attention 4*4096^2 + SwiGLU 3*4096*11008, split over TP=2, + 2 RMSNorms of 4096
    layer = (4 * 4096**2 + 3 * 4096 * 11008) // 2 + 2 * 4096
    assert layer == 101_195_776
    shard = 49152 * 4096 // 2  # padded vocabulary 49152 (a multiple of 128 x 2) split over TP
    expected = [8 * layer + shard, 8 * layer, 8 * layer, 8 * layer + 4096 + shard]
    assert [stage_parameters(model, 2, 4, p) for p in range(4)] == expected
    assert expected == [910_229_504, 809_566_208, 809_566_208, 910_233_600]
    # all ranks of one DP replica hold the model once, plus TP copies of the replicated norms
    assert 2 * sum(expected) == model.num_parameters() + (32 * 2 * 4096 + 4096)


@pytest.mark.parametrize("untie", [True, False])
def test_stage_parameters_match_built_gptmodel(megatron_single_process, untie):
    from megatron_let.model.llama import build_student
    from megatron_let.runtime.device import ParallelConfig
    from megatron_let.training.estimates import stage_parameters

    argv = ["--model-preset", "tiny", "--seq-length", "32", "--vocab-size", "200"]
    if not untie:
        argv.append("--tie-embeddings-and-output-weights")
    model = _cfg(argv).model
    built = build_student(model, ParallelConfig(), use_cpu=True)
    assert stage_parameters(model, 1, 1, 0) == sum(p.numel() for p in built.parameters())


# ---------------------------------------------------------------------------------------------
# plan: teacher, memory and FLOPs (1B LET at 64 GPUs, PP=4; 7B RKD at 64 GPUs, TP=2, PP=4)
# ---------------------------------------------------------------------------------------------


def test_plan_llama_1b_let_pp4(monkeypatch, smollm2_135m):
    from megatron_let.training.dry_run import plan_run

    monkeypatch.setenv("WORLD_SIZE", "64")
    cfg = _cfg(PAPER_1B + ["--pipeline-model-parallel-size", "4", "--use-distributed-optimizer",
                           "--teacher-path", smollm2_135m])
    plan = plan_run(cfg)
    assert (plan.layout.dp, plan.num_microbatches, plan.global_batch_size) == (16, 8, 2048)

    # SmolLM2-135M: embedding 49152 x 576 (tied) + 30 x (q,o 576^2, k,v 576x192, MLP 3x576x1536,
    # 2 norms) + final norm = 134,515,008, the published size
    t = plan.teacher
    assert t.num_parameters == 134_515_008 and t.embedding_parameters == 49152 * 576 and t.tied
    assert (t.num_layers, t.layer, t.output_width) == (30, 30, 576)
    use = plan.teacher_use
    assert use.stages == {0} and not use.lm_head and use.layers_run == 30
    assert use.active_steps == 1500

    # memory on stage 0 (embedding, layers 1-6, teacher), formulas of docs/launching.md
    params = 6 * (4 * 2048**2 + 3 * 2048 * 5461 + 2 * 2048) + 49152 * 2048
    assert params == 402_665_472
    m0 = plan.memory[0]
    assert m0.parameters == params
    assert m0.weights == 2 * params and m0.gradients == 4 * params
    assert m0.optimizer == pytest.approx(12 * params / 16)  # master + Adam, sharded over DP 16
    tokens = 16 * 1280
    assert m0.in_flight_microbatches == 4  # 1F1B: PP - stage
    assert m0.activations == pytest.approx(tokens * (6 * 2048 + 2 * 2048 + 3 * 5461) * 2 * 6 * 4)
    # the GPU overlap (default on with CUDA) prefetches the step: all 8 micro-batches' targets
    assert m0.teacher == pytest.approx(2 * 134_515_008 + 8 * tokens * 576 * 2)
    assert m0.logits == 0
    m3 = plan.memory[3]
    assert m3.in_flight_microbatches == 1 and m3.teacher == 0
    assert m3.logits == pytest.approx(tokens * 49152 * (2 + 4))

    # FLOPs per token: student 6*(matmul weights + output layer) + 12*L*s*h; teacher forward
    # 2*(30 blocks) + 4*30*s*576 (final hidden state: no LM head)
    student = 6 * (24 * (4 * 2048**2 + 3 * 2048 * 5461) + 49152 * 2048) + 12 * 24 * 1280 * 2048
    teacher = 2 * (134_515_008 - 49152 * 576) + 4 * 30 * 1280 * 576
    f = plan.flops
    assert f.student_per_step == pytest.approx(student * 2048 * 1280)
    assert f.teacher_per_step == pytest.approx(teacher * 2048 * 1280)
    assert f.overhead_active == pytest.approx(teacher / student)
    assert f.overhead_run == pytest.approx(teacher / student * 1500 / 7630)
    assert f.overhead_on_teacher_ranks == pytest.approx(teacher / student * 4)  # TP 1 x PP 4


def test_plan_llama_7b_rkd_teacher_on_last_stage(monkeypatch, smollm2_17b):
    from megatron_let.training.dry_run import format_plan, plan_run

    monkeypatch.setenv("WORLD_SIZE", "64")
    cfg = _cfg(PAPER_7B + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
                           "4", "--sequence-parallel", "--objective", "rkd",
                           "--teacher-path", smollm2_17b])
    plan = plan_run(cfg)
    t = plan.teacher
    assert t.num_parameters == 1_711_376_384  # SmolLM2-1.7B, the published size
    use = plan.teacher_use
    assert use.stages == {3} and use.lm_head and use.active_steps == 7630  # whole run
    ranks = [r.rank for r in plan.layout.placements(use.stages) if r.teacher]
    assert ranks == list(range(48, 64))  # pp_rank 3 = ranks TP*DP*3 .. 63
    tokens = 4 * 1280
    # the teacher's logits: this rank's vocabulary slice only
    assert plan.memory[3].logits == pytest.approx(tokens * 49152 / 2 * 6 + tokens * 49152 / 2 * 2)
    # TP split: the final hidden states (full sequence, width 2048) of the step's 64 micro-batches
    assert plan.num_microbatches == 64
    assert plan.memory[3].teacher == pytest.approx(2 * 1_711_376_384 + 64 * tokens * 2048 * 2)
    blocks = 1_711_376_384 - 49152 * 2048
    teacher = 2 * (blocks + 49152 * 2048) + 4 * 24 * 1280 * 2048  # + LM head (tied, still a matmul)
    assert plan.flops.teacher_per_step == pytest.approx(teacher * 2048 * 1280)
    assert plan.flops.overhead_run == pytest.approx(plan.flops.overhead_active)
    # each TP rank runs the teacher on 32 of the 64 micro-batches: PP x the job's share
    assert plan.flops.overhead_on_teacher_ranks == pytest.approx(plan.flops.overhead_active * 4)
    text = format_plan(plan)
    assert "each runs 32 of the step's 64 (--teacher-tp-split)" in text
    assert f"final hidden states held per step on a teacher rank: {64 * tokens * 2048 * 2 / 2**20:.1f} MiB" in text


def test_plan_teacher_states_without_split_or_overlap(monkeypatch, smollm2_135m):
    """LET at TP=2 + SP: the split's all-to-all keeps s/TP positions of each of the step's
    micro-batches; --no-teacher-tp-split --no-teacher-overlap holds one micro-batch, as before."""
    from megatron_let.training.dry_run import plan_run

    monkeypatch.setenv("WORLD_SIZE", "64")
    base = PAPER_1B + ["--ffn-hidden-size", "5632", "--tensor-model-parallel-size", "2",
                       "--sequence-parallel", "--teacher-path", smollm2_135m]
    split = plan_run(_cfg(base + ["--no-teacher-overlap"]))
    m, tokens = split.num_microbatches, 16 * 1280
    assert m == 4
    assert split.memory[0].teacher == pytest.approx(2 * 134_515_008 + m * tokens / 2 * 576 * 2)
    assert split.flops.overhead_on_teacher_ranks == pytest.approx(split.flops.overhead_active)
    inline = plan_run(_cfg(base + ["--no-teacher-tp-split", "--no-teacher-overlap"]))
    assert inline.memory[0].teacher == pytest.approx(2 * 134_515_008 + tokens * 576 * 2)
    assert inline.flops.overhead_on_teacher_ranks == pytest.approx(inline.flops.overhead_active * 2)


@pytest.mark.parametrize("extra,expected", [
    (["--objective", "let", "--let-stop-step", "1500"], 1500),
    (["--objective", "let", "--let-stop-step", "9000"], 7630),
    (["--objective", "let", "--let-lambda", "0"], 0),
    # grad-ratio: the teacher is needed until S_stop whatever λ0 (unused; step 0 measures)
    (["--objective", "let", "--let-lambda", "0", "--let-lambda-mode", "grad-ratio"], 1500),
    (["--objective", "rkd"], 7630),
    (["--objective", "salt"], 1321),
    (["--objective", "salt", "--kd-transition", "linear", "--kd-decay-start", "500",
      "--kd-stop-step", "1000"], 1000),
    (["--objective", "baseline"], 0),
])
def test_teacher_active_steps_matches_a_linear_scan(extra, expected):
    from megatron_let.objectives import ObjectiveContext, build_objective
    from megatron_let.training.estimates import teacher_active_steps

    cfg = _cfg(PAPER_1B + extra)
    obj = build_objective(cfg.objective, cfg.objective_config, ObjectiveContext(train_iters=7630))
    scan = sum(1 for s in range(7630) if obj.needs(s).teacher)
    assert teacher_active_steps(obj, 7630) == scan == expected


def test_plan_reads_data_prefix_token_counts(tmp_path, monkeypatch):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_let.training.dry_run import format_plan, plan_run

    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for n in (100, 250, 50):
        builder.add_document(torch.arange(n, dtype=torch.int32), [n])
    builder.finalize(prefix + ".idx")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _cfg(["--model-preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2",
                "--train-iters", "10", "--objective", "baseline", "--data-path", prefix,
                "--tokenizer-type", "NullTokenizer", "--vocab-size", "500"])
    plan = plan_run(cfg)
    assert plan.data.num_tokens == 400
    text = format_plan(plan)
    # 10 steps x global batch 4 x 32 tokens = 1280 tokens = 3.20 passes over 400
    assert "1 prefix(es), 400 tokens; the run reads 3.20 epoch(s)" in text


def test_vocabulary_read_from_tokenizer_when_not_given(tmp_path):
    """--vocab-size absent: the dry run asks the tokenizer, like the trainer."""
    import sentencepiece as spm

    from megatron_let.training.dry_run import plan_run

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"word{i} token{i % 7} text{i % 13}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=40, model_type="unigram", minloglevel=2)
    cfg = _cfg(["--model-preset", "tiny", "--seq-length", "32", "--objective", "baseline",
                "--tokenizer-type", "SentencePieceTokenizer",
                "--tokenizer-model", str(tmp_path / "sp.model")])
    plan = plan_run(cfg, world_size=1)
    expected = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model")).get_piece_size()
    assert plan.model.vocab_size == expected
    assert cfg.model.vocab_size == 0  # the caller's configuration is left as it was


def test_dry_run_prints_layout_and_estimates(monkeypatch, capsys, smollm2_135m):
    import pretrain_let

    monkeypatch.setenv("WORLD_SIZE", "64")
    monkeypatch.delenv("RANK", raising=False)
    rc = pretrain_let.main(["--dry-run", *PAPER_1B, "--pipeline-model-parallel-size", "4",
                            "--teacher-path", smollm2_135m])
    out = capsys.readouterr().out
    assert rc == 0
    assert "parallel layout: world 64 = TP 1 x DP 16 x PP 4" in out
    assert "teacher loaded on every rank of stage 0" in out
    lines = [line.split() for line in out.splitlines()]
    row0 = next(w for w in lines if w[:4] == ["0", "0", "0", "0"])
    assert row0[4:] == ["1-6", "embedding", "TEACHER"]
    row63 = next(w for w in lines if w[:4] == ["63", "3", "15", "0"])
    assert row63[4:] == ["19-24", "output"]
    assert "student: 1,409,337,344 (1.41B)" in out
    assert "teacher overhead averaged over the run" in out
    assert "dry run OK" in out
    assert "objective_config:" in out and "lambda0: 0.1" in out  # nested configuration


# ---------------------------------------------------------------------------------------------
# errors: exit code 2 and the message on stderr
# ---------------------------------------------------------------------------------------------

ERRORS = [
    ("heads-vs-tp", PAPER_7B + ["--tensor-model-parallel-size", "3", "--objective", "baseline"], None,
     "--num-attention-heads 32 is not divisible by --tensor-model-parallel-size 3"),
    ("layers-vs-pp", PAPER_1B + ["--pipeline-model-parallel-size", "5", "--objective", "baseline"],
     None, "--num-layers 24 is not divisible by --pipeline-model-parallel-size 5"),
    ("world-vs-mp", PAPER_7B + ["--tensor-model-parallel-size", "4", "--objective", "baseline"], "6",
     "world size 6 is not divisible by --tensor-model-parallel-size 4 x "
     "--pipeline-model-parallel-size 1"),
    ("global-batch", PAPER_1B + ["--global-batch-size", "1000", "--objective", "baseline"], "8",
     "--global-batch-size 1000 is not divisible by --micro-batch-size 16 x data-parallel size 8"),
    ("k-beyond-depth", PAPER_1B + ["--let-student-layer", "30", "--teacher-path", "TEACHER"], None,
     "--let-student-layer 30 is outside the student's layers 1..24"),
    ("missing-teacher", PAPER_1B + ["--objective", "let"], None,
     "--objective let needs --teacher-path"),
    ("missing-teacher-kd", PAPER_1B + ["--objective", "salt"], None,
     "--objective salt needs --teacher-path"),
    ("teacher-folder", PAPER_1B + ["--teacher-path", "/nonexistent/teacher"], None,
     "teacher folder '/nonexistent/teacher' does not exist"),
    ("teacher-layer", PAPER_1B + ["--teacher-path", "TEACHER", "--let-teacher-layer", "40"], None,
     "teacher layer 40 is out of range: the teacher has 30 layers"),
    ("vocab-mismatch", [a if a != "49152" else "32000" for a in PAPER_1B] +
     ["--teacher-path", "TEACHER"], None,
     "student vocabulary size 32000 (padded to 32000) differs from the teacher's vocabulary size "
     "49152"),
    ("vocab-unknown", [a for a in PAPER_1B if a not in ("--vocab-size", "49152")] +
     ["--objective", "baseline"], None, "vocabulary size unknown: pass --vocab-size"),
    ("scheduler-flags", PAPER_1B + ["--objective", "baseline", "--override-opt_param-scheduler",
                                    "--use-checkpoint-opt_param-scheduler"], None,
     "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are mutually exclusive"),
    ("grad-ratio", PAPER_1B + ["--teacher-path", "TEACHER", "--let-lambda-mode", "grad-ratio",
                               "--let-grad-ratio", "0"], None,
     "--let-grad-ratio must be a positive number, got 0.0"),
    ("exit-interval", PAPER_1B + ["--objective", "baseline", "--exit-interval", "0"], None,
     "--exit-interval must be > 0"),
]


@pytest.mark.parametrize("name,argv,world,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_invalid_configurations_fail_with_clear_messages(name, argv, world, message, monkeypatch,
                                                          capsys, smollm2_135m):
    import pretrain_let

    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    argv = [smollm2_135m if a == "TEACHER" else a for a in argv]
    rc = pretrain_let.main(["--dry-run", *argv])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.startswith("pretrain_let.py: error: "), captured.err
    assert message in captured.err
    assert captured.out == ""


def test_world_size_from_environment(monkeypatch):
    from megatron_let.training.dry_run import plan_run, world_size_from_env

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = _cfg(PAPER_7B + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
                           "4", "--objective", "baseline", "--global-batch-size", "64"])
    assert world_size_from_env(cfg) == 8  # unset: one replica, TP x PP
    assert plan_run(cfg).layout.dp == 1
    monkeypatch.setenv("WORLD_SIZE", "sixty-four")
    with pytest.raises(ValueError, match="WORLD_SIZE='sixty-four' is not an integer"):
        plan_run(cfg)
    monkeypatch.setenv("WORLD_SIZE", "32")
    assert plan_run(cfg).layout.dp == 4


def test_error_exit_code_and_stderr_in_a_real_process():
    env = base_env()
    env["WORLD_SIZE"] = "64"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pretrain_let.py"), "--dry-run", *PAPER_7B,
         "--tensor-model-parallel-size", "3", "--objective", "baseline"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2
    assert "--num-attention-heads 32 is not divisible by --tensor-model-parallel-size 3" in proc.stderr
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------------------
# the 7B launchers with --dry-run at 64 GPUs (8 nodes x 8), TP=2, PP=4
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["baseline", "let", "rkd", "salt"])
def test_7b_launcher_dry_run_at_64_gpus(objective, smollm2_17b, tmp_path):
    env = warm_start.python_env(launcher_env(MOCK_DATA=1, VOCAB_SIZE=49152, TEACHER_PATH=smollm2_17b,
                                             NNODES=8, TP=2, PP=4, CHECKPOINT_DIR=tmp_path / "ck"))
    out = run_launcher(LAUNCHERS["7b", objective], env, ["--dry-run"], timeout=300).stdout
    assert "parallel layout: world 64 = TP 2 x DP 8 x PP 4" in out
    assert "global batch: 2048 = micro 4 x DP 8 x 64 micro-batches" in out
    lines = [line.split() for line in out.splitlines()]
    header = next(w for w in lines if w[:2] == ["rank", "node"])
    assert header[2:5] == ["pp", "dp", "tp"]
    rows = [w for w in lines if len(w) >= 6 and w[0].isdigit() and len(w[0]) <= 2 and "-" in w[5]]
    assert len(rows) == 64
    assert rows[17][:6] == ["17", "2", "1", "0", "1", "9-16"]  # node 2, pp 1, dp 0, tp 1
    teacher_ranks = [int(w[0]) for w in rows if "TEACHER" in w]
    expected = {"baseline": [], "let": list(range(16)), "rkd": list(range(48, 64)),
                "salt": list(range(48, 64))}[objective]
    assert teacher_ranks == expected
    assert not (tmp_path / "ck").exists()  # a dry run creates nothing


def test_dry_run_states_the_log_throughput_counts(monkeypatch, smollm2_135m):
    """With --log-throughput the dry run prints the FLOPs per step the run will divide by its step
    time: the trainer's own count (estimates.run_step_flops), written out here from the shapes
    (Megatron-LM's formula: 3 x 2 x tokens x GEMM weights, causal attention halved)."""
    from megatron_let.training.dry_run import format_plan, plan_run
    from megatron_let.training.estimates import run_step_flops

    monkeypatch.setenv("WORLD_SIZE", "64")
    cfg = _cfg(PAPER_1B + ["--pipeline-model-parallel-size", "4", "--teacher-path", smollm2_135m,
                           "--log-throughput"])
    plan = plan_run(cfg)
    m, gbs = cfg.model, plan.global_batch_size
    h, f, s, hd = m.hidden_size, m.ffn_hidden_size, m.seq_length, m.head_dim
    q, kv = m.num_attention_heads * hd, (m.num_query_groups or m.num_attention_heads) * hd
    gemm = m.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * f) + h * m.padded_vocab_size(1)
    student = 6 * gbs * (s * gemm + m.num_layers * s * s * q)
    t = plan.teacher  # LET: all 30 blocks, no LM head
    teacher = 2 * gbs * (s * t.block_parameters + t.num_layers * s * s * t.hidden_size)
    line = next(x for x in format_plan(plan).splitlines() if "--log-throughput counts" in x)
    assert f"student {student:.3e}" in line and f"teacher forward {teacher:.3e}" in line, line
    assert "64 GPUs" in line
    # the same numbers the trainer's throughput divides by its step time
    from megatron_let.teacher.inspection import inspect_teacher

    info = inspect_teacher(smollm2_135m, layer=-1, seq_length=m.seq_length)
    trainer = run_step_flops(cfg, plan.objective, info, 64, gbs)
    assert trainer.student == pytest.approx(student) and trainer.teacher == pytest.approx(teacher)
    cfg = _cfg(PAPER_1B + ["--teacher-path", smollm2_135m])
    assert "--log-throughput counts" not in format_plan(plan_run(cfg))
