"""Optimizer state converted at load time between the distributed optimizer's layout and the regular
optimizers' one, so a resume may switch ``--use-distributed-optimizer`` on or off (and change DP).

The two layouts (see :mod:`optimizer_checkpoint`):

* distributed (``dp_reshardable``): per DDP bucket, one flat tensor each of fp32 main params,
  ``exp_avg`` and ``exp_avg_sq`` over the bucket's unpadded length, params at their offsets in the
  bucket; the Adam step in the param groups.
* regular: per model parameter, ``optimizer.state.{exp_avg,exp_avg_sq}.<model key>`` shaped (and
  TP-sharded) like the parameter, ``optimizer.state.fp32_param.<model key>`` in bf16, the step as
  ``common_step``.

The bucket layout is megatron-core's internal (param order, 64-element alignment, bucket sizes), so a
distributed save also records where each parameter sits in its bucket (:func:`layout_state`, a small
object per model-parallel rank); loading into a regular optimizer reads whole buckets and cuts the
parameters out of them. The reverse reads the per-parameter tensors and gives each data-parallel
rank its range, as megatron-core's own ``fully_reshardable`` load does. A conversion keeps the
tensor/pipeline layout the checkpoint was saved with (the bucket map is per model-parallel rank).
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

LAYOUT_KEY = "megatron_let.optimizer_layout.dp_group_idx_{}"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _single(optimizer):
    inner = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    if len(inner) != 1:
        raise ValueError(f"converting the optimizer state between --use-distributed-optimizer layouts "
                         f"supports one optimizer; this run chains {len(inner)}: resume with the "
                         "checkpoint's --use-distributed-optimizer setting, or pass --no-load-optim")
    return inner[0]


def _param_names(chunks) -> Dict[torch.nn.Parameter, str]:
    return {p: f"{i}.{n}" for i, chunk in enumerate(chunks) for n, p in chunk.named_parameters()}


def _model_parallel_rank() -> int:
    """megatron-core's ``data_parallel_group_idx`` of the distributed optimizer (its key prefix)."""
    return torch.distributed.get_rank(parallel_state.get_model_parallel_group())


# ---------------------------------------------------------------------------------- save

def layout_state(optimizer, chunks) -> Dict[str, Any]:
    """Entries for a save's sharded state dict: where each parameter sits in the distributed
    optimizer's bucket tensors, one object per model-parallel rank. Empty for a regular optimizer."""
    inner = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    if len(inner) != 1 or not isinstance(inner[0], DistributedOptimizer):
        return {}
    opt = inner[0]
    names = _param_names(chunks)
    buckets: List[Dict[str, Any]] = []
    for gbuf_idx, gbuf_range_maps in enumerate(opt.gbuf_ranges):
        buffer = opt.buffers[gbuf_idx]
        for dtype, per_bucket in gbuf_range_maps.items():
            for bucket_idx in range(len(per_bucket)):
                bucket = buffer.buckets[bucket_idx]
                params = []
                for p in bucket.params_list:
                    start, end, _ = buffer.param_index_map[p]
                    params.append((names[p], start - bucket.offset, end - bucket.offset, tuple(p.shape)))
                buckets.append({
                    # the prefix of megatron-core's sharded_param_state_dp_reshardable keys
                    "key": (f"optimizer.distributed.dp_group_idx_{opt.data_parallel_group_idx}"
                            f".gbuf_idx_{gbuf_idx}.dtype_{dtype}.bucket_idx_{bucket_idx}"),
                    "numel": bucket.numel_unpadded,
                    "params": sorted(params, key=lambda x: x[1]),
                })
    key = LAYOUT_KEY.format(opt.data_parallel_group_idx)
    return {"optimizer_layout": ShardedObject(
        key, {"buckets": buckets}, (1,), (0,),
        replica_id=(opt.distributed_optimizer_instance_id, 0, opt.data_parallel_group.rank()))}


# ---------------------------------------------------------------------------------- load helpers

