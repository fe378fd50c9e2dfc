"""Tests for the chunked KD loss (SALT eq. 3) and the SALT_DS score (eq. 11).

References are written here independently: a dense autograd implementation of CE(P_T^rho/Z, P_M)
on the sliced vocabulary, hand-computed values, and a plain-Python median/top-k loop.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from megatron_let.objectives.kd_loss import KDLossConfig, vocab_parallel_kd_loss
from megatron_let.objectives.salt_score import (
    SaltDSConfig,
    masked_lower_median,
    salt_ds_scores,
    salt_sequence_scores,
)


def dense_kd_reference(student, teacher, mask, rho, vocab):
    """CE(P_T,rho, P_M) with P_T,rho = P_T**rho / sum P_T**rho, literally as in the paper."""
    log_p_t = F.log_softmax(teacher.float()[..., :vocab], dim=-1)
    p_t_rho = torch.exp(rho * log_p_t)
    p_t_rho = p_t_rho / p_t_rho.sum(dim=-1, keepdim=True)
    log_p_m = F.log_softmax(student.float()[..., :vocab], dim=-1)
    return -(p_t_rho * log_p_m).sum(dim=-1) * mask.float()


def _inputs(shape_lead, v_student, v_teacher, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(*shape_lead, v_student, generator=g)).to(dtype)
    teacher = (3 * torch.randn(*shape_lead, v_teacher, generator=g)).to(dtype)
    mask = torch.rand(*shape_lead, generator=g) > 0.3
    upstream = torch.rand(*shape_lead, generator=g) + 0.5  # non-uniform dL/dloss per token
    return student, teacher, mask, upstream


def _loss_and_grad(fn, student, *args, upstream, **kw):
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, *args, **kw)
    (loss.float() * upstream).sum().backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("rho", [0.25, 1.0])
def test_matches_dense_reference_fp32_padded_vocab(rho):
    vocab, v_pad, v_teacher = 37, 40, 45  # student padded to 40, teacher has its own padding
    student, teacher, mask, up = _inputs((3, 7), v_pad, v_teacher, torch.float32)
    # Huge logits in the padding must not leak into either distribution.
    student[..., vocab:] = 50.0
    teacher[..., vocab:] = 50.0
    loss, grad = _loss_and_grad(
        vocab_parallel_kd_loss, student, teacher, mask,
        temperature=rho, vocab_size=vocab, chunk_size=5, upstream=up,
    )
    ref_loss, ref_grad = _loss_and_grad(
        lambda s, t, m: dense_kd_reference(s, t, m, rho, vocab), student, teacher, mask, upstream=up
    )
    assert loss.dtype == torch.float32 and loss.shape == (3, 7)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
    assert torch.all(loss[~mask] == 0)
    assert torch.all(grad[~mask] == 0)
    assert torch.all(grad[..., vocab:] == 0)


@pytest.mark.parametrize("rho", [0.25, 1.0])
def test_matches_dense_reference_bf16(rho):
    vocab = 37
    student, teacher, mask, up = _inputs((4, 6), 40, 40, torch.bfloat16, seed=1)
    loss, grad = _loss_and_grad(
        vocab_parallel_kd_loss, student, teacher, mask,
        temperature=rho, vocab_size=vocab, upstream=up,
    )
    ref_loss, ref_grad = _loss_and_grad(
        lambda s, t, m: dense_kd_reference(s.float(), t, m, rho, vocab),
        student, teacher, mask, upstream=up,
    )
    assert loss.dtype == torch.float32
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(grad.float(), ref_grad.float(), atol=2e-2, rtol=2e-2)


def test_temperature_hand_computed_v3():
    # P_T = [0.7, 0.2, 0.1], rho = 0.5 -> P_T,rho ∝ sqrt(P_T); P_M = [0.2, 0.3, 0.5].
    p_t = [0.7, 0.2, 0.1]
    p_m = [0.2, 0.3, 0.5]
    w = [math.sqrt(p) for p in p_t]
    expected = -sum(wi / sum(w) * math.log(pm) for wi, pm in zip(w, p_m))
    teacher = torch.log(torch.tensor([p_t])) + 4.0  # shift: softmax is shift invariant
    student = torch.log(torch.tensor([p_m])) - 2.0
    loss = vocab_parallel_kd_loss(student, teacher, temperature=0.5)
    assert loss.shape == (1,)
    assert abs(loss.item() - expected) < 1e-6


def test_chunked_equals_unchunked():
    student, teacher, mask, up = _inputs((11,), 40, 40, torch.float32, seed=2)
    kw = dict(temperature=0.25, vocab_size=37)
    l3, g3 = _loss_and_grad(vocab_parallel_kd_loss, student, teacher, mask, chunk_size=3, upstream=up, **kw)
    lf, gf = _loss_and_grad(vocab_parallel_kd_loss, student, teacher, mask, chunk_size=4096, upstream=up, **kw)
    torch.testing.assert_close(l3, lf, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g3, gf, atol=1e-6, rtol=1e-6)


def test_no_mask_means_all_tokens_and_defaults():
    student, teacher, _, up = _inputs((2, 3), 16, 16, torch.float32, seed=3)
    loss = vocab_parallel_kd_loss(student, teacher)  # rho = 0.25, vocab = 16 by default
    ref = dense_kd_reference(student, teacher, torch.ones(2, 3), 0.25, 16)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert KDLossConfig().temperature == 0.25


def _cpu_peak_bytes(fn) -> int:
    """Peak of live CPU bytes allocated by torch while ``fn`` runs (profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_chunking_bounds_peak_memory():
    n_tok, vocab = 2048, 8192
    full_bytes = n_tok * vocab * 4  # one fp32 [tokens, vocab] tensor (64 MiB)
    g = torch.Generator().manual_seed(4)
    student = torch.randn(n_tok, vocab, generator=g, requires_grad=True)
    teacher = torch.randn(n_tok, vocab, generator=g)

    def fwd_bwd(chunk):
        def run():
            loss = vocab_parallel_kd_loss(student, teacher, chunk_size=chunk)
            student.grad = None
            loss.sum().backward()
            student.grad = None
        return run

    def fwd(chunk):
        def run():
            with torch.no_grad():
                vocab_parallel_kd_loss(student, teacher, chunk_size=chunk)
        return run

    peak_chunked = _cpu_peak_bytes(fwd_bwd(128))
    peak_full = _cpu_peak_bytes(fwd_bwd(n_tok))
    # The [tokens, vocab] gradient itself is unavoidable; chunking removes the full-size temporaries.
    assert peak_full >= 2.5 * full_bytes
    assert peak_chunked < 1.5 * full_bytes
    assert peak_chunked < 0.5 * peak_full
    # Forward alone keeps nothing full-size when chunked.
    assert _cpu_peak_bytes(fwd(128)) < 0.25 * full_bytes
    assert _cpu_peak_bytes(fwd(n_tok)) >= 2 * full_bytes


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(student=(2, 3, 8), teacher=(2, 4, 8)), "leading dims"),
        (dict(student=(2, 8), teacher=(2, 6), vocab_size=7), "teacher vocab 6 is smaller than vocab_size 7"),
        (dict(student=(2, 8), teacher=(2, 8), mask=(3,)), "loss_mask shape"),
        (dict(student=(2, 8), teacher=(2, 8), temperature=0.0), "temperature"),
        (dict(student=(2, 8), teacher=(2, 8), vocab_size=9), "vocab_size 9"),
        (dict(student=(2, 8), teacher=(2, 8), chunk_size=0), "chunk_size"),
    ],
)
def test_kd_bad_input_raises(kwargs, match):
    student = torch.randn(*kwargs.pop("student"))
    teacher = torch.randn(*kwargs.pop("teacher"))
    mask_shape = kwargs.pop("mask", None)
    mask = None if mask_shape is None else torch.ones(mask_shape)
    with pytest.raises(ValueError, match=match):
        vocab_parallel_kd_loss(student, teacher, mask, **kwargs)


