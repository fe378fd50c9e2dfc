"""LET end to end: schedule, gradient injection at layer k, parallel layouts, teacher placement/release."""

import pytest
import torch

from launch import TINY_MODEL, read_metrics, run_pretrain
from tiny_teachers import save_tiny_llama_teacher

from megatron_let.objectives.let import LETObjective, let_lambda


def test_lambda_schedule():
    assert let_lambda(0, 0.1, 1500) == pytest.approx(0.1)
    assert let_lambda(750, 0.1, 1500) == pytest.approx(0.05)
    assert let_lambda(1500, 0.1, 1500) == 0.0
    assert let_lambda(4000, 0.1, 1500) == 0.0
    assert let_lambda(5, 0.3, 0) == 0.0
    obj = LETObjective(LETObjective.Config(lambda0=1.0, stop_step=4), None)
    assert obj.needs(3).teacher and obj.needs(3).student_layer == 3
    assert not obj.needs(4).teacher


def test_let_validation_errors():
    obj = LETObjective(LETObjective.Config(student_layer=7), None)
    with pytest.raises(ValueError, match="--let-student-layer 7 is outside the student's layers 1..4"):
        obj.validate(4)


def test_alignment_gradient_injected_at_layer_k(megatron_single_process):
    """Grads through LayerCapture equal autograd of NLL + λ·align computed on the captured state."""
    from megatron_let.kernels.cosine_align import cosine_align_reference
    from megatron_let.model.llama import LlamaConfig, build_student
    from megatron_let.runtime.device import ParallelConfig
    from megatron_let.training.layer_capture import LayerCapture, find_local_layer

    torch.manual_seed(0)
    cfg = LlamaConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                      seq_length=10, vocab_size=50)
    model = build_student(cfg, ParallelConfig())
    ids = torch.randint(0, 50, (2, 10))
    pos = torch.arange(10).expand(2, 10)
    teacher = torch.randn(2, 10, 24)
    mask = (torch.rand(2, 10) > 0.3).float()
    lam = 0.7
    obj = LETObjective(LETObjective.Config(lambda0=lam, stop_step=100, student_layer=2,
                                           kernel="reference"), None)

    def grads():
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # (a) through the capture hook
    cap = LayerCapture(find_local_layer(model, 2), lambda h, t, m: obj.hidden_loss(h, t, m, 0),
                       sequence_parallel=False)
    cap.set_pending(teacher, mask)
    model(ids, pos, None).float().logsumexp(-1).sum().backward()
    assert cap.fired == 1
    cap.remove()
    got = grads()
    model.zero_grad()

    # (b) reference: capture the state with a plain hook and add the loss by hand
    seen = {}
    h = find_local_layer(model, 2).register_forward_hook(lambda m, i, o: seen.update(h=o[0]))
    out = model(ids, pos, None).float().logsumexp(-1).sum()
    h.remove()
    align = cosine_align_reference(seen["h"], teacher.transpose(0, 1), mask.transpose(0, 1)).sum()
    (out + lam * align).backward()
    want = grads()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    # layers after k get no alignment gradient: identical to a plain NLL backward there
    model.zero_grad()
    model(ids, pos, None).float().logsumexp(-1).sum().backward()
    plain = grads()
    assert torch.allclose(plain["decoder.layers.3.mlp.linear_fc2.weight"],
                          want["decoder.layers.3.mlp.linear_fc2.weight"])
    assert not torch.allclose(plain["decoder.layers.0.mlp.linear_fc2.weight"],
                              want["decoder.layers.0.mlp.linear_fc2.weight"])


LET = TINY_MODEL + ["--objective", "let", "--mock-data", "--vocab-size", "200",
                    "--micro-batch-size", "2", "--global-batch-size", "4", "--seed", "11",
                    "--let-lambda", "1.0", "--let-student-layer", "2"]


@pytest.fixture(scope="module")
def let_init(tmp_path_factory, teacher_dir):
    d = str(tmp_path_factory.mktemp("let_init"))
    run_pretrain(LET + ["--teacher-path", teacher_dir, "--train-iters", "0", "--save", d])
    return d


def _run(tmp_path, teacher_dir, init, extra, nproc, steps=4, stop=3):
    metrics = str(tmp_path / "m.jsonl")
    proc = run_pretrain(LET + ["--teacher-path", teacher_dir, "--train-iters", str(steps),
                               "--let-stop-step", str(stop), "--load", init, "--no-load-optim",
                               "--no-load-rng", "--metrics-jsonl", metrics] + extra, nproc=nproc)
    return read_metrics(metrics), proc.stdout


@pytest.fixture(scope="module")
def let_single(tmp_path_factory, teacher_dir, let_init):
    return _run(tmp_path_factory.mktemp("s"), teacher_dir, let_init, [], 1)


