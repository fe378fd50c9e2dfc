"""Capture the student's hidden state after layer k and inject the objective's hidden-state loss.

A forward hook on the layer whose global ``layer_number == k`` (on whichever pipeline stage holds it)
receives ``[s, b, h]`` - replicated over TP ranks, or this rank's sequence shard under sequence
parallelism. The hook computes the objective's ``hidden_loss`` against the teacher states supplied for
the current micro-batch and returns the layer output through :class:`InjectLossGrad`, which adds
d(loss)/d(h) to the gradient arriving at layer k during backward. That is how the alignment gradient
enters the backward on the first stage (not only on the last stage, where megatron-core's schedule
starts backward), scaled like the main loss: per-token sums, divided later by the global number of
valid tokens in ``finalize_model_grads``.

Activation recompute: inside a recomputed block megatron-core runs layer k twice per micro-batch -
first without autograd (``torch.no_grad`` inside ``CheckpointFunction.forward``), then again with
autograd during backward. A gradient can only be injected into the second, so the teacher states of
a micro-batch whose first forward ran without autograd are queued (in forward order; 1F1B and the
interleaved schedule run a chunk's backwards in the order of its forwards) and consumed by the
recomputation. :meth:`LayerCapture.check_step` asserts at every step that the loss was injected
exactly once per micro-batch.

Measured mode (``weight_fn`` returns a float w, e.g. LET's ``--let-lambda-mode grad-ratio``): the
hook evaluates the objective's *unweighted* hidden-state term on a detached copy of h and takes its
gradient g_h = d(term)/dh at once (a small backward through the alignment loss only); the backward
then adds w·g_h to the gradient arriving from the layers above, g_out (the LM loss's gradient at
layer k). Both squared norms are summed on the device into the step's metrics (:data:`HIDDEN_GRAD`
in forward, :data:`OUTPUT_GRAD` in backward), so they ride on the step's one metric reduction: no
host synchronisation. The result is the same gradient as the default path (up to rounding).
"""

from __future__ import annotations

from collections import deque
from typing import Callable, List, Optional, Tuple

import torch


# squared norms of the two gradients at layer k, reduced as (sum of ||g||^2, valid tokens)
HIDDEN_GRAD = "hidden grad sq"  # of the unweighted hidden-state term (LET: the alignment loss)
OUTPUT_GRAD = "output grad sq"  # arriving from the layers above (the output loss: LM)


def _own_storage_copy(hidden: torch.Tensor) -> torch.Tensor:
    """A new tensor object sharing hidden's storage but with no ``_base``: megatron's
    deallocate_pipeline_outputs asserts ``out._base is None`` on a stage's output, which is this
    tensor when k is the stage's last layer (``view_as`` would make it a view)."""
    out = torch.empty((1,), dtype=hidden.dtype, device=hidden.device)
    out.data = hidden.data
    return out


class InjectGrad(torch.autograd.Function):
    """Identity on ``hidden``; backward adds ``weight * grad`` (a precomputed gradient of the
    hidden-state term) and reports the squared norm of the gradient that arrived from above."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, grad: torch.Tensor, weight: float, on_output_grad):
        ctx.save_for_backward(grad)
        ctx.weight = weight
        ctx.on_output_grad = on_output_grad
        return _own_storage_copy(hidden)

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if ctx.on_output_grad is not None:
            ctx.on_output_grad(grad_hidden.detach().float().pow(2).sum())
        if ctx.weight == 0.0:
            return grad_hidden, None, None, None
        return grad_hidden + ctx.weight * grad.to(grad_hidden.dtype), None, None, None


class InjectLossGrad(torch.autograd.Function):
    """Identity on ``hidden``; in backward also seeds ``loss`` with ``scale`` (like megatron's
    MoEAuxLossAutoScaler, but for a loss whose graph hangs off an intermediate activation)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor, scale: float):
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return _own_storage_copy(hidden)

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


def find_layer_in_chunks(chunks: List[torch.nn.Module],
                         layer_number: int) -> Optional[Tuple[int, torch.nn.Module]]:
    """``(chunk index, layer)`` for global layer ``layer_number`` among this rank's model chunks
    (one chunk, or several under the interleaved pipeline), or None when no chunk holds it."""
    for i, chunk in enumerate(chunks):
        layer = find_local_layer(chunk, layer_number)
        if layer is not None:
            return i, layer
    return None


class CaptureInvariantError(RuntimeError):
    """The alignment loss was not injected exactly once per micro-batch in a step."""


