"""How the optimizer's state is laid out in a checkpoint, and the check that a resume can read it.

The distributed optimizer writes its bucket-space shards (``dp_reshardable``, Megatron-LM's default:
reshardable across data-parallel sizes; megatron-core's own default, ``fully_sharded_model_space``,
fails to save in 0.16.1 with "flattened_range is not supported"). The regular optimizers write one
state tensor per model parameter. The two layouts are not interchangeable, so a resume that switches
``--use-distributed-optimizer`` on or off must either keep the flag or pass ``--no-load-optim``.
"""

from __future__ import annotations

# passed to every optimizer's sharded_state_dict; the regular optimizers ignore it
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    # get_megatron_optimizer returns a ChainedOptimizer even around a single optimizer
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def saved_by_distributed_optimizer(checkpoint_path: str) -> bool:
    """Whether the optimizer state under ``checkpoint_path`` (one iter_XXXXXXX folder) was written by
    the distributed optimizer: only its state dict carries a ``param_state_sharding_type``."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(checkpoint_path)
    return "param_state_sharding_type" in (common.get("optimizer") or {})


def check_optimizer_format(checkpoint_path: str, optimizer) -> None:
    """A clear error, before anything is read, when the checkpoint's optimizer layout is not this run's."""
    saved = saved_by_distributed_optimizer(checkpoint_path)
    here = is_distributed_optimizer(optimizer)
    if saved == here:
        return
    had, has = ("with", "without") if saved else ("without", "with")
    raise ValueError(
        f"--load {checkpoint_path}: its optimizer state was saved {had} --use-distributed-optimizer "
        f"but this run is {has} it; the two layouts differ. Resume {had} --use-distributed-optimizer, "
        "or pass --no-load-optim to load the weights and start a fresh optimizer and LR schedule"
    )