def _load_object(path: str, key: str):
    return dist_checkpointing.load({"x": ShardedObject(key, None, (1,), (0,), replica_id=0)}, path)["x"]


def _object_keys(path: str) -> set:
    return {k.split("/")[0] for k in load_sharded_metadata(path)}  # objects: "key/shard_0_1"


def _steps_of_param_groups(groups, path: str) -> int:
    steps = {g["step"] for g in groups if g.get("step") is not None}
    if len(steps) > 1:
        raise ValueError(f"--load {path}: its optimizer param groups have different steps {sorted(steps)}")
    return int(steps.pop()) if steps else 0


def _regular_step(common_optimizer, path: str) -> int:
    """The Adam step of a regular optimizer's checkpoint: ``common_step`` (torch Adam) or the param
    groups' ``step`` (apex / Transformer Engine FusedAdam); megatron omits a zero step."""
    inner = common_optimizer.get("optimizer", common_optimizer)  # Float16Optimizer nests it
    step = (inner.get("state") or {}).get("common_step")
    if step is not None:
        return int(step.item() if isinstance(step, torch.Tensor) else step)
    return _steps_of_param_groups(inner.get("param_groups") or [], path)


def _set_step(torch_opt: torch.optim.Optimizer, state: dict, step: int) -> None:
    if isinstance(torch_opt, torch.optim.Adam) or type(torch_opt).__name__ in ("Adam", "AdamW"):
        state["step"] = torch.tensor(float(step), dtype=torch.float32)  # one tensor per param
    else:
        for group in torch_opt.param_groups:  # FusedAdam keeps it per group
            group["step"] = step


def _model_to_main(opt) -> List[tuple]:
    """(model param, main param) pairs of a regular megatron optimizer."""
    if isinstance(opt, Float16OptimizerWithFloat16Params):
        pairs = [(m, f) for mg, fg in zip(opt.float16_groups, opt.fp32_from_float16_groups)
                 for m, f in zip(mg, fg)]
        return pairs + [(p, p) for g in opt.fp32_from_fp32_groups for p in g]
    return [(p, p) for g in opt.optimizer.param_groups for p in g["params"]]


# ---------------------------------------------------------------------------------- distributed -> regular

def load_distributed_into_regular(path: str, optimizer, chunks) -> None:
    """Fill a regular optimizer from a distributed optimizer's ``dp_reshardable`` checkpoint."""
    opt = _single(optimizer)
    mp_rank = _model_parallel_rank()
    key = LAYOUT_KEY.format(mp_rank)
    if key not in _object_keys(path):
        raise ValueError(
            f"--load {path}: its optimizer state was saved with --use-distributed-optimizer by a "
            "megatron_let that did not record the optimizer's bucket layout (or at another "
            "tensor/pipeline-parallel layout), so it cannot be converted for this run without "
            "--use-distributed-optimizer. Resume with --use-distributed-optimizer, or pass "
            "--no-load-optim to load the weights and start a fresh optimizer and LR schedule")
    layout = _load_object(path, key)
    groups = _load_object(path, f"optimizer.distributed.dp_group_idx_{mp_rank}.optimizer")
    step = _steps_of_param_groups(groups["param_groups"], path)

    meta = dist_checkpointing.load_tensors_metadata(path)
    request = {}
    for b, bucket in enumerate(layout["buckets"]):
        for k in ("param",) + MOMENTS:
            saved = meta[f"{bucket['key']}.{k}"]
            assert tuple(saved.global_shape) == (bucket["numel"],), (saved.global_shape, bucket)
            request[f"{b}.{k}"] = ShardedTensor.from_rank_offsets(
                f"{bucket['key']}.{k}", torch.empty(bucket["numel"], dtype=saved.dtype), replica_id=0)
    loaded = dist_checkpointing.load(request, path)

    per_param = {}
    for b, bucket in enumerate(layout["buckets"]):
        for name, start, end, shape in bucket["params"]:
            per_param[name] = ({k: loaded[f"{b}.{k}"][start:end].view(shape) for k in ("param",) + MOMENTS},
                               tuple(shape))
    names = _param_names(chunks)
    here = {names[m]: tuple(m.shape) for m, _ in _model_to_main(opt)}
    there = {n: s for n, (_, s) in per_param.items()}
    if here != there:
        diff = sorted(set(here.items()) ^ set(there.items()))[:4]
        raise ValueError(f"--load {path}: the distributed optimizer's saved parameters differ from "
                         f"this run's ({diff}); a conversion needs the checkpoint's tensor/pipeline-"
                         "parallel layout: resume with --use-distributed-optimizer, or --no-load-optim")
    opt.init_state_fn(opt.optimizer, opt.config)  # exp_avg/exp_avg_sq exist lazily in torch Adam
    for model_p, main_p in _model_to_main(opt):
        src, _ = per_param[names[model_p]]
        if main_p is not model_p:  # bf16: the fp32 main param (fp32: the loaded weight itself)
            main_p.copy_(src["param"])
        state = opt.optimizer.state[main_p]
        for k in MOMENTS:
            state[k].copy_(src[k])
        _set_step(opt.optimizer, state, step)


