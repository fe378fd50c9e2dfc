"""The student, its DDP wrappers, megatron-core's optimizer and the LR schedule of a run, built as
Megatron-LM builds them (``get_model`` + ``get_megatron_optimizer``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

import torch
from megatron.core import distributed as mcore_distributed  # called through it: tests replace finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import Float16Module

from megatron_let.model.llama import build_ddp_config, build_student_chunks
from megatron_let.runtime.cpu_compat import apply_torch_adam_fallback_fixes
from megatron_let.training.lr_schedule import build_scheduler


@dataclass
class ModelAndOptimizer:
    student_chunks: List  # the bare GPT chunks of this rank (one per virtual stage when interleaved)
    model: List  # each chunk under DDP (and Float16Module with --bf16): what the schedules run
    optimizer: object
    scheduler: object


def build_model_and_optimizer(cfg, spec, use_cpu: bool, global_batch_size: int,
                              log: Callable[[str], None]) -> ModelAndOptimizer:
    # One chunk per rank, or one per virtual stage under the interleaved pipeline (the
    # schedule then takes the list); DDP wraps each chunk, as in Megatron-LM.
    for line in spec.describe():
        log(line)
    student_chunks = build_student_chunks(cfg.model, cfg.parallel, bf16=cfg.bf16,
                                          use_cpu=use_cpu, perf=cfg.perf, spec=spec)
    ddp_config = build_ddp_config(cfg.perf, cfg.parallel.use_distributed_optimizer)
    model = [
        mcore_distributed.DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config,
            module=Float16Module(chunk.config, chunk) if cfg.bf16 else chunk,
            # later chunks' reductions overlap with the earlier chunks' backward anyway
            disable_bucketing=i > 0,
        )
        for i, chunk in enumerate(student_chunks)
    ]
    # The schedules read the first chunk's config (megatron-core's get_model_config).
    tconfig = student_chunks[0].config

    def per_chunk(name):
        funcs = [getattr(m, name) for m in model]
        return funcs[0] if len(funcs) == 1 else funcs

    tconfig.no_sync_func = per_chunk("no_sync")
    if cfg.perf.overlap_grad_reduce:
        # Megatron-LM's set-up (align_grad_reduce): each chunk starts its bucketed reduction
        # as soon as its last micro-batch's backward is done.
        tconfig.grad_sync_func = per_chunk("start_grad_sync")
    if cfg.perf.overlap_param_gather:
        tconfig.param_sync_func = per_chunk("start_param_sync")
    tconfig.finalize_model_grads_func = mcore_distributed.finalize_model_grads
    tconfig.grad_scale_func = None

    o = cfg.optim
    if cfg.parallel.use_distributed_optimizer:
        apply_torch_adam_fallback_fixes()  # no-op when apex/TE provide the optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.resolved_min_lr(), weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad, bf16=cfg.bf16,
            params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            decoupled_lr=o.schedule.decoupled_lr, decoupled_min_lr=o.schedule.decoupled_min_lr,
        ),
        model,
    )
    scheduler = build_scheduler(optimizer, o, cfg.batch.train_iters, global_batch_size)
    return ModelAndOptimizer(student_chunks, model, optimizer, scheduler)
