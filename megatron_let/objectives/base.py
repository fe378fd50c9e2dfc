"""The objective interface: one loss module per training objective, chosen by ``--objective``.

Under pipeline parallelism the student's layer-k hidden state and its logits live on different
stages, so an objective contributes up to two terms, each evaluated where its inputs are:

* ``hidden_loss`` - at student layer k (first stage for LET); its gradient is injected into the
  student's backward at that layer;
* ``output_loss`` - at the last stage, from the per-token NLL and the (vocab-parallel) logits.

Both return ``(loss_sum, metrics)`` where ``loss_sum`` is a masked **sum** over this rank's tokens.
The trainer turns sums into the token mean over the whole global batch (megatron-core's
``calculate_per_token_loss``: gradients are divided by the number of valid tokens across micro-batches
and data-parallel ranks), so every objective is reduced the same way. ``metrics`` maps a name to a
``(sum, count)`` pair of tensors that the trainer reduces across ranks for logging.

The trainer asks the objective what it needs (:class:`Needs`) and never looks at its name.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

import torch

Metrics = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Needs:
    """What an objective needs at a given step. All ``None``/``False`` = plain language modelling."""

    student_layer: Optional[int] = None  # 1-based student layer whose output feeds hidden_loss
    teacher_hidden_layer: Optional[int] = None  # teacher layer (1-based, -1 = last) for hidden_loss
    teacher_logits: bool = False  # output_loss needs the teacher's logits
    kd_data_selection: bool = False  # draw training samples from a data selection (SALT_DS)
    student_logits: bool = False  # output_loss reads the student's logits beyond the NLL

    @property
    def teacher(self) -> bool:
        return self.teacher_hidden_layer is not None or self.teacher_logits

    @property
    def logits(self) -> bool:
        """output_loss gets the logits (else None): the trainer then keeps an unmodified copy
        beside the in-place cross entropy, a full-vocabulary tensor per micro-batch."""
        return self.teacher_logits or self.student_logits


@dataclass
class ObjectiveContext:
    """Facts about the run an objective may need when it is built."""

    train_iters: int
    tp_group: Optional[torch.distributed.ProcessGroup] = None
    vocab_size: Optional[int] = None  # true (unpadded) student vocabulary
    student_num_layers: Optional[int] = None
    # Ranks holding the other sequence shards of a micro-batch (the TP group under sequence
    # parallelism, else None): objectives whose hidden_loss needs full-sequence statistics reduce over it.
    sequence_parallel_group: Optional[torch.distributed.ProcessGroup] = None
    padded_vocab_size: Optional[int] = None  # the student's embedding rows (padded for TP)


class Objective:
    """Base class; subclasses set ``name``, ``Config`` and override what they use."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    metric_names: ClassVar[Tuple[str, ...]] = ()  # keys of the metrics this objective reports

    def __init__(self, config, context: ObjectiveContext) -> None:
        self.config = config
        self.context = context

    # --- command line -------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this objective's flags (called for every registered objective)."""

    @classmethod
    def config_from_args(cls, args: argparse.Namespace):
        return cls.Config()

    def validate(self, student_num_layers: int) -> None:
        """Raise ValueError for a configuration that cannot work, before any compute."""

    # --- schedule -----------------------------------------------------------------------------
    def needs(self, step: int) -> Needs:
        return Needs()

    def schedule_values(self, step: int) -> Dict[str, float]:
        """Loss weights at ``step`` for logging (e.g. ``{"lambda": 0.1}``)."""
        return {}

    def hidden_grad_weight(self, step: int) -> Optional[float]:
        """None (default): ``hidden_loss`` returns the weighted term, whose gradient is injected at
        layer k as it is. A float w: ``hidden_loss`` returns the *unweighted* term; the capture
        injects w times its gradient and measures both gradients at layer k (the metrics
        ``hidden grad sq`` and ``output grad sq`` of :mod:`megatron_let.training.layer_capture`)."""
        return None

    def end_step(self, step: int, values: Dict[str, float]) -> Dict[str, float]:
        """After the step's metric reduction, on every rank with the same ``values`` (this step's
        reduced metrics and schedule values); ``step`` is the index of the *next* step. Returns
        what is logged (default: ``values`` unchanged). An objective whose schedule depends on the
        run's history updates it here and keeps it in :meth:`state_dict`."""
        return values

    def state_dict(self) -> Dict[str, object]:
        """Schedule state that depends on the run's history (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: Dict[str, object], step: int) -> None:
        """Restore :meth:`state_dict` of a checkpoint resumed at ``step`` (``{}`` when the
        checkpoint has none: another objective, or a run without history-dependent state)."""

    def teacher_logits_range(self) -> Optional[Tuple[int, int]]:
        """Global vocabulary columns ``[start, stop)`` of the teacher logits ``output_loss`` reads
        on this rank; the trainer has the teacher compute only those. ``None``: all of them."""
        return None

    # --- losses ---------------------------------------------------------------------------------
    def hidden_loss(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                    loss_mask: torch.Tensor, step: int) -> Tuple[torch.Tensor, Metrics]:
        raise NotImplementedError(f"objective {self.name!r} has no hidden-state term")

    def output_loss(self, nll: torch.Tensor, logits: Optional[torch.Tensor],
                    teacher_logits: Optional[torch.Tensor], loss_mask: torch.Tensor,
                    step: int) -> Tuple[torch.Tensor, Metrics]:
        """Default: language modelling only, ``sum(nll * mask)``."""
        return masked_sum(nll, loss_mask), {}


def masked_sum(values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return (values.float() * loss_mask.float()).sum()


def metric(total: torch.Tensor, count: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return total.detach().float(), count.detach().float()


_REGISTRY: Dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator that makes an objective selectable with ``--objective NAME``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> Dict[str, type]:
    # The built-ins are registered already: importing this module first runs the package's
    # __init__, which imports every built-in objective module (no import back needed here).
    return dict(_REGISTRY)


def build_objective(name: str, config, context: ObjectiveContext) -> Objective:
    objectives = registry()
    if name not in objectives:
        raise ValueError(f"unknown --objective {name!r}; choose from {sorted(objectives)}")
    return objectives[name](config, context)
