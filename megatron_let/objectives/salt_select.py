"""SALT_DS data selection over a run's training samples (``tools/select_data.py`` is its command line):
every data-parallel rank scores its share of the candidates with the teacher (eq. 11, :mod:`.salt_score`),
the scores are gathered, and rank 0 writes the top m as the ``--kd-data-selection`` file."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from megatron_let.objectives.salt_score import salt_sequence_scores


def score_candidates(teacher, dataset: Sequence[dict], num_candidates: int, batch_size: int, top_k: int,
                     vocab_size: int, device: torch.device) -> np.ndarray:
    """S(x) of samples 0..num_candidates-1 of ``dataset``: rank r of W scores r, r+W, ... in batches of
    ``batch_size`` with ``teacher.logits``; returns every score on every rank (-inf: nothing scoreable)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine = list(range(rank, num_candidates, world))
    scores = torch.full((num_candidates,), float("-inf"), dtype=torch.float32)
    bar = tqdm(total=len(mine), desc=f"scoring (rank {rank})", disable=rank != 0, unit="seq")
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        samples = [dataset[i] for i in idx]
        tokens = torch.stack([s["tokens"] for s in samples]).to(device)
        labels = torch.stack([s["labels"] for s in samples]).to(device)
        mask = torch.stack([s["loss_mask"] for s in samples]).to(device)
        logits = teacher.logits(tokens)
        scores[idx] = salt_sequence_scores(logits, labels, top_k, mask, vocab_size=vocab_size).float().cpu()
        bar.update(len(idx))
    bar.close()
    # every candidate is scored by exactly one rank; the others hold -inf there
    gathered = scores.to(device if device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(gathered, op=torch.distributed.ReduceOp.MAX)
    return gathered.cpu().numpy()


def write_selection(output: str, scores: np.ndarray, count: int) -> str:
    """``OUT.npy``: the ``count`` best sample indices (int64, best first; written atomically) and
    ``OUT.scores.npy``: every score (float32). Returns ``OUT`` without the extension."""
    order = np.argsort(-scores, kind="stable")[:count]
    base = output[:-4] if output.endswith(".npy") else output
    np.save(base + ".scores.npy", scores.astype(np.float32))
    tmp = base + ".tmp.npy"
    np.save(tmp, order.astype(np.int64))
    os.replace(tmp, base + ".npy")
    return base
