"""``salt``: small-model-aided training (SALT paper): KD as in ``rkd`` for the first n_KD steps,
then plain NLL (``--kd-transition step``), or with ω decaying linearly from ``--kd-decay-start`` to
n_KD (``linear``, the paper's table 8). With ``--kd-data-selection`` (SALT_DS, from
``tools/select_data.py``) the KD steps draw their samples from the selected sequences and later
steps from the full data. After n_KD the teacher is freed, exactly as for LET.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_let.objectives.base import Needs, register
from megatron_let.objectives.rkd import RKDObjective

# The paper distils for 36K of 208K steps.
DEFAULT_KD_FRACTION = 36 / 208


@register
class SALTObjective(RKDObjective):
    name = "salt"

    @dataclass
    class Config(RKDObjective.Config):
        use_selection: bool = False

    @classmethod
    def config_from_args(cls, args: argparse.Namespace):
        stop = args.kd_stop_step
        if stop is None:
            stop = max(1, round(DEFAULT_KD_FRACTION * args.train_iters))
        return cls.Config(weight=args.kd_weight, temperature=args.kd_temperature,
                          chunk_size=args.kd_chunk_size, stop_step=stop,
                          transition=args.kd_transition, decay_start=args.kd_decay_start,
                          use_selection=bool(getattr(args, "kd_data_selection", None)))

    def needs(self, step: int) -> Needs:
        if self.schedule(step) <= 0:
            return Needs()
        return Needs(teacher_logits=True, kd_data_selection=self.config.use_selection)
