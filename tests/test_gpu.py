"""Checks of the GPU path (``pytest -m gpu``, run by scripts/gpu_check.sh on one H100/H200).

* the compiled Triton cosine-alignment kernel against the PyTorch reference at LET's real shapes;
* a 1-GPU (NCCL) LET run in bf16 tracking the same run in fp32;
* the distributed optimizer with overlapped gradient reduction / parameter all-gather and full
  recompute: its run (evaluations included) equals the plain bf16 run's, and save -> resume is exact;
  selective recompute equals it too (the LET capture firing once per micro-batch under recompute);
* the spec and fusions this GPU gets by default (model/spec.py): TE with RoPE fusion where TE imports,
  else the error naming the fix; the local spec's jit fusions (bias-SwiGLU, bias-dropout-add) equal
  the unfused spec with the same weights;
* with Transformer Engine importable: the TE layer spec with its fusions - captured layer-k state and
  LET gradients - equals the unfused local spec with the same weights, the capture firing once per
  micro-batch.

Five training processes in all (fp32, bf16, the feature run, its resume, selective recompute) plus a
spec worker per spec: the GPU check runs these within its budget (scripts/gpu_check.sh).

Without a GPU these tests are skipped (tests/conftest.py), except under
``MEGATRON_LET_GPU_DRY_RUN=1`` (``scripts/gpu_check.sh --cpu-dry-run``), where the same tests run at
tiny sizes on CPU (the kernel under Triton's interpreter). Measured figures are attached with
``record_property`` so the check's report lists them. New GPU checks: add a ``gpu``-marked test here
(or ``pytest.mark.gpu`` in another tests/test_*.py file) - scripts/gpu_check.sh picks it up.
"""

import os

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels are built at import

import importlib
import shutil
import subprocess
import sys

import pytest

from launch import ROOT, TINY_MODEL, base_env, gpu_impl_args, read_metrics, run_script

pytestmark = pytest.mark.gpu

ca = importlib.import_module("megatron_let.kernels.cosine_align")
if ca.TRITON_AVAILABLE and not GPU and not ca.triton_interpreter_active():
    ca = importlib.reload(ca)  # imported earlier without the interpreter

DEVICE = "cuda" if GPU else "cpu"

# --------------------------------------------------------------------------------------- sizes
if GPU:
    KERNEL_SHAPES = [(16 * 1280, 2048, 576), (16 * 1280, 4096, 2048)]  # (tokens, d_M, d_T): LET's
    MODEL = ["--num-layers", "8", "--hidden-size", "1024", "--ffn-hidden-size", "2816",
             "--num-attention-heads", "16", "--num-query-groups", "4", "--seq-length", "512",
             "--max-position-embeddings", "512", "--device", "cuda", "--log-interval", "1",
             "--lr", "1e-3", "--lr-warmup-fraction", "0.0", "--lr-decay-style", "constant",
             *gpu_impl_args()]
    VOCAB, TEACHER_HIDDEN, MICRO, GLOBAL, STEPS = 2048, 256, 4, 8, 12
else:  # --cpu-dry-run: the same checks at test size
    KERNEL_SHAPES = [(16, 256, 72), (16, 128, 64)]
    MODEL = TINY_MODEL
    VOCAB, TEACHER_HIDDEN, MICRO, GLOBAL, STEPS = 200, 48, 2, 4, 4

# Stated tolerances. Kernel: max |fused - reference| relative to max |reference| (fp32 reference on
# the same inputs; a bf16 gradient's rounding alone is up to 2^-8 = 3.9e-3 of its value). bf16 training vs fp32: per-step relative lm-loss difference and absolute
# align-loss difference (bf16 activations carry ~3 significant digits; over a few steps the runs
# drift apart slowly).
KERNEL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
BF16_LM_LOSS_REL = 2e-2
BF16_ALIGN_ABS = 2e-2
DISTOPT_REL = 1e-3  # distributed vs plain optimizer at DP=1 (same math, other kernels)
RESUME_REL = 1e-5  # resumed vs uninterrupted: the same computation
RECOMPUTE_REL = 1e-4  # selective recompute vs none: the same kernels run again

