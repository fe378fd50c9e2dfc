#!/usr/bin/env python
"""Teacher forward time, eager vs ``--teacher-compile`` (the blocks under torch.compile), same model.

Generates a random-weight teacher (``--teacher-like smollm2-135m``: SmolLM2-135M's architecture, or a
tiny one with ``--tiny``), times ``HFTeacher.hidden_states`` (the forward LET runs every micro-batch)
eagerly, then compiles the blocks in place and times it again, and reports the first compiled call
(the compile), the median per-forward times, the speed-up and the largest difference between the two
outputs. GPU example (scripts/gpu_check.sh runs it):

    python benchmarks/bench_teacher_compile.py --device cuda --dtype bf16 --teacher-like smollm2-135m \\
        --micro-batch-size 4 --seq-length 1280 --json out.json

``--backend`` other than inductor (e.g. ``aot_eager``, which needs no C++ compiler) is for the
check's CPU dry run, which only proves that the step works.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=True)


def timed(fn, iters, sync):
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    shape = p.add_mutually_exclusive_group(required=True)
    shape.add_argument("--teacher-like", choices=("smollm2-135m",))
    shape.add_argument("--tiny", action="store_true", help="a 2-layer x 64 teacher (CPU dry run)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=1280)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--max-rel-diff", type=float, default=None,
                   help="fail (exit 1) when max |compiled - eager| exceeds this times max |eager| "
                        "(default 1e-5 in fp32; 0.1 in bf16, where fused kernels round less often)")
    a = p.parse_args()

    # lazy: torch, megatron.core, transformers take seconds to import; --help needs none (CLI start-up)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench_training import SMOLLM2_135M
    from megatron_let.teacher.compile import check_compile_available, compile_blocks
    from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig

    device = torch.device(a.device)
    if a.backend == "inductor":
        check_compile_available(device)
    spec = TINY if a.tiny else SMOLLM2_135M
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**spec)).save_pretrained(folder, safe_serialization=True)
        cfg = TeacherConfig(path=folder, dtype="bfloat16" if a.dtype == "bf16" else "float32")
        teacher = HFTeacher.load(cfg, device)
        ids = torch.randint(0, spec["vocab_size"], (a.micro_batch_size, a.seq_length), device=device,
                            generator=torch.Generator(device=device).manual_seed(1))
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        eager_out = teacher.hidden_states(ids)
        eager = timed(lambda: teacher.hidden_states(ids), a.warmup + a.iters, sync)[a.warmup:]
        if a.backend == "inductor":  # the flag's own path, on the same weights
            teacher = HFTeacher(teacher.model, dataclasses.replace(cfg, compile=True))
        else:
            compile_blocks(teacher.model.model.layers, backend=a.backend)
        first = timed(lambda: teacher.hidden_states(ids), 1, sync)[0]
        compiled = timed(lambda: teacher.hidden_states(ids), a.warmup + a.iters, sync)[a.warmup:]
        diff = (teacher.hidden_states(ids).float() - eager_out.float()).abs().max().item()

    figures = {
        "settings": {"device": a.device, "dtype": a.dtype, "teacher": "tiny" if a.tiny else a.teacher_like,
                     "layers": spec["num_hidden_layers"], "hidden": spec["hidden_size"],
                     "micro_batch_size": a.micro_batch_size, "seq_length": a.seq_length,
                     "backend": a.backend, "iters": a.iters},
        "eager_ms": 1e3 * statistics.median(eager),
        "compiled_ms": 1e3 * statistics.median(compiled),
        "first_compiled_call_s": first,
        "max_abs_diff": diff,
        "max_abs_eager": eager_out.float().abs().max().item(),
    }
    figures["speedup_eager_over_compiled"] = figures["eager_ms"] / figures["compiled_ms"]
    print(json.dumps(figures, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(figures, f, indent=1)
    tol = a.max_rel_diff if a.max_rel_diff is not None else (1e-5 if a.dtype == "fp32" else 0.1)
    if diff > tol * max(1.0, figures["max_abs_eager"]):
        raise SystemExit(f"compiled teacher differs from eager by {diff:.3g} (max |eager| "
                         f"{figures['max_abs_eager']:.3g}, allowed {tol} relative)")


if __name__ == "__main__":
    main()
