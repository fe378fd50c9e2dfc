"""--teacher-compile: the teacher's blocks under torch.compile (inductor) give eager's hidden states
and logits, compile once for all blocks, and a LET run with it gives the same losses."""

import dataclasses

import pytest
import torch

from launch import TINY_MODEL, read_metrics, run_pretrain

# fp32 on CPU: inductor fuses and may reorder the norms' and the attention's reductions; measured
# max |compiled - eager| here 6e-7 on hidden states of magnitude ~3.5 (2.4e-7 on logits), allowed 1e-5
ATOL, RTOL = 1e-5, 1e-5
SHAPE = (2, 32)  # the LET run's micro-batch x sequence below: its subprocess reuses this compile


@pytest.fixture(scope="module")
def eager_and_compiled(teacher_dir):
    from torch._dynamo.utils import counters

    from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig

    cfg = TeacherConfig(path=teacher_dir)
    eager = HFTeacher.load(cfg)
    compiled = HFTeacher.load(dataclasses.replace(cfg, compile=True))
    # layer 2 of 3 on the same (already compiled) model: the forward hook ends it early
    compiled_l2 = HFTeacher(compiled.model, dataclasses.replace(cfg, layer=2, compile=True))
    eager_l2 = HFTeacher(eager.model, dataclasses.replace(cfg, layer=2))
    ids = torch.randint(0, 200, SHAPE, generator=torch.Generator().manual_seed(3))
    before = counters["stats"]["unique_graphs"]
    out = {
        "final": (eager.hidden_states(ids), compiled.hidden_states(ids)),
        "layer2": (eager_l2.hidden_states(ids), compiled_l2.hidden_states(ids)),
        "sliced": (eager.logits(ids, vocab_range=(40, 140)), compiled.logits(ids, vocab_range=(40, 140))),
        "full": (eager.logits(ids), compiled.logits(ids)),
    }
    out["graphs"] = counters["stats"]["unique_graphs"] - before
    out["compiled"] = compiled
    return out


@pytest.mark.parametrize("what", ["final", "layer2", "sliced", "full"])
def test_compiled_teacher_equals_eager(eager_and_compiled, what):
    ref, got = eager_and_compiled[what]
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_blocks_compiled_once(eager_and_compiled):
    blocks = eager_and_compiled["compiled"].model.model.layers
    assert all(getattr(b, "_megatron_let_compiled", False) for b in blocks)
    # three blocks, four forwards (final, layer 2, logits twice), the sliced-head probe (eager):
    # one graph, shared by every block
    assert eager_and_compiled["graphs"] == 1


LET = TINY_MODEL + ["--objective", "let", "--mock-data", "--vocab-size", "200",
                    "--micro-batch-size", str(SHAPE[0]), "--global-batch-size", "4", "--seed", "11",
                    "--let-lambda", "1.0", "--let-student-layer", "2", "--train-iters", "3"]


def test_let_run_with_teacher_compile_matches_eager(tmp_path, teacher_dir, eager_and_compiled):
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--teacher-compile"])):
        metrics = str(tmp_path / f"{name}.jsonl")
        out = run_pretrain(LET + ["--teacher-path", teacher_dir, "--metrics-jsonl", metrics] + extra).stdout
        assert ("blocks under torch.compile" in out) == bool(extra), out[-2000:]
        runs[name] = read_metrics(metrics)
    assert sorted(runs["compiled"]) == [1, 2, 3]
    for i in (1, 2, 3):  # same tolerance as the forward's: it enters only through the teacher states
        for key in ("lm loss", "align loss"):
            assert runs["compiled"][i][key] == pytest.approx(runs["eager"][i][key], abs=ATOL), (i, key)
    assert runs["compiled"][1]["align loss"] != 0


def test_missing_compiler_is_a_clear_error(monkeypatch):
    from megatron_let.teacher import compile as teacher_compile

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(teacher_compile.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="--teacher-compile: .*needs a C\\+\\+ compiler on CPU"):
        teacher_compile.check_compile_available(torch.device("cpu"))


def test_teacher_compile_without_a_teacher_is_an_error():
    proc = run_pretrain(TINY_MODEL + ["--objective", "baseline", "--mock-data", "--vocab-size", "200",
                                      "--train-iters", "1", "--teacher-compile", "--dry-run"], check=False)
    assert proc.returncode != 0 and "--teacher-compile: --objective baseline runs no teacher" in proc.stderr
