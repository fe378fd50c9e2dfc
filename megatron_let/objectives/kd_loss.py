"""Vocab-parallel, token-chunked distillation loss for the RKD / SALT objectives.

SALT paper eq. 2-3: per token, L_KD(rho) = CE(P_T,rho, P_M) = -sum_v P_T,rho(v) log P_M(v), with
P_T,rho proportional to P_T ** rho (a temperature on the teacher only), i.e.
P_T,rho = softmax(rho * log_softmax(z_T)) = softmax(rho * z_T), and P_M = softmax(z_M).
Note on direction: rho < 1 (the paper's rho = 0.25) *flattens* the teacher distribution (raises its
entropy); rho > 1 sharpens it. We implement the paper's formula exactly.

Design (why it looks the way it does):
- Under tensor parallelism the student's logits are split along the vocabulary; we never gather them.
  Each rank reduces its shard to per-token statistics (max, sum of exp, teacher-weighted sum of student
  logits) and two all-reduces per chunk (MAX, then SUM) combine them:
      loss = m_S + log Z_S - (sum_v e_T(v) * z_M(v)) / Z_T
  with e_T = exp(rho*z_T - m_T). The backward needs no communication:
      d loss / d z_M(v) = P_M(v) - P_T,rho(v).
- Tokens are processed in chunks of ``chunk_size`` so that fp32 copies of the logits exist for one
  chunk at a time. For backward we keep only the inputs (in their own dtype) plus two fp32 log-sum-exp
  values per token, and recompute the softmaxes chunk by chunk.
- Vocabulary padding: ids >= ``vocab_size`` are excluded from both distributions (as if the student
  logit were -inf and the teacher probability 0). We slice them away rather than mask them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["KDLossConfig", "teacher_vocab_shard", "vocab_parallel_kd_loss", "vocab_shard_range"]


@dataclass
class KDLossConfig:
    """Settings of the KD term (SALT paper defaults).

    Attributes:
        temperature: rho in P_T,rho ∝ P_T**rho (teacher-only; the paper uses 0.25).
        chunk_size: tokens processed at once; bounds the fp32 working memory to
            ``chunk_size * V_local`` floats per tensor.
    """

    temperature: float = 0.25
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"KD temperature (rho) must be > 0, got {self.temperature}")
        if self.chunk_size < 1:
            raise ValueError(f"KD chunk_size must be >= 1, got {self.chunk_size}")


@dataclass
class _Shard:
    """Where this rank's vocabulary shard sits and how much of it is real (unpadded)."""

    tp_group: Optional[dist.ProcessGroup]
    world: int
    rank: int
    v_local: int
    start: int  # first global vocab id of the shard
    n_valid: int  # ids [start, start + n_valid) are real vocabulary; the rest is padding


