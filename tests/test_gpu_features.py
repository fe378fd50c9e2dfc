"""GPU checks of the memory and speed features (``pytest -m gpu``; scripts/gpu_check.sh runs them).

* LET in bf16 on one GPU: full and selective activation recompute give the per-step losses and grad
  norms of the run without recompute (the same kernels recomputed; the local layer spec's attention
  is deterministic), the capture's once-per-micro-batch invariant holding on CUDA; the teacher's
  time share (CUDA events) is a fraction of the step;
* the distributed optimizer with ``--overlap-grad-reduce --overlap-param-gather`` (and an evaluation
  in between, which needs the parameters gathered) equals the plain optimizer's run.

Skipped without a GPU, except under ``MEGATRON_LET_GPU_DRY_RUN=1`` (the check's CPU dry run), where
the same runs are made on CPU in fp32.
"""

import os

import pytest
import torch

from launch import TINY_MODEL, read_metrics, run_pretrain
from tiny_teachers import save_tiny_llama_teacher

GPU = torch.cuda.is_available()
DRY = os.environ.get("MEGATRON_LET_GPU_DRY_RUN") == "1"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (GPU or DRY), reason="needs a GPU (or MEGATRON_LET_GPU_DRY_RUN=1)")]

DEVICE = ["--device", "cuda", "--bf16"] if GPU else ["--device", "cpu"]
MODEL = [a for a in TINY_MODEL] + ["--mock-data", "--vocab-size", "200", "--micro-batch-size", "2",
                                   "--global-batch-size", "8", "--seed", "3"]
MODEL[MODEL.index("--device") + 1] = DEVICE[1]
STEPS = 4
REL = 1e-4
CPU_UNSUPPORTED = ("--bf16 needs a CUDA device", "--use-distributed-optimizer needs CUDA")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_teacher")
    save_tiny_llama_teacher(d)
    return str(d)


def _run(tmp_path, args):
    metrics = str(tmp_path / f"m{len(os.listdir(tmp_path))}.jsonl")
    proc = run_pretrain(MODEL + DEVICE[2:] + ["--train-iters", str(STEPS), "--metrics-jsonl",
                                             metrics] + args, check=False)
    if proc.returncode != 0 and not GPU and any(m in proc.stderr for m in CPU_UNSUPPORTED):
        pytest.skip("this build runs the feature on CUDA only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(metrics), read_metrics(metrics, split="valid")


def _same(got, ref, keys, rel):
    for i in range(1, STEPS + 1):
        for key in keys:
            if key in ref[i]:
                assert got[i][key] == pytest.approx(ref[i][key], rel=rel, abs=1e-6), (i, key)


def test_recompute_keeps_let_exact_on_gpu(teacher, tmp_path, record_property):
    let = ["--objective", "let", "--teacher-path", teacher, "--let-lambda", "1.0",
           "--let-student-layer", "2", "--let-stop-step", "100"]
    ref, _ = _run(tmp_path, let)
    assert all("align loss" in ref[i] for i in range(1, STEPS + 1))
    for name, flags in (("full", ["--recompute-granularity", "full", "--recompute-method",
                                  "uniform", "--recompute-num-layers", "1"]),
                        ("selective", ["--recompute-granularity", "selective"])):
        got, _ = _run(tmp_path, let + flags)
        _same(got, ref, ("lm loss", "align loss", "total loss", "grad norm"), REL)
        record_property(f"recompute_{name}_step_time_ratio",
                        got[STEPS]["step time"] / ref[STEPS]["step time"])
    share = ref[STEPS]["teacher time share"]
    record_property("teacher_time_share", share)
    assert 0.0 < share < 1.0


def test_overlapped_distributed_optimizer_matches_plain_on_gpu(tmp_path):
    base = ["--objective", "baseline", "--eval-interval", "2", "--eval-iters", "1"]
    ref, ref_valid = _run(tmp_path, base)
    got, valid = _run(tmp_path, base + ["--use-distributed-optimizer", "--overlap-grad-reduce",
                                        "--overlap-param-gather", "--ddp-bucket-size", "20000"])
    _same(got, ref, ("lm loss", "grad norm"), 1e-3)
    for i in (2, 4):
        assert valid[i]["lm loss"] == pytest.approx(ref_valid[i]["lm loss"], rel=1e-3)
