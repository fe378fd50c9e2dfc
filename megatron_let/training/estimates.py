"""Layout, memory and FLOP estimates of a run: shared by the trainer (its logged FLOPs, TFLOP/s)
and ``--dry-run`` (which only formats them). Formulas and assumptions: ``docs/launching.md``.

* **Layout** - Megatron's rank order ``tp-cp-ep-dp-pp``: ``rank = tp_rank + TP·dp_rank +
  TP·DP·pp_rank``; pipeline stage p holds student layers ``p·L/PP + 1 .. (p+1)·L/PP``, or with
  ``--num-layers-per-virtual-pipeline-stage n`` the model chunks c = 0..V-1 of layers
  ``(c·PP + p)·n + 1 .. (c·PP + p + 1)·n`` (megatron-core's interleaved assignment).
* **Memory per GPU** (:func:`estimate_memory`) - weights, fp32 gradient buffer, optimizer state
  (fp32 master + Adam moments, sharded over DP with ``--use-distributed-optimizer``), activations
  of the micro-batches a 1F1B pipeline stage keeps in flight, logits, and the bf16 teacher.
* **Teacher FLOPs** (:func:`estimate_flops`) - teacher forward ≈ 2·N_T·tokens (+ attention) against
  student training ≈ 6·N_S·tokens (+ attention), while the teacher is active and averaged over
  the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Set, Tuple

from megatron_let.model.llama import LlamaConfig
from megatron_let.teacher.inspection import text_config
from megatron_let.teacher.step_prefetch import teacher_state_bytes
from megatron_let.training.arguments import RunConfig


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankPlacement:
    """Where one global rank sits in the (tp, dp, pp) grid and what it holds."""

    rank: int
    tp_rank: int
    dp_rank: int
    pp_rank: int
    first_layer: int  # 1-based global student layer numbers held by this rank's stage
    last_layer: int
    embedding: bool
    output_layer: bool
    teacher: bool
    chunks: Tuple[Tuple[int, int], ...] = ()  # (first, last) layer of each model chunk


@dataclass(frozen=True)
class ParallelLayout:
    """Megatron-core's default grid (order ``tp-cp-ep-dp-pp``, no CP/EP), optionally with ``vpp``
    model chunks per stage (interleaved pipeline)."""

    world_size: int
    tp: int
    pp: int
    num_layers: int
    vpp: Optional[int] = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size}")
        if self.world_size % (self.tp * self.pp):
            raise ValueError(
                f"world size {self.world_size} is not divisible by --tensor-model-parallel-size "
                f"{self.tp} x --pipeline-model-parallel-size {self.pp}"
            )
        if self.num_layers % self.pp:
            raise ValueError(
                f"--num-layers {self.num_layers} is not divisible by "
                f"--pipeline-model-parallel-size {self.pp}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def layers_per_stage(self) -> int:
        return self.num_layers // self.pp

    def coordinates(self, rank: int) -> Tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank: TP fastest, then DP, then PP."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    @property
    def chunks_per_stage(self) -> int:
        return self.vpp or 1

    @property
    def layers_per_chunk(self) -> int:
        return self.layers_per_stage // self.chunks_per_stage

    def chunk_layers(self, pp_rank: int) -> List[Tuple[int, int]]:
        """1-based (first, last) student layers of each model chunk on stage ``pp_rank``."""
        n = self.layers_per_chunk
        return [((c * self.pp + pp_rank) * n + 1, (c * self.pp + pp_rank + 1) * n)
                for c in range(self.chunks_per_stage)]

    def stage_layers(self, pp_rank: int) -> Tuple[int, int]:
        """1-based (first, last) student layer on pipeline stage ``pp_rank`` (without chunks)."""
        chunks = self.chunk_layers(pp_rank)
        return chunks[0][0], chunks[-1][1]

    def stage_of_layer(self, layer: int) -> int:
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"student layer {layer} outside 1..{self.num_layers}")
        return ((layer - 1) // self.layers_per_chunk) % self.pp

    def chunk_of_layer(self, layer: int) -> int:
        return (layer - 1) // self.layers_per_chunk // self.pp

    def placements(self, teacher_stages: Iterable[int] = ()) -> List[RankPlacement]:
        stages = set(teacher_stages)
        out = []
        for rank in range(self.world_size):
            tp_rank, dp_rank, pp_rank = self.coordinates(rank)
            first, last = self.stage_layers(pp_rank)
            out.append(RankPlacement(
                rank=rank, tp_rank=tp_rank, dp_rank=dp_rank, pp_rank=pp_rank,
                first_layer=first, last_layer=last, embedding=pp_rank == 0,
                output_layer=pp_rank == self.pp - 1, teacher=pp_rank in stages,
                chunks=tuple(self.chunk_layers(pp_rank)),
            ))
        return out


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------


def layer_matmul_parameters(model: LlamaConfig) -> int:
    """Weights of one transformer layer's linear layers (attention QKV + proj, SwiGLU MLP)."""
    h, f = model.hidden_size, model.ffn_hidden_size
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    head_dim = model.head_dim
    attn = h * heads * head_dim + 2 * h * groups * head_dim + heads * head_dim * h
    return attn + 3 * h * f


