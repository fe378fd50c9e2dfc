"""Perplexity and bits per byte of a student on an indexed (``.bin``/``.idx``) dataset.

The data goes through the trainer's own pipeline (:func:`megatron_let.data.datasets.build_datasets`,
megatron-core's ``GPTDataset``): windows of ``seq_length`` targets, non-overlapping, over the
(shuffled) documents of the chosen split, so every token of the split is predicted exactly once per
pass. Samples are divided round-robin over data-parallel replicas; sums are all-reduced.

* ``loss`` = mean negative log-likelihood (nats) over target tokens with ``loss_mask`` 1,
  ``ppl = exp(loss)``. The softmax runs over the real vocabulary (megatron's padded rows are
  excluded, see :mod:`megatron_let.evaluation.scoring`), so the numbers equal those of the
  exported Hugging Face model on the same windows.
* ``bits_per_byte`` = total NLL / (ln 2 × bytes), where bytes are the UTF-8 bytes of the text the
  target tokens decode to (:func:`window_bytes`). Tokenizer-independent, so students with different
  vocabularies compare. Not defined for the NullTokenizer (its "text" is ids).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import torch
from megatron.core import parallel_state

from megatron_let.data.datasets import DataConfig, build_datasets
from megatron_let.data.epochs import EpochCycle
from megatron_let.data.indexed import parse_data_path
from megatron_let.evaluation.scoring import TokenScorer, result_owner, world_sum
from megatron_let.model.llama import LlamaConfig

SPLITS = ("train", "valid", "test")


@dataclass
class PerplexityConfig:
    """What to evaluate on. ``split`` weights documents into train/valid/test as in training;
    the default ``0,0,1`` makes the whole dataset the evaluated ``test`` split."""

    data_path: List[str]
    split: str = "0,0,1"
    eval_split: str = "test"
    eval_samples: Optional[int] = None  # None: one full pass over the split
    micro_batch_size: int = 4
    seed: int = 1234
    data_cache_path: Optional[str] = None

    def validate(self) -> None:
        if not self.data_path:
            raise ValueError("--data-path is required for --task ppl")
        if self.eval_split not in SPLITS:
            raise ValueError(f"--eval-split must be one of {SPLITS}, got {self.eval_split!r}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ValueError(f"--eval-samples must be >= 1, got {self.eval_samples}")
        if self.micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")

        if any(w is not None for w, _ in parse_data_path(self.data_path)):
            raise ValueError("--data-path for perplexity takes prefixes without weights "
                             "(a weighted blend samples with replacement)")


@dataclass
class PerplexityResult:
    samples: int
    tokens: int
    nll_sum: float
    loss: float
    ppl: float
    bytes: Optional[int]
    bits_per_byte: Optional[float]

    def to_dict(self) -> dict:
        return asdict(self)


def window_bytes(tokenizer, tokens: Sequence[int], labels: Sequence[int], loss_mask: Sequence[float]) -> int:
    """UTF-8 bytes of the text that a window's scored targets decode to.

    The targets are cut at EOD tokens (document separators, zero bytes; their loss still counts)
    and each piece is decoded on its own, so a document start decodes as it does at the start of a
    document (sentencepiece drops its dummy-prefix space there). The first piece is decoded after
    the token that precedes it (``tokens[0]``) and that token's own text is subtracted, so a space
    or a multi-byte character at the window edge is counted where it belongs. Targets with
    ``loss_mask`` 0 are skipped.
    """
    eod = int(tokenizer.eod)
    pieces: List[List[int]] = [[]]
    for t, m in zip(labels, loss_mask):
        if int(t) == eod:
            pieces.append([])
        elif m > 0:
            pieces[-1].append(int(t))

    def nbytes(ids: List[int]) -> int:
        return len(tokenizer.detokenize(ids).encode("utf-8")) if ids else 0

    prefix = [] if int(tokens[0]) == eod else [int(tokens[0])]
    total = nbytes(prefix + pieces[0]) - nbytes(prefix) if pieces[0] else 0
    return total + sum(nbytes(p) for p in pieces[1:])


def build_eval_dataset(cfg: PerplexityConfig, seq_length: int, tokenizer, tokenizer_type: str,
                       tokenizer_model: Optional[str]):
    """The evaluated split as a GPTDataset holding exactly one pass over its documents."""
    data_cfg = DataConfig(data_path=list(cfg.data_path), split=cfg.split, seq_length=seq_length,
                          seed=cfg.seed, data_cache_path=cfg.data_cache_path,
                          tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model)
    sizes = [1 if name == cfg.eval_split else 0 for name in SPLITS]  # 1 sample => a single epoch

    datasets = build_datasets(data_cfg, tokenizer, *sizes)
    ds = datasets[SPLITS.index(cfg.eval_split)]
    # build_datasets hands out exactly the samples asked for; the pass is megatron-core's epoch
    return ds.dataset if isinstance(ds, EpochCycle) else ds


def evaluate_perplexity(model, model_cfg: LlamaConfig, tokenizer, dataset,
                        eval_samples: Optional[int] = None, micro_batch_size: int = 4,
                        compute_bytes: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on the first ``eval_samples`` windows of ``dataset`` (all by default).

    Collective: every rank calls it with the same arguments. ``dataset`` items are dicts with
    ``tokens``, ``labels``, ``loss_mask`` (megatron-core GPTDataset samples) of length
    ``model_cfg.seq_length``.
    """
    total = len(dataset)
    n = total if eval_samples is None else eval_samples
    if n > total:
        raise ValueError(f"--eval-samples {n} exceeds the {total} windows of one pass over the split "
                         f"(seq length {model_cfg.seq_length}); more would repeat tokens")
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = list(range(dp_rank, n, dp_size))
    scorer = TokenScorer(model, model_cfg, micro_batch_size)
    owner = result_owner()
    nll_sum, tokens_count, nbytes = 0.0, 0.0, 0.0
    chunk = micro_batch_size * max(1, parallel_state.get_pipeline_model_parallel_world_size())
    for start in range(0, len(mine), chunk):
        items = [dataset[i] for i in mine[start:start + chunk]]
        tokens = torch.stack([torch.as_tensor(x["tokens"]) for x in items]).long()
        labels = torch.stack([torch.as_tensor(x["labels"]) for x in items]).long()
        mask = torch.stack([torch.as_tensor(x["loss_mask"]) for x in items]).double()
        if tokens.shape[1] != model_cfg.seq_length:
            raise ValueError(f"dataset windows have {tokens.shape[1]} tokens, expected {model_cfg.seq_length}")
        logprobs, _ = scorer.score(tokens, labels)
        if owner:
            nll_sum += float(-(logprobs.double() * mask).sum())
            tokens_count += float(mask.sum())
            if compute_bytes:
                nbytes += sum(window_bytes(tokenizer, t.tolist(), l.tolist(), m.tolist())
                              for t, l, m in zip(tokens, labels, mask))
    sums = world_sum(torch.tensor([nll_sum, tokens_count, nbytes], dtype=torch.float64))
    nll, count, byte_total = float(sums[0]), int(sums[1]), int(sums[2])
    if count == 0:
        raise ValueError("no target tokens were scored (empty split or all loss_mask zero)")
    loss = nll / count
    bpb = nll / (math.log(2) * byte_total) if compute_bytes and byte_total > 0 else None
    return PerplexityResult(samples=n, tokens=count, nll_sum=nll, loss=loss, ppl=math.exp(min(loss, 700.0)),
                            bytes=byte_total if compute_bytes else None, bits_per_byte=bpb)
