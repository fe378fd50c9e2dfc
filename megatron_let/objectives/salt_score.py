"""SALT_DS sequence score (SALT paper eq. 11) for teacher-driven data selection.

    S_k(x) = median_i ( 1[x_i in argtop_k P_T(.|x_<i)] * (-log P_T(x_i | x_<i)) )

Conventions (stated here because the paper leaves them open):
- Shift: the teacher's logits at position i-1 (having read x_<=i-1) score token x_i, so a sequence of
  s tokens has s-1 scored positions (x_1, the first token, has no context and is never scored).
  :func:`salt_sequence_scores` takes already-aligned ``labels`` (Megatron's convention: logits[:, j]
  predict labels[:, j]); :func:`salt_ds_scores` takes the raw token sequence and shifts.
- Tokens outside the teacher's top-k are *zeroed, not dropped*: eq. 11 multiplies by the indicator,
  and the paper's related-work section says "we take the median and also zero out noisy tokens".
  The zeros take part in the median.
- Top-k membership counts ties in the token's favour: x_i is in the top-k iff fewer than k vocabulary
  entries have a strictly larger teacher logit (identical to torch.topk when values are distinct).
- Median: the *lower* median for an even count (torch.median semantics), over the valid positions.
- Positions with loss_mask == 0 are left out of the median entirely. A sequence with no valid
  position scores -inf, so a top-m selection never picks it.
- Vocabulary padding (ids >= vocab_size) is excluded from the softmax and from the top-k ranking.

Memory: log-softmax is computed ``chunk_size`` positions at a time in fp32, so scoring a pool is a
stream of independent batches with bounded working memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = [
    "SaltDSConfig",
    "masked_lower_median",
    "salt_token_scores",
    "salt_sequence_scores",
    "salt_ds_scores",
]


@dataclass
class SaltDSConfig:
    """SALT_DS scoring settings.

    Attributes:
        top_k: k in eq. 11 (the paper uses k = 10).
        chunk_size: positions per fp32 log-softmax chunk.
    """

    top_k: int = 10
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        _check_positive_int("top_k", self.top_k)
        _check_positive_int("chunk_size", self.chunk_size)


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _resolve_vocab(v_logits: int, vocab_size: Optional[int]) -> int:
    if vocab_size is None:
        return v_logits
    if not 1 <= vocab_size <= v_logits:
        raise ValueError(
            f"vocab_size {vocab_size} must be in [1, teacher logits vocab {v_logits}]"
        )
    return vocab_size


def salt_token_scores(
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    top_k: int,
    vocab_size: Optional[int] = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Per-position term of eq. 11: ``1[target in top-k] * (-log P_T(target))``, fp32.

    Args:
        teacher_logits: ``[..., V]``; ``teacher_logits[..., j, :]`` predicts ``targets[..., j]``.
        targets: integer ids with shape ``teacher_logits.shape[:-1]``, each in ``[0, vocab_size)``.
        top_k: k >= 1.
        vocab_size: real vocabulary (entries past it are padding); default ``V``.
        chunk_size: positions per fp32 chunk.
    """
    _check_positive_int("top_k", top_k)
    _check_positive_int("chunk_size", chunk_size)
    if teacher_logits.dim() < 1 or not teacher_logits.is_floating_point():
        raise ValueError(
            f"teacher_logits must be a floating tensor [..., V], got {teacher_logits.dtype} "
            f"{tuple(teacher_logits.shape)}"
        )
    if tuple(targets.shape) != tuple(teacher_logits.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal teacher_logits leading dims "
            f"{tuple(teacher_logits.shape[:-1])}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    vocab = _resolve_vocab(teacher_logits.shape[-1], vocab_size)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(
            f"target ids must lie in [0, vocab_size={vocab}), got range "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )

    return _token_scores(teacher_logits, targets, top_k, vocab, chunk_size)


def _token_scores(
    teacher_logits: torch.Tensor, targets: torch.Tensor, top_k: int, vocab: int, chunk_size: int
) -> torch.Tensor:
    """Validated worker of :func:`salt_token_scores`; never copies the whole logits tensor."""
    try:
        logits = teacher_logits.view(-1, teacher_logits.shape[-1])
    except RuntimeError:
        # A strided view (e.g. logits[:, :-1]) cannot be flattened without a full copy: go row by row.
        return torch.stack(
            [_token_scores(teacher_logits[i], targets[i], top_k, vocab, chunk_size)
             for i in range(teacher_logits.shape[0])]
        )
    tgt = targets.reshape(-1).to(device=logits.device, dtype=torch.long)
    out = torch.empty(tgt.shape[0], dtype=torch.float32, device=logits.device)
    for c0 in range(0, tgt.shape[0], chunk_size):
        c1 = min(tgt.shape[0], c0 + chunk_size)
        z = logits[c0:c1, :vocab].float()
        z_tgt = z.gather(1, tgt[c0:c1, None])  # [C, 1]
        nll = torch.logsumexp(z, dim=-1) - z_tgt[:, 0]
        n_better = (z > z_tgt).sum(dim=-1)
        out[c0:c1] = torch.where(n_better < top_k, nll, torch.zeros_like(nll))
    return out.reshape(targets.shape)