# ----------------------------------------------------------------------------- SALT_DS score (eq. 11)


def _hand_example():
    # Row: tokens x_0..x_3; logits at position i-1 score token i. Vocabulary of 3.
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.6, 0.25, 0.15], [0.4, 0.4, 0.2]])
    logits = (torch.log(probs) + 5.0)[None]  # [1, 4, 3]; position 3 predicts past the end (unused)
    tokens = torch.tensor([[2, 1, 0, 0]])
    # Position 0 -> token 1: p=0.3, rank 2nd. Position 1 -> token 0: p=0.1, rank 3rd.
    # Position 2 -> token 0: p=0.6, rank 1st.
    return logits, tokens


@pytest.mark.parametrize(
    "top_k, expected",
    [
        (3, sorted([-math.log(0.3), -math.log(0.1), -math.log(0.6)])[1]),  # all kept: 1.2040
        (2, sorted([-math.log(0.3), 0.0, -math.log(0.6)])[1]),  # 0.1 zeroed: 0.5108
        (1, 0.0),  # only position 2 kept: median of {0, 0, 0.5108}
    ],
)
def test_salt_score_hand_computed_v3(top_k, expected):
    logits, tokens = _hand_example()
    score = salt_ds_scores(logits, tokens, top_k=top_k)
    assert score.shape == (1,) and score.dtype == torch.float32
    assert abs(score.item() - expected) < 1e-5