def _tp_world_and_rank(tp_group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if tp_group is None:
        return 1, 0
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("tp_group was given but torch.distributed is not initialized")
    return dist.get_world_size(group=tp_group), dist.get_rank(group=tp_group)


def _valid_ids(rank: int, v_local: int, vocab_size: int) -> tuple[int, int]:
    """(first global id, number of real ids) of shard ``rank``; megatron-core's vocab split."""
    start = rank * v_local
    return start, max(0, min(v_local, vocab_size - start))


def vocab_shard_range(vocab_size: int, padded_vocab_size: int, world: int, rank: int) -> tuple[int, int]:
    """Global ids ``[start, stop)`` of the real (unpadded) vocabulary in TP rank ``rank``'s shard
    of the padded vocabulary (megatron-core's split); ``start == stop`` for an all-padding shard."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"TP rank {rank} is not in a TP world of size {world}")
    if padded_vocab_size % world:
        raise ValueError(
            f"padded vocabulary {padded_vocab_size} is not divisible by the TP world size {world}"
        )
    if not 1 <= vocab_size <= padded_vocab_size:
        raise ValueError(
            f"vocab_size {vocab_size} must be in [1, padded vocabulary {padded_vocab_size}]"
        )
    start, n_valid = _valid_ids(rank, padded_vocab_size // world, vocab_size)
    return start, start + n_valid


def teacher_vocab_shard(
    vocab_size: int, padded_vocab_size: int, tp_group: Optional[dist.ProcessGroup] = None
) -> tuple[int, int]:
    """Global teacher-logit columns ``[start, stop)`` this TP rank's KD term reads.

    They are the real (unpadded) ids of the rank's shard of the student's padded vocabulary, so a
    teacher that computes only these columns (``HFTeacher.logits(vocab_range=...)``) gives the
    same loss as the full-vocabulary logits. ``start == stop`` for a shard that is all padding.
    """
    world, rank = _tp_world_and_rank(tp_group)
    return vocab_shard_range(vocab_size, padded_vocab_size, world, rank)


def _validate_and_shard(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_mask: Optional[torch.Tensor],
    temperature: float,
    vocab_size: Optional[int],
    chunk_size: int,
    tp_group: Optional[dist.ProcessGroup],
    teacher_vocab_start: Optional[int] = None,
) -> tuple[_Shard, torch.Tensor]:
    """Check the arguments (before any compute) and return the shard plus the local teacher view."""
    if not isinstance(student_logits, torch.Tensor) or not isinstance(teacher_logits, torch.Tensor):
        raise ValueError("student_logits and teacher_logits must be torch.Tensor")
    if student_logits.dim() < 1 or teacher_logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension (last dim)")
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise ValueError(
            f"logits must be floating point, got student {student_logits.dtype}, "
            f"teacher {teacher_logits.dtype}"
        )
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student and teacher logits must share leading dims: student "
            f"{tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student logits on {student_logits.device} but teacher logits on {teacher_logits.device}"
        )
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask.shape)} must equal the logits' leading dims "
            f"{tuple(student_logits.shape[:-1])}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature (rho) must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    world, rank = _tp_world_and_rank(tp_group)
    v_local = student_logits.shape[-1]
    if v_local < 1:
        raise ValueError("student logits have an empty vocabulary dimension")
    v_padded = world * v_local
    if vocab_size is None:
        vocab_size = v_padded
    if not 1 <= vocab_size <= v_padded:
        raise ValueError(
            f"vocab_size {vocab_size} must be in [1, padded student vocab {v_padded}] "
            f"(= tp world {world} x local shard {v_local})"
        )

    start, n_valid = _valid_ids(rank, v_local, vocab_size)
    v_teacher = teacher_logits.shape[-1]
    if teacher_vocab_start is not None:
        # columns of a vocabulary-sliced teacher: global ids [teacher_vocab_start, + v_teacher)
        offset = start - teacher_vocab_start
        if n_valid and (offset < 0 or offset + n_valid > v_teacher):
            raise ValueError(
                f"teacher logits hold vocabulary ids [{teacher_vocab_start}, "
                f"{teacher_vocab_start + v_teacher}) but TP rank {rank} needs [{start}, "
                f"{start + n_valid})"
            )
        teacher_local = teacher_logits[..., max(offset, 0) : max(offset, 0) + n_valid]
    elif world > 1 and v_teacher == v_local:
        teacher_local = teacher_logits  # already this rank's shard
    else:
        if v_teacher < vocab_size:
            raise ValueError(
                f"teacher vocab {v_teacher} is smaller than vocab_size {vocab_size}; student and "
                f"teacher must share the vocabulary"
            )
        teacher_local = teacher_logits[..., start : start + n_valid]
    shard = _Shard(tp_group, world, rank, v_local, start, n_valid)
    return shard, teacher_local


def _local_max(x: torch.Tensor, n_rows: int, device: torch.device) -> torch.Tensor:
    """Row max in fp32; -inf for an empty (all-padding) shard so MAX-reduce ignores it."""
    if x.shape[-1] == 0:
        return torch.full((n_rows,), float("-inf"), dtype=torch.float32, device=device)
    return x.amax(dim=-1).float()


class _VocabParallelKDLoss(torch.autograd.Function):
    """Per-token CE(softmax(rho*z_T), softmax(z_M)) over a (possibly sharded) vocabulary."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student: torch.Tensor,  # [N, V_local]
        teacher: torch.Tensor,  # [N, n_valid] (local, unpadded part only)
        mask: torch.Tensor,  # [N] bool
        rho: float,
        chunk_size: int,
        shard: _Shard,
    ) -> torch.Tensor:
        n_tok = student.shape[0]
        nv = shard.n_valid
        dev = student.device
        loss = torch.zeros(n_tok, dtype=torch.float32, device=dev)
        lse_s = torch.empty(n_tok, dtype=torch.float32, device=dev)
        lse_t = torch.empty(n_tok, dtype=torch.float32, device=dev)
        group = shard.tp_group if shard.world > 1 else None

        for c0 in range(0, n_tok, chunk_size):
            c1 = min(n_tok, c0 + chunk_size)
            rows = c1 - c0
            s_raw = student[c0:c1, :nv]
            t_raw = teacher[c0:c1]

            # Global maxima (rho > 0, so max(rho*z) = rho*max(z)).
            maxes = torch.stack([_local_max(s_raw, rows, dev), _local_max(t_raw, rows, dev) * rho])
            if group is not None:
                dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
            m_s, m_t = maxes[0], maxes[1]

            # fp32 working copies of this chunk only.
            s = s_raw.float() - m_s[:, None]  # z_M - m_S
            e_t = t_raw.float() * rho
            e_t.sub_(m_t[:, None]).exp_()  # exp(rho*z_T - m_T)
            sums = torch.stack(
                [
                    torch.exp(s).sum(dim=-1),  # Z_S (shifted)
                    e_t.sum(dim=-1),  # Z_T (shifted)
                    torch.einsum("cv,cv->c", e_t, s),  # sum_v e_T(v) * (z_M(v) - m_S)
                ]
            )
            del s, e_t
            if group is not None:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            z_s, z_t, cross = sums[0], sums[1], sums[2]

            log_z_s = torch.log(z_s)
            # CE = log Z_S - sum_v P_T,rho(v) (z_M(v) - m_S)
            chunk_loss = log_z_s - cross / z_t
            loss[c0:c1] = torch.where(mask[c0:c1], chunk_loss, torch.zeros_like(chunk_loss))
            lse_s[c0:c1] = m_s + log_z_s
            lse_t[c0:c1] = m_t + torch.log(z_t)

        ctx.save_for_backward(student, teacher, mask, lse_s, lse_t)
        ctx.rho = rho
        ctx.chunk_size = chunk_size
        ctx.n_valid = nv
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        student, teacher, mask, lse_s, lse_t = ctx.saved_tensors
        rho, chunk_size, nv = ctx.rho, ctx.chunk_size, ctx.n_valid
        # Padded vocab entries and masked tokens keep a zero gradient.
        grad_student = torch.zeros_like(student)
        grad_tok = torch.where(mask, grad_loss.float(), torch.zeros_like(lse_s))
        n_tok = student.shape[0]
        for c0 in range(0, n_tok, chunk_size):
            c1 = min(n_tok, c0 + chunk_size)
            p_m = student[c0:c1, :nv].float() - lse_s[c0:c1, None]
            p_m.exp_()
            p_t = teacher[c0:c1].float() * rho
            p_t.sub_(lse_t[c0:c1, None]).exp_()
            p_m.sub_(p_t).mul_(grad_tok[c0:c1, None])  # (P_M - P_T,rho) * dL/dloss
            del p_t
            grad_student[c0:c1, :nv] = p_m  # cast to the input dtype happens here
            del p_m
        return grad_student, None, None, None, None, None


