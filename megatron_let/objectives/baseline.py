"""``baseline``: plain next-token prediction, L = L_NLL."""

from dataclasses import dataclass

from megatron_let.objectives.base import Objective, register


@register
class BaselineObjective(Objective):
    name = "baseline"

    @dataclass
    class Config:
        pass
