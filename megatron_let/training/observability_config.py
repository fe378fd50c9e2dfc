"""Megatron-LM's logging and profiling flags that :mod:`megatron_let.training.observability`
honours: ``--log-throughput`` (+ ``--peak-tflops``), ``--log-params-norm``,
``--log-num-zeros-in-grad``, ``--log-timers-to-tensorboard``, ``--log-memory-to-tensorboard`` and
``--profile`` / ``--use-pytorch-profiler`` / ``--profile-step-start`` / ``--profile-step-end`` /
``--profile-ranks``. Kept apart from the runtime so that the argument parser imports no estimate."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class ObservabilityConfig:
    log_throughput: bool = False
    peak_tflops: Optional[float] = None  # per GPU; None: from the device table (no MFU on CPU)
    log_params_norm: bool = False
    log_num_zeros_in_grad: bool = False
    log_timers_to_tensorboard: bool = False
    log_memory_to_tensorboard: bool = False
    profile: bool = False
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: List[int] = field(default_factory=list)  # empty: every rank (Megatron-LM)


def add_observability_args(g: argparse._ArgumentGroup) -> None:
    """Into the parser's logging group, with Megatron-LM's names, defaults and meaning."""
    g.add_argument("--log-throughput", action="store_true",
                   help="log model TFLOP/s per GPU (Megatron-LM's FLOP count; the teacher's "
                        "forward counted on its own and in the total) and MFU")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s of one GPU for MFU (default: bf16 peak of H100/H200/"
                        "A100 from the device name; none on CPU)")
    g.add_argument("--log-params-norm", action="store_true",
                   help="log the L2 norm of the parameters")
    g.add_argument("--log-num-zeros-in-grad", action="store_true",
                   help="log the number of zeros in the gradient")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="write the step's timers (forward-backward, optimizer, iteration) to "
                        "TensorBoard and W&B")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="write the allocator's memory statistics to TensorBoard and W&B")
    g.add_argument("--profile", action="store_true",
                   help="profile steps --profile-step-start..--profile-step-end with the PyTorch "
                        "profiler (Chrome trace + TensorBoard plugin files in --tensorboard-dir)")
    g.add_argument("--use-pytorch-profiler", action="store_true",
                   help="accepted for Megatron-LM launchers: --profile always uses it here")
    g.add_argument("--profile-step-start", type=int, default=10,
                   help="profile from the step that starts at this iteration count")
    g.add_argument("--profile-step-end", type=int, default=12,
                   help="stop profiling when the iteration count reaches this value")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[],
                   help="global ranks to profile (default: all)")


def observability_config_from_args(a: argparse.Namespace) -> ObservabilityConfig:
    """Checked before any compute (and identically by ``--dry-run``)."""
    if a.peak_tflops is not None and not (math.isfinite(a.peak_tflops) and a.peak_tflops > 0):
        raise ValueError(f"--peak-tflops {a.peak_tflops} must be a positive number")
    if a.peak_tflops is not None and not a.log_throughput:
        raise ValueError("--peak-tflops is used for the MFU of --log-throughput; add --log-throughput")
    if a.use_pytorch_profiler and not a.profile:
        raise ValueError("--use-pytorch-profiler selects the profiler of --profile; add --profile")
    if a.profile:
        if a.profile_step_start < 0 or a.profile_step_end <= a.profile_step_start:
            raise ValueError(f"--profile-step-start {a.profile_step_start} / --profile-step-end "
                             f"{a.profile_step_end}: need 0 <= start < end")
        if not a.tensorboard_dir:
            raise ValueError("--profile writes its traces into --tensorboard-dir; set it")
        if a.profile_step_end > a.train_iters:
            raise ValueError(f"--profile-step-end {a.profile_step_end} is beyond --train-iters "
                             f"{a.train_iters}: the profile would never be written")
    if any(r < 0 for r in a.profile_ranks):
        raise ValueError(f"--profile-ranks {a.profile_ranks}: ranks are >= 0")
    return ObservabilityConfig(
        log_throughput=a.log_throughput, peak_tflops=a.peak_tflops,
        log_params_norm=a.log_params_norm, log_num_zeros_in_grad=a.log_num_zeros_in_grad,
        log_timers_to_tensorboard=a.log_timers_to_tensorboard,
        log_memory_to_tensorboard=a.log_memory_to_tensorboard, profile=a.profile,
        profile_step_start=a.profile_step_start, profile_step_end=a.profile_step_end,
        profile_ranks=list(a.profile_ranks))
