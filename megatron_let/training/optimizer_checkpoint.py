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


def saved_optimizer_layout(checkpoint_path: str):
    """"distributed", "regular" or None (no optimizer state: an imported/exported checkpoint) for the
    checkpoint in ``checkpoint_path`` (one iter_XXXXXXX folder). Only the distributed optimizer's
    state dict carries a ``param_state_sharding_type``."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(checkpoint_path)
    if "optimizer" not in common:
        return None
    return "distributed" if "param_state_sharding_type" in (common["optimizer"] or {}) else "regular"


def check_optimizer_format(checkpoint_path: str, optimizer) -> None:
    """A clear error, before anything is read, when the checkpoint's optimizer layout is not this run's."""
    layout = saved_optimizer_layout(checkpoint_path)
    if layout is None:
        raise ValueError(
            f"--load {checkpoint_path} holds no optimizer state (a checkpoint written by "
            "tools/import_hf.py or for export): pass --no-load-optim to start training from its weights"
        )
    saved = layout == "distributed"
    here = is_distributed_optimizer(optimizer)
    if saved == here:
        return
    had, has = ("with", "without") if saved else ("without", "with")
    raise ValueError(
        f"--load {checkpoint_path}: its optimizer state was saved {had} --use-distributed-optimizer "
        f"but this run is {has} it; the two layouts differ. Resume {had} --use-distributed-optimizer, "
        "or pass --no-load-optim to load the weights and start a fresh optimizer and LR schedule"
    )
