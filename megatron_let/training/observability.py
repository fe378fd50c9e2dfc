"""What Megatron-LM's logging and profiling flags add to a training step (flags:
:mod:`megatron_let.training.observability_config`):

* ``--log-throughput``: model TFLOP/s per GPU = FLOPs of the step / (step time · world size ·
  10¹²), Megatron-LM's count for the student (:func:`~megatron_let.training.estimates.megatron_training_flops`)
  and the teacher's forward on its own (``teacher-throughput``), both in ``throughput``; MFU =
  throughput / the GPU's peak (``--peak-tflops`` or :data:`PEAK_BF16_TFLOPS`).
* ``--log-params-norm`` / ``--log-num-zeros-in-grad``: device tensors folded into the step's one
  metric reduction (no host synchronisation of their own), as Megatron-LM computes them: the
  parameters' L2 norm and the zeros of the optimizer's main gradients, each tensor-parallel
  duplicate and shared (tied, PP > 1) weight counted once.
* ``--log-timers-to-tensorboard``: forward-backward, optimizer and iteration time (CUDA events on
  GPU, read after the step's reduction has synchronised the stream).
* ``--log-memory-to-tensorboard``: the caching allocator's statistics (Megatron-LM's names); on
  CPU the process's peak resident memory.
* ``--profile``: a :mod:`torch.profiler` window over steps ``[start, end)`` (0-based: the step that
  begins when ``start`` iterations are done, up to the one that completes iteration ``end``, as
  Megatron-LM's ``--profile`` range); named ranges (:func:`named_range`) for the teacher's
  forward, the alignment and the KD loss, also as NVTX ranges on CUDA.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import resource
import shutil
import time
from typing import Dict, Iterator, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from megatron_let.runtime import device as device_policy
from megatron_let.training.estimates import StepFlops, run_step_flops
from megatron_let.training.observability_config import ObservabilityConfig

# Dense bf16 peak TFLOP/s per GPU (NVIDIA data sheets, without sparsity), matched in this order
# against torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", ...).
PEAK_BF16_TFLOPS = (
    (("H200",), 989.4),
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.4),  # SXM
    (("A100",), 312.0),
)

_PROFILING = False  # named ranges are recorded only inside a --profile window


def device_peak_tflops(name: str) -> Optional[float]:
    """The table's peak for a CUDA device name, None when it has no entry."""
    upper = name.upper()
    for parts, peak in PEAK_BF16_TFLOPS:
        if all(p in upper for p in parts):
            return peak
    return None


@contextlib.contextmanager
def named_range(name: str) -> Iterator[None]:
    """A range in the --profile trace (and an NVTX range on CUDA); free outside the window."""
    if not _PROFILING:
        yield
        return
    nvtx = device_policy.cuda_initialized()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


class StepProfiler:
    """Megatron-LM's ``--profile`` window with the PyTorch profiler, on the ranks of
    ``--profile-ranks``. The profiler starts one step early as warm-up (not recorded)."""

    def __init__(self, cfg: ObservabilityConfig, tensorboard_dir: Optional[str], rank: int,
                 cuda: bool):
        self.cfg, self.dir, self.rank, self.cuda = cfg, tensorboard_dir, rank, cuda
        self.enabled = cfg.profile and (not cfg.profile_ranks or rank in cfg.profile_ranks)
        self.prof: Optional[torch.profiler.profile] = None
        self.trace_files: List[str] = []

    def _export(self, prof: torch.profiler.profile) -> None:
        # TensorBoard's profiler plugin reads <logdir>/<worker>.<id>.pt.trace.json (the layout of
        # torch.profiler.tensorboard_trace_handler, which could write only one of the two files);
        # the gzipped copy goes where Megatron-LM's --use-pytorch-profiler puts its Chrome trace.
        os.makedirs(self.dir, exist_ok=True)
        plugin = os.path.join(self.dir, f"rank{self.rank}.{time.time_ns()}.pt.trace.json")
        prof.export_chrome_trace(plugin)
        chrome = os.path.join(self.dir, "torch_profile", f"rank-{self.rank}.json.gz")
        os.makedirs(os.path.dirname(chrome), exist_ok=True)
        with open(plugin, "rb") as src, gzip.open(chrome, "wb") as dst:
            shutil.copyfileobj(src, dst)
        self.trace_files += [plugin, chrome]

    def begin(self, step: int) -> None:
        """Before step ``step`` (0-based, = iterations done)."""
        start, end = self.cfg.profile_step_start, self.cfg.profile_step_end
        if not self.enabled or self.prof is not None or not start - 1 <= step < end:
            return
        warmup = 1 if step == start - 1 else 0
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=0, warmup=warmup, active=end - max(step, start),
                                             repeat=1),
            on_trace_ready=self._export, record_shapes=True)
        self.prof.start()
        self._activate(step >= start)

    def step_range(self, step: int):
        """The whole step under ``iteration N`` (N = step + 1, as the console numbers it)."""
        if self.prof is None or not _PROFILING:
            return contextlib.nullcontext()
        return named_range(f"iteration {step + 1}")

    def _activate(self, on: bool) -> None:
        global _PROFILING
        if on and not _PROFILING and self.cuda:
            # the recorded steps also for an `nsys --capture-range=cudaProfilerApi` launch
            torch.cuda.cudart().cudaProfilerStart()
        _PROFILING = on

    def end(self, step: int) -> None:
        """After step ``step``."""
        if self.prof is None:
            return
        self.prof.step()
        self._activate(step + 1 >= self.cfg.profile_step_start)
        if step + 1 >= self.cfg.profile_step_end:
            self.close()

    def close(self) -> None:
        global _PROFILING
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.stop()
            if self.cuda and _PROFILING:
                torch.cuda.cudart().cudaProfilerStop()
        _PROFILING = False


