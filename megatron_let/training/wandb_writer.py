"""Weights & Biases logging with Megatron-LM's flags (``--wandb-project``, ``--wandb-exp-name``,
``--wandb-save-dir``).

An optional dependency (``pip install -e .[wandb]``). As in Megatron-LM, logging is on when
``--wandb-project`` is given, the experiment name is then required, and the run directory defaults
to ``<--save>/wandb``. Only the rank that writes TensorBoard opens a run, and
:class:`~megatron_let.training.metrics.MetricsWriter` logs the same scalars under the same names to
both. ``WANDB_MODE=offline`` keeps everything in the run directory (``wandb sync`` uploads it later).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional


@dataclass
class WandbConfig:
    project: str
    exp_name: str
    save_dir: str


def wandb_config_from_args(project: Optional[str], exp_name: Optional[str], save_dir: Optional[str],
                           save: Optional[str]) -> Optional[WandbConfig]:
    """The resolved settings, or None when W&B is off. Raises ValueError naming the flag for any
    combination that would otherwise log nothing or fail after start-up."""
    if not project:
        given = [f for f, v in (("--wandb-exp-name", exp_name), ("--wandb-save-dir", save_dir)) if v]
        if given:
            raise ValueError(f"{' and '.join(given)} given without --wandb-project: nothing would be "
                             "logged to Weights & Biases")
        return None
    if not exp_name:
        raise ValueError(f"--wandb-project {project} needs --wandb-exp-name (the run's name)")
    if not save_dir:
        if not save:
            raise ValueError("--wandb-project needs --wandb-save-dir DIR (or --save DIR: the run "
                             "directory then defaults to <--save>/wandb)")
        save_dir = os.path.join(save, "wandb")
    if importlib.util.find_spec("wandb") is None:
        raise ValueError(f"--wandb-project {project}: the wandb package is not installed "
                         "(pip install wandb, or pip install -e .[wandb])")
    return WandbConfig(project, exp_name, save_dir)


def open_wandb_run(cfg: WandbConfig, run_config: Optional[Dict[str, Any]] = None):
    """Start the run (Megatron-LM's ``wandb.init(dir=, name=, project=, config=vars(args))``)."""
    # lazy: wandb is an optional dependency
    import wandb

    os.makedirs(cfg.save_dir, exist_ok=True)
    return wandb.init(dir=cfg.save_dir, name=cfg.exp_name, project=cfg.project,
                      config=dict(run_config or {}))
