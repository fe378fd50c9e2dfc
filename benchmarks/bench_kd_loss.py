"""Peak memory and time of the KD loss: chunked vs unchunked vs a dense autograd reference.

    python benchmarks/bench_kd_loss.py            # paper-scale: vocab 49152, 16 x 1280 tokens (GPU)
    python benchmarks/bench_kd_loss.py --small    # CPU preset, runs in seconds

Peak memory is what forward + backward allocates on top of the inputs: torch.cuda.max_memory_allocated
on CUDA, the profiler's memory events on CPU (timing runs are separate from the profiled ones).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from megatron_let.objectives.kd_loss import vocab_parallel_kd_loss


@dataclass
class BenchConfig:
    vocab: int = 49152
    batch: int = 16
    seq: int = 1280
    chunk: int = 4096
    rho: float = 0.25
    dtype: str = "auto"  # bf16 on CUDA, fp32 on CPU
    repeats: int = 3
    device: str = "auto"
    skip_dense: bool = False


def dense_reference(student: torch.Tensor, teacher: torch.Tensor, rho: float) -> torch.Tensor:
    """Plain autograd CE(softmax(rho * z_T), softmax(z_M)) in fp32 on the full vocabulary."""
    p_t = F.softmax(rho * teacher.float(), dim=-1)
    return -(p_t * F.log_softmax(student.float(), dim=-1)).sum(dim=-1)


def _cpu_peak_bytes(fn: Callable[[], None]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # +bytes on alloc, -bytes on free
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _cpu_peak_bytes(fn)


def _time_s(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(cfg: BenchConfig) -> None:
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype]
    n_tok = cfg.batch * cfg.seq
    g = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(cfg.batch, cfg.seq, cfg.vocab, device=device, generator=g).to(dtype)
    teacher = torch.randn(cfg.batch, cfg.seq, cfg.vocab, device=device, generator=g).to(dtype)
    student.requires_grad_(True)
    tensor_mib = n_tok * cfg.vocab * student.element_size() / 2**20
    print(f"device={device} dtype={dtype} tokens={n_tok} vocab={cfg.vocab} chunk={cfg.chunk} "
          f"(one [tokens, vocab] input = {tensor_mib:.0f} MiB)")

    def fwd_bwd(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            student.grad = None
            loss_fn().sum().backward()
            student.grad = None
        return step

    methods = {
        f"chunked ({cfg.chunk})": lambda: vocab_parallel_kd_loss(
            student, teacher, temperature=cfg.rho, chunk_size=cfg.chunk),
        "unchunked": lambda: vocab_parallel_kd_loss(
            student, teacher, temperature=cfg.rho, chunk_size=n_tok),
    }
    if not cfg.skip_dense:
        methods["dense reference"] = lambda: dense_reference(student, teacher, cfg.rho)

    with torch.no_grad():
        ref = dense_reference(student, teacher, cfg.rho) if not cfg.skip_dense else None
        if ref is not None:
            ours = vocab_parallel_kd_loss(student, teacher, temperature=cfg.rho, chunk_size=cfg.chunk)
            print(f"max |chunked - dense| loss = {(ours - ref).abs().max().item():.3e}")
        del ref

    rows = []
    for name, fn in methods.items():
        step = fwd_bwd(fn)
        peak = _peak_bytes(step, device) / 2**20
        secs = _time_s(step, device, cfg.repeats)
        rows.append((name, peak, secs))

    base_peak, base_time = rows[-1][1], rows[-1][2]
    base_name = rows[-1][0]
    print(f"{'method':<20}{'peak MiB':>12}{'fwd+bwd s':>12}{'peak/' + base_name:>26}{'time/' + base_name:>26}")
    for name, peak, secs in rows:
        print(f"{name:<20}{peak:>12.1f}{secs:>12.4f}{peak / base_peak:>26.3f}{secs / base_time:>26.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CPU preset: 2 x 512 tokens, vocab 8192")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--rho", type=float, default=0.25)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-dense", action="store_true", help="leave out the dense reference")
    a = p.parse_args()
    cfg = BenchConfig(rho=a.rho, dtype=a.dtype, repeats=a.repeats, device=a.device, skip_dense=a.skip_dense)
    if a.small:
        cfg.vocab, cfg.batch, cfg.seq, cfg.chunk = 8192, 2, 512, 128
    for field in ("vocab", "batch", "seq", "chunk"):
        if getattr(a, field) is not None:
            setattr(cfg, field, getattr(a, field))
    for field in ("vocab", "batch", "seq", "chunk", "repeats"):
        if getattr(cfg, field) < 1:
            raise ValueError(f"--{field} must be >= 1, got {getattr(cfg, field)}")
    run(cfg)


if __name__ == "__main__":
    main()
