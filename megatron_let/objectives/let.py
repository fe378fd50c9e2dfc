"""``let``: Late-to-Early Training (LET paper eq. 4-7, Algorithm 1).

L = L_NLL + λ(s)·L_align,  λ(s) = λ0·max(0, (S_stop − s)/S_stop)

L_align aligns the student's hidden state after layer k (1-based, default 3) with the frozen teacher's
hidden state after its layer ``--let-teacher-layer`` (default: last). When the widths differ, the
student state is linearly interpolated along the hidden dimension to the teacher's width
(parameter-free, endpoints aligned). Alignment losses (``--let-loss``), all reported as a token mean
(the paper's eq. 7 writes a sum over positions; the token mean keeps λ0 meaningful at any length):

* ``cosine`` (default): −cos(interp(h_M), h_T), by the fused kernel in ``megatron_let.kernels``.
* ``logsum`` (paper app. H, after Miles & Mikolajczyk 2024): log(Σ_j |x̂_j − ŷ_j|^α + ε) with x̂, ŷ the
  L2-normalised interp(h_M), h_T and α = ``--let-logsum-alpha`` (default 4): dominated by the
  features that disagree most.
* ``cca`` (paper table 5): −(1/d_T)·Σ_j corr_j, the Pearson correlation of each (interpolated) feature
  pair across the micro-batch's valid tokens, i.e. canonical correlation with the identity pairing
  that the interpolation defines; weighted by the number of valid tokens so it reduces like the others.
  The statistics cover the micro-batch's whole sequence: under sequence parallelism they are summed
  over the TP ranks' shards. They are per micro-batch, not per global batch (the loss must be known
  when the micro-batch's backward starts); data parallelism and gradient accumulation only decide which
  rank runs a micro-batch, not what it holds, so the loss does not depend on the layout at a fixed
  ``--micro-batch-size``.

After S_stop, λ = 0 and :meth:`needs` stops asking for the teacher, so the trainer frees it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from megatron_let.kernels.cosine_align import cosine_align, interpolate_hidden
from megatron_let.objectives.base import Metrics, Needs, Objective, metric, register

ALIGN_LOSSES = ("cosine", "logsum", "cca")


def let_lambda(step: int, lambda0: float, stop_step: int) -> float:
    """λ(s) = λ0·max(0, (S_stop − s)/S_stop); zero from S_stop on (and always for S_stop <= 0)."""
    if stop_step <= 0:
        return 0.0
    return lambda0 * max(0.0, (stop_step - step) / stop_step)


def logsum_align(h_m: torch.Tensor, h_t: torch.Tensor, loss_mask: torch.Tensor,
                 alpha: float = 4.0, eps: float = 1e-12) -> torch.Tensor:
    """Per-token logsum distance between L2-normalised interp(h_M) and h_T (masked tokens: 0)."""
    x = interpolate_hidden(h_m.float(), h_t.shape[-1])
    x = torch.nn.functional.normalize(x, dim=-1, eps=1e-8)
    y = torch.nn.functional.normalize(h_t.float(), dim=-1, eps=1e-8)
    per_token = torch.log((x - y).abs().pow(alpha).sum(-1) + eps)
    return per_token * loss_mask.float()


class _AllReduceSum(torch.autograd.Function):
    """Differentiable SUM all-reduce for statistics whose loss every rank of ``group`` back-propagates.

    Each rank's loss term is a different function of the same global sum (CCA weights it by the
    rank's own token count), so the gradient of the total with respect to one rank's summand is the
    sum of the upstream gradients of all ranks: backward is an all-reduce too (unlike megatron's
    ``reduce_from_tensor_model_parallel_region``, whose backward is the identity)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _global_sum(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _AllReduceSum.apply(x, group)


def cca_align(h_m: torch.Tensor, h_t: torch.Tensor, loss_mask: torch.Tensor,
              eps: float = 1e-6, group=None) -> torch.Tensor:
    """−mean_j corr(x_j, y_j) over the valid tokens of the micro-batch (a scalar).

    ``group``: the ranks that hold the other shards of this micro-batch's sequence (the TP group
    under sequence parallelism). The statistics are then summed over it - means first, centred
    moments second, the same two passes as on the whole tensor - so every rank returns the
    full-sequence correlation and the result does not depend on the layout.
    """
    d_t = h_t.shape[-1]
    # the valid tokens as 0/1 weights, not a boolean index: indexing and a Python-side token count
    # would each wait for the device once per micro-batch
    w = (loss_mask.reshape(-1, 1) != 0).float()
    x = interpolate_hidden(h_m.float(), d_t).reshape(-1, d_t)
    y = h_t.float().reshape(-1, d_t)
    n = _global_sum(w.sum().reshape(1), group)
    n_div = n.clamp_min(2.0)  # < 2 tokens: the result is replaced below; keeps every value finite
    means = _global_sum(torch.cat([(w * x).sum(0), (w * y).sum(0)]), group) / n_div
    xc, yc = (x - means[:d_t]) * w, (y - means[d_t:]) * w
    moments = _global_sum(torch.cat([(xc * xc).sum(0), (yc * yc).sum(0), (xc * yc).sum(0)]),
                          group) / n_div
    # clamp: a constant feature has variance 0, where sqrt's gradient is infinite (eps dominates anyway)
    sx, sy = moments[:d_t].clamp_min(1e-12).sqrt(), moments[d_t:2 * d_t].clamp_min(1e-12).sqrt()
    corr = -(moments[2 * d_t:] / ((sx + eps) * (sy + eps))).mean()
    # correlation undefined for < 2 tokens: 0, still in the graph (gradient 0)
    return torch.where(n[0] >= 2, corr, torch.zeros_like(corr))


@register
class LETObjective(Objective):
    name = "let"
    metric_names = ("align loss", "cosine similarity")

    @dataclass
    class Config:
        lambda0: float = 0.1
        stop_step: int = 1500
        student_layer: int = 3
        teacher_layer: int = -1
        loss: str = "cosine"
        logsum_alpha: float = 4.0
        kernel: str = "auto"  # auto | triton | reference

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("LET (--objective let)")
        g.add_argument("--let-lambda", type=float, default=0.1, help="λ0, initial alignment weight")
        g.add_argument("--let-stop-step", type=int, default=1500,
                       help="S_stop: λ decays linearly to 0 here; the teacher is freed afterwards")
        g.add_argument("--let-student-layer", type=int, default=3,
                       help="k: student layer (1-based) aligned with the teacher")
        g.add_argument("--let-teacher-layer", type=int, default=-1,
                       help="teacher layer (1-based) whose output is the target; -1 = last")
        g.add_argument("--let-loss", choices=ALIGN_LOSSES, default="cosine")
        g.add_argument("--let-logsum-alpha", type=float, default=4.0)
        g.add_argument("--let-kernel", choices=("auto", "triton", "reference"), default="auto",
                       help="cosine-alignment implementation (auto: Triton on CUDA, PyTorch on CPU)")

    @classmethod
    def config_from_args(cls, args: argparse.Namespace) -> "LETObjective.Config":
        return cls.Config(
            lambda0=args.let_lambda, stop_step=args.let_stop_step,
            student_layer=args.let_student_layer, teacher_layer=args.let_teacher_layer,
            loss=args.let_loss, logsum_alpha=args.let_logsum_alpha, kernel=args.let_kernel,
        )

    def validate(self, student_num_layers: int) -> None:
        c = self.config
        if not 1 <= c.student_layer <= student_num_layers:
            raise ValueError(
                f"--let-student-layer {c.student_layer} is outside the student's layers "
                f"1..{student_num_layers}"
            )
        if c.teacher_layer == 0 or c.teacher_layer < -1:
            raise ValueError("--let-teacher-layer must be -1 (last) or a 1-based layer index")
        if c.lambda0 < 0:
            raise ValueError(f"--let-lambda must be >= 0, got {c.lambda0}")
        if c.stop_step < 0:
            raise ValueError(f"--let-stop-step must be >= 0, got {c.stop_step}")
        if c.loss not in ALIGN_LOSSES:
            raise ValueError(f"--let-loss must be one of {ALIGN_LOSSES}")

    def weight(self, step: int) -> float:
        return let_lambda(step, self.config.lambda0, self.config.stop_step)

    def needs(self, step: int) -> Needs:
        if self.weight(step) <= 0.0:
            return Needs()
        return Needs(student_layer=self.config.student_layer,
                     teacher_hidden_layer=self.config.teacher_layer)

    def schedule_values(self, step: int) -> Dict[str, float]:
        return {"lambda": self.weight(step)}

    def hidden_loss(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                    loss_mask: torch.Tensor, step: int) -> Tuple[torch.Tensor, Metrics]:
        mask = loss_mask.float()
        count = mask.sum()
        if self.config.loss == "cosine":
            neg_cos = cosine_align(student_hidden, teacher_hidden, mask, impl=self.config.kernel)
            align_sum = neg_cos.sum()
            cos_sum = -align_sum.detach()
        else:
            with torch.no_grad():  # the cosine is reported for every loss (paper fig. 6)
                cos_sum = -cosine_align(student_hidden, teacher_hidden, mask, impl="reference").sum()
            if self.config.loss == "logsum":
                align_sum = logsum_align(student_hidden, teacher_hidden, mask,
                                         self.config.logsum_alpha).sum()
            else:
                group = getattr(self.context, "sequence_parallel_group", None)
                align_sum = cca_align(student_hidden, teacher_hidden, mask, group=group) * count
        metrics = {"align loss": metric(align_sum, count), "cosine similarity": metric(cos_sum, count)}
        return self.weight(step) * align_sum, metrics