def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------------------- kernel


@pytest.mark.skipif(not ca.TRITON_AVAILABLE, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=[f"{n}x{a}to{b}" for n, a, b in KERNEL_SHAPES])
def test_compiled_kernel_matches_reference(shape, dtype, record_property):
    tokens, d_m, d_t = shape
    if GPU:
        assert not ca.triton_interpreter_active(), "TRITON_INTERPRET is set: the kernel is not compiled"
    gen = torch.Generator().manual_seed(0)
    h_m = torch.randn(tokens, d_m, generator=gen).to(DEVICE, dtype)
    h_t = torch.randn(tokens, d_t, generator=gen).to(DEVICE, dtype)
    mask = (torch.rand(tokens, generator=gen) > 0.1).to(DEVICE)
    upstream = torch.randn(tokens, generator=gen).to(DEVICE)

    def run(fn, dt):
        a = h_m.detach().to(dt).requires_grad_(True)
        b = h_t.detach().to(dt).requires_grad_(True)
        loss = fn(a, b, mask)
        (loss * upstream).sum().backward()
        return loss.detach(), a.grad, b.grad

    loss, g_m, g_t = run(ca.fused_cosine_align, dtype)
    # the same (bf16-representable) inputs in fp32: bf16 gradients then differ by their rounding only
    ref_loss, ref_m, ref_t = run(ca.cosine_align_reference, torch.float32)
    assert g_m.dtype == dtype and g_t.dtype == dtype
    errs = {"loss": _rel_err(loss, ref_loss), "grad_h_m": _rel_err(g_m, ref_m), "grad_h_t": _rel_err(g_t, ref_t)}
    for name, err in errs.items():
        record_property(f"max_rel_err_{name}", f"{err:.3e}")
    assert torch.equal(loss[~mask], torch.zeros_like(loss[~mask])) and not g_m[~mask].any()
    for name, err in errs.items():
        assert err <= KERNEL_TOL[dtype], (name, err, KERNEL_TOL[dtype])


# --------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("gpu_teacher")
    torch.manual_seed(0)
    seq = int(MODEL[MODEL.index("--seq-length") + 1])
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=TEACHER_HIDDEN, intermediate_size=2 * TEACHER_HIDDEN,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max(128, seq), tie_word_embeddings=True)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(d), safe_serialization=True)
    return str(d)