def masked_lower_median(values: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Row-wise lower median of ``values[b, n]`` over entries where ``mask`` is nonzero.

    Rows with no valid entry give -inf. Without a mask this equals ``values.median(dim=-1).values``.
    """
    if values.dim() != 2:
        raise ValueError(f"values must be [b, n], got shape {tuple(values.shape)}")
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    if tuple(mask.shape) != tuple(values.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal values shape {tuple(values.shape)}")
    valid = mask.to(values.device) != 0
    # Invalid entries sort last; the lower median of the n_valid leading ones sits at (n_valid-1)//2.
    v = torch.where(valid, values.float(), torch.full_like(values, float("inf"), dtype=torch.float32))
    v_sorted = v.sort(dim=-1).values
    n_valid = valid.sum(dim=-1)
    idx = ((n_valid - 1).clamp(min=0) // 2)[:, None]
    med = v_sorted.gather(1, idx)[:, 0] if values.shape[1] else torch.zeros(values.shape[0], device=values.device)
    return torch.where(n_valid > 0, med, torch.full_like(med, float("-inf")))


def salt_sequence_scores(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    top_k: int,
    loss_mask: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Eq. 11 with already-aligned labels: ``teacher_logits[b, j]`` predicts ``labels[b, j]``.

    Args:
        teacher_logits: ``[b, n, V]``.
        labels: ``[b, n]`` ids; positions with ``loss_mask == 0`` may hold any id (e.g. -100).
        top_k: k in eq. 11.
        loss_mask: ``[b, n]``, nonzero = position enters the median. Default: all.
    Returns:
        ``[b]`` fp32 scores (-inf for rows without a valid position).
    """
    if teacher_logits.dim() != 3 or tuple(labels.shape) != tuple(teacher_logits.shape[:2]):
        raise ValueError(
            f"expected teacher_logits [b, n, V] and labels [b, n], got "
            f"{tuple(teacher_logits.shape)} and {tuple(labels.shape)}"
        )
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(labels.shape):
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask.shape)} must equal labels shape {tuple(labels.shape)}"
        )
    valid = (
        torch.ones_like(labels, dtype=torch.bool)
        if loss_mask is None
        else loss_mask.to(labels.device) != 0
    )
    # Masked positions may carry ignore ids; give them id 0 so they pass the range check.
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    per_pos = salt_token_scores(teacher_logits, safe_labels, top_k, vocab_size, chunk_size)
    return masked_lower_median(per_pos, valid.to(per_pos.device))


def salt_ds_scores(
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    top_k: int,
    loss_mask: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """SALT_DS score S_k(x) (eq. 11) of each sequence from the teacher run on ``tokens``.

    Args:
        teacher_logits: ``[b, s, V]`` teacher logits for input ``tokens`` (position i-1 predicts
            token i).
        tokens: ``[b, s]`` the sequences x_1..x_s.
        top_k: k in eq. 11 (paper: 10).
        loss_mask: ``[b, s]`` aligned with ``tokens``: nonzero at i means token i is scored
            (``loss_mask[:, 0]`` is ignored: the first token is never scored).
        vocab_size: real vocabulary; ids >= vocab_size are padding.
        chunk_size: positions per fp32 chunk.
    Returns:
        ``[b]`` fp32: lower median over scored positions i = 1..s-1 of
        ``1[x_i in top-k] * (-log P_T(x_i | x_<i))``; -inf if nothing is scored.
    """
    if teacher_logits.dim() != 3 or tokens.dim() != 2:
        raise ValueError(
            f"expected teacher_logits [b, s, V] and tokens [b, s], got "
            f"{tuple(teacher_logits.shape)} and {tuple(tokens.shape)}"
        )
    if tuple(tokens.shape) != tuple(teacher_logits.shape[:2]):
        raise ValueError(
            f"tokens shape {tuple(tokens.shape)} must equal teacher_logits leading dims "
            f"{tuple(teacher_logits.shape[:2])}"
        )
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(tokens.shape):
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask.shape)} must equal tokens shape {tuple(tokens.shape)}"
        )
    shifted_mask = None if loss_mask is None else loss_mask[:, 1:]
    return salt_sequence_scores(
        teacher_logits[:, :-1], tokens[:, 1:], top_k, shifted_mask, vocab_size, chunk_size
    )
