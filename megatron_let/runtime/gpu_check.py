"""The steps of ``scripts/gpu_check.sh``: verify the GPU path on one GPU and write one report.

Steps (each a subprocess with its own time limit; the limits are scaled to fit one overall budget
that counts from the start of scripts/gpu_check.sh, so the whole check - wheel install included -
ends within 10 minutes on one H200). The report names the student spec, attention backend and
fusions the runs use (TE where it imports, else ``--transformer-impl local``):

1. ``pytest -m gpu`` over the test files that use the marker (kernel vs reference at LET's shapes, bf16 vs fp32 LET run, the
   distributed optimizer with save/resume, the TE spec when TE is importable); the figures the tests
   attach with ``record_property`` come back through pytest's JUnit XML;
2. ``benchmarks/bench_cosine_align.py`` in bf16 and fp32 (16x1280 tokens, 2048->576, 4096->2048);
3. ``benchmarks/bench_training.py``: baseline / LET / RKD / SALT step time and memory with a ~1B
   student (``llama-1b``), sequence 1280, and a random teacher with SmolLM2-135M's architecture;
4. ``benchmarks/bench_teacher_compile.py``: that teacher's forward (bf16, 4x1280) eager vs
   ``--teacher-compile``.

``--cpu-dry-run`` runs the same steps at tiny size on CPU (the gpu tests under
``MEGATRON_LET_GPU_DRY_RUN=1``), so CI keeps the script working without a GPU. The report
(``gpu_check_report.md`` + ``.json`` in ``--out``) is rewritten after every step, so a step that runs
out of time still leaves the others' figures. More checks: add a step to :func:`plan` (a command, a
time cap, an optional JSON file it writes), or a ``gpu``-marked test (``pytest.mark.gpu`` in a
tests/test_*.py file), which step 1 collects.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRY_RUN_ENV = "MEGATRON_LET_GPU_DRY_RUN"  # read by tests/conftest.py and tests/test_gpu.py
T0_ENV = "GPU_CHECK_T0"  # epoch seconds when scripts/gpu_check.sh started (the wheel install counts)
# The whole check, wheel install included, within 10 minutes on one H200: 570 s from the script's
# start, the rest is margin for the report. The steps' nominal caps (plan) add up to less; when
# less is left (a slow install, a smaller --budget-s) they are scaled down to what is left.
DEFAULT_BUDGET_S = 570
SECOND_PASS_BUDGET_S = 240  # the optional megatron-core 0.19.x pass (pytest -m gpu only)
REPORT_MARGIN_S = 15
# The dry run checks that the steps work, not how fast: a shared CI machine may be slow.
DRY_RUN_BUDGET_S = 1800
DRY_RUN_CAP_S = 600


@dataclass
class Step:
    name: str
    cmd: List[str]
    cap_s: int  # time limit of this step (less when the overall budget runs short)
    json_out: Optional[str] = None  # a JSON file the step writes (its figures)
    junit: Optional[str] = None  # pytest's JUnit XML
    env: Dict[str, str] = field(default_factory=dict)
    # filled in by run_step
    status: str = "not run"  # passed | failed | timeout | not run (budget spent)
    rc: Optional[int] = None
    wall_s: Optional[float] = None
    log: Optional[str] = None
    figures: Optional[dict] = None


def gpu_transformer_impl() -> str:
    """The spec the GPU runs use: TE where it imports, else the local spec (the check's image has
    no TE; the report says so)."""
    # lazy: torch (under model.spec) only once main() has set CUDA_VISIBLE_DEVICES
    from megatron_let.model.spec import te_importable

    return "transformer_engine" if te_importable() else "local"


def fit_caps(steps: List[Step], seconds: float) -> None:
    """Scale the steps' caps down proportionally so that they add up to at most ``seconds``."""
    total = sum(s.cap_s for s in steps)
    if total > seconds:
        for s in steps:
            s.cap_s = max(10, int(s.cap_s * seconds / total))


