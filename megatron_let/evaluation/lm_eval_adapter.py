"""lm-eval (0.4.9) model adapter for a megatron_let student, and lm-eval import helpers.

:class:`MegatronLetLM` is an ``lm_eval.api.model.TemplateLM``: lm-eval tokenizes requests through
``tok_encode`` (our tokenizer, no special tokens — as lm-eval's ``hf`` model does for causal LMs)
and hands us ``(context ids, continuation ids)``; we score them with the TP/PP student
(:class:`~megatron_let.evaluation.scoring.TokenScorer`), length-sorted and batched, and spread over
the data-parallel replicas. Truncation (keep the last ``max_length + 1`` tokens) and the empty-context
prefix token follow lm-eval's ``hf`` model, so a checkpoint and its Hugging Face export get the
same scores.

Distributed use: *every* rank runs lm-eval on all requests (we report ``rank=0, world_size=1`` to
lm-eval, which would otherwise need HF accelerate); only the forward passes are divided between
data-parallel replicas, and the results are summed over the world, so every rank returns the same
numbers. Only loglikelihood requests are supported (the paper's nine tasks are all
multiple-choice / loglikelihood).
"""

from __future__ import annotations

import contextlib
import sys
from typing import List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state

from megatron_let.data.tokenizers import NullTokenizer
from megatron_let.evaluation.scoring import TokenScorer, result_owner, world_sum
from megatron_let.model.llama import LlamaConfig

LM_EVAL_VERSION = "0.4.9"


def import_lm_eval():
    """Import lm-eval under transformers 5.

    lm-eval 0.4.9 references ``transformers.AutoModelForVision2Seq`` at import time, a class that
    transformers 5 renamed ``AutoModelForImageTextToText``. transformers replaces its module object
    in ``sys.modules`` once its processing utilities load, so we load them first and alias the name
    on the final module object. Raises a clear ImportError when lm-eval is missing.
    """
    if "lm_eval.evaluator" in sys.modules:
        return sys.modules["lm_eval"]
    import transformers.processing_utils  # noqa: F401  (forces transformers' final module object)

    tr = sys.modules["transformers"]
    if "AutoModelForVision2Seq" not in tr.__dict__ and hasattr(tr, "AutoModelForImageTextToText"):
        tr.AutoModelForVision2Seq = tr.AutoModelForImageTextToText
    try:
        # lazy: lm-eval is an optional dependency
        import lm_eval
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"lm-eval is needed for downstream evaluation: pip install lm-eval=={LM_EVAL_VERSION} ({e})"
        ) from e
    return lm_eval


@contextlib.contextmanager
def quiet_lm_eval_environment():
    """Stop ``simple_evaluate`` from running ``git describe`` and torch's slow environment probe
    (it only stores their output in the results); restores lm-eval afterwards."""
    # lazy: lm-eval is an optional dependency
    import lm_eval.evaluator as ev

    saved = ev.get_git_commit_hash, ev.add_env_info
    ev.get_git_commit_hash = lambda: None
    ev.add_env_info = lambda storage: storage.update({"lm_eval_version": LM_EVAL_VERSION})
    try:
        yield
    finally:
        ev.get_git_commit_hash, ev.add_env_info = saved


def _template_lm_base():
    import_lm_eval()
    # lazy: lm-eval is an optional dependency
    from lm_eval.api.model import TemplateLM

    return TemplateLM


