"""Mismatched tokenizers (the LET paper's "LET†", table 5): align teacher states to student tokens
by character offsets.

Each student sequence is decoded to text; student token i ends at character e_i, where
e_i = len(decode(ids[:i+1])) (prefix decoding, so the spans are exactly those of the decoded text
whatever the tokenizer's spacing rules). The text is re-tokenized with the teacher's tokenizer with
character offsets, the teacher runs on those ids, and student token i receives the state of the
teacher token whose character span covers the student token's last character e_i − 1 (the first
teacher token whose span ends after it). A student token that decodes to nothing (e_i = e_{i-1})
reuses the previous mapping. The teacher token may extend a few characters past the student token:
the mismatch mode accepts that small look-ahead, as the paper's setting does.

Cost: O(s) decodes per sequence on the host; meant for ablations, not peak throughput.
"""

from __future__ import annotations

import bisect
from typing import List, Sequence, Tuple

import torch


def student_token_ends(tokenizer, ids: Sequence[int]) -> Tuple[str, List[int]]:
    """The decoded text and the end character offset of every student token."""
    ids = [int(i) for i in ids]
    ends = []
    for i in range(len(ids)):
        ends.append(len(tokenizer.detokenize(ids[: i + 1])))
    text = tokenizer.detokenize(ids)
    # a prefix may decode longer than in the full text (e.g. a replacement char for a partial byte
    # sequence): clamp and keep the ends monotone
    out, prev = [], 0
    for e in ends:
        e = min(max(e, prev), len(text))
        out.append(e)
        prev = e
    return text, out


def map_student_to_teacher(student_ends: Sequence[int], teacher_spans: Sequence[Tuple[int, int]]) -> List[int]:
    """Index of the teacher token covering each student token's last character."""
    if not teacher_spans:
        raise ValueError("the teacher tokenizer produced no tokens for this text")
    teacher_ends = [e for _, e in teacher_spans]
    for a, b in zip(teacher_ends, teacher_ends[1:]):
        if b < a:
            raise ValueError("teacher token spans are not ordered")
    mapping = []
    for e in student_ends:
        last_char = max(e - 1, 0)
        j = bisect.bisect_right(teacher_ends, last_char)  # first teacher token ending after it
        mapping.append(min(j, len(teacher_spans) - 1))
    return mapping


class TokenAligner:
    """Runs a teacher with its own tokenizer on student-tokenized sequences."""

    def __init__(self, student_tokenizer, teacher_tokenizer, max_teacher_tokens: int | None = None):
        self.student = student_tokenizer
        self.teacher = teacher_tokenizer
        self.max_teacher_tokens = max_teacher_tokens

    def teacher_inputs(self, student_ids: torch.Tensor):
        """Teacher ids ``[b, t]`` (right-padded), attention mask ``[b, t]`` and the ``[b, s]`` index
        of the teacher position aligned with each student position."""
        rows, maps = [], []
        for row in student_ids.tolist():
            text, ends = student_token_ends(self.student, row)
            t_ids, t_spans = self.teacher.tokenize_with_offsets(text)
            if self.max_teacher_tokens is not None:
                t_ids, t_spans = t_ids[: self.max_teacher_tokens], t_spans[: self.max_teacher_tokens]
            rows.append(t_ids)
            maps.append(map_student_to_teacher(ends, t_spans))
        t = max(len(r) for r in rows)
        pad = self.teacher.eod if self.teacher.eod >= 0 else 0
        ids = torch.full((len(rows), t), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask, torch.tensor(maps, dtype=torch.long)

    def teacher_hidden(self, teacher, student_ids: torch.Tensor) -> torch.Tensor:
        """Teacher states aligned to the student's positions: ``[b, s, d_T]``. Reads
        ``student_ids`` on the host: the training step prepares the inputs first
        (:meth:`teacher_inputs`, then :meth:`gather_hidden`; teacher/step_prefetch.py)."""
        ids, mask, index = self.teacher_inputs(student_ids.cpu())
        device = teacher.device
        return self.gather_hidden(teacher, ids.to(device), mask.to(device), index.to(device))

    @staticmethod
    def gather_hidden(teacher, ids: torch.Tensor, mask: torch.Tensor,
                      index: torch.Tensor) -> torch.Tensor:
        """The teacher's states for :meth:`teacher_inputs`' outputs (on the teacher's device),
        gathered at the student's positions: device work only."""
        hidden = teacher.hidden_states(ids, attention_mask=mask)
        return torch.gather(hidden, 1, index[..., None].expand(-1, -1, hidden.shape[-1]))