def _let_args(teacher, steps=STEPS):
    return MODEL + ["--objective", "let", "--mock-data", "--vocab-size", str(VOCAB),
                    "--micro-batch-size", str(MICRO), "--global-batch-size", str(GLOBAL),
                    "--seed", "5", "--let-lambda", "1.0", "--let-stop-step", str(10 * steps),
                    "--let-student-layer", "2", "--teacher-path", teacher, "--train-iters", str(steps),
                    "--eval-interval", str(steps // 2), "--eval-iters", "1"]


def _train(args, metrics, valid=False):
    """Run pretrain_let.py (one process: NCCL on a GPU, gloo in the CPU dry run); per-iteration
    metrics (and the validation ones). TE's attention is asked for its deterministic algorithms, so
    that runs which compute the same thing compare closely."""
    env = base_env()
    env["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] = "0"
    run_script("pretrain_let.py", args + ["--metrics-jsonl", str(metrics)], timeout=600, env=env)
    m = read_metrics(str(metrics))
    assert sorted(m)[-1] == int(args[args.index("--train-iters") + 1])
    return (m, read_metrics(str(metrics), split="valid")) if valid else m


@pytest.fixture(scope="module")
def fp32_run(teacher_dir, tmp_path_factory):
    return _train(_let_args(teacher_dir), tmp_path_factory.mktemp("fp32") / "m.jsonl")


@pytest.fixture(scope="module")
def bf16_runs(teacher_dir, tmp_path_factory):
    """(training, validation) metrics of the plain bf16 run."""
    return _train(_let_args(teacher_dir) + ["--bf16"], tmp_path_factory.mktemp("bf16") / "m.jsonl", valid=True)


@pytest.fixture(scope="module")
def bf16_run(bf16_runs):
    return bf16_runs[0]


def test_let_bf16_tracks_fp32(bf16_run, fp32_run, record_property):
    lm = [abs(bf16_run[i]["lm loss"] - fp32_run[i]["lm loss"]) / fp32_run[i]["lm loss"]
          for i in range(1, STEPS + 1)]
    align = [abs(bf16_run[i]["align loss"] - fp32_run[i]["align loss"]) for i in range(1, STEPS + 1)]
    record_property("max_lm_loss_rel_diff", f"{max(lm):.3e}")
    record_property("max_align_loss_abs_diff", f"{max(align):.3e}")
    record_property("fp32_lm_loss_first_last", f"{fp32_run[1]['lm loss']:.4f} -> {fp32_run[STEPS]['lm loss']:.4f}")
    record_property("bf16_lm_loss_first_last", f"{bf16_run[1]['lm loss']:.4f} -> {bf16_run[STEPS]['lm loss']:.4f}")
    assert fp32_run[STEPS]["lm loss"] < fp32_run[1]["lm loss"]  # it learns
    assert bf16_run[STEPS]["lm loss"] < bf16_run[1]["lm loss"]
    assert max(lm) <= BF16_LM_LOSS_REL, lm
    assert max(align) <= BF16_ALIGN_ABS, align


FEATURES = ["--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
            "--ddp-bucket-size", "20000", "--recompute-granularity", "full", "--recompute-method", "uniform",
            "--recompute-num-layers", "1"]


def test_distributed_optimizer_overlap_recompute_match_plain_and_resume_exactly(
        teacher_dir, bf16_runs, tmp_path, record_property):
    """One run with the distributed optimizer, both overlaps and full recompute against the plain bf16
    run (with an evaluation in between, which needs the parameters gathered); then a resume from its
    mid-run checkpoint against the uninterrupted run."""
    bf16_run, bf16_valid = bf16_runs
    half = STEPS // 2
    save = tmp_path / "ckpt"
    args = _let_args(teacher_dir) + FEATURES
    full, full_valid = _train(args + ["--save", str(save), "--save-interval", str(half)], tmp_path / "full.jsonl",
                              valid=True)
    plain = [abs(full[i]["lm loss"] - bf16_run[i]["lm loss"]) / bf16_run[i]["lm loss"] for i in range(1, STEPS + 1)]
    record_property("max_lm_loss_rel_diff_vs_plain_optimizer", f"{max(plain):.3e}")
    assert max(plain) <= DISTOPT_REL, plain
    for i in range(1, STEPS + 1):
        assert full[i]["align loss"] == pytest.approx(bf16_run[i]["align loss"], rel=DISTOPT_REL, abs=1e-5)
    assert sorted(full_valid) == sorted(bf16_valid) == [half, STEPS]
    for i in (half, STEPS):  # the evaluation saw the gathered parameters
        assert full_valid[i]["lm loss"] == pytest.approx(bf16_valid[i]["lm loss"], rel=DISTOPT_REL)

    # resume from the mid-run checkpoint alone (a folder whose tracker points at it)
    mid = tmp_path / "mid"
    mid.mkdir()
    name = f"iter_{half:07d}"
    assert (save / name).is_dir(), sorted(os.listdir(save))
    shutil.copytree(save / name, mid / name)
    (mid / "latest_checkpointed_iteration.txt").write_text(str(half))
    resumed = _train(args + ["--load", str(mid)], tmp_path / "resumed.jsonl")
    assert sorted(resumed) == list(range(half + 1, STEPS + 1))
    diffs = [abs(resumed[i]["lm loss"] - full[i]["lm loss"]) / full[i]["lm loss"] for i in range(half + 1, STEPS + 1)]
    record_property("max_lm_loss_rel_diff_resumed", f"{max(diffs):.3e}")
    assert max(diffs) <= RESUME_REL, diffs
    for i in range(half + 1, STEPS + 1):
        assert resumed[i]["align loss"] == pytest.approx(full[i]["align loss"], rel=RESUME_REL, abs=1e-7)
        assert resumed[i]["lr"] == pytest.approx(full[i]["lr"], rel=1e-9)


def test_selective_recompute_keeps_let_exact(teacher_dir, bf16_run, tmp_path, record_property):
    got = _train(_let_args(teacher_dir) + ["--bf16", "--recompute-granularity", "selective"],
                 tmp_path / "selective.jsonl")
    for i in range(1, STEPS + 1):
        for key in ("lm loss", "align loss", "grad norm"):
            assert got[i][key] == pytest.approx(bf16_run[i][key], rel=RECOMPUTE_REL, abs=1e-6), (i, key)
    record_property("selective_step_time_ratio", round(got[STEPS]["step time"] / bf16_run[STEPS]["step time"], 3))
    share = bf16_run[STEPS]["teacher time share"]
    record_property("teacher_time_share", round(share, 4))
    assert 0.0 < share < 1.0


# --------------------------------------------------------------------------------------- spec


@pytest.mark.skipif(not GPU, reason="the CUDA spec decisions need a GPU (mocked on CPU: test_model_spec.py)")
def test_default_spec_on_this_gpu(record_property):
    from megatron_let.model.spec import ImplConfig, resolve_spec, te_importable

    if te_importable():
        spec = resolve_spec(ImplConfig(), "cuda")
        assert spec.use_te and spec.fusion("apply_rope_fusion").on
    else:
        with pytest.raises(ValueError, match=r"transformer-engine\[pytorch\].*--transformer-impl local"):
            resolve_spec(ImplConfig(), "cuda")
        spec = resolve_spec(ImplConfig(transformer_impl="local"), "cuda")
    assert spec.fusion("bias_activation_fusion").on and spec.fusion("bias_dropout_fusion").on
    assert spec.batch_p2p_sync is False
    record_property("spec", " | ".join(line.strip() for line in spec.describe()))


def _spec_worker(mode, tmp_path, record_property):
    out = tmp_path / f"{mode}.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "te_spec_worker.py"), str(out),
                           mode], env=base_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    import json

    res = json.loads(out.read_text())
    record_property("fusions_on", ",".join(res["fusions_on"]))
    for key, value in res["errors"].items():
        record_property(f"max_rel_err_{key}", f"{value:.3e}")
    assert res["fired"] == {"local": res["micro_batches"], "te": res["micro_batches"]}, res
    for key, value in res["errors"].items():
        assert value <= res["tolerance"], (key, value)
    assert res["untouched_above_k"], "layers above k got an alignment gradient"
    return res


@pytest.mark.skipif(not GPU, reason="the jit fusions exist on CUDA only")
def test_local_spec_fusions_match_unfused(tmp_path, record_property):
    res = _spec_worker("local", tmp_path, record_property)
    assert {"bias_activation_fusion", "bias_dropout_fusion"} <= set(res["fusions_on"])


# --------------------------------------------------------------------------------------- TE spec


def _te_importable() -> bool:
    from megatron_let.model.llama import transformer_engine_available

    return transformer_engine_available()


@pytest.mark.skipif(not _te_importable(), reason="Transformer Engine is not importable (or no GPU)")
def test_te_spec_capture_and_let_gradients_match_local_spec(tmp_path, record_property):
    """TE spec with its fusions on (RoPE, bias-SwiGLU, masked softmax, bias-dropout-add) against the
    unfused local spec with the same weights."""
    res = _spec_worker("te", tmp_path, record_property)
    assert {"apply_rope_fusion", "bias_activation_fusion", "masked_softmax_fusion"} <= set(res["fusions_on"])