def stage_parameters(model: LlamaConfig, tp: int, pp: int, pp_rank: int) -> int:
    """Parameters held by one rank of pipeline stage ``pp_rank`` (Megatron's sharding).

    Linear weights and the (padded) vocabulary are split over TP; RMSNorm weights are replicated.
    The first stage holds the embedding, the last the output layer and final norm; with tied
    embeddings and PP > 1 the last stage keeps its own copy of the embedding (kept in sync by an
    all-reduce), as Megatron does."""
    h = model.hidden_size
    layers = model.num_layers // pp
    per_layer = layer_matmul_parameters(model) // tp + 2 * h
    total = layers * per_layer
    vocab_shard = model.padded_vocab_size(tp) * h // tp
    if pp_rank == 0:
        total += vocab_shard
    if pp_rank == pp - 1:
        total += h  # final norm
        if model.untie_embeddings_and_output_weights or pp > 1:
            total += vocab_shard
    return total


@dataclass
class TeacherSummary:
    """The teacher as the dry run sees it: sizes from ``config.json`` and a meta-device model."""

    path: str
    model_type: str
    num_layers: int
    hidden_size: int  # width of the embedding / blocks
    vocab_size: int
    num_parameters: int
    embedding_parameters: int
    head_parameters: int  # LM head matmul weights (counted for FLOPs even when tied)
    tied: bool
    layer: int  # resolved 1-based layer that LET aligns to (num_layers = final state)
    output_width: int  # width of the tensor LET aligns to

    @property
    def block_parameters(self) -> int:
        """Parameters of the transformer blocks (and final norm), i.e. without embedding/head."""
        return self.num_parameters - self.embedding_parameters - (0 if self.tied else self.head_parameters)


def teacher_summary(info, trust_remote_code: bool) -> TeacherSummary:
    """Break the teacher's parameters into embedding / head / blocks on the meta device."""
    # Lazy: transformers takes seconds to import and only runs with a teacher.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(info.path, local_files_only=True,
                                        trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    emb = model.get_input_embeddings().weight
    head_module = model.get_output_embeddings()
    head = head_module.weight if head_module is not None else emb
    seen, total = set(), 0
    for p in model.parameters():  # tied weights appear once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    text = text_config(config)
    return TeacherSummary(
        path=info.path, model_type=info.model_type, num_layers=info.num_layers,
        hidden_size=int(getattr(text, "hidden_size", info.hidden_size)),
        vocab_size=info.vocab_size, num_parameters=total, embedding_parameters=emb.numel(),
        head_parameters=head.numel(), tied=head is emb, layer=info.layer,
        output_width=info.hidden_size,
    )


# ---------------------------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------------------------


@dataclass
class TeacherUse:
    """How the objective uses the teacher."""

    stages: Set[int]  # pipeline stages whose ranks load the teacher
    layers_run: int  # teacher blocks run per forward
    lm_head: bool  # logits are needed (KD): the LM head runs too
    active_steps: int  # steps 0..active_steps-1 need the teacher


