"""Device policy, backend and process-group set-up: the one place that decides CUDA+NCCL versus
CPU+gloo and that asks torch whether CUDA is there.

Every CUDA probe of the package goes through the functions below (:func:`cuda_usable`,
:func:`cuda_device_count`, :func:`cuda_initialized`), and callers reach them as attributes of this
module (``from megatron_let.runtime import device as device_policy``), so a test that fakes a GPU on a
CPU machine replaces them here, once.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from megatron_let.runtime.cpu_compat import apply_cpu_compat


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    virtual_pipeline_model_parallel_size: Optional[int] = None  # model chunks per stage (interleaved)

    def validate(self, world_size: int) -> None:
        mp = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            raise ValueError("parallel sizes must be >= 1")
        if world_size % mp:
            raise ValueError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size}"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            # Megatron-LM silently turns SP off at TP=1; we do the same in the arguments layer.
            raise ValueError("--sequence-parallel requires --tensor-model-parallel-size > 1")

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)


# ------------------------------------------------------------------------------------ probes


def cuda_built() -> bool:
    """This torch can run CUDA at all (a CPU-only wheel cannot, whatever the machine has); asking
    never touches the driver."""
    return torch.backends.cuda.is_built()


def cuda_usable() -> bool:
    """A CUDA GPU is visible to this process."""
    return torch.cuda.is_available()


def cuda_device_count() -> int:
    """The CUDA GPUs visible to this process."""
    return torch.cuda.device_count()


def cuda_initialized() -> bool:
    """This process already uses CUDA (its context exists): CUDA-only calls such as NVTX ranges or
    memory statistics are cheap and meaningful, and asking never creates a context."""
    return cuda_usable() and torch.cuda.is_initialized()


# ------------------------------------------------------------------------------------ decisions


def resolve_device(flag: str = "auto") -> torch.device:
    """``auto``: CUDA when a GPU is visible, else CPU. ``cpu`` forces CPU; ``cuda`` requires a GPU."""
    if flag not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {flag!r}")
    if flag == "cuda" and not cuda_usable():
        raise ValueError("--device cuda was requested but no CUDA GPU is visible")
    if flag == "cpu" or (flag == "auto" and not cuda_usable()):
        return torch.device("cpu")
    return torch.device("cuda", local_cuda_index())


def planned_device_type(flag: str = "auto") -> str:
    """The device type a run with ``--device flag`` uses, without requiring it here: a dry run on a
    login node may describe a GPU run."""
    return "cuda" if flag == "cuda" or (flag == "auto" and cuda_usable()) else "cpu"


def local_cuda_index() -> int:
    """This process's GPU: ``LOCAL_RANK`` modulo the visible GPUs. With one process per GPU and all
    of a node's GPUs visible that is GPU LOCAL_RANK; where each task sees only its own GPU (SLURM
    ``--gpus-per-task=1``, a per-rank CUDA_VISIBLE_DEVICES) it is GPU 0 whatever LOCAL_RANK is."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return local_rank % max(1, cuda_device_count())


def device_memory_bytes() -> Optional[int]:
    """Memory of this machine's GPU (the run's device), None without a visible GPU."""
    if not cuda_usable():
        return None
    return torch.cuda.get_device_properties(local_cuda_index()).total_memory


def collective_device(group: Optional[torch.distributed.ProcessGroup] = None) -> torch.device:
    """Where a collective's tensors must live: the current GPU under NCCL, else the CPU (gloo, or
    no process group at all)."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda")
    return torch.device("cpu")


def release_cached_memory(device: Union[str, torch.device]) -> None:
    """Hand the caching allocator's free blocks back to the GPU (after freeing a large model)."""
    if torch.device(device).type == "cuda" and cuda_usable():
        torch.cuda.empty_cache()


def device_rng_state() -> Optional[torch.Tensor]:
    """The default CUDA generator's state (for checkpoints), None without a GPU."""
    return torch.cuda.get_rng_state() if cuda_usable() else None


def set_device_rng_state(state: Optional[torch.Tensor]) -> None:
    """Restore :func:`device_rng_state`; a state saved without a GPU, or read without one, is skipped."""
    if state is not None and cuda_usable():
        torch.cuda.set_rng_state(state)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize_distributed(device: torch.device, parallel: ParallelConfig, seed: int,
                           timeout_minutes: int = 30) -> None:
    """Start torch.distributed (env:// under torchrun, a private 1-rank group otherwise), megatron's
    model-parallel groups and its RNG tracker. On CPU, installs the megatron-core compatibility layer."""
    # lazy: megatron.core takes seconds to import; arguments.py imports this module (CLI start-up)
    from megatron.core import parallel_state

    if device.type == "cpu":
        apply_cpu_compat()
        if "OMP_NUM_THREADS" not in os.environ and world_size_from_env() == 1:
            torch.set_num_threads(max(1, os.cpu_count() or 1))
    else:
        torch.cuda.set_device(device)

    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "RANK" not in os.environ:
            # A plain `python pretrain_let.py`: a private 1-rank group on an in-memory store, so
            # concurrent single-process runs never race for a TCP port. (The environment is left
            # alone: in-process users such as tests must not see a WORLD_SIZE afterwards.)
            torch.distributed.init_process_group(backend=backend, store=torch.distributed.HashStore(),
                                                 rank=0, world_size=1, timeout=timeout)
        else:
            torch.distributed.init_process_group(backend=backend, timeout=timeout)
    parallel.validate(torch.distributed.get_world_size())
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Seed python/numpy/torch and megatron's TP-aware RNG tracker (same scheme on CPU and GPU)."""
    # lazy: megatron.core takes seconds to import; arguments.py imports this module (CLI start-up)
    from megatron.core import parallel_state, tensor_parallel

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    # Different pipeline stages get different seeds, as in Megatron-LM.
    stage_seed = seed + 100 * pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed, force_reset_rng=True)


def destroy_distributed() -> None:
    # lazy: megatron.core takes seconds to import; arguments.py imports this module (CLI start-up)
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