def plan(out: str, dry: bool, second_pass: bool = False) -> List[Step]:
    """The check's steps, GPU-sized or (``dry``) tiny on CPU. Nominal GPU caps: 480 s in all.
    ``second_pass`` (another megatron-core): the gpu tests only."""
    py = sys.executable
    bench = os.path.join(ROOT, "benchmarks")
    # only the test files that hold gpu-marked tests (collecting the whole suite costs more than they do)
    test_files = [f for f in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
                  if "pytest.mark.gpu" in open(f, encoding="utf-8").read()]
    steps = [Step(
        "pytest -m gpu",
        [py, "-m", "pytest", "-m", "gpu", *test_files, "-q", "-rA", "-p", "no:cacheprovider",
         f"--junitxml={os.path.join(out, 'pytest_gpu.xml')}"],
        cap_s=DRY_RUN_CAP_S if dry else 200, junit=os.path.join(out, "pytest_gpu.xml"),
        env={DRY_RUN_ENV: "1"} if dry else {},
    )]
    if second_pass:
        return steps
    for dtype in (("fp32",) if dry else ("bf16", "fp32")):
        js = os.path.join(out, f"bench_cosine_align_{dtype}.json")
        steps.append(Step(f"bench_cosine_align {dtype}",
                          [py, os.path.join(bench, "bench_cosine_align.py"), "--dtype", dtype, "--json", js]
                          + (["--small", "--device", "cpu"] if dry else ["--device", "cuda"]),
                          cap_s=DRY_RUN_CAP_S if dry else (25 if dtype == "bf16" else 20), json_out=js))
    js = os.path.join(out, "bench_training.json")
    if dry:
        size = ["--device", "cpu", "--preset", "tiny", "--seq-length", "32", "--micro-batch-size", "2",
                "--vocab-size", "256", "--iters", "4", "--warmup", "1", "--objectives", "baseline,let"]
    else:
        size = ["--device", "cuda", "--bf16", "--preset", "llama-1b", "--seq-length", "1280",
                "--micro-batch-size", "4", "--vocab-size", "49152", "--teacher-like", "smollm2-135m",
                "--iters", "8", "--warmup", "2", "--transformer-impl", gpu_transformer_impl()]
    size.append("--compare-teacher-overlap")  # --teacher-overlap on/off (a no-op in the dry run)
    steps.append(Step("bench_training", [py, os.path.join(bench, "bench_training.py"), *size, "--json", js],
                      cap_s=DRY_RUN_CAP_S if dry else 180, json_out=js))
    # --teacher-compile: teacher forward eager vs compiled (the dry run uses aot_eager: no C++ build)
    js = os.path.join(out, "bench_teacher_compile.json")
    size = (["--device", "cpu", "--tiny", "--micro-batch-size", "2", "--seq-length", "32", "--iters", "3",
             "--warmup", "1", "--backend", "aot_eager"] if dry else
            ["--device", "cuda", "--dtype", "bf16", "--teacher-like", "smollm2-135m", "--micro-batch-size", "4",
             "--seq-length", "1280", "--iters", "20", "--warmup", "3"])
    steps.append(Step("bench_teacher_compile", [py, os.path.join(bench, "bench_teacher_compile.py"), *size,
                                                "--json", js], cap_s=DRY_RUN_CAP_S if dry else 55, json_out=js))
    return steps


def _version(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except Exception as e:  # TE raises RuntimeError without a GPU, not only ImportError
        return f"not importable ({type(e).__name__})"


def environment() -> dict:
    """GPU, driver and package versions."""
    # lazy: torch only after main() may have hidden the GPUs (--cpu-dry-run sets CUDA_VISIBLE_DEVICES)
    import torch

    from megatron_let.runtime import device as device_policy

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "cuda (torch build)": torch.version.cuda, "cuda available": device_policy.cuda_usable()}
    for name, module in (("triton", "triton"), ("transformers", "transformers"),
                         ("megatron-core", "megatron.core"), ("transformer-engine", "transformer_engine"),
                         ("tensorboard", "tensorboard"), ("sentencepiece", "sentencepiece"),
                         ("pytest", "pytest")):
        env[name] = _version(module)
    if device_policy.cuda_usable():
        props = torch.cuda.get_device_properties(0)
        env.update({"gpu": props.name, "gpu memory GiB": round(props.total_memory / 2**30, 1),
                    "compute capability": f"{props.major}.{props.minor}",
                    "gpu count": device_policy.cuda_device_count()})
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except Exception as e:
            env["driver"] = f"unknown ({type(e).__name__})"
    else:
        env["gpu"] = "none (CPU dry run)"
    # lazy: torch (under model.spec) only once main() has set CUDA_VISIBLE_DEVICES
    from megatron_let.model.spec import APEX_WGRAD, module_importable

    env["apex fused wgrad"] = "importable" if module_importable(APEX_WGRAD) else "not importable"
    return env