# ---------------------------------------------------------------------------------- regular -> distributed

def load_regular_into_distributed(path: str, optimizer, chunks, model_prefix: str) -> None:
    """Fill a distributed optimizer from a regular optimizer's checkpoint (any TP/PP/DP: the
    per-parameter tensors are resharded by dist_checkpointing like the model's)."""
    opt = _single(optimizer)
    names = _param_names(chunks)
    sharded_of = {}
    for chunk in chunks:
        tensors, _ = extract_sharded_tensors_and_factories(chunk.sharded_state_dict(prefix=model_prefix))
        for sh in nested_values(tensors):
            sharded_of[sh.data] = sh
    saved_keys = set(dist_checkpointing.load_tensors_metadata(path))
    with_main = any(k.startswith("optimizer.state.fp32_param.") for k in saved_keys)
    kinds = MOMENTS + (("fp32_param",) if with_main else ())
    # every rank reads every parameter's state (megatron-core's fully_reshardable load does the
    # same): the load's access check wants each tensor read by its main replica, which need not be
    # the rank that holds a range of it
    request = {}
    for p in (p for buffer in opt.buffers for p in buffer.params):
        if p not in sharded_of:
            raise ValueError(f"parameter {names[p]} has no entry in the model's sharded state dict")
        for k in kinds:
            request[f"{names[p]}.{k}"] = make_sharded_optimizer_tensor(
                sharded_of[p], torch.empty(p.shape, dtype=torch.float32), prefix=f"optimizer.state.{k}")
    missing = sorted({sh.key for sh in nested_values(request)} - saved_keys)[:3]
    if missing:
        raise ValueError(f"--load {path}: its optimizer state has no {missing}; it cannot be "
                         "converted for --use-distributed-optimizer: pass --no-load-optim")
    loaded = dist_checkpointing.load(request, path) if request else {}
    step = _regular_step(dist_checkpointing.load_common_state_dict(path)["optimizer"], path)

    # allocate the torch state and set its step the way megatron-core's own load does
    state = opt.state_dict()
    for group in state["optimizer"]["param_groups"]:
        group["step"] = step
    opt.load_state_dict(state)
    for gbuf in opt.gbuf_ranges:
        for per_bucket in gbuf.values():
            for rmap in per_bucket:
                for p, ranges in rmap["param_map"].items():
                    r = ranges["param"]  # this rank's slice of the flattened parameter
                    main = loaded[f"{names[p]}.fp32_param"] if with_main else p.detach().float()
                    src = {"param": main.flatten()[r.start:r.end]}
                    for k in MOMENTS:
                        src[k] = loaded[f"{names[p]}.{k}"].flatten()[r.start:r.end]
                    opt._set_main_param_and_optimizer_states(p, src)
