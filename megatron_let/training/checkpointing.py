"""Distributed checkpoints (megatron-core ``dist_checkpointing``), written atomically.

Layout under ``--save DIR``::

    DIR/iter_0000100/            one complete checkpoint (torch_dist format + our extras)
    DIR/iter_0000100/rng/rank_00003.pt   per-rank RNG states (exact resume)
    DIR/latest_checkpointed_iteration.txt   "100"; updated only after the rename

A checkpoint is written to ``iter_XXXXXXX.tmp`` and renamed when every rank has finished, so a run
killed mid-save leaves the previous checkpoint as ``latest``; stale ``.tmp`` folders are ignored and
cleaned up by the next save.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch

from megatron_let.training.optimizer_checkpoint import OPTIMIZER_METADATA, check_optimizer_format

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_PREFIX = "model."  # key prefix of the model's tensors inside a checkpoint


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest_iteration(root: str) -> Optional[int]:
    """The iteration named by the tracker file, or None when there is no complete checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        iteration = int(text)
    except ValueError as e:
        raise ValueError(f"corrupt checkpoint tracker {path}: {text!r}") from e
    if not os.path.isdir(checkpoint_dir(root, iteration)):
        raise FileNotFoundError(
            f"{path} names iteration {iteration} but {checkpoint_dir(root, iteration)} is missing"
        )
    return iteration


def _rng_state() -> Dict[str, Any]:
    from megatron.core import tensor_parallel

    return {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state_dict(model, optimizer, is_loading: bool, with_optimizer: bool):
    model_sd = model.sharded_state_dict(prefix=MODEL_PREFIX)
    state = {"model": model_sd}
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata=OPTIMIZER_METADATA)
    return state


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler,
                    extra: Dict[str, Any]) -> str:
    """Save on every rank (collective). ``model`` is the bare GPTModel of this stage."""
    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    final = checkpoint_dir(root, iteration)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of a save that was killed
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    torch.distributed.barrier()

    state = _sharded_state_dict(model, optimizer, is_loading=False, with_optimizer=True)
    state["scheduler"] = scheduler.state_dict()
    state["extra"] = extra
    dist_checkpointing.save(state, tmp)

    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
    torch.distributed.barrier()
    if rank == 0:
        if os.path.isdir(final):  # re-saving the same iteration (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    torch.distributed.barrier()
    return final


def load_checkpoint(root: str, model, optimizer, scheduler, load_optim: bool = True,
                    load_rng: bool = True) -> Optional[Dict[str, Any]]:
    """Load the latest complete checkpoint under ``root`` into model/optimizer/scheduler.

    Returns the ``extra`` dict that was saved (iteration, consumed samples, ...), or None when
    ``root`` has no checkpoint yet (a fresh run whose --load equals --save)."""
    from megatron.core import dist_checkpointing

    iteration = read_latest_iteration(root)
    if iteration is None:
        if os.path.isdir(root) and any(n.startswith("iter_") for n in os.listdir(root)):
            raise FileNotFoundError(f"--load {root}: no {TRACKER}; no complete checkpoint found")
        return None
    path = checkpoint_dir(root, iteration)
    if load_optim:
        check_optimizer_format(path, optimizer)
        # torch's AdamW creates its state lazily; materialise it so the sharded keys exist.
        optimizer.init_state_fn(optimizer.optimizer, optimizer.config) if hasattr(
            optimizer, "init_state_fn") and optimizer.init_state_fn else None
    state = _sharded_state_dict(model, optimizer, is_loading=True, with_optimizer=load_optim)
    state["scheduler"] = None
    state["extra"] = None
    with torch.no_grad():
        loaded = dist_checkpointing.load(state, path)
    # dist_checkpointing fills the tensors in place; load_state_dict (strict) also restores
    # non-tensor extra state and proves the checkpoint matches this architecture.
    model.load_state_dict({k[len(MODEL_PREFIX):]: v for k, v in loaded["model"].items()}, strict=True)
    if load_optim:
        with torch.no_grad():  # the distributed optimizer's fp32 shards are views of leaf params
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
    rng_file = os.path.join(path, "rng", f"rank_{torch.distributed.get_rank():05d}.pt")
    if load_rng and os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return loaded["extra"]
