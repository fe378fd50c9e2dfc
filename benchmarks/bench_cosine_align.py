"""Benchmark the fused LET cosine-alignment kernel against the eager PyTorch reference.

Measures forward+backward time (median over ``--iters`` after ``--warmup``) and the extra memory each
implementation needs: peak CUDA memory above the live inputs (``torch.cuda.max_memory_allocated``) on
GPU, and on every device the bytes autograd keeps for backward beyond the inputs themselves.

    python benchmarks/bench_cosine_align.py                # GPU: 16x1280 tokens, 2048->576 and 4096->2048
    python benchmarks/bench_cosine_align.py --small        # CPU: scaled-down shapes, a few seconds

On CPU the kernel only runs under Triton's interpreter, whose timings say nothing about GPU speed, so
``--small`` times the reference at the scaled shapes and runs the kernel only at a tiny shape.

Achieved bandwidth: the bytes a fwd+bwd must move at least (:func:`min_traffic_bytes`: read both
inputs and the mask twice, write the per-token loss and statistics, read them back, write the
student's gradient) over the measured time, in GB/s; on a GPU also as a share of its memory
bandwidth (:data:`PEAK_GBPS`, from the device name). The kernel is memory-bound: that share is
its figure of merit.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

FULL_SHAPES = [(16 * 1280, 2048, 576), (16 * 1280, 4096, 2048)]  # (tokens, d_M, d_T)
SMALL_SHAPES = [(2 * 128, 512, 144), (2 * 128, 1024, 512)]  # same width ratios, CPU-sized
INTERPRETER_SHAPE = (16, 256, 72)  # kernel under the CPU interpreter: correctness-scale only
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# Peak memory bandwidth in GB/s by device-name fragment (first match wins; NVIDIA's data sheets).
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),  # "H100 80GB HBM3" = SXM
    ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0),  # 40 GB parts
]


def peak_gbps(device_name: str) -> float | None:
    """The GPU's memory bandwidth (GB/s) for a ``torch.cuda.get_device_name()``, or None."""
    for fragment, gbps in PEAK_GBPS:
        if fragment in device_name:
            return gbps
    return None


def min_traffic_bytes(tokens: int, d_m: int, d_t: int, dtype: torch.dtype, teacher_grad: bool = False) -> int:
    """Bytes one fwd+bwd must move at least: forward reads h_m, h_t and the uint8 mask and writes
    the fp32 loss and 3 fp32 statistics per token; backward reads h_m, h_t, the mask, the upstream
    gradient and the statistics and writes grad h_m (and grad h_t when the teacher needs one)."""
    e = torch.finfo(dtype).bits // 8
    inputs = tokens * (d_m + d_t) * e + tokens
    fwd = inputs + tokens * 4 * 4
    bwd = inputs + tokens * 4 * 4 + tokens * d_m * e + (tokens * d_t * e if teacher_grad else 0)
    return fwd + bwd


@dataclass
class Result:
    impl: str
    time_ms: float
    peak_extra_bytes: int | None  # CUDA only
    saved_extra_bytes: int
    gbps: float = 0.0  # min_traffic_bytes / time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CPU-sized preset (runs in a few seconds)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 20, --small 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 5, --small 1)")
    p.add_argument("--mask-frac", type=float, default=0.1, help="fraction of tokens masked out")
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on CPU, steadier on a shared machine; untouched on CUDA)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    args.iters = args.iters if args.iters is not None else (5 if args.small else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 5)
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    if not 0.0 <= args.mask_frac < 1.0:
        p.error("--mask-frac must be in [0, 1)")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    args.dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    return args


