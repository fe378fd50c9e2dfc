"""scripts/gpu_check.sh --cpu-dry-run: the GPU check's steps at tiny size on CPU, and its report."""

import json
import os
import subprocess
import sys

import pytest

from launch import ROOT, base_env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = base_env()
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--cpu-dry-run", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    return proc, out


def test_dry_run_runs_every_step_and_reports_its_figures(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check_report.json").read_text())
    assert report["mode"] == "cpu-dry-run" and report["ok"]
    assert report["environment"]["megatron-core"] == "0.16.1"
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["pytest -m gpu", "bench_cosine_align fp32", "bench_training",
                           "bench_teacher_compile"]
    assert all(s["status"] == "passed" and s["rc"] == 0 for s in steps.values()), steps

    tests = {t["test"].split("::")[-1]: t for t in steps["pytest -m gpu"]["figures"]["tests"]}
    kernel = [t for name, t in tests.items() if name.startswith("test_compiled_kernel_matches_reference")]
    assert len(kernel) == 4 and all(t["outcome"] == "passed" for t in kernel)
    for t in kernel:  # the measured errors come back, and are within the tests' tolerances
        assert 0 <= float(t["figures"]["max_rel_err_grad_h_m"]) <= 1e-2
    for name in ("test_let_bf16_tracks_fp32", "test_distributed_optimizer_matches_plain_and_resumes_exactly"):
        t = tests[name]  # bf16 and the distributed optimizer run on CPU too (gloo)
        assert t["outcome"] == "passed" and t["figures"], t
    te = tests["test_te_spec_capture_and_let_gradients_match_local_spec"]
    assert te["outcome"] == "skipped" and "Transformer Engine" in te["message"]

    shapes = steps["bench_cosine_align fp32"]["figures"]["shapes"]
    assert [(s["d_M"], s["d_T"]) for s in shapes] == [(512, 144), (1024, 512), (256, 72)]
    assert shapes[-1]["impls"]["fused"]["saved_extra_bytes"] < shapes[-1]["impls"]["reference"]["saved_extra_bytes"]
    training = steps["bench_training"]["figures"]
    assert set(training["objectives"]) == {"baseline", "let"}
    assert training["objectives"]["let"]["step_s_active"] > 0 and training["objectives"]["let"]["step_s_after_stop"] > 0
    assert set(training["teacher_overlap"]) == {"overlap on", "overlap off"}
    assert all(r["step_s"] > 0 and 0 < r["teacher_share"] < 1 for r in training["teacher_overlap"].values())

    compiled = steps["bench_teacher_compile"]["figures"]
    assert compiled["eager_ms"] > 0 and compiled["compiled_ms"] > 0
    assert compiled["max_abs_diff"] <= 1e-5 * max(1.0, compiled["max_abs_eager"])  # compiled = eager

    md = (out / "gpu_check_report.md").read_text()
    for heading in ("## Environment", "## Steps", "## pytest -m gpu", "## bench_cosine_align fp32", "## bench_training",
                    "## bench_teacher_compile"):
        assert heading in md
    assert "max_rel_err_grad_h_m=" in md and "| let |" in md and "| overlap off |" in md


def test_bad_invocations_are_clear_errors(tmp_path):
    script = os.path.join(ROOT, "scripts", "gpu_check.sh")
    env = base_env()
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", script, "--frobnicate"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument --frobnicate" in proc.stderr
    env["CUDA_VISIBLE_DEVICES"] = ""  # as on a CPU machine
    proc = subprocess.run([sys.executable, "-m", "megatron_let.runtime.gpu_check", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "no CUDA GPU is visible" in proc.stderr and "--cpu-dry-run" in proc.stderr