@dataclass
class StageMemory:
    """Estimated bytes per GPU on one pipeline stage (see docs/launching.md for the formulas)."""

    pp_rank: int
    parameters: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    teacher: float
    in_flight_microbatches: int

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.logits
                + self.teacher)


def layer_activation_bytes(model: LlamaConfig, micro_batch_size: int, tp: int,
                           sequence_parallel: bool, bytes_per_value: int) -> float:
    """Activations one LLaMA layer keeps for backward, for one micro-batch (flash attention).

    Per token, saved tensors: attention-norm input (h), QKV input (h), q/k/v (h + 2·h_kv),
    attention output (h), MLP-norm input (h), FC1 input (h), FC1 output (2f, gate and up) and the
    SwiGLU output (f): 6h + 2h_kv + 3f values. Under TP the q/k/v, attention-output, FC1-output and
    SwiGLU terms are split over TP ranks; the four h-sized norm/linear inputs are split too only
    with sequence parallelism. Flash attention keeps no s×s matrix (its softmax statistics are
    negligible) and dropout is off, so there are no masks."""
    h, f = model.hidden_size, model.ffn_hidden_size
    heads = model.num_attention_heads
    h_kv = (model.num_query_groups or heads) * model.head_dim
    tokens = model.seq_length * micro_batch_size
    split = (h + 2 * h_kv) + h + 3 * f
    outside = 4 * h
    per_token = (split + outside) / tp if sequence_parallel else split / tp + outside
    return tokens * per_token * bytes_per_value