def test_let_single_process_schedule_and_release(let_single):
    m, out = let_single
    assert [m[i]["lambda"] for i in (1, 2, 3, 4)] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    for i in (1, 2, 3):
        assert m[i]["total loss"] == pytest.approx(
            m[i]["lm loss"] + m[i]["lambda"] * m[i]["align loss"], rel=1e-5)
        assert m[i]["cosine similarity"] == pytest.approx(-m[i]["align loss"], rel=1e-5)
    assert "align loss" not in m[4] and m[4]["total loss"] == pytest.approx(m[4]["lm loss"])
    assert "teacher released at iteration 3" in out


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2"],
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ["--pipeline-model-parallel-size", "2"],
])
def test_let_two_process_layout_matches_single(layout, tmp_path, teacher_dir, let_init, let_single):
    m, out = _run(tmp_path, teacher_dir, let_init, layout, 2)
    ref, _ = let_single
    for i in (1, 2, 3, 4):
        for key in ("total loss", "lm loss", "align loss", "grad norm"):
            if key in ref[i]:
                assert m[i][key] == pytest.approx(ref[i][key], rel=1e-4, abs=1e-5), (i, key)
    if "--pipeline-model-parallel-size" in layout:
        # layer 2 lives on stage 0 (rank 0): the last stage never loads the teacher
        assert "teacher loaded on rank 0" in out and "teacher loaded on rank 1" not in out
    else:
        assert "teacher loaded on rank 0" in out and "teacher loaded on rank 1" in out


@pytest.fixture(scope="module")
def cca_single(tmp_path_factory, teacher_dir, let_init):
    return _run(tmp_path_factory.mktemp("cca"), teacher_dir, let_init, ["--let-loss", "cca"], 1)[0]


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],  # each rank holds half the sequence
    [],  # DP=2: each rank runs whole micro-batches, the same ones as the single process
], ids=["tp2-sp", "dp2"])
def test_cca_statistics_are_the_micro_batch_s_whatever_the_layout(layout, tmp_path, teacher_dir, let_init,
                                                                   cca_single):
    """CCA's correlations are over the micro-batch's full sequence: TP=2 + SP gives the single
    process's align loss and - through the all-reduce's backward - its gradients, so the later steps'
    losses and grad norms match too; so does DP=2 (micro-batches are the same samples)."""
    ref = cca_single
    m, _ = _run(tmp_path, teacher_dir, let_init, ["--let-loss", "cca"] + layout, 2)
    assert abs(ref[1]["align loss"]) > 1e-3  # a real correlation, not a zero
    for i in (1, 2, 3, 4):
        for key in ("total loss", "lm loss", "align loss", "grad norm"):
            if key in ref[i]:
                assert m[i][key] == pytest.approx(ref[i][key], rel=1e-4, abs=1e-6), (i, key, m[i], ref[i])


def test_resume_after_stop_never_loads_teacher(tmp_path, teacher_dir):
    save = str(tmp_path / "ck")
    run_pretrain(LET + ["--teacher-path", teacher_dir, "--train-iters", "3", "--let-stop-step", "2",
                        "--save", save])
    out = run_pretrain(LET + ["--teacher-path", teacher_dir, "--train-iters", "4",
                              "--override-opt_param-scheduler",  # a longer run than the checkpoint's
                              "--let-stop-step", "2", "--save", save, "--load", save]).stdout
    assert "resumed from" in out and "teacher loaded" not in out


def test_missing_teacher_is_a_clear_error(tmp_path):
    proc = run_pretrain(LET + ["--train-iters", "2", "--teacher-path", str(tmp_path / "nope")],
                        check=False)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "--teacher-path" in proc.stderr
    proc = run_pretrain(LET + ["--train-iters", "2"], check=False)
    assert proc.returncode == 2 and "needs --teacher-path" in proc.stderr


def test_vocab_mismatch_is_a_clear_error(tmp_path):
    save_tiny_llama_teacher(tmp_path, vocab_size=300)
    proc = run_pretrain(LET + ["--train-iters", "2", "--teacher-path", str(tmp_path)], check=False)
    assert proc.returncode == 2
    assert "200" in proc.stderr and "300" in proc.stderr


@pytest.mark.parametrize("loss", ["cosine", "logsum", "cca"])
def test_alignment_losses_match_independent_formulas(loss):
    """hidden_loss returns λ·Σ over valid tokens (cca: λ·n_valid·loss) of the documented formula."""
    import numpy as np

    torch.manual_seed(1)
    h = torch.randn(7, 3, 10, dtype=torch.float64)  # [s, b, d_M]
    t = torch.randn(7, 3, 6, dtype=torch.float64)  # [s, b, d_T]
    mask = (torch.rand(7, 3) > 0.3).double()
    obj = LETObjective(LETObjective.Config(lambda0=0.5, stop_step=10, loss=loss, logsum_alpha=3.0,
                                           kernel="reference"), None)
    got, metrics = obj.hidden_loss(h, t, mask, step=0)

    hn, tn, mn = h.numpy().reshape(-1, 10), t.numpy().reshape(-1, 6), mask.numpy().reshape(-1)
    grid = np.linspace(0, 9, 6)  # endpoints aligned
    x = np.stack([np.interp(grid, np.arange(10), row) for row in hn])
    valid = mn > 0
    if loss == "cosine":
        per = -(x * tn).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(tn, axis=1))
        want = per[valid].sum()
    elif loss == "logsum":
        xu = x / np.linalg.norm(x, axis=1, keepdims=True)
        yu = tn / np.linalg.norm(tn, axis=1, keepdims=True)
        want = np.log((np.abs(xu - yu) ** 3).sum(1) + 1e-12)[valid].sum()
    else:
        xs, ys = x[valid], tn[valid]
        corr = [np.corrcoef(xs[:, j], ys[:, j])[0, 1] for j in range(6)]
        want = -np.mean(corr) * valid.sum()
    assert float(got) == pytest.approx(0.5 * want, rel=1e-5)
    assert float(metrics["align loss"][0]) == pytest.approx(want, rel=1e-5)
    assert float(metrics["align loss"][1]) == valid.sum()