def student_spec(dry: bool) -> List[str]:
    """The spec, attention backend and fusions the check's training runs use on this machine."""
    # lazy: torch (under model.spec) only once main() has set CUDA_VISIBLE_DEVICES
    from megatron_let.model.spec import ImplConfig, resolve_spec

    if dry:
        return resolve_spec(ImplConfig(), "cpu").describe()
    impl = gpu_transformer_impl()
    lines = resolve_spec(ImplConfig(transformer_impl=impl), "cuda").describe()
    if impl == "local":
        lines.append("  (Transformer Engine is not importable here: the GPU runs pass --transformer-impl "
                     "local; the TE test is skipped)")
    return lines


def parse_junit(path: str) -> dict:
    """Per-test outcome, time and recorded properties from pytest's JUnit XML."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "")[:300]
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests.append({"test": f"{case.get('classname', '')}::{case.get('name')}", "outcome": outcome,
                      "time_s": round(float(case.get("time", 0.0)), 2), "message": message,
                      "figures": props})
    counts: Dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return {"counts": counts, "tests": tests}


def run_step(step: Step, out: str, deadline: float) -> None:
    left = deadline - time.time()
    if left < 10:
        step.status = "not run (budget spent)"
        return
    limit = min(step.cap_s, left)
    step.log = os.path.join(out, step.name.replace(" ", "_").replace("-", "") + ".log")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", **step.env)
    t0 = time.time()
    with open(step.log, "w") as log:
        proc = subprocess.Popen(step.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            step.rc = proc.wait(timeout=limit)
            step.status = "passed" if step.rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the step and the runs it started
            proc.wait()
            step.status = "timeout"
    step.wall_s = round(time.time() - t0, 1)
    try:
        if step.junit and os.path.isfile(step.junit):
            step.figures = parse_junit(step.junit)
            if step.status == "passed" and not step.figures["tests"]:
                step.status = "failed"  # nothing collected: the check checked nothing
        elif step.json_out and os.path.isfile(step.json_out):
            with open(step.json_out) as f:
                step.figures = json.load(f)
    except (ET.ParseError, json.JSONDecodeError) as e:
        step.figures = {"unreadable": f"{type(e).__name__}: {e}"}
        if step.status == "passed":
            step.status = "failed"


# ------------------------------------------------------------------------------------------ report


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "–" if v is None else str(v)


def _mib(v) -> str:
    return "–" if v is None else f"{v / 2**20:.1f} MiB"


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['mode']})", "",
             f"{report['started']} · {report['wall_s']} s of a {report['budget_s']} s budget · "
             f"**{'all steps passed' if report['ok'] else 'NOT OK'}**", "", "## Environment", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in report["environment"].items()]
    if report.get("spec"):
        lines += ["", "## Student spec", "", "```", *report["spec"], "```"]
    lines += ["", "## Steps", "", "| step | status | wall s | log |", "|---|---|---|---|"]
    for s in report["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {_fmt(s['wall_s'])} | {os.path.basename(s['log'] or '') or '–'} |")
    for s in report["steps"]:
        fig = s.get("figures") or {}
        if s["name"] == "pytest -m gpu" and "tests" in fig:
            lines += ["", "## pytest -m gpu", "", f"counts: {fig['counts']}", "",
                      "| test | outcome | s | figures / reason |", "|---|---|---|---|"]
            for t in fig["tests"]:
                detail = ", ".join(f"{k}={v}" for k, v in t["figures"].items()) or t["message"]
                lines.append(f"| {t['test']} | {t['outcome']} | {t['time_s']} | {detail.replace('|', '/')} |")
        elif s["name"].startswith("bench_cosine_align") and "shapes" in fig:
            lines += ["", f"## {s['name']}", "", "| tokens | d_M→d_T | dtype | impl | fwd+bwd ms | peak extra | "
                      "saved extra | GB/s | share of peak bandwidth | speed-up ref/fused |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for sh in fig["shapes"]:
                for impl, r in sh["impls"].items():
                    share = r.get("share_of_peak")
                    lines.append(f"| {sh['tokens']} | {sh['d_M']}→{sh['d_T']} | {sh['dtype']} | {impl} | "
                                 f"{r['fwd_bwd_ms']:.3f} | {_mib(r['peak_extra_bytes'])} | "
                                 f"{_mib(r['saved_extra_bytes'])} | {_fmt(r.get('achieved_GBps'))} | "
                                 f"{'n/a' if share is None else f'{100 * share:.1f}%'} | "
                                 f"{_fmt(sh.get('speedup_ref_over_fused'))} |")
        elif s["name"] == "bench_training" and "objectives" in fig:
            lines += ["", "## bench_training", "", "settings: " + ", ".join(
                f"{k}={v}" for k, v in fig["settings"].items()), "",
                "| objective | step s (teacher active) | throughput vs baseline | peak memory MB | "
                "memory vs baseline | step s after stop |", "|---|---|---|---|---|---|"]
            for name, r in fig["objectives"].items():
                lines.append(f"| {name} | {r['step_s_active']:.4f} | {r['throughput_vs_baseline']:.3f} | "
                             f"{r['peak_memory_MB']:.0f} | {r['peak_memory_vs_baseline']:.3f} | "
                             f"{_fmt(r['step_s_after_stop'])} |")
            if fig.get("teacher_overlap"):
                lines += ["", "| teacher overlap | step s | teacher share |", "|---|---|---|"]
                for label, r in fig["teacher_overlap"].items():
                    lines.append(f"| {label} | {r['step_s']:.4f} | {100 * r['teacher_share']:.1f}% |")
        elif s["name"] == "bench_teacher_compile" and "eager_ms" in fig:
            lines += ["", "## bench_teacher_compile", "", "settings: " + ", ".join(
                f"{k}={v}" for k, v in fig["settings"].items()), "",
                "| teacher forward eager ms | compiled ms | speed-up | first compiled call s | max abs diff |",
                "|---|---|---|---|---|",
                f"| {fig['eager_ms']:.3f} | {fig['compiled_ms']:.3f} | {fig['speedup_eager_over_compiled']:.3f} | "
                f"{fig['first_compiled_call_s']:.1f} | {fig['max_abs_diff']:.3g} |"]
    return "\n".join(lines) + "\n"


def write_report(out: str, report: dict) -> None:
    with open(os.path.join(out, "gpu_check_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "gpu_check_report.md"), "w") as f:
        f.write(markdown(report))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Verify the GPU path and write one report (scripts/gpu_check.sh).")
    p.add_argument("--out", required=True, help="folder for the report, logs and step outputs")
    p.add_argument("--cpu-dry-run", action="store_true", help="the same steps at tiny size on CPU")
    p.add_argument("--budget-s", type=int, default=None,
                   help=f"overall time budget in seconds from the start of scripts/gpu_check.sh (${T0_ENV}; "
                        f"default {DEFAULT_BUDGET_S}, second pass {SECOND_PASS_BUDGET_S}, dry run "
                        f"{DRY_RUN_BUDGET_S})")
    p.add_argument("--second-pass", action="store_true",
                   help="the pass with another megatron-core (gpu_check.sh --second-pass-mcore): gpu tests only")
    a = p.parse_args(argv)
    if a.budget_s is None:
        a.budget_s = DRY_RUN_BUDGET_S if a.cpu_dry_run else (
            SECOND_PASS_BUDGET_S if a.second_pass else DEFAULT_BUDGET_S)
    if a.budget_s < 30:
        p.error(f"--budget-s {a.budget_s} is too small (>= 30)")
    if a.cpu_dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU even on a GPU machine (inherited by every step)
    # lazy: torch only once CUDA_VISIBLE_DEVICES is final (just above)
    from megatron_let.runtime import device as device_policy

    if not a.cpu_dry_run and not device_policy.cuda_usable():
        print("gpu_check: no CUDA GPU is visible; use --cpu-dry-run to exercise the steps on CPU", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    # the budget counts from the script's start (the wheel install included)
    t0 = float(os.environ.get(T0_ENV) or time.time())
    deadline = t0 + a.budget_s
    report = {"mode": ("cpu-dry-run" if a.cpu_dry_run else "gpu") + (" (second pass)" if a.second_pass else ""),
              "budget_s": a.budget_s,
              "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
              "environment": environment(), "spec": student_spec(a.cpu_dry_run), "steps": [], "ok": False,
              "wall_s": 0.0, "setup_s": round(time.time() - t0, 1)}
    steps = plan(os.path.abspath(a.out), a.cpu_dry_run, second_pass=a.second_pass)
    fit_caps(steps, deadline - time.time() - REPORT_MARGIN_S)
    report["caps_s"] = {s.name: s.cap_s for s in steps}
    for step in steps:
        print(f"gpu_check: {step.name} ...", flush=True)
        run_step(step, a.out, deadline)
        print(f"gpu_check: {step.name}: {step.status} ({step.wall_s} s)", flush=True)
        report["steps"] = [s.__dict__ for s in steps]
        report["wall_s"] = round(time.time() - t0, 1)
        report["ok"] = all(s.status == "passed" for s in steps)
        write_report(a.out, report)
    print(f"gpu_check: report in {os.path.join(a.out, 'gpu_check_report.md')} "
          f"({'ok' if report['ok'] else 'NOT OK'}, {report['wall_s']} s)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