def estimate_memory(cfg: RunConfig, model: LlamaConfig, layout: ParallelLayout,
                    num_microbatches: int, teacher: Optional[TeacherSummary],
                    use: Optional[TeacherUse]) -> List[StageMemory]:
    """Per-GPU memory estimate for each pipeline stage.

    * weights: P·2 bytes in bf16 (P·4 in fp32);
    * gradients: P·4 (the DDP gradient buffer is fp32: ``grad_reduce_in_fp32``);
    * optimizer: P·12 in bf16 (fp32 master copy + Adam m, v), P·8 in fp32 (m, v); divided by DP
      with ``--use-distributed-optimizer``;
    * activations: :func:`layer_activation_bytes` × layers of the stage × micro-batches in flight
      (1F1B: stage p holds min(PP − p, micro-batches) forward passes awaiting their backward;
      interleaved with V chunks: min((PP − p − 1)·2 + (V − 1)·PP + 1, V·M) chunk forwards of L/(PP·V)
      layers each, i.e. that many / V stage-equivalents). ``--recompute-granularity full`` keeps
      only each recomputed layer's input (s·b·h, /TP under SP) plus one recompute unit's full
      activations during its backward; ``selective`` recomputes core attention, which this
      flash-attention estimate already counts as free;
    * logits (last stage, one micro-batch): s·b·V_pad/TP·(act bytes + 4), the logits and the fp32
      softmax that vocab-parallel cross entropy keeps; KD adds the teacher's logits s·b·V_T·2;
    * teacher: 2·N_T bytes (bf16) on the stages that hold it, plus its LET target s·b·d_T·2; when
      the step's teacher work is prefetched (the TP split or the GPU overlap,
      :func:`teacher_step_prefetch`), the states of all m micro-batches instead:
      m·b·s·d_T·2 (s/TP for LET under sequence parallelism with the split; KD holds the final
      hidden state, full sequence, and one micro-batch's V/TP logits slice).
    """
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    bf16 = cfg.bf16
    act = 2 if bf16 else 4
    b, s = cfg.batch.micro_batch_size, model.seq_length
    opt_per_param = 12 if bf16 else 8
    if cfg.parallel.use_distributed_optimizer:
        opt_per_param = opt_per_param / dp
    per_layer = layer_activation_bytes(model, b, tp, cfg.parallel.sequence_parallel, act)
    layer_input = s * b * model.hidden_size * act / (tp if cfg.parallel.sequence_parallel else 1)
    perf = cfg.perf
    chunk_layers = layout.layers_per_chunk
    if perf.recompute_granularity == "full":
        n = perf.recompute_num_layers
        recomputed = chunk_layers if perf.recompute_method == "uniform" else n
        unit = n if perf.recompute_method == "uniform" else 1
        # kept per chunk forward in flight; plus one unit recomputed at a time (counted below)
        per_chunk_kept = recomputed * layer_input + (chunk_layers - recomputed) * per_layer
        recompute_peak = unit * per_layer
    else:
        per_chunk_kept = chunk_layers * per_layer
        recompute_peak = 0.0
    stages = []
    for p in range(pp):
        params = stage_parameters(model, tp, pp, p)
        v = layout.chunks_per_stage
        if layout.vpp:
            chunk_forwards = min((pp - p - 1) * 2 + (v - 1) * pp + 1, v * num_microbatches)
        else:
            chunk_forwards = min(pp - p, num_microbatches)
        in_flight = chunk_forwards
        logits = 0.0
        if p == pp - 1:
            logits = s * b * model.padded_vocab_size(tp) / tp * (act + 4)
            if use is not None and use.lm_head and teacher is not None:
                # the vocabulary-sliced teacher logits: this rank's columns only
                logits += s * b * min(teacher.vocab_size, model.padded_vocab_size(tp) // tp) * 2
        teacher_bytes = 0.0
        if use is not None and teacher is not None and p in use.stages:
            teacher_bytes = 2.0 * teacher.num_parameters + teacher_state_memory(
                cfg, model, layout, num_microbatches, teacher, use)
        stages.append(StageMemory(
            pp_rank=p, parameters=params, weights=params * (2 if bf16 else 4),
            gradients=params * (2.0 if cfg.perf.grad_reduce_in_bf16 else 4.0), optimizer=params * opt_per_param,
            activations=per_chunk_kept * chunk_forwards + recompute_peak, logits=logits,
            teacher=teacher_bytes, in_flight_microbatches=in_flight,
        ))
    return stages


def teacher_step_prefetch(cfg: RunConfig, layout: ParallelLayout) -> Tuple[bool, bool]:
    """``(split, overlap)``: whether each TP rank runs the teacher on only its share of the step's
    micro-batches, and whether its forwards are overlapped on a side CUDA stream (the dry run plans
    a GPU run unless ``--device cpu``). Either prefetches the step (teacher/step_prefetch.py)."""
    t = cfg.teacher
    split = layout.tp > 1 and t.tp_split is not False
    overlap = t.overlap is not False and cfg.device != "cpu"
    return split, overlap


def teacher_state_memory(cfg: RunConfig, model: LlamaConfig, layout: ParallelLayout,
                         num_microbatches: int, teacher: TeacherSummary, use: TeacherUse) -> float:
    """Bytes of teacher outputs held on one teacher rank during a step (bf16)."""
    b, s = cfg.batch.micro_batch_size, model.seq_length
    split, overlap = teacher_step_prefetch(cfg, layout)
    width = teacher.hidden_size if use.lm_head else teacher.output_width
    # LET† (--teacher-tokenizer-mismatch) always prefetches the step: its host work comes first
    if not (split or overlap or cfg.teacher.tokenizer_mismatch):
        return 0.0 if use.lm_head else float(s * b * width * 2)  # one micro-batch, inline
    return float(teacher_state_bytes(num_microbatches, b, s, width, 2, layout.tp,
                                     cfg.parallel.sequence_parallel and split,
                                     shard_sequence=not use.lm_head))


@dataclass
class FlopEstimate:
    """FLOPs per training step (whole job) and the teacher's overhead."""

    student_per_step: float
    teacher_per_step: float
    active_steps: int
    train_iters: int
    tp: int
    pp: int
    teacher_tp_split: bool = False  # the TP ranks share the teacher's micro-batches

    @property
    def overhead_active(self) -> float:
        """Teacher forward / student training FLOPs on a step where the teacher runs."""
        return self.teacher_per_step / self.student_per_step if self.student_per_step else 0.0

    @property
    def overhead_run(self) -> float:
        """The same ratio averaged over all training steps."""
        if self.train_iters <= 0:
            return 0.0
        return self.overhead_active * min(self.active_steps, self.train_iters) / self.train_iters

    @property
    def overhead_on_teacher_ranks(self) -> float:
        """Ratio on the GPUs that run it: the teacher runs on one pipeline stage, replicated over
        TP unless the TP ranks share its micro-batches, so each such GPU does PP (or TP·PP) times
        its share of the job's teacher work."""
        return self.overhead_active * (1 if self.teacher_tp_split else self.tp) * self.pp


def student_flops_per_token(model: LlamaConfig, tp: int) -> float:
    """Training FLOPs per token: 6·(layer matmul weights + V_pad·h output layer) + 12·L·s·h
    (QKᵀ and AV, forward + backward, counted without causal halving)."""
    h = model.hidden_size
    matmul = model.num_layers * layer_matmul_parameters(model) + model.padded_vocab_size(tp) * h
    return 6.0 * matmul + 12.0 * model.num_layers * model.seq_length * h


def teacher_flops_per_token(teacher: TeacherSummary, use: TeacherUse, seq_length: int) -> float:
    """Forward FLOPs per token: 2·(blocks run × block weights [+ LM head]) + 4·layers·s·h."""
    per_block = (teacher.block_parameters) / teacher.num_layers
    matmul = use.layers_run * per_block + (teacher.head_parameters if use.lm_head else 0)
    return 2.0 * matmul + 4.0 * use.layers_run * seq_length * teacher.hidden_size


def estimate_flops(model: LlamaConfig, tokens_per_step: int, train_iters: int,
                   layout: ParallelLayout, teacher: Optional[TeacherSummary],
                   use: Optional[TeacherUse], teacher_tp_split: bool = False) -> FlopEstimate:
    student = student_flops_per_token(model, layout.tp) * tokens_per_step
    t = 0.0
    active = 0
    if teacher is not None and use is not None:
        t = teacher_flops_per_token(teacher, use, model.seq_length) * tokens_per_step
        active = use.active_steps
    return FlopEstimate(student, t, active, train_iters, layout.tp, layout.pp,
                        teacher_tp_split=teacher_tp_split and layout.tp > 1)


def teacher_active_steps(objective, train_iters: int) -> int:
    """Number of leading steps that need the teacher. Schedules only decay (the trainer relies on
    it to free the teacher), so the first step without a teacher is found by bisection."""
    if train_iters <= 0 or not objective.needs(0).teacher:
        return 0
    if objective.needs(train_iters - 1).teacher:
        return train_iters
    lo, hi = 0, train_iters - 1  # invariant: needs(lo).teacher, not needs(hi).teacher
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if objective.needs(mid).teacher:
            lo = mid
        else:
            hi = mid
    return hi


def objective_teacher_use(objective, layout: ParallelLayout, teacher: TeacherSummary,
                          train_iters: int) -> TeacherUse:
    """Where and how much of the teacher the objective runs (from its step-0 needs)."""
    needs = objective.needs(0)
    stages: Set[int] = set()
    if needs.teacher_hidden_layer is not None and needs.student_layer is not None:
        stages.add(layout.stage_of_layer(needs.student_layer))
    if needs.teacher_logits:
        stages.add(layout.pp - 1)
    return TeacherUse(
        stages=stages,
        layers_run=teacher.num_layers if needs.teacher_logits else teacher.layer,
        lm_head=needs.teacher_logits,
        active_steps=teacher_active_steps(objective, train_iters),
    )


def run_flops(cfg: RunConfig, objective, teacher_info, world_size: int,
              global_batch_size: int) -> FlopEstimate:
    """The dry run's FLOP estimate for a run being set up (``teacher_info``: ``inspect_teacher``'s
    result, None without a teacher)."""
    par = cfg.parallel
    layout = ParallelLayout(world_size, par.tensor_model_parallel_size,
                            par.pipeline_model_parallel_size, cfg.model.num_layers)
    teacher, use = None, None
    if teacher_info is not None and objective.needs(0).teacher:
        teacher = teacher_summary(teacher_info, cfg.teacher.trust_remote_code)
        use = objective_teacher_use(objective, layout, teacher, cfg.batch.train_iters)
    return estimate_flops(cfg.model, global_batch_size * cfg.model.seq_length,
                          cfg.batch.train_iters, layout, teacher, use)


def flops_scalars(flops: FlopEstimate) -> dict:
    """What the trainer logs under ``config/`` so that ``tools/compare_runs.py`` can count the
    compute a run spent (student training + teacher forward) up to any step."""
    return {"student flops per step": flops.student_per_step,
            "teacher flops per step": flops.teacher_per_step,
            "teacher active steps": float(flops.active_steps)}


# ---------------------------------------------------------------------------------------------
# Throughput (--log-throughput): Megatron-LM's model-FLOP count
# ---------------------------------------------------------------------------------------------


def megatron_training_flops(model: LlamaConfig, batch_size: int, tp: int = 1,
                            causal: bool = True) -> float:
    """FLOPs of one training step (forward + backward) of the student over ``batch_size``
    sequences, counted as Megatron-LM's ``num_floating_point_operations`` counts a dense GPT:
    every GEMM 3× (forward, data gradient, weight gradient) × 2 FLOPs per multiply-add; per token
    the QKV projection h·(q + 2·kv) with q = heads·d_head and kv = groups·d_head (GQA), the output
    projection q·h, the SwiGLU MLP 3·h·f (gate and up, then down) and the output layer h·V_pad
    (a GEMM whether or not its weight is tied to the embedding); per sequence the core attention
    QKᵀ and AV, 2·s²·q per layer, halved for the causal mask (``causal=False``: the dense count an
    unmasked implementation performs). Norms, rotary embedding, softmax and the loss are not
    counted (as in Megatron-LM)."""
    h, f, layers = model.hidden_size, model.ffn_hidden_size, model.num_layers
    heads = model.num_attention_heads
    head_dim = model.head_dim
    q = heads * head_dim
    kv = (model.num_query_groups or heads) * head_dim
    per_token = layers * (h * (q + 2 * kv) + q * h + 3 * h * f) + h * model.padded_vocab_size(tp)
    core_per_sequence = layers * 2 * model.seq_length ** 2 * q * (0.5 if causal else 1.0)
    return 3 * 2 * batch_size * (model.seq_length * per_token + core_per_sequence)


def teacher_forward_flops(teacher: TeacherSummary, use: TeacherUse, seq_length: int,
                          batch_size: int) -> float:
    """Forward FLOPs of the teacher over ``batch_size`` sequences in the same convention (one
    forward = a third of :func:`megatron_training_flops`): 2·(weights of the blocks run [+ LM
    head]) per token plus the causal core attention s²·width per block and sequence. The block
    weights include its norms (a rounding error) and the attention width is the hidden size."""
    per_block = teacher.block_parameters / teacher.num_layers
    matmul = use.layers_run * per_block + (teacher.head_parameters if use.lm_head else 0)
    core = use.layers_run * seq_length ** 2 * teacher.hidden_size  # 2·s²·q / 2 (causal)
    return 2.0 * batch_size * (seq_length * matmul + core)


@dataclass
class StepFlops:
    """Model FLOPs of one training step of the whole job, split into student and teacher."""

    student: float
    teacher: float  # on a step that runs the teacher
    teacher_active_steps: int

    def at(self, step: int) -> Tuple[float, float]:
        """(student, teacher) FLOPs of step ``step`` (0-based): no teacher once it is released."""
        return self.student, (self.teacher if step < self.teacher_active_steps else 0.0)


def run_step_flops(cfg: RunConfig, objective, teacher_info, world_size: int,
                   global_batch_size: int) -> StepFlops:
    """:class:`StepFlops` of a run being set up (``teacher_info`` as for :func:`run_flops`)."""
    par = cfg.parallel
    tp = par.tensor_model_parallel_size
    student = megatron_training_flops(cfg.model, global_batch_size, tp)
    if teacher_info is None or not objective.needs(0).teacher:
        return StepFlops(student, 0.0, 0)
    layout = ParallelLayout(world_size, tp, par.pipeline_model_parallel_size,
                            cfg.model.num_layers)
    teacher = teacher_summary(teacher_info, cfg.teacher.trust_remote_code)
    use = objective_teacher_use(objective, layout, teacher, cfg.batch.train_iters)
    return StepFlops(student, teacher_forward_flops(teacher, use, cfg.model.seq_length,
                                                    global_batch_size), use.active_steps)
