"""Per-token log-probabilities from a (tensor/pipeline-parallel) megatron_let student.

:class:`TokenScorer` runs this rank's model stage through megatron-core's forward-only pipeline
schedule and returns, for every position, ``log p(target | prefix)`` and whether the target is the
arg-max token. The distribution is over the *real* vocabulary: logits of megatron's padded
vocabulary rows (``LlamaConfig.padded_vocab_size``) are excluded, so the numbers equal those of the
exported Hugging Face model. The results are computed on the last pipeline stage and broadcast to
the other stages, so every rank of a model-parallel group gets them. Under sequence parallelism a
batch's length is padded on the right to a multiple of the TP size (lm-eval's batches have any
length); causal attention keeps the padding out of the real positions, whose scores are returned.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Iterator, List, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_let.model.llama import LlamaConfig
from megatron_let.runtime import device as device_policy


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                            tp_group=None, tp_rank: int = 0, tp_size: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax at ``targets`` and greedy flags from vocabulary-parallel logits.

    ``logits`` is this TP rank's slice ``[..., V_padded / tp_size]`` of the vocabulary; ids at or
    beyond ``vocab_size`` (padding) are masked out. Returns (log-probs fp32, is-argmax bool), both
    shaped like ``targets`` and identical on all TP ranks.
    """
    logits = logits.float()
    v_local = logits.shape[-1]
    start = tp_rank * v_local
    if start + v_local > vocab_size:
        ids = torch.arange(start, start + v_local, device=logits.device)
        logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
    gmax = logits.max(dim=-1).values
    if tp_size > 1:
        torch.distributed.all_reduce(gmax, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    sumexp = torch.exp(logits - gmax.unsqueeze(-1)).sum(dim=-1)
    in_range = (targets >= start) & (targets < start + v_local)
    local_idx = (targets - start).clamp(0, v_local - 1)
    tlogit = torch.where(in_range, logits.gather(-1, local_idx.unsqueeze(-1)).squeeze(-1),
                         torch.zeros_like(gmax))
    if tp_size > 1:
        torch.distributed.all_reduce(sumexp, group=tp_group)
        torch.distributed.all_reduce(tlogit, group=tp_group)
    return tlogit - gmax - torch.log(sumexp), tlogit >= gmax


class TokenScorer:
    """Scores token batches with this rank's student stage (collective over its TP x PP group).

    Args:
        model: the bare ``GPTModel`` stage (or any wrapper with the same call signature).
        cfg: the student's LlamaConfig (for the real vocabulary size).
        micro_batch_size: rows per forward micro-batch; a batch is split into micro-batches and
            padded to a multiple of it.
    """

    def __init__(self, model, cfg: LlamaConfig, micro_batch_size: int = 4) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.model = model
        self.cfg = cfg
        self.micro_batch_size = micro_batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, tokens: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``tokens``/``targets``: ``[b, s]`` int tensors, the same on every rank of the model-parallel
        group (targets of padding positions may be any valid id). Returns CPU (log-probs fp32,
        greedy bool), each ``[b, s]``, on every rank of the group."""
        if tokens.shape != targets.shape or tokens.dim() != 2:
            raise ValueError(f"tokens {tuple(tokens.shape)} and targets {tuple(targets.shape)} must be equal [b, s]")
        b, s = tokens.shape
        for name, t in (("tokens", tokens), ("targets", targets)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.cfg.vocab_size):
                raise ValueError(f"{name} hold ids outside [0, {self.cfg.vocab_size})")
        if s > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence length {s} exceeds max_position_embeddings {self.cfg.max_position_embeddings}")
        mbs = min(self.micro_batch_size, b)
        n_micro = math.ceil(b / mbs)
        pad = n_micro * mbs - b
        if pad:  # repeat row 0; its results are dropped
            tokens = torch.cat([tokens, tokens[:1].expand(pad, s)])
            targets = torch.cat([targets, targets[:1].expand(pad, s)])
        tp_group = parallel_state.get_tensor_model_parallel_group()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        s_run = padded_length(s, tp_size, sequence_parallel(self.model))
        if s_run > s:  # right padding: causal attention keeps it out of the real positions' scores
            tokens = torch.nn.functional.pad(tokens, (0, s_run - s))
            targets = torch.nn.functional.pad(targets, (0, s_run - s))
        device = self.device
        batches: List[Tuple[torch.Tensor, torch.Tensor]] = [
            (tokens[i * mbs:(i + 1) * mbs].to(device), targets[i * mbs:(i + 1) * mbs].to(device))
            for i in range(n_micro)
        ]
        position_ids = torch.arange(s_run, device=device).unsqueeze(0).expand(mbs, s_run)

        def loss_func(tgt, logits, non_loss_data=False):
            return vocab_parallel_logprobs(logits, tgt, self.cfg.vocab_size, tp_group, tp_rank, tp_size)

        def forward_step(data_iterator: Iterator, model):
            tok, tgt = next(data_iterator)
            return model(tok, position_ids, None), partial(loss_func, tgt)

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                store = get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=iter(batches), model=[self.model],
                    num_microbatches=n_micro, seq_length=s_run, micro_batch_size=mbs, forward_only=True,
                    collect_non_loss_data=True,
                )
        finally:
            self.model.train(was_training)

        logprobs = torch.empty(n_micro * mbs, s_run, dtype=torch.float32)
        greedy = torch.empty(n_micro * mbs, s_run, dtype=torch.bool)
        if parallel_state.is_pipeline_last_stage():
            logprobs.copy_(torch.cat([lp for lp, _ in store]).cpu())
            greedy.copy_(torch.cat([g for _, g in store]).cpu())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            group = parallel_state.get_pipeline_model_parallel_group()
            src = parallel_state.get_pipeline_model_parallel_last_rank()
            packed = torch.cat([logprobs, greedy.float()]).to(device_policy.collective_device(group))
            torch.distributed.broadcast(packed, src=src, group=group)
            packed = packed.cpu()
            logprobs, greedy = packed[: n_micro * mbs], packed[n_micro * mbs:].bool()
        return logprobs[:b, :s], greedy[:b, :s]


def sequence_parallel(model) -> bool:
    """Whether ``model`` (a GPTModel stage or a megatron wrapper with ``.config``) shards sequences."""
    return bool(getattr(getattr(model, "config", None), "sequence_parallel", False))


def padded_length(s: int, tp_size: int, sequence_parallel: bool) -> int:
    """Sequence length to run: sequence parallelism splits the sequence over the TP ranks, so it
    must be a multiple of ``tp_size``; the extra positions are padding whose outputs are dropped."""
    if not sequence_parallel or tp_size == 1:
        return s
    return -(-s // tp_size) * tp_size


def result_owner() -> bool:
    """True on the one rank per data-parallel replica that contributes results to a world-wide sum
    (TP rank 0 of the last pipeline stage), so sums over the world count each replica once."""
    return parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.is_pipeline_last_stage()


def world_sum(t: torch.Tensor) -> torch.Tensor:
    """All-reduce SUM over the whole world (CPU tensors on gloo; moved to CUDA for NCCL)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return t
    comm = device_policy.collective_device()
    if comm.type == "cuda":
        out = t.to(comm)
        torch.distributed.all_reduce(out)
        return out.cpu()
    torch.distributed.all_reduce(t)
    return t
