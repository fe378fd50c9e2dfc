"""Capture the student's hidden state after layer k and inject the objective's hidden-state loss.

A forward hook on the layer whose global ``layer_number == k`` (on whichever pipeline stage holds it)
receives ``[s, b, h]`` - replicated over TP ranks, or this rank's sequence shard under sequence
parallelism. The hook computes the objective's ``hidden_loss`` against the teacher states supplied for
the current micro-batch and returns the layer output through :class:`InjectLossGrad`, which adds
d(loss)/d(h) to the gradient arriving at layer k during backward. That is how the alignment gradient
enters the backward on the first stage (not only on the last stage, where megatron-core's schedule
starts backward), scaled like the main loss: per-token sums, divided later by the global number of
valid tokens in ``finalize_model_grads``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


class InjectLossGrad(torch.autograd.Function):
    """Identity on ``hidden``; in backward also seeds ``loss`` with ``scale`` (like megatron's
    MoEAuxLossAutoScaler, but for a loss whose graph hangs off an intermediate activation)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor, scale: float):
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad_hidden, torch.full_like(loss, ctx.scale), None


def find_local_layer(model: torch.nn.Module, layer_number: int) -> Optional[torch.nn.Module]:
    """The TransformerLayer with global 1-based ``layer_number`` on this stage, or None."""
    for module in model.modules():
        if type(module).__name__ == "TransformerLayer" and getattr(module, "layer_number", None) == layer_number:
            return module
    return None


def sequence_shard(x_sbh: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """This TP rank's slice of a full-sequence ``[s, b, ...]`` tensor under sequence parallelism."""
    if not sequence_parallel:
        return x_sbh
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    chunk = x_sbh.shape[0] // tp
    return x_sbh[rank * chunk:(rank + 1) * chunk]


class LayerCapture:
    """Owns the hook on student layer k for one model stage."""

    def __init__(self, layer: torch.nn.Module, loss_fn: Callable, sequence_parallel: bool,
                 grad_scale_fn: Optional[Callable[[], float]] = None) -> None:
        self.layer = layer
        self.loss_fn = loss_fn  # (student_hidden, teacher_hidden, loss_mask) -> (loss_sum, metrics)
        self.sequence_parallel = sequence_parallel
        self.grad_scale_fn = grad_scale_fn or (lambda: 1.0)
        self._pending = None
        self.metrics_sink: Optional[Callable] = None
        self.fired = 0
        self._handle = layer.register_forward_hook(self._hook)

    def set_pending(self, teacher_hidden_bsd: torch.Tensor, loss_mask_bs: torch.Tensor) -> None:
        """Teacher states ``[b, s, d_T]`` and the loss mask ``[b, s]`` of the next micro-batch."""
        teacher = teacher_hidden_bsd.transpose(0, 1)
        mask = loss_mask_bs.transpose(0, 1)
        self._pending = (sequence_shard(teacher, self.sequence_parallel),
                         sequence_shard(mask, self.sequence_parallel))

    def clear(self) -> None:
        self._pending = None

    def _hook(self, module, inputs, output):
        if self._pending is None or not torch.is_grad_enabled():
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        teacher, mask = self._pending
        self._pending = None  # one alignment per micro-batch even if the hook fires again
        if teacher.shape[:2] != hidden.shape[:2]:
            raise RuntimeError(
                f"teacher states {tuple(teacher.shape)} do not match student layer output "
                f"{tuple(hidden.shape)}"
            )
        loss_sum, metrics = self.loss_fn(hidden, teacher.to(hidden.device), mask.to(hidden.device))
        self.fired += 1
        if self.metrics_sink is not None:
            self.metrics_sink(loss_sum.detach(), mask.float().sum(), metrics)
        hidden = InjectLossGrad.apply(hidden, loss_sum, self.grad_scale_fn())
        if isinstance(output, tuple):
            return (hidden,) + tuple(output[1:])
        return hidden

    def remove(self) -> None:
        self._handle.remove()
