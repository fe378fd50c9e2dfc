"""``--dry-run``: validate a run and print its layout, sizes and costs without starting it.

No process group is created and no weight is loaded, so a launcher can be checked on a login node
(CPU only) for any cluster size. The world size is read from ``WORLD_SIZE`` (set by torchrun, SLURM
wrappers or the example launchers) and defaults to TP × PP (a single data-parallel replica).

What is checked is the run's own preflight (:mod:`megatron_let.training.preflight`, the function
``Trainer.setup`` calls before any compute): parallel sizes against the world size, the global
batch, ``--split``, the tokenizer and vocabulary, the objective's own settings, the teacher folder
(causal LM, layer range, positions, weights present; no weights loaded), the SALT data selection,
the ``--data-path`` prefixes (token ids against the vocabulary, empty splits, data repetition) and
``--save`` (writable, free space). Every problem is a ``ValueError``/``FileNotFoundError`` naming
the flag, which ``pretrain_let.py`` reports on stderr with exit code 2.

The layout, memory and FLOP estimates come from :mod:`megatron_let.training.estimates` (shared
with the trainer, which logs the same FLOPs); this module validates, plans and formats.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from megatron_let.model.llama import LlamaConfig
from megatron_let.model.spec import add_local_attention_memory, memory_lines
from megatron_let.runtime.device import device_memory_bytes
from megatron_let.training.arguments import RunConfig
from megatron_let.training.estimates import (
    FlopEstimate,
    ParallelLayout,
    StageMemory,
    TeacherSummary,
    TeacherUse,
    estimate_flops,
    estimate_memory,
    megatron_training_flops,
    objective_teacher_use,
    teacher_state_memory,
    teacher_step_prefetch,
    teacher_forward_flops,
    teacher_summary,
)
from megatron_let.training.lr_schedule import schedule_steps
from megatron_let.training.preflight import PreflightResult, preflight, world_size_from_env  # noqa: F401
from megatron_let.training.trainer import Trainer

GIB = 2**30
# Print every rank up to this world size; beyond it, the first and last ranks of the table.
MAX_RANK_ROWS = 512


# ---------------------------------------------------------------------------------------------
# Plan: everything validated and computed, nothing printed
# ---------------------------------------------------------------------------------------------


@dataclass
class DataSummary:
    prefixes: List[Tuple[Optional[float], str]] = field(default_factory=list)
    num_tokens: int = 0  # total tokens in the --data-path files


@dataclass
class DryRunPlan:
    cfg: RunConfig
    model: LlamaConfig  # with the resolved vocabulary
    layout: ParallelLayout
    num_microbatches: int
    global_batch_size: int
    objective: object
    teacher: Optional[TeacherSummary]
    teacher_use: Optional[TeacherUse]
    memory: List[StageMemory]
    flops: FlopEstimate
    data: DataSummary
    gpus_per_node: Optional[int]
    preflight: Optional[PreflightResult] = None
    attention_bytes: float = 0.0  # local attention: s x s bytes kept per layer (model/spec.py)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.model.seq_length


def _data_summary(pre: PreflightResult) -> DataSummary:
    return DataSummary(prefixes=[(d.weight, d.prefix) for d in pre.datasets],
                       num_tokens=pre.num_tokens)


def _gpus_per_node() -> Optional[int]:
    text = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("GPUS_PER_NODE")
    return int(text) if text and text.isdigit() and int(text) > 0 else None


def plan_run(cfg: RunConfig, world_size: Optional[int] = None) -> DryRunPlan:
    """Validate ``cfg`` as the trainer would, without any process group or weights, and compute the
    layout and estimates. Raises ValueError/FileNotFoundError naming the offending flag."""
    cfg = copy.deepcopy(cfg)  # the vocabulary is filled in below; the caller's config is kept
    # The run's own preflight, on a trainer that is never set up: the dry run then fails exactly
    # where, and with the message, a real run would.
    trainer = Trainer(cfg)
    pre = preflight(cfg, trainer, world_size)
    par = cfg.parallel
    layout = ParallelLayout(pre.world_size, par.tensor_model_parallel_size,
                            par.pipeline_model_parallel_size, cfg.model.num_layers,
                            cfg.perf.virtual_pipeline_size(cfg.model.num_layers,
                                                           par.pipeline_model_parallel_size))
    num_microbatches, gbs = pre.num_microbatches, pre.global_batch_size
    model = cfg.model
    objective = pre.objective
    data = _data_summary(pre)

    teacher, use = None, None
    info = getattr(trainer, "teacher_info", None)
    if getattr(trainer, "needs_teacher_ever", False) and info is not None:
        teacher = teacher_summary(info, cfg.teacher.trust_remote_code)
        use = objective_teacher_use(objective, layout, teacher, cfg.batch.train_iters)
    memory = estimate_memory(cfg, model, layout, num_microbatches, teacher, use)
    attention = add_local_attention_memory(memory, pre.spec, cfg, layout.layers_per_chunk)
    flops = estimate_flops(model, gbs * model.seq_length, cfg.batch.train_iters, layout, teacher,
                           use, teacher_tp_split=teacher_step_prefetch(cfg, layout)[0])
    return DryRunPlan(cfg, model, layout, num_microbatches, gbs, objective, teacher, use, memory,
                      flops, data, _gpus_per_node(), pre, attention_bytes=attention)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def format_config(obj, indent: int = 0) -> List[str]:
    """Nested dataclasses as indented ``name: value`` lines (the raw argparse namespace skipped)."""
    pad = "  " * indent
    lines = []
    for f in dataclasses.fields(obj):
        if f.name == "raw":
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            lines.append(f"{pad}{f.name}:")
            lines.extend(format_config(value, indent + 1))
        else:
            lines.append(f"{pad}{f.name}: {value!r}")
    return lines


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _layers(first: int, last: int) -> str:
    return f"{first}-{last}" if first != last else str(first)


def _warmup_iters(cfg, global_batch_size: int) -> float:
    return schedule_steps(cfg.optim, cfg.batch.train_iters, global_batch_size)["lr_warmup_steps"]


def format_plan(plan: DryRunPlan) -> str:
    cfg, model, layout = plan.cfg, plan.model, plan.layout
    out: List[str] = ["=" * 30 + " megatron_let dry run " + "=" * 30, "", "resolved configuration:"]
    out += format_config(cfg, indent=1)

    # Derived quantities.
    iters = cfg.batch.train_iters
    tokens = plan.tokens_per_step
    out += [
        "",
        "derived:",
        f"  vocabulary: {model.vocab_size} (padded to {model.padded_vocab_size(layout.tp)} = "
        f"multiple of {model.make_vocab_size_divisible_by} x TP)",
        f"  global batch: {plan.global_batch_size} = micro {cfg.batch.micro_batch_size} x DP "
        f"{layout.dp} x {plan.num_microbatches} micro-batches",
        f"  tokens per step: {tokens:,}; whole run: {tokens * iters:,} tokens ({_count(tokens * iters)})",
        f"  learning rate: {cfg.optim.lr:g} -> {cfg.optim.resolved_min_lr():g}, "
        f"{_warmup_iters(cfg, plan.global_batch_size):g} warmup iterations, "
        f"{cfg.optim.lr_decay_style} decay",
        f"  objective schedule: step 0 {plan.objective.schedule_values(0)}, "
        f"last step {plan.objective.schedule_values(max(0, iters - 1))}",
    ]
    if plan.data.prefixes:
        epochs = tokens * iters / plan.data.num_tokens if plan.data.num_tokens else float("inf")
        out.append(f"  data: {len(plan.data.prefixes)} prefix(es), {plan.data.num_tokens:,} tokens; "
                   f"the run reads {epochs:.2f} epoch(s)")
    pre = plan.preflight
    if pre is not None:
        for d in pre.datasets:
            out.append(f"    {d.prefix}: token ids {d.min_id}..{d.max_id} ({d.id_source})")
        if pre.planned_checkpoints:
            out.append(f"  checkpoints: about {pre.checkpoint_bytes / GIB:.2f} GiB each x "
                       f"{pre.planned_checkpoints} planned; {pre.save_free_bytes / GIB:.2f} GiB free "
                       f"under --save {cfg.checkpoint.save}")
        for w in pre.warnings:
            out.append(f"  WARNING: {w}")

    # Layout.
    out += ["", f"parallel layout: world {layout.world_size} = TP {layout.tp} x DP {layout.dp} x "
            f"PP {layout.pp} (rank = tp + TP*dp + TP*DP*pp); {layout.layers_per_stage} layers per stage"
            + (f" in {layout.vpp} interleaved chunks of {layout.layers_per_chunk}" if layout.vpp
               else "")]
    use = plan.teacher_use
    if use is not None:
        where = ", ".join(f"stage {s}" for s in sorted(use.stages))
        out.append(f"  teacher loaded on every rank of {where} (replicated over TP and DP)")
        split, overlap = teacher_step_prefetch(cfg, layout)
        m = plan.num_microbatches
        if split:
            out.append(f"  teacher micro-batches shared out among the TP ranks: each runs "
                       f"{-(-m // layout.tp)} of the step's {m} (--teacher-tp-split)")
        if overlap:
            out.append("  teacher forwards overlapped with the student on a side CUDA stream "
                       "(--teacher-overlap)")
        if plan.teacher is not None and use.stages:
            held = teacher_state_memory(cfg, model, layout, m, plan.teacher, use)
            what = "final hidden states" if use.lm_head else "hidden states"
            out.append(f"  teacher {what} held per step on a teacher rank: {held / 2**20:.1f} MiB"
                       + (f" ({m} micro-batches prefetched)"
                          if split or overlap or cfg.teacher.tokenizer_mismatch else ""))
        layer_k = plan.objective.needs(0).student_layer
        if layout.vpp and layer_k is not None:
            out.append(f"  student layer {layer_k} is in model chunk {layout.chunk_of_layer(layer_k)} "
                       f"of stage {layout.stage_of_layer(layer_k)}")
    rows = plan.layout.placements(use.stages if use else ())
    node_col = plan.gpus_per_node is not None
    header = f"  {'rank':>6} " + (f"{'node':>5} " if node_col else "") + \
        f"{'pp':>3} {'dp':>4} {'tp':>3}  {'layers':>9}  holds"
    out.append(header)
    shown = rows if len(rows) <= MAX_RANK_ROWS else rows[: MAX_RANK_ROWS // 2] + [None] + \
        rows[-MAX_RANK_ROWS // 2:]
    for r in shown:
        if r is None:
            out.append(f"  ... {len(rows) - MAX_RANK_ROWS} ranks omitted ...")
            continue
        holds = [name for name, on in (("embedding", r.embedding), ("output", r.output_layer),
                                       ("TEACHER", r.teacher)) if on]
        node = f"{r.rank // plan.gpus_per_node:>5} " if node_col else ""
        layers = ",".join(_layers(a, b) for a, b in r.chunks) if layout.vpp else \
            _layers(r.first_layer, r.last_layer)
        out.append(f"  {r.rank:>6} {node}{r.pp_rank:>3} {r.dp_rank:>4} {r.tp_rank:>3}  "
                   f"{layers:>9}  {' '.join(holds)}")

    # Parameters.
    total = model.num_parameters()
    non_emb = model.num_parameters(include_embeddings=False)
    out += ["", "parameters:",
            f"  student: {total:,} ({_count(total)}), non-embedding {non_emb:,} ({_count(non_emb)})"]
    for m in plan.memory:
        out.append(f"    per rank on stage {m.pp_rank}: {m.parameters:,} ({_count(m.parameters)}, "
                   "padded vocabulary)")
    t = plan.teacher
    if t is not None:
        out.append(
            f"  teacher: {t.num_parameters:,} ({_count(t.num_parameters)}) {t.model_type}, "
            f"{t.num_layers} layers, hidden {t.hidden_size}, vocab {t.vocab_size}"
            f"{', tied embeddings' if t.tied else ''}; {t.path}")
        if use is not None:
            what = "logits (all layers + LM head)" if use.lm_head else \
                f"hidden state of layer {t.layer}/{t.num_layers} (width {t.output_width})"
            out.append(f"    uses: {what}; needed for steps 0..{use.active_steps - 1} "
                       f"({use.active_steps} of {iters} steps)")

    # Memory.
    out += ["", "estimated memory per GPU (GiB; excludes CUDA context, NCCL buffers, fragmentation):",
            f"  {'stage':>5} {'weights':>8} {'grads':>8} {'optim':>8} {'activ.':>8} {'logits':>8} "
            f"{'teacher':>8} {'total':>8}  "
            + ("chunk forwards in flight" if layout.vpp else "micro-batches in flight")]
    for m in plan.memory:
        out.append(
            f"  {m.pp_rank:>5} {m.weights / GIB:>8.2f} {m.gradients / GIB:>8.2f} "
            f"{m.optimizer / GIB:>8.2f} {m.activations / GIB:>8.2f} {m.logits / GIB:>8.2f} "
            f"{m.teacher / GIB:>8.2f} {m.total / GIB:>8.2f}  {m.in_flight_microbatches}")
    peak = max(plan.memory, key=lambda m: m.total)
    out.append(f"  peak: {peak.total / GIB:.2f} GiB on stage {peak.pp_rank} "
               f"({'bf16' if cfg.bf16 else 'fp32'}, "
               f"{'distributed' if cfg.parallel.use_distributed_optimizer else 'replicated'} optimizer"
               f"{', sequence parallel' if cfg.parallel.sequence_parallel else ''}"
               f"{', recompute ' + cfg.perf.recompute_granularity if cfg.perf.recompute_granularity else ''})")
    if pre is not None and pre.spec is not None:
        out += memory_lines(pre.spec, peak.total, plan.attention_bytes, device_memory_bytes())
        out += ["", *pre.spec.describe()]
    features = [name for name, on in (
        ("overlapped gradient reduction", cfg.perf.overlap_grad_reduce),
        ("overlapped parameter all-gather", cfg.perf.overlap_param_gather)) if on]
    if features:
        out.append(f"  communication: {', '.join(features)}")

    # FLOPs.
    f = plan.flops
    out += ["", "compute per step:",
            f"  student training: {f.student_per_step:.3e} FLOPs "
            f"({f.student_per_step / tokens:.3e} per token)"]
    if t is not None and use is not None:
        out += [
            f"  teacher forward: {f.teacher_per_step:.3e} FLOPs "
            f"({f.teacher_per_step / tokens:.3e} per token)",
            f"  teacher overhead while active: {100 * f.overhead_active:.2f}% of the student's "
            f"FLOPs (on the teacher's GPUs: {100 * f.overhead_on_teacher_ranks:.2f}% of their work)",
            f"  teacher overhead averaged over the run: {100 * f.overhead_run:.2f}% "
            f"({use.active_steps} of {iters} steps)",
        ]
    else:
        out.append("  no teacher: no overhead")
    if cfg.logging.observability.log_throughput:
        # what --log-throughput divides by the step time: Megatron-LM's count (causal attention
        # halved), not the dense estimate above
        gbs = plan.global_batch_size
        student = megatron_training_flops(model, gbs, layout.tp)
        teacher = (teacher_forward_flops(t, use, model.seq_length, gbs)
                   if t is not None and use is not None else 0.0)
        out.append(f"  --log-throughput counts (Megatron-LM's formula): student {student:.3e}, "
                   f"teacher forward {teacher:.3e} FLOPs per step; TFLOP/s per GPU = FLOPs / "
                   f"(step time x {layout.world_size} GPUs)")
    out += ["", "dry run OK: configuration is valid; nothing was started."]
    return "\n".join(out)


def dry_run(cfg: RunConfig) -> None:
    """Validate ``cfg`` and print the plan (on rank 0 only when launched under torchrun)."""
    plan = plan_run(cfg)
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(format_plan(plan), flush=True)
