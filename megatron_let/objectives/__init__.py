"""Pluggable training objectives. Importing this package registers every built-in objective."""

from megatron_let.objectives import baseline, let, rkd, salt  # noqa: F401  (registration side effects)
from megatron_let.objectives.base import (  # noqa: F401
    Needs,
    Objective,
    ObjectiveContext,
    build_objective,
    register,
    registry,
)