class MegatronLetLM(_template_lm_base()):
    """lm-eval model over this rank's megatron_let student stage (see module docstring).

    Args:
        model: the bare ``GPTModel`` stage built by ``build_student`` (checkpoint loaded).
        cfg: its LlamaConfig.
        tokenizer: the megatron_let tokenizer the student was trained with.
        batch_size: requests per forward batch (per data-parallel replica).
        micro_batch_size: rows per pipeline micro-batch inside a batch.
        max_length: context window; default ``cfg.max_position_embeddings`` (what lm-eval's ``hf``
            model reads from the exported config).
    """

    def __init__(self, model, cfg: LlamaConfig, tokenizer, batch_size: int = 8,
                 micro_batch_size: Optional[int] = None, max_length: Optional[int] = None) -> None:
        super().__init__()

        if isinstance(tokenizer, NullTokenizer):
            raise ValueError("downstream evaluation needs the run's real tokenizer (text -> ids); the "
                             "checkpoint/run uses a NullTokenizer (mock data)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.cfg = cfg
        self.megatron_tokenizer = tokenizer
        self._batch_size = batch_size
        self._max_length = max_length or cfg.max_position_embeddings
        if self._max_length > cfg.max_position_embeddings:
            raise ValueError(f"max_length {self._max_length} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        self.scorer = TokenScorer(model, cfg, micro_batch_size or batch_size)

    # --- lm-eval interface -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.megatron_tokenizer.eod)

    @property
    def prefix_token_id(self) -> int:
        # lm-eval's hf model: BOS when the tokenizer has one, else EOS.
        bos = int(self.megatron_tokenizer.bos)
        return bos if bos >= 0 else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, **kwargs) -> List[int]:
        return list(self.megatron_tokenizer.tokenize(string))

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.megatron_tokenizer.detokenize(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        """``requests``: ``[(request strings, context ids, continuation ids), ...]`` ->
        ``[(sum of continuation log-probs, continuation is greedy), ...]`` in request order."""
        windows = []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("lm-eval gave a request with an empty context or continuation")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            windows.append((whole[:-1], whole[1:], len(cont)))
        scores = self.score_windows(windows)
        return [(float(lp), bool(g)) for lp, g in scores]

    def score_windows(self, windows: Sequence[Tuple[List[int], List[int], int]]) -> List[Tuple[float, bool]]:
        """Each window: (input ids, target ids, n) -> (sum of the last n targets' log-probs, all
        of them greedy). Collective over all ranks; every rank returns all results."""
        n = len(windows)
        order = sorted(range(n), key=lambda i: -len(windows[i][0]))  # long first, like lm-eval
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        batches = [order[i:i + self._batch_size] for i in range(0, n, self._batch_size)]
        mine = batches[dp_rank::dp_size]
        out = torch.zeros(n, 2, dtype=torch.float64)
        owner = result_owner()
        for batch in mine:
            length = max(len(windows[i][0]) for i in batch)
            tokens = torch.zeros(len(batch), length, dtype=torch.long)
            targets = torch.zeros(len(batch), length, dtype=torch.long)
            for row, i in enumerate(batch):
                inp, tgt, _ = windows[i]
                tokens[row, : len(inp)] = torch.tensor(inp)
                targets[row, : len(tgt)] = torch.tensor(tgt)
            logprobs, greedy = self.scorer.score(tokens, targets)
            if owner:
                for row, i in enumerate(batch):
                    inp_len, k = len(windows[i][0]), windows[i][2]
                    out[i, 0] = logprobs[row, inp_len - k: inp_len].double().sum()
                    out[i, 1] = float(bool(greedy[row, inp_len - k: inp_len].all()))
        out = world_sum(out)
        return [(float(out[i, 0]), bool(out[i, 1] > 0.5)) for i in range(n)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Whole-string log-likelihood with lm-eval's rolling windows (as its ``hf`` model)."""
        # lazy: lm-eval is an optional dependency
        from lm_eval import utils

        windows, owners = [], []
        for idx, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
                windows.append((whole[:-1], whole[1:], len(cont)))
                owners.append(idx)
        totals = [0.0] * len(requests)
        for idx, (lp, _) in zip(owners, self.score_windows(windows)):
            totals[idx] += lp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        raise ValueError(
            "MegatronLetLM scores log-likelihoods only; generative lm-eval tasks are not supported "
            "(evaluate an exported Hugging Face folder with --hf for those)"
        )