class StepTimers:
    """Named intervals of one step: CUDA events on GPU (no synchronisation when they are
    recorded; read after the step's metric reduction), the host clock on CPU."""

    def __init__(self, enabled: bool, cuda: bool):
        self.enabled, self.cuda = enabled, cuda
        self._spans: Dict[str, list] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._spans.setdefault(name, []).append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._spans.setdefault(name, []).append(time.perf_counter() - t0)

    def pop(self) -> Dict[str, float]:
        """Seconds per name, as Megatron-LM's ``<name>-time`` scalars."""
        out = {}
        for name, spans in self._spans.items():
            if self.cuda:
                for _, end in spans:  # already complete after the reduction: returns at once
                    end.synchronize()
                out[f"{name}-time"] = sum(s.elapsed_time(e) for s, e in spans) / 1000.0
            else:
                out[f"{name}-time"] = float(sum(spans))
        self._spans.clear()
        return out


def params_norm_sq(model_chunks) -> torch.Tensor:
    """Local sum of squares of this rank's parameters (fp32), without TP duplicates and shared
    copies: summed over the tensor and pipeline ranks it is the model's squared L2 norm."""
    total = None
    for chunk in model_chunks:
        for p in chunk.parameters():
            if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
                sq = p.detach().float().pow(2).sum()
                total = sq if total is None else total + sq
    return total if total is not None else torch.zeros(())


def grad_zeros(optimizer) -> torch.Tensor:
    """Zeros in this rank's main gradients (the ones the optimizer stepped with, as megatron-core's
    ``count_zeros``), without TP duplicates and shared copies; a device tensor."""
    total = None
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        for g in opt.get_main_grads_for_grad_norm():
            zeros = g.numel() - torch.count_nonzero(g)
            total = zeros if total is None else total + zeros
    return total if total is not None else torch.zeros((), dtype=torch.int64)