def test_salt_score_even_count_uses_lower_median_and_mask():
    logits, tokens = _hand_example()
    # Mask out token 2 (scored by position 1): values {1.204, 0.511} -> lower median 0.511.
    mask = torch.tensor([[0, 1, 0, 1]])
    assert abs(salt_ds_scores(logits, tokens, 3, loss_mask=mask).item() + math.log(0.6)) < 1e-5
    # loss_mask[:, 0] is ignored (the first token has no context).
    mask0 = torch.tensor([[1, 1, 0, 1]])
    assert abs(salt_ds_scores(logits, tokens, 3, loss_mask=mask0).item() + math.log(0.6)) < 1e-5
    # Nothing scored -> -inf (never selected).
    none = torch.tensor([[1, 0, 0, 0]])
    assert salt_ds_scores(logits, tokens, 3, loss_mask=none).item() == float("-inf")


def test_salt_score_ignores_padded_vocab():
    logits, tokens = _hand_example()
    padded = torch.cat([logits, torch.full((1, 4, 2), 100.0)], dim=-1)  # 2 padded ids, huge logits
    for k in (1, 2, 3):
        torch.testing.assert_close(
            salt_ds_scores(padded, tokens, k, vocab_size=3), salt_ds_scores(logits, tokens, k)
        )


def test_salt_score_tie_counts_in_favour():
    logits = torch.zeros(1, 2, 4)  # uniform teacher: every token ties for first place
    tokens = torch.tensor([[0, 3]])
    assert abs(salt_ds_scores(logits, tokens, top_k=1).item() - math.log(4)) < 1e-6


def _python_reference(logits, tokens, top_k, mask, vocab):
    out = []
    for b in range(tokens.shape[0]):
        vals = []
        for i in range(1, tokens.shape[1]):
            if not mask[b, i]:
                continue
            row = logits[b, i - 1, :vocab].double().tolist()
            lse = math.log(sum(math.exp(z) for z in row))
            x = int(tokens[b, i])
            n_better = sum(1 for z in row if z > row[x])
            vals.append(-(row[x] - lse) if n_better < top_k else 0.0)
        out.append(statistics.median_low(vals) if vals else float("-inf"))
    return torch.tensor(out, dtype=torch.float32)


def test_salt_score_random_vs_python_loop():
    g = torch.Generator().manual_seed(5)
    b, s, v_pad, vocab, k = 4, 9, 13, 11, 4
    logits = 2 * torch.randn(b, s, v_pad, generator=g)
    tokens = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.rand(b, s, generator=g) > 0.3
    mask[3] = False  # one row with nothing scored
    expected = _python_reference(logits, tokens, k, mask, vocab)
    got = salt_ds_scores(logits, tokens, k, loss_mask=mask, vocab_size=vocab, chunk_size=2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # bf16 teacher logits give the same ranking/score as their fp32 upcast.
    lb = logits.bfloat16()
    torch.testing.assert_close(
        salt_ds_scores(lb, tokens, k, loss_mask=mask, vocab_size=vocab),
        _python_reference(lb.float(), tokens, k, mask, vocab), atol=1e-5, rtol=1e-5,
    )


def test_salt_sequence_scores_aligned_labels_accept_ignore_ids():
    logits, tokens = _hand_example()
    labels = torch.tensor([[1, 0, 0, -100]])  # Megatron-aligned: logits[:, j] predicts labels[:, j]
    mask = torch.tensor([[1, 1, 1, 0]])
    expected = salt_ds_scores(logits, tokens, 2)
    torch.testing.assert_close(salt_sequence_scores(logits, labels, 2, loss_mask=mask), expected)


def test_masked_lower_median_matches_torch_median():
    g = torch.Generator().manual_seed(6)
    vals = torch.randn(5, 8, generator=g)
    torch.testing.assert_close(masked_lower_median(vals), vals.median(dim=-1).values)


@pytest.mark.parametrize(
    "kind, match",
    [("top_k", "top_k"), ("id", r"\[0, vocab_size=3\)"), ("shape", "tokens shape"), ("cfg", "top_k")],
)
def test_salt_bad_input_raises(kind, match):
    logits, tokens = _hand_example()
    with pytest.raises(ValueError, match=match):
        if kind == "top_k":
            salt_ds_scores(logits, tokens, 0)
        elif kind == "id":
            salt_ds_scores(logits, torch.tensor([[0, 1, 3, 0]]), 2)
        elif kind == "shape":
            salt_ds_scores(logits, tokens[:, :3], 2)
        else:
            SaltDSConfig(top_k=0)