def load_kernels(device: str):
    """Import the kernel module; on CPU switch on Triton's interpreter first (read at import time)."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # The package re-exports a function named like the submodule: import the module object itself.
    return importlib.import_module("megatron_let.kernels.cosine_align")


def make_inputs(tokens: int, d_m: int, d_t: int, dtype: torch.dtype, device: str, mask_frac: float):
    gen = torch.Generator().manual_seed(0)
    h_m = torch.randn(tokens, d_m, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    h_t = torch.randn(tokens, d_t, generator=gen).to(device=device, dtype=dtype)  # frozen teacher
    mask = (torch.rand(tokens, generator=gen) >= mask_frac).to(device)
    return h_m, h_t, mask


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step(fn, h_m, h_t, mask) -> None:
    h_m.grad = None
    loss = fn(h_m, h_t, mask)
    (loss.sum() / mask.sum().clamp_min(1)).backward()  # token mean, as in the LET objective


def saved_extra_bytes(fn, h_m, h_t, mask) -> int:
    """Bytes autograd keeps for backward, excluding storages shared with the inputs."""
    inputs = {t.untyped_storage().data_ptr() for t in (h_m, h_t, mask)}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(h_m, h_t, mask)
    return sum(storages.values())


def measure(impl: str, fn, h_m, h_t, mask, device: str, iters: int, warmup: int) -> Result:
    for _ in range(warmup):
        _step(fn, h_m, h_t, mask)
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        _step(fn, h_m, h_t, mask)
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = None
    if device == "cuda":
        h_m.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(fn, h_m, h_t, mask)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    saved = saved_extra_bytes(fn, h_m, h_t, mask)
    median = statistics.median(times)
    traffic = min_traffic_bytes(h_m.shape[0], h_m.shape[-1], h_t.shape[-1], h_m.dtype, h_t.requires_grad)
    return Result(impl, median * 1e3, peak, saved, traffic / median / 1e9)


def _fmt_bytes(x: int | None) -> str:
    if x is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x} B"


def report(shape, dtype, results: list[Result], note: str = "", peak: float | None = None) -> None:
    tokens, d_m, d_t = shape
    print(f"\n== tokens={tokens} d_M={d_m} -> d_T={d_t} dtype={str(dtype).removeprefix('torch.')} {note}")
    print(f"{'impl':<10} {'fwd+bwd ms':>11} {'peak extra':>12} {'saved extra':>12} {'GB/s':>9}"
          + (f" {'of peak':>8}" if peak else ""))
    for r in results:
        peak_mem, saved = _fmt_bytes(r.peak_extra_bytes), _fmt_bytes(r.saved_extra_bytes)
        print(f"{r.impl:<10} {r.time_ms:>11.3f} {peak_mem:>12} {saved:>12} {r.gbps:>9.1f}"
              + (f" {100 * r.gbps / peak:>7.1f}%" if peak else ""))
    by = {r.impl: r for r in results}
    if "reference" in by and "fused" in by:
        ref, fused = by["reference"], by["fused"]
        line = f"speedup (ref/fused) = {ref.time_ms / fused.time_ms:.2f}x"
        if ref.peak_extra_bytes is not None and fused.peak_extra_bytes:
            line += f", peak-memory ratio (ref/fused) = {ref.peak_extra_bytes / fused.peak_extra_bytes:.2f}x"
        if fused.saved_extra_bytes > 0:
            line += f", saved-memory ratio (ref/fused) = {ref.saved_extra_bytes / fused.saved_extra_bytes:.1f}x"
        print(line)


def figures(shape, dtype, results: list[Result], note: str = "", peak: float | None = None) -> dict:
    """One shape's results as a JSON-ready dict (times in ms, memory in bytes, bandwidth in GB/s)."""
    tokens, d_m, d_t = shape
    out = {"tokens": tokens, "d_M": d_m, "d_T": d_t, "dtype": str(dtype).removeprefix("torch."),
           "note": note, "peak_GBps": peak,
           "impls": {r.impl: {"fwd_bwd_ms": r.time_ms, "peak_extra_bytes": r.peak_extra_bytes,
                              "saved_extra_bytes": r.saved_extra_bytes, "achieved_GBps": r.gbps,
                              "share_of_peak": r.gbps / peak if peak else None} for r in results}}
    by = {r.impl: r for r in results}
    if "reference" in by and "fused" in by:
        out["speedup_ref_over_fused"] = by["reference"].time_ms / by["fused"].time_ms
        if by["reference"].peak_extra_bytes is not None and by["fused"].peak_extra_bytes:
            out["peak_memory_ratio_ref_over_fused"] = by["reference"].peak_extra_bytes / by["fused"].peak_extra_bytes
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ca = load_kernels(args.device)
    ref_fn = ca.cosine_align_reference
    kernel_ok = ca.TRITON_AVAILABLE and (args.device == "cuda" or ca.triton_interpreter_active())
    if not kernel_ok:
        print("note: the fused kernel cannot run here (triton missing or interpreter not active); reference only")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = peak_gbps(name) if args.device == "cuda" else None
    print(f"device={args.device} ({name}; memory bandwidth "
          f"{f'{peak:.0f} GB/s' if peak else 'not in the table'}) iters={args.iters} warmup={args.warmup} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")

    shapes = SMALL_SHAPES if args.small else FULL_SHAPES
    recorded = []
    for shape in shapes:
        h_m, h_t, mask = make_inputs(*shape, args.dtype, args.device, args.mask_frac)
        results = [measure("reference", ref_fn, h_m, h_t, mask, args.device, args.iters, args.warmup)]
        if kernel_ok and args.device == "cuda":
            fused = measure("fused", ca.fused_cosine_align, h_m, h_t, mask, args.device, args.iters, args.warmup)
            results.append(fused)
        note = "" if args.device == "cuda" else "(reference only on CPU)"
        report(shape, args.dtype, results, note, peak)
        recorded.append(figures(shape, args.dtype, results, note, peak))
        del h_m, h_t, mask

    if kernel_ok and args.device == "cpu":
        h_m, h_t, mask = make_inputs(*INTERPRETER_SHAPE, args.dtype, args.device, args.mask_frac)
        results = [
            measure("reference", ref_fn, h_m, h_t, mask, args.device, args.iters, args.warmup),
            measure("fused", ca.fused_cosine_align, h_m, h_t, mask, args.device, min(args.iters, 2), 1),
        ]
        report(INTERPRETER_SHAPE, args.dtype, results, "(fused = Triton CPU interpreter)")
        recorded.append(figures(INTERPRETER_SHAPE, args.dtype, results, "fused = Triton CPU interpreter"))
        print("note: interpreter timings are NOT representative of GPU speed; only the saved-memory "
              "column carries over (it depends on shapes, not on the device).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "device_name": name, "peak_GBps": peak, "iters": args.iters, "warmup": args.warmup,
                       "torch": torch.__version__, "shapes": recorded}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