def sequence_shard(x_sbh: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """This TP rank's slice of a full-sequence ``[s, b, ...]`` tensor under sequence parallelism."""
    if not sequence_parallel:
        return x_sbh
    # lazy: megatron.core takes seconds to import; arguments.py imports the objectives, and this module with them (CLI start-up)
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    chunk = x_sbh.shape[0] // tp
    return x_sbh[rank * chunk:(rank + 1) * chunk]


class LayerCapture:
    """Owns the hook on student layer k for one model stage."""

    def __init__(self, layer: torch.nn.Module, loss_fn: Callable, sequence_parallel: bool,
                 grad_scale_fn: Optional[Callable[[], float]] = None,
                 weight_fn: Optional[Callable[[], Optional[float]]] = None) -> None:
        self.layer = layer
        self.loss_fn = loss_fn  # (student_hidden, teacher_hidden, loss_mask) -> (loss_sum, metrics)
        self.sequence_parallel = sequence_parallel
        self.grad_scale_fn = grad_scale_fn or (lambda: 1.0)
        # None (default): loss_fn returns the weighted term, injected as it is. A float w: loss_fn
        # returns the unweighted term; w times its gradient is injected and both gradients at
        # layer k are measured (the module docstring's measured mode).
        self.weight_fn = weight_fn or (lambda: None)
        self._pending = None
        self._deferred: deque = deque()  # micro-batches waiting for their recomputed forward
        self.metrics_sink: Optional[Callable] = None
        self.fired = 0  # injections since the capture was installed
        self._fired_at_step_start = 0
        self._handle = layer.register_forward_hook(self._hook)

    def set_pending(self, teacher_hidden_bsd: torch.Tensor, loss_mask_bs: torch.Tensor,
                    teacher_sharded: bool = False) -> None:
        """Teacher states ``[b, s, d_T]`` and the loss mask ``[b, s]`` of the next micro-batch;
        ``teacher_sharded``: the states are already this rank's sequence shard ``[b, s/TP, d_T]``
        (the TP-split teacher's all-to-all delivers only those)."""
        teacher = teacher_hidden_bsd.transpose(0, 1)
        mask = loss_mask_bs.transpose(0, 1)
        self._pending = (teacher if teacher_sharded else sequence_shard(teacher, self.sequence_parallel),
                         sequence_shard(mask, self.sequence_parallel))

    def clear(self) -> None:
        """After the micro-batch's forward: its states are either consumed or queued for the
        recomputation in backward."""
        self._pending = None

    def start_step(self) -> None:
        self._fired_at_step_start = self.fired
        self._deferred.clear()

    def check_step(self, num_microbatches: int) -> None:
        """Raise unless the loss was injected once for each of the step's micro-batches."""
        fired = self.fired - self._fired_at_step_start
        if fired != num_microbatches or self._deferred or self._pending is not None:
            raise CaptureInvariantError(
                f"layer-{self.layer.layer_number} capture injected the alignment loss {fired} "
                f"time(s) for {num_microbatches} micro-batch(es) in this step "
                f"({len(self._deferred)} still waiting for a recomputed forward): the alignment "
                "gradient would be lost or counted twice"
            )

    def _hook(self, module, inputs, output):
        if self._pending is not None and not torch.is_grad_enabled():
            # First forward of a recomputed block: no graph to inject into; the recomputation in
            # backward (grad enabled, no pending states) takes this micro-batch's states.
            self._deferred.append(self._pending)
            self._pending = None
            return output
        if self._pending is not None:
            states = self._pending
            self._pending = None  # one alignment per micro-batch even if the hook fires again
        elif self._deferred and torch.is_grad_enabled():
            states = self._deferred.popleft()
        else:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        teacher, mask = states
        if teacher.shape[:2] != hidden.shape[:2]:
            raise RuntimeError(
                f"teacher states {tuple(teacher.shape)} do not match student layer output "
                f"{tuple(hidden.shape)}"
            )
        # already on the student's device in training (no-ops); never a blocking copy
        teacher = teacher.to(hidden.device, non_blocking=True)
        mask = mask.to(hidden.device, non_blocking=True)
        weight = self.weight_fn()
        if weight is not None:
            hidden = self._inject_measured(hidden, teacher, mask, weight)
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
        loss_sum, metrics = self.loss_fn(hidden, teacher, mask)
        self.fired += 1
        if self.metrics_sink is not None:
            self.metrics_sink(loss_sum.detach(), mask.float().sum(), metrics)
        hidden = InjectLossGrad.apply(hidden, loss_sum, self.grad_scale_fn())
        if isinstance(output, tuple):
            return (hidden,) + tuple(output[1:])
        return hidden

    def _inject_measured(self, hidden: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                         weight: float) -> torch.Tensor:
        leaf = hidden.detach().requires_grad_(True)
        with torch.enable_grad():
            term, metrics = self.loss_fn(leaf, teacher, mask)
            (grad,) = torch.autograd.grad(term, leaf, allow_unused=True)
        if grad is None:  # the term does not depend on h (e.g. no valid token)
            grad = torch.zeros_like(leaf)
        self.fired += 1
        count = mask.float().sum()
        sink = self.metrics_sink
        if sink is not None:
            metrics = dict(metrics)
            metrics[HIDDEN_GRAD] = (grad.detach().float().pow(2).sum(), count)
            sink(weight * term.detach(), count, metrics)

        def on_output_grad(sq: torch.Tensor) -> None:
            if sink is not None:
                sink(None, None, {OUTPUT_GRAD: (sq, count)})

        return InjectGrad.apply(hidden, grad.detach(), weight, on_output_grad)

    def remove(self) -> None:
        self._handle.remove()