def vocab_parallel_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    temperature: float = 0.25,
    vocab_size: Optional[int] = None,
    chunk_size: int = 4096,
    tp_group: Optional[dist.ProcessGroup] = None,
    teacher_vocab_start: Optional[int] = None,
) -> torch.Tensor:
    """Per-token KD loss CE(P_T,rho, P_M) (SALT eq. 3), vocab-parallel and chunked over tokens.

    Args:
        student_logits: ``[..., V_local]``; this rank's vocabulary shard (shard r covers global ids
            ``[r*V_local, (r+1)*V_local)`` of the padded vocabulary). With ``tp_group=None`` it is the
            whole vocabulary. Differentiable; the gradient comes back in its dtype.
        teacher_logits: ``[..., V_T]`` with the same leading dims. Treated as *this rank's shard* when
            the TP world size is > 1 and ``V_T == V_local``; otherwise as the full vocabulary
            (``V_T >= vocab_size``; entries past ``vocab_size``, e.g. the teacher's own embedding
            padding, are ignored) and sliced to this rank's shard inside. Treated as a constant
            target (no gradient).
        loss_mask: ``[...]``, nonzero = token counts. Masked tokens get loss 0 and zero gradient.
        temperature: rho > 0 in P_T,rho ∝ P_T**rho (= softmax(rho * teacher_logits)).
        vocab_size: true (unpadded) vocabulary size; ids ``>= vocab_size`` are excluded from both
            distributions. Default: the padded student vocabulary ``world * V_local``.
        chunk_size: tokens per chunk in forward and backward (bounds fp32 working memory).
        tp_group: tensor-parallel process group the vocabulary is split over; ``None`` = no TP.
        teacher_vocab_start: set when ``teacher_logits`` is a vocabulary slice (e.g. the columns
            :func:`teacher_vocab_shard` names): the global id of its first column. The slice must
            cover this rank's real ids. ``None``: ``teacher_logits`` is read as described above.

    Returns:
        fp32 tensor of shape ``student_logits.shape[:-1]``: per-token loss, 0 where masked. Every TP
        rank gets the same values. Reduce (masked mean over tokens) in the caller.

    Raises:
        ValueError: mismatched leading dims / mask shape, teacher vocab smaller than ``vocab_size``,
            ``vocab_size`` outside ``[1, world * V_local]``, non-positive temperature or chunk size.

    Logits must be finite over the real vocabulary. Leading dims are flattened with ``reshape``: pass
    tensors whose leading dims are contiguous (e.g. not a ``transpose(0, 1)`` view) or the flatten
    copies the whole tensor.
    """
    shard, teacher_local = _validate_and_shard(
        student_logits, teacher_logits, loss_mask, temperature, vocab_size, chunk_size, tp_group,
        teacher_vocab_start,
    )
    lead = student_logits.shape[:-1]
    n_tok = lead.numel()
    student = student_logits.reshape(n_tok, shard.v_local)
    # Explicit row count: an all-padding shard has a zero-width teacher slice.
    teacher = teacher_local.detach().reshape(n_tok, teacher_local.shape[-1])[:, : shard.n_valid]
    if loss_mask is None:
        mask = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
    else:
        mask = loss_mask.reshape(-1).to(device=student.device) != 0
    loss = _VocabParallelKDLoss.apply(
        student, teacher, mask, float(temperature), int(chunk_size), shard
    )
    return loss.reshape(lead)
