"""Per-step metric accumulation, cross-rank reduction and output (console, TensorBoard, W&B, JSONL)."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Dict, Optional, Tuple

import torch
from megatron.core import parallel_state

from megatron_let.runtime import device as device_policy
from megatron_let.training.wandb_writer import open_wandb_run


class MetricAccumulator:
    """Collects ``name -> (sum, count)`` on this rank; :meth:`reduce` sums over all ranks.

    Values replicated across TP ranks (e.g. the NLL after vocab-parallel cross entropy) are added
    only by the TP-rank-0 copy (``replicated=True``) so that nothing is counted twice."""

    def __init__(self) -> None:
        self._values: Dict[str, list] = OrderedDict()
        self.non_finite: Dict[str, list] = {}

    def add(self, name: str, total: torch.Tensor, count: torch.Tensor, replicated: bool) -> None:
        """Accumulates on the tensors' device: no host-device sync inside a micro-batch."""
        if replicated and parallel_state.get_tensor_model_parallel_rank() != 0:
            self._values.setdefault(name, [0.0, 0.0])  # the name still takes part in the reduce
            return
        slot = self._values.setdefault(name, [0.0, 0.0])
        slot[0] = slot[0] + torch.as_tensor(total).detach().to(torch.float64)
        slot[1] = slot[1] + torch.as_tensor(count).detach().to(torch.float64)

    def add_many(self, metrics: Dict[str, Tuple[torch.Tensor, torch.Tensor]], replicated: bool) -> None:
        for name, (total, count) in metrics.items():
            self.add(name, total, count, replicated)

    def reduce(self, names, finite_checks: Optional[Dict[str, float]] = None) -> Dict[str, float]:
        """Collective: every rank must call it with the same ``names`` (order matters).

        With ``finite_checks`` (``{name: local value}``, e.g. the grad norm) the same all-reduce also
        counts, per metric and per check, the ranks whose local value is NaN/inf; the names that are
        non-finite anywhere, with those ranks, land in :attr:`non_finite` (an all-gather runs only
        then, so a healthy step costs no extra collective)."""
        names = list(names)
        checks = list((finite_checks or {}).items())
        n = 2 * len(names)
        device = device_policy.collective_device()
        zero = torch.zeros((), dtype=torch.float64, device=device)
        parts = []  # the sums stay on the device until this one all-reduce
        for name in names:
            total, count = self._values.get(name, (0.0, 0.0))
            parts += [torch.as_tensor(total, dtype=torch.float64).to(device) + zero,
                      torch.as_tensor(count, dtype=torch.float64).to(device) + zero]
        buf = torch.stack(parts) if parts else zero.new_zeros(0)
        if finite_checks is not None:
            local = torch.cat([(~torch.isfinite(buf[0:n:2]) | ~torch.isfinite(buf[1:n:2])).double(),
                               torch.tensor([0.0 if math.isfinite(v) else 1.0 for _, v in checks],
                                            dtype=torch.float64, device=device)])
            buf = torch.cat([buf, local])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(buf)
        buf = buf.cpu()  # the step's one host-device synchronisation for metrics
        self._values.clear()
        self.non_finite = {}
        if finite_checks is not None and bool((buf[n:] > 0).any()):
            self.non_finite = self._non_finite_ranks(names + [k for k, _ in checks], local)
        out = {}
        for i, name in enumerate(names):
            if buf[2 * i + 1] > 0:
                out[name] = float(buf[2 * i] / buf[2 * i + 1])
        return out

    @staticmethod
    def _non_finite_ranks(names, local: torch.Tensor) -> Dict[str, list]:
        """Only after a non-finite value: which ranks saw it (every rank takes this branch)."""
        rows = [local]
        if torch.distributed.is_initialized():
            device = device_policy.collective_device()
            rows = [torch.zeros_like(local, device=device)
                    for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(rows, local.to(device))
        flags = torch.stack([r.cpu() for r in rows])  # [world, names]
        return {name: [int(r) for r in torch.nonzero(flags[:, j]).flatten()]
                for j, name in enumerate(names) if bool(flags[:, j].any())}


def peak_memory_mb() -> float:
    if device_policy.cuda_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class IntervalTimer:
    """Seconds per iteration over the current log interval, as Megatron-LM's console reports it:
    the interval restarts at every log line, and time inside ``paused()`` (evaluation,
    checkpointing) is left out."""

    def __init__(self, iteration: int, clock=time.monotonic):
        self._clock = clock
        self.restart(iteration)

    def restart(self, iteration: int) -> None:
        self._t0, self._iter0, self._paused = self._clock(), iteration, 0.0

    @contextmanager
    def paused(self):
        t = self._clock()
        try:
            yield
        finally:
            self._paused += self._clock() - t

    def per_iteration(self, iteration: int) -> float:
        return (self._clock() - self._t0 - self._paused) / max(1, iteration - self._iter0)


class IntervalAverage:
    """Losses as Megatron-LM's console prints them: the mean over the iterations of the current log
    interval, not the last iteration's value. Iterations whose update was skipped are left out, as
    Megatron-LM leaves them out of its ``advanced_iters``. :meth:`pop` returns the means and starts
    the next interval."""

    def __init__(self, keys) -> None:
        self.keys = tuple(keys)
        self._sums: Dict[str, list] = {}

    def add(self, values: Dict[str, float], skipped: bool = False) -> None:
        if skipped:
            return
        for key in self.keys:
            if key in values:
                slot = self._sums.setdefault(key, [0.0, 0])
                slot[0] += float(values[key])
                slot[1] += 1

    def pop(self) -> Dict[str, float]:
        out = {k: total / count for k, (total, count) in self._sums.items() if count}
        self._sums.clear()
        return out


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class MetricsWriter:
    """Console line in Megatron's style, TensorBoard and W&B scalars (same names, same steps) and
    an optional JSONL, on one rank."""

    def __init__(self, tensorboard_dir: Optional[str], jsonl_path: Optional[str], enabled: bool,
                 wandb=None, run_config: Optional[Dict[str, Any]] = None):
        """``wandb``: a :class:`~megatron_let.training.wandb_writer.WandbConfig` or None;
        ``run_config``: what the W&B run records as its config (Megatron-LM: ``vars(args)``)."""
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.jsonl = None
        if not enabled:
            return
        if tensorboard_dir:
            # lazy: tensorboard takes seconds to import; only a run with --tensorboard-dir needs it
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir, max_queue=100)
        if wandb is not None:
            self.wandb = open_wandb_run(wandb, run_config)
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self.jsonl = open(jsonl_path, "a")

    def scalars(self, step: int, values: Dict[str, float], prefix: str = "train/") -> None:
        if not self.enabled:
            return
        tags = {prefix + k.replace(" ", "_"): v for k, v in values.items()}
        if self.tb is not None:
            for tag, v in tags.items():
                self.tb.add_scalar(tag, v, step)
        if self.wandb is not None:
            self.wandb.log(tags, step=step)
        if self.jsonl is not None:
            record = {"iteration": step, "split": prefix.rstrip("/"), "time": time.time()}
            record.update(values)
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def console(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.jsonl is not None:
            self.jsonl.close()
