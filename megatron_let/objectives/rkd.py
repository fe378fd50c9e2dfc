"""``rkd``: reverse knowledge distillation for the whole run (SALT paper eq. 2-4).

L = (1 − ω)·L_NLL + ω·L_KD(ρ),  L_KD(ρ) = token-mean CE(P_T,ρ, P_M),  P_T,ρ ∝ P_T^ρ

The teacher runs on the last pipeline stage (where the logits are) of every data-parallel rank;
the KD term is computed vocab-parallel and chunked over tokens (``kd_loss.py``). Student and
teacher must share the vocabulary; padded entries are masked.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from megatron_let.objectives.base import Metrics, Needs, Objective, metric, register
from megatron_let.objectives.kd_loss import teacher_vocab_shard, vocab_parallel_kd_loss


@dataclass
class KDSchedule:
    """ω(s): constant ω before ``decay_start``; ``step``: drops to 0 at ``stop_step``; ``linear``:
    decays linearly from ω at ``decay_start`` to 0 at ``stop_step``. ``stop_step=None``: never stops."""

    weight: float = 0.667
    stop_step: Optional[int] = None
    transition: str = "step"
    decay_start: Optional[int] = None

    def __call__(self, step: int) -> float:
        if self.stop_step is None:
            return self.weight
        if step >= self.stop_step:
            return 0.0
        if self.transition == "linear":
            start = self.decay_start or 0
            if step >= start:
                return self.weight * (self.stop_step - step) / (self.stop_step - start)
        return self.weight

    def validate(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"--kd-weight must be in [0, 1], got {self.weight}")
        if self.transition not in ("step", "linear"):
            raise ValueError(f"--kd-transition must be step or linear, got {self.transition!r}")
        if self.stop_step is not None and self.stop_step < 0:
            raise ValueError("--kd-stop-step must be >= 0")
        if self.transition == "linear":
            start = self.decay_start or 0
            if self.stop_step is None or not 0 <= start < self.stop_step:
                raise ValueError(
                    f"--kd-transition linear needs 0 <= --kd-decay-start ({start}) < "
                    f"--kd-stop-step ({self.stop_step})"
                )


def add_kd_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the logit-distillation objectives (rkd, salt); added once."""
    if any(a.dest == "kd_weight" for a in parser._actions):
        return
    g = parser.add_argument_group("logit distillation (--objective rkd / salt)")
    g.add_argument("--kd-weight", type=float, default=0.667, help="ω, weight of the KD term")
    g.add_argument("--kd-temperature", type=float, default=0.25,
                   help="ρ: P_T,ρ ∝ P_T^ρ (teacher-only temperature)")
    g.add_argument("--kd-stop-step", type=int, default=None,
                   help="n_KD for salt (default: 17%% of --train-iters, the paper's 36K/208K)")
    g.add_argument("--kd-transition", choices=("step", "linear"), default="step")
    g.add_argument("--kd-decay-start", type=int, default=None,
                   help="with --kd-transition linear: step where ω starts decaying")
    g.add_argument("--kd-chunk-size", type=int, default=4096,
                   help="tokens per chunk of the KD loss (bounds its fp32 memory)")


@register
class RKDObjective(Objective):
    name = "rkd"
    metric_names = ("kd loss",)

    @dataclass
    class Config:
        weight: float = 0.667
        temperature: float = 0.25
        chunk_size: int = 4096
        stop_step: Optional[int] = None
        transition: str = "step"
        decay_start: Optional[int] = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_kd_arguments(parser)

    @classmethod
    def config_from_args(cls, args: argparse.Namespace):
        return cls.Config(weight=args.kd_weight, temperature=args.kd_temperature,
                          chunk_size=args.kd_chunk_size)

    def __init__(self, config, context) -> None:
        super().__init__(config, context)
        self.schedule = KDSchedule(config.weight, config.stop_step, config.transition,
                                   config.decay_start)

    def validate(self, student_num_layers: int) -> None:
        self.schedule.validate()
        if not self.config.temperature > 0:
            raise ValueError(f"--kd-temperature must be > 0, got {self.config.temperature}")
        if self.config.chunk_size < 1:
            raise ValueError("--kd-chunk-size must be >= 1")

    def needs(self, step: int) -> Needs:
        return Needs(teacher_logits=True) if self.schedule(step) > 0 else Needs()

    def schedule_values(self, step: int) -> Dict[str, float]:
        return {"kd weight": self.schedule(step)}

    def teacher_logits_range(self) -> Optional[Tuple[int, int]]:
        """This TP rank's real ids of the student's vocabulary shard: the teacher computes only
        these columns (its final state times those rows of its LM head), never all V."""
        c = self.context
        if c.padded_vocab_size is None or c.vocab_size is None:
            return None
        return teacher_vocab_shard(c.vocab_size, c.padded_vocab_size, c.tp_group)

    def output_loss(self, nll: torch.Tensor, logits: Optional[torch.Tensor],
                    teacher_logits: Optional[torch.Tensor], loss_mask: torch.Tensor,
                    step: int) -> Tuple[torch.Tensor, Metrics]:
        omega = self.schedule(step)
        mask = loss_mask.float()
        nll_sum = (nll.float() * mask).sum()
        if omega <= 0 or teacher_logits is None:
            return nll_sum, {}
        # The trainer passes the columns teacher_logits_range() names, or (other callers) the
        # whole vocabulary. A width equal to the range's tells them apart: under TP a rank's
        # range is narrower than the vocabulary, and at TP=1 both start at column 0.
        span = self.teacher_logits_range()
        sliced = span is not None and teacher_logits.shape[-1] == span[1] - span[0]
        kd = vocab_parallel_kd_loss(
            logits, teacher_logits.to(logits.device), mask, temperature=self.config.temperature,
            vocab_size=self.context.vocab_size, chunk_size=self.config.chunk_size,
            tp_group=self.context.tp_group, teacher_vocab_start=span[0] if sliced else None,
        )
        kd_sum = kd.sum()
        return (1.0 - omega) * nll_sum + omega * kd_sum, {"kd loss": metric(kd_sum, mask.sum())}