def memory_stats(cuda: bool) -> Dict[str, float]:
    if cuda:
        s = torch.cuda.memory_stats()
        return {"mem-reserved-bytes": float(s.get("reserved_bytes.all.current", 0)),
                "mem-allocated-bytes": float(s.get("allocated_bytes.all.current", 0)),
                "mem-max-allocated-bytes": float(s.get("allocated_bytes.all.peak", 0)),
                "mem-allocated-count": float(s.get("allocation.all.current", 0))}
    return {"mem-max-rss-bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0}


def _tflops(x: float) -> str:
    # Megatron-LM's one decimal, with significant digits where that would print 0.0 (CPU)
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


class StepObserver:
    """The trainer's one handle on the flags above: a few calls per step."""

    PARAMS_NORM_SQ = "params norm sq"  # names in the step's metric reduction
    NUM_ZEROS = "num zeros"

    def __init__(self, cfg: ObservabilityConfig, *, tensorboard_dir: Optional[str], rank: int,
                 world: int, tp: int, pp: int, distributed_optimizer: bool,
                 device: torch.device, step_flops: Optional[StepFlops] = None):
        self.cfg, self.world = cfg, world
        cuda = device.type == "cuda"
        self.cuda = cuda
        self.timers = StepTimers(cfg.log_timers_to_tensorboard, cuda)
        self.profiler = StepProfiler(cfg, tensorboard_dir, rank, cuda)
        self.step_flops = step_flops
        self.peak = cfg.peak_tflops
        if self.peak is None and cuda:
            self.peak = device_peak_tflops(torch.cuda.get_device_name(device))
        # The reduction sums over every rank and divides by the summed counts: the parameters are
        # replicated over DP (count 1/(TP·PP) each), the main gradients too unless the
        # distributed optimizer shards them over DP (count 1/world each).
        self._params_count = 1.0 / (tp * pp)
        self._zeros_count = 1.0 / world if distributed_optimizer else 1.0 / (tp * pp)

    @property
    def metric_names(self) -> List[str]:
        return ([self.PARAMS_NORM_SQ] if self.cfg.log_params_norm else []) + \
            ([self.NUM_ZEROS] if self.cfg.log_num_zeros_in_grad else [])

    def accumulate(self, metrics, model_chunks, optimizer) -> None:
        """After the update, before the step's reduction (every rank)."""
        if self.cfg.log_params_norm:
            metrics.add(self.PARAMS_NORM_SQ, params_norm_sq(model_chunks),
                        torch.tensor(self._params_count), replicated=False)
        if self.cfg.log_num_zeros_in_grad:
            metrics.add(self.NUM_ZEROS, grad_zeros(optimizer), torch.tensor(self._zeros_count),
                        replicated=False)

    def throughput(self, step: int, seconds: float) -> Dict[str, float]:
        """TFLOP/s per GPU of step ``step`` (0-based) taking ``seconds``."""
        student, teacher = self.step_flops.at(step)
        scale = 1.0 / (max(seconds, 1e-12) * self.world * 1e12)
        out = {"student flops": student, "teacher flops": teacher,
               "throughput": (student + teacher) * scale,
               "student-throughput": student * scale, "teacher-throughput": teacher * scale}
        if self.peak:
            out["mfu"] = out["throughput"] / self.peak
        return out

    def values(self, reduced: Dict[str, float], step: int, step_time: float) -> Dict[str, float]:
        """The step's scalars (after the reduction); pops the raw reduced sums it consumed."""
        out: Dict[str, float] = {}
        if self.PARAMS_NORM_SQ in reduced:
            out["params-norm"] = reduced.pop(self.PARAMS_NORM_SQ) ** 0.5
        if self.NUM_ZEROS in reduced:
            out["num-zeros"] = round(reduced.pop(self.NUM_ZEROS))
        if self.cfg.log_throughput:
            out.update(self.throughput(step, step_time))
        if self.cfg.log_timers_to_tensorboard:
            out.update(self.timers.pop())
            out["iteration-time"] = step_time
        if self.cfg.log_memory_to_tensorboard:
            out.update(memory_stats(self.cuda))
        return out

    def console_parts(self, v: Dict[str, float], step: int, per_iter: float) -> List[str]:
        """Megatron-LM's console fields; throughput over the log interval's time per iteration."""
        parts = []
        if self.cfg.log_throughput:
            t = self.throughput(step, per_iter)
            parts.append(f"throughput per GPU (TFLOP/s/GPU): {_tflops(t['throughput'])}")
            if t["teacher flops"]:
                parts.append(f"teacher TFLOP/s/GPU: {_tflops(t['teacher-throughput'])}")
            if "mfu" in t:
                parts.append(f"MFU: {100 * t['mfu']:.1f}%")
        if "num-zeros" in v:
            parts.append(f"num zeros: {int(v['num-zeros'])}")
        if "params-norm" in v:
            parts.append(f"params norm: {v['params-norm']:.3f}")
        return parts

    def close(self) -> None:
        self.profiler.close()


def observer_for_run(cfg, objective, teacher_info, rank: int, world: int, global_batch_size: int,
                     device: torch.device) -> StepObserver:
    """The trainer's observer (``cfg``: the RunConfig; ``teacher_info`` as for
    :func:`~megatron_let.training.estimates.run_step_flops`)."""
    obs = cfg.logging.observability
    flops = run_step_flops(cfg, objective, teacher_info, world, global_batch_size) \
        if obs.log_throughput else None
    par = cfg.parallel
    return StepObserver(obs, tensorboard_dir=cfg.logging.tensorboard_dir, rank=rank, world=world,
                        tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size,
                        distributed_optimizer=par.use_distributed_optimizer, device=device,
                        step_flops=flops)
