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
    for name in ("test_let_bf16_tracks_fp32",
                 "test_distributed_optimizer_overlap_recompute_match_plain_and_resume_exactly",
                 "test_selective_recompute_keeps_let_exact"):
        t = tests[name]  # bf16, the distributed optimizer, overlap and recompute run on CPU too (gloo)
        assert t["outcome"] == "passed" and t["figures"], t
    te = tests["test_te_spec_capture_and_let_gradients_match_local_spec"]
    assert te["outcome"] == "skipped" and "Transformer Engine" in te["message"]
    for name in ("test_default_spec_on_this_gpu", "test_local_spec_fusions_match_unfused"):
        assert tests[name]["outcome"] == "skipped", tests[name]  # CUDA-only decisions and kernels
    assert report["spec"][0].startswith("student spec: --transformer-impl local on cpu")
    assert any("attention backend" in line for line in report["spec"])
    assert sum(report["caps_s"].values()) <= report["budget_s"]

    shapes = steps["bench_cosine_align fp32"]["figures"]["shapes"]
    assert [(s["d_M"], s["d_T"]) for s in shapes] == [(512, 144), (1024, 512), (256, 72)]
    assert shapes[-1]["impls"]["fused"]["saved_extra_bytes"] < shapes[-1]["impls"]["reference"]["saved_extra_bytes"]
    assert all(r["achieved_GBps"] > 0 for sh in shapes for r in sh["impls"].values())
    training = steps["bench_training"]["figures"]
    assert set(training["objectives"]) == {"baseline", "let"}
    assert training["objectives"]["let"]["step_s_active"] > 0 and training["objectives"]["let"]["step_s_after_stop"] > 0
    assert set(training["teacher_overlap"]) == {"overlap on", "overlap off"}
    assert all(r["step_s"] > 0 and 0 < r["teacher_share"] < 1 for r in training["teacher_overlap"].values())

    compiled = steps["bench_teacher_compile"]["figures"]
    assert compiled["eager_ms"] > 0 and compiled["compiled_ms"] > 0
    assert compiled["max_abs_diff"] <= 1e-5 * max(1.0, compiled["max_abs_eager"])  # compiled = eager

    md = (out / "gpu_check_report.md").read_text()
    for heading in ("## Environment", "## Student spec", "## Steps", "## pytest -m gpu", "## bench_cosine_align fp32", "## bench_training",
                    "## bench_teacher_compile"):
        assert heading in md
    assert "| GB/s | share of peak bandwidth |" in md  # no peak bandwidth known on CPU: n/a
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


def test_gpu_step_caps_fit_the_ten_minute_budget(tmp_path, monkeypatch):
    """The GPU steps' caps add up within the default budget, which leaves room for the wheel install
    inside 10 minutes; less time left (a slow install) scales them down to fit."""
    from megatron_let.runtime import gpu_check

    monkeypatch.setattr(gpu_check, "gpu_transformer_impl", lambda: "local")
    steps = gpu_check.plan(str(tmp_path), dry=False)
    assert [s.name for s in steps] == ["pytest -m gpu", "bench_cosine_align bf16", "bench_cosine_align fp32",
                                       "bench_training", "bench_teacher_compile"]
    nominal = sum(s.cap_s for s in steps)
    install_allowance = 60  # megatron-core + pytest wheels, offline
    assert nominal + install_allowance + gpu_check.REPORT_MARGIN_S <= gpu_check.DEFAULT_BUDGET_S <= 600
    training = next(s for s in steps if s.name == "bench_training")
    assert training.cmd[training.cmd.index("--transformer-impl") + 1] == "local"
    gpu_check.fit_caps(steps, 300)
    assert sum(s.cap_s for s in steps) <= 300 and all(s.cap_s >= 10 for s in steps)
    second = gpu_check.plan(str(tmp_path), dry=False, second_pass=True)
    assert [s.name for s in second] == ["pytest -m gpu"]
    assert second[0].cap_s <= gpu_check.SECOND_PASS_BUDGET_S


def test_second_pass_without_its_wheels_is_a_clear_error_before_anything_runs(tmp_path):
    env = base_env()
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--cpu-dry-run", "--out",
                           str(tmp_path), "--second-pass-mcore", "0.99.0"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "--second-pass-mcore 0.99.0" in proc.stderr and "--wheels" in proc.stderr
    assert not (tmp_path / "gpu_check_report.json").exists()  # stopped before the first step
