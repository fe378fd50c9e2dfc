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

λ without a grid (``--let-lambda-mode grad-ratio --let-grad-ratio r0``): instead of λ0, a target
ratio r(s) = r0·max(0, 1 − s/S_stop) between the norms of the two gradients at layer k's output,
λ(s)·‖g_align‖ / ‖g_LM‖, where g_align = ∂L_align/∂h_k (unit weight) and g_LM = ∂L_NLL/∂h_k (what
arrives from the layers above). Both are measured in the backward that already runs (the capture's
measured mode, :mod:`megatron_let.training.layer_capture`) and reduced with the step's metrics, so
λ is set with a lag of one step: λ(s+1) = r(s+1)·‖g_LM‖_s / ‖g_align‖_s. Step 0 (and the first step
after resuming from a checkpoint without this state) has no measurement yet: it aligns with λ = 0
and only measures. λ is checkpointed (it depends on the run's history). The norms are the root mean
square over the global batch's valid tokens of the per-token gradient of the summed losses,
sqrt(Σ_t ‖∂L_sum/∂h_t‖² / N): summed over the sequence shards (sequence parallelism), counted once
over TP ranks that hold replicas, summed over data-parallel ranks and micro-batches, and zero on
pipeline stages without layer k - one number whatever the layout. See docs/objectives.md.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from megatron_let.kernels.cosine_align import cosine_align, interpolate_hidden
from megatron_let.objectives.base import Metrics, Needs, Objective, metric, register
from megatron_let.training.layer_capture import HIDDEN_GRAD, OUTPUT_GRAD

ALIGN_LOSSES = ("cosine", "logsum", "cca")
LAMBDA_MODES = ("linear", "grad-ratio")


def let_lambda(step: int, lambda0: float, stop_step: int) -> float:
    """λ(s) = λ0·max(0, (S_stop − s)/S_stop); zero from S_stop on (and always for S_stop <= 0)."""
    if stop_step <= 0:
        return 0.0
    return lambda0 * max(0.0, (stop_step - step) / stop_step)


def grad_ratio_target(step: int, ratio0: float, stop_step: int) -> float:
    """r(s) = r0·max(0, (S_stop − s)/S_stop): the grad-ratio mode's target ‖λ·g_align‖ / ‖g_LM‖."""
    return let_lambda(step, ratio0, stop_step)


def grad_ratio_lambda(step: int, ratio0: float, stop_step: int, lm_grad: float,
                      align_grad: float) -> float:
    """λ of step ``step`` from the gradient norms measured at step ``step`` − 1: r(s)·‖g_LM‖/‖g_align‖
    (0 when the alignment term had no gradient: the step then measures again)."""
    r = grad_ratio_target(step, ratio0, stop_step)
    if r <= 0.0 or not align_grad > 0.0:
        return 0.0
    return r * lm_grad / align_grad


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
        lambda_mode: str = "linear"  # linear | grad-ratio
        grad_ratio: float = 0.1  # r0 of the grad-ratio mode (docs/results-crossover.md)

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
        g.add_argument("--let-lambda-mode", choices=LAMBDA_MODES, default="linear",
                       help="linear: λ(s) = λ0·(1 − s/S_stop) (the paper); grad-ratio: λ set each step "
                            "so that ‖λ·∂L_align/∂h_k‖ = r(s)·‖∂L_NLL/∂h_k‖, r(s) = r0·(1 − s/S_stop), "
                            "from the previous step's gradients (--let-lambda is then not used)")
        g.add_argument("--let-grad-ratio", type=float, default=0.1,
                       help="r0 of --let-lambda-mode grad-ratio (0.1: within the seed spread of the best "
                            "fixed λ0/S_stop in docs/results-crossover.md)")

    @classmethod
    def config_from_args(cls, args: argparse.Namespace) -> "LETObjective.Config":
        return cls.Config(
            lambda0=args.let_lambda, stop_step=args.let_stop_step,
            student_layer=args.let_student_layer, teacher_layer=args.let_teacher_layer,
            loss=args.let_loss, logsum_alpha=args.let_logsum_alpha, kernel=args.let_kernel,
            lambda_mode=args.let_lambda_mode, grad_ratio=args.let_grad_ratio,
        )

    def __init__(self, config, context) -> None:
        super().__init__(config, context)
        self.adaptive = config.lambda_mode == "grad-ratio"
        if self.adaptive:
            self.metric_names = type(self).metric_names + (HIDDEN_GRAD, OUTPUT_GRAD)
        # grad-ratio: the λ of step ``_lambda_step`` (0 until a step has measured the gradients)
        self._lambda, self._lambda_step = 0.0, 0

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
        if c.lambda_mode not in LAMBDA_MODES:
            raise ValueError(f"--let-lambda-mode must be one of {LAMBDA_MODES}, got {c.lambda_mode!r}")
        if c.lambda_mode == "grad-ratio" and not 0.0 < c.grad_ratio < float("inf"):
            raise ValueError(f"--let-grad-ratio must be a positive number, got {c.grad_ratio} "
                             "(no alignment at all is --objective baseline)")

    def _active(self, step: int) -> bool:
        c = self.config
        if self.adaptive:
            return grad_ratio_target(step, c.grad_ratio, c.stop_step) > 0.0
        return let_lambda(step, c.lambda0, c.stop_step) > 0.0

    def weight(self, step: int) -> float:
        if not self.adaptive:
            return let_lambda(step, self.config.lambda0, self.config.stop_step)
        if not self._active(step):
            return 0.0
        if step != self._lambda_step:
            raise RuntimeError(f"grad-ratio λ asked for step {step} but known for step "
                               f"{self._lambda_step}: end_step must run after every step")
        return self._lambda

    def needs(self, step: int) -> Needs:
        if not self._active(step):
            return Needs()
        return Needs(student_layer=self.config.student_layer,
                     teacher_hidden_layer=self.config.teacher_layer)

    def schedule_values(self, step: int) -> Dict[str, float]:
        if not self.adaptive:
            return {"lambda": self.weight(step)}
        out = {"grad ratio target": grad_ratio_target(step, self.config.grad_ratio, self.config.stop_step)}
        if not self._active(step) or step == self._lambda_step:  # a later step's λ is not known yet
            out["lambda"] = self.weight(step)
        return out

    def hidden_grad_weight(self, step: int) -> Optional[float]:
        return self.weight(step) if self.adaptive else None

    def end_step(self, step: int, values: Dict[str, float]) -> Dict[str, float]:
        """grad-ratio: log the norms measured in the step just run and set the λ of ``step``."""
        if not self.adaptive:
            return values

        values = dict(values)
        align_sq, lm_sq = values.pop(HIDDEN_GRAD, None), values.pop(OUTPUT_GRAD, None)
        lam = 0.0
        if align_sq is not None and lm_sq is not None:
            align, lm = math.sqrt(align_sq), math.sqrt(lm_sq)
            values["align grad rms"], values["lm grad rms"] = align, lm
            # the ratio this step realised with the λ it used
            values["grad ratio"] = self._lambda * align / lm if lm > 0 else float("nan")
            lam = grad_ratio_lambda(step, self.config.grad_ratio, self.config.stop_step, lm, align)
        self._lambda, self._lambda_step = lam, step
        return values

    def state_dict(self) -> Dict[str, object]:
        if not self.adaptive:
            return {}
        return {"lambda_mode": "grad-ratio", "lambda": self._lambda, "lambda_step": self._lambda_step}

    def load_state_dict(self, state: Dict[str, object], step: int) -> None:
        if not self.adaptive:
            return
        if state.get("lambda_mode") != "grad-ratio":
            # nothing measured yet in this run's mode: this step measures (λ = 0), as step 0 does
            self._lambda, self._lambda_step = 0.0, step
            return
        if int(state["lambda_step"]) != step:
            raise ValueError(f"checkpoint at iteration {step} holds the grad-ratio λ of step "
                             f"{state['lambda_step']}")
        self._lambda, self._lambda_step = float(state["lambda"]), step

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
        # grad-ratio: the capture weights the term's gradient itself (hidden_grad_weight)
        return (align_sum if self.adaptive else self.weight(step) * align_sum), metrics
