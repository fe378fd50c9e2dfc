"""How the optimizer's state is laid out in a checkpoint, and the check that a resume can read it.

The distributed optimizer writes its bucket-space shards (``dp_reshardable``, Megatron-LM's default:
reshardable across data-parallel sizes; megatron-core's own default, ``fully_sharded_model_space``,
fails to save in 0.16.1 with "flattened_range is not supported"). The regular optimizers write one
state tensor per model parameter. A resume that switches ``--use-distributed-optimizer`` on or off
converts the state between the two (:mod:`optimizer_conversion`).
"""

from __future__ import annotations

from megatron.core import dist_checkpointing
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

# passed to every optimizer's sharded_state_dict; the regular optimizers ignore it
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def is_distributed_optimizer(optimizer) -> bool:
    # get_megatron_optimizer returns a ChainedOptimizer even around a single optimizer
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def saved_optimizer_layout(checkpoint_path: str):
    """"distributed", "regular" or None (no optimizer state: an imported/exported checkpoint) for the
    checkpoint in ``checkpoint_path`` (one iter_XXXXXXX folder). Only the distributed optimizer's
    state dict carries a ``param_state_sharding_type``."""
    common = dist_checkpointing.load_common_state_dict(checkpoint_path)
    if "optimizer" not in common:
        return None
    return "distributed" if "param_state_sharding_type" in (common["optimizer"] or {}) else "regular"


def check_optimizer_format(checkpoint_path: str, optimizer):
    """A clear error, before anything is read, when the checkpoint holds no optimizer state; else
    None when its layout is this run's, or the conversion the load needs: "to_regular" (saved with
    --use-distributed-optimizer, this run without) or "to_distributed" (the reverse)."""
    layout = saved_optimizer_layout(checkpoint_path)
    if layout is None:
        raise ValueError(
            f"--load {checkpoint_path} holds no optimizer state (a checkpoint written by "
            "tools/import_hf.py or for export): pass --no-load-optim to start training from its weights"
        )
    saved = layout == "distributed"
    here = is_distributed_optimizer(optimizer)
    if saved == here:
        return None
    return "to_regular" if saved else "to_distributed"
