"""LET's ``--let-lambda-mode grad-ratio``: λ from the gradient norms at layer k, without a grid.

* the capture's measured mode injects the same gradient as the plain path and measures the two
  gradients at layer k exactly as ``torch.autograd.grad`` of each loss term does;
* at step 1 of a real (in-process) run the logged norms equal a plain-PyTorch recomputation from the
  same initial weights, batches and teacher states;
* the λ every step uses equals an independent recomputation from the norms logged in
  metrics.jsonl (one-step lag), resuming from a checkpoint reproduces the uninterrupted run
  (λ is checkpointed), and the norms do not depend on the parallel layout.
"""

import math

import pytest
import torch

from launch import TINY_MODEL, read_metrics, run_pretrain

from megatron_let.objectives.let import LETObjective

R0, STOP, STEPS = 0.5, 3, 4
COMMON = TINY_MODEL + ["--objective", "let", "--mock-data", "--vocab-size", "200",
                       "--micro-batch-size", "2", "--global-batch-size", "4", "--seed", "11",
                       "--let-student-layer", "2"]
GRAD_RATIO = ["--let-lambda-mode", "grad-ratio", "--let-grad-ratio", str(R0), "--let-stop-step", str(STOP)]


def expected_lambda(step: int, lm: float, align: float) -> float:
    """The rule, written out independently: r(s) = r0·max(0, 1 − s/S_stop), λ(s) = r(s)·lm/align."""
    return R0 * max(0.0, 1.0 - step / STOP) * lm / align


def test_objective_schedule_state_and_validation():
    obj = LETObjective(LETObjective.Config(lambda_mode="grad-ratio", grad_ratio=R0, stop_step=STOP), None)
    assert obj.schedule_values(0) == {"grad ratio target": R0, "lambda": 0.0}  # step 0 only measures
    assert obj.needs(0).teacher and obj.needs(STOP - 1).teacher and not obj.needs(STOP).teacher
    assert "lambda" not in obj.schedule_values(1)  # not known before step 0 has measured
    with pytest.raises(RuntimeError, match="end_step must run"):
        obj.weight(1)
    v = obj.end_step(1, {"hidden grad sq": 4.0, "output grad sq": 9.0, "lm loss": 5.0})
    assert v == {"lm loss": 5.0, "align grad rms": 2.0, "lm grad rms": 3.0, "grad ratio": 0.0}
    assert obj.weight(1) == pytest.approx(expected_lambda(1, 3.0, 2.0))
    assert obj.hidden_grad_weight(1) == obj.weight(1)
    state = obj.state_dict()
    other = LETObjective(obj.config, None)
    other.load_state_dict(state, 1)
    assert other.weight(1) == obj.weight(1)
    with pytest.raises(ValueError, match="holds the grad-ratio λ of step 1"):
        other.load_state_dict(state, 2)
    other.load_state_dict({}, 2)  # a checkpoint of another mode: this step measures again
    assert other.weight(2) == 0.0
    assert LETObjective(LETObjective.Config(), None).hidden_grad_weight(0) is None  # linear: plain path
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="--let-grad-ratio must be a positive number"):
            LETObjective(LETObjective.Config(lambda_mode="grad-ratio", grad_ratio=bad), None).validate(4)


def test_measured_mode_matches_autograd(megatron_single_process):
    """The measured mode injects λ·∂align/∂h like the plain path, and its two squared norms are
    those of torch.autograd.grad of the NLL sum and of the alignment sum with respect to h_k."""
    from megatron_let.kernels.cosine_align import cosine_align_reference
    from megatron_let.model.llama import LlamaConfig, build_student
    from megatron_let.runtime.device import ParallelConfig
    from megatron_let.training.layer_capture import (HIDDEN_GRAD, OUTPUT_GRAD, LayerCapture,
                                                     find_local_layer)

    torch.manual_seed(0)
    cfg = LlamaConfig(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                      seq_length=10, vocab_size=50)
    model = build_student(cfg, ParallelConfig())
    ids, labels = torch.randint(0, 50, (2, 10)), torch.randint(0, 50, (2, 10))
    pos = torch.arange(10).expand(2, 10)
    teacher = torch.randn(2, 10, 24)
    mask = (torch.rand(2, 10) > 0.3).float()
    lam = 0.7
    obj = LETObjective(LETObjective.Config(lambda_mode="grad-ratio", grad_ratio=R0, stop_step=100,
                                           student_layer=2, kernel="reference"), None)
    obj.load_state_dict({"lambda_mode": "grad-ratio", "lambda": lam, "lambda_step": 0}, 0)

    def nll_sum(logits):
        nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                reduction="none")
        return (nll * mask.reshape(-1)).sum()

    def grads():
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    seen = {}
    cap = LayerCapture(find_local_layer(model, 2), lambda h, t, m: obj.hidden_loss(h, t, m, 0),
                       sequence_parallel=False, weight_fn=lambda: obj.hidden_grad_weight(0))
    cap.metrics_sink = lambda w, c, metrics: seen.update(
        {k: v[0] for k, v in metrics.items()}, **({"term": w} if w is not None else {}))
    cap.set_pending(teacher, mask)
    nll_sum(model(ids, pos, None)).backward()
    cap.remove()
    got = grads()
    model.zero_grad()

    plain = {}
    hook = find_local_layer(model, 2).register_forward_hook(lambda m, i, o: plain.update(h=o[0]))
    loss = nll_sum(model(ids, pos, None))
    hook.remove()
    align = cosine_align_reference(plain["h"], teacher.transpose(0, 1), mask.transpose(0, 1)).sum()
    g_lm, = torch.autograd.grad(loss, plain["h"], retain_graph=True)
    g_align, = torch.autograd.grad(align, plain["h"], retain_graph=True)
    (loss + lam * align).backward()
    want = grads()
    assert float(seen[OUTPUT_GRAD]) == pytest.approx(float(g_lm.pow(2).sum()), rel=1e-5)
    assert float(seen[HIDDEN_GRAD]) == pytest.approx(float(g_align.pow(2).sum()), rel=1e-5)
    assert float(seen["term"]) == pytest.approx(lam * float(align), rel=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_step_one_norms_match_plain_pytorch(megatron_single_process, teacher_dir, tmp_path):
    """A real in-process run: the norms logged at step 1 equal sqrt(Σ_mb ‖∂L/∂h_k‖² / N) computed
    with plain PyTorch (cross entropy, reference cosine, autograd.grad) from the same initial
    weights, micro-batches and teacher states."""
    from megatron_let.kernels.cosine_align import cosine_align_reference
    from megatron_let.training.arguments import parse_args
    from megatron_let.training.layer_capture import find_local_layer
    from megatron_let.training.trainer import Trainer

    metrics = str(tmp_path / "m.jsonl")
    cfg = parse_args(COMMON + GRAD_RATIO + ["--teacher-path", teacher_dir, "--train-iters", "1",
                                            "--metrics-jsonl", metrics])
    trainer = Trainer(cfg)
    trainer.setup()
    student = trainer.student_chunks[0]
    initial = {k: v.detach().clone() for k, v in student.state_dict().items() if torch.is_tensor(v)}
    batches, states = [], []
    capture = trainer.teacher.capture  # layer k's capture, installed by setup()
    real_loss, real_pending = trainer._loss_func, capture.set_pending
    trainer._loss_func = lambda batch, *a, **k: (batches.append(batch), real_loss(batch, *a, **k))[1]
    capture.set_pending = lambda h, m, **k: (states.append(h.clone()), real_pending(h, m, **k))[1]
    try:
        trainer.train()
    finally:
        trainer.close()
    logged = read_metrics(metrics)[1]
    assert len(batches) == len(states) == 2

    student.load_state_dict(initial, strict=False)
    layer = find_local_layer(student, 2)
    sq_lm = sq_align = tokens = 0.0
    for batch, teacher in zip(batches, states):
        seen = {}
        hook = layer.register_forward_hook(lambda m, i, o: seen.update(h=o[0]))
        logits = student(batch["tokens"], batch["position_ids"], None)
        hook.remove()
        mask = batch["loss_mask"].float()
        nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                batch["labels"].reshape(-1), reduction="none")
        g_lm, = torch.autograd.grad((nll * mask.reshape(-1)).sum(), seen["h"], retain_graph=True)
        align = cosine_align_reference(seen["h"], teacher.transpose(0, 1), mask.transpose(0, 1)).sum()
        g_align, = torch.autograd.grad(align, seen["h"])
        sq_lm += float(g_lm.double().pow(2).sum())
        sq_align += float(g_align.double().pow(2).sum())
        tokens += float(mask.sum())
    assert logged["lm grad rms"] == pytest.approx(math.sqrt(sq_lm / tokens), rel=1e-4)
    assert logged["align grad rms"] == pytest.approx(math.sqrt(sq_align / tokens), rel=1e-4)
    assert logged["lambda"] == 0.0 and logged["grad ratio"] == 0.0  # step 0 measures only


@pytest.fixture(scope="module")
def init(tmp_path_factory, teacher_dir):
    d = str(tmp_path_factory.mktemp("init"))
    run_pretrain(COMMON + ["--teacher-path", teacher_dir, "--train-iters", "0", "--save", d])
    return d


def _run(tmp_path, teacher_dir, init, extra=(), nproc=1):
    metrics = str(tmp_path / "m.jsonl")
    run_pretrain(COMMON + GRAD_RATIO + ["--teacher-path", teacher_dir, "--train-iters", str(STEPS),
                                        "--load", init, "--no-load-optim", "--no-load-rng",
                                        "--metrics-jsonl", metrics] + list(extra), nproc=nproc)
    return read_metrics(metrics)


@pytest.fixture(scope="module")
def single(tmp_path_factory, teacher_dir, init):
    save = tmp_path_factory.mktemp("save")
    m = _run(tmp_path_factory.mktemp("single"), teacher_dir, init,
             ["--save", str(save), "--save-interval", "2"])
    return m, str(save)


def test_lambda_equals_recomputation_from_logged_norms(single):
    m, _ = single
    assert sorted(m) == list(range(1, STEPS + 1))
    assert m[1]["lambda"] == 0.0
    for n in range(1, STOP):  # record n is step n - 1; it sets the λ of step n (record n + 1)
        assert m[n]["grad ratio target"] == pytest.approx(R0 * (1 - (n - 1) / STOP))
        assert m[n + 1]["lambda"] == pytest.approx(
            expected_lambda(n, m[n]["lm grad rms"], m[n]["align grad rms"]), rel=1e-12)
        assert m[n]["grad ratio"] == pytest.approx(
            m[n]["lambda"] * m[n]["align grad rms"] / m[n]["lm grad rms"], rel=1e-12)
        assert m[n]["total loss"] == pytest.approx(m[n]["lm loss"] + m[n]["lambda"] * m[n]["align loss"],
                                                   rel=1e-5)
    assert m[2]["lambda"] > 0
    assert m[STEPS]["lambda"] == 0.0 and "align grad rms" not in m[STEPS]  # after S_stop


def test_resume_reproduces_the_uninterrupted_run(single, tmp_path, teacher_dir):
    """λ of step 2 depends on step 1's gradients: it comes back from the checkpoint."""
    ref, save = single
    metrics = str(tmp_path / "m.jsonl")
    out = run_pretrain(COMMON + GRAD_RATIO + ["--teacher-path", teacher_dir, "--train-iters", str(STEPS),
                                              "--load", save, "--ckpt-step", "2", "--metrics-jsonl", metrics])
    assert "resumed from" in out.stdout
    got = read_metrics(metrics)
    assert sorted(got) == [3, 4]
    assert got[3]["lambda"] == ref[3]["lambda"] and got[3]["lambda"] > 0
    for n in (3, 4):
        for key in ("lm loss", "total loss", "grad norm", "lambda"):
            assert got[n][key] == pytest.approx(ref[n][key], rel=1e-6, abs=1e-9), (n, key)
    assert got[3]["align grad rms"] == pytest.approx(ref[3]["align grad rms"], rel=1e-6)


@pytest.mark.parametrize("layout,nproc", [
    (["--tensor-model-parallel-size", "2"], 2),  # replicated over TP: counted once
    (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 2),  # sequence shards: summed over TP
    (["--pipeline-model-parallel-size", "2"], 2),  # layer k on stage 0, the loss on stage 1
    (["--micro-batch-size", "1"], 2),  # DP = 2: tokens of both ranks
    # layer k recomputed: measured in the recomputation during backward
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"], 1),
])
def test_norms_do_not_depend_on_the_layout(layout, nproc, single, tmp_path, teacher_dir, init):
    ref, _ = single
    got = _run(tmp_path, teacher_dir, init, layout, nproc=nproc)
    for n in range(1, STOP + 1):
        for key in ("align grad rms", "lm grad rms", "lambda", "lm loss"):
            assert got[n][key] == pytest.approx(ref[n][key], rel=2e-4), (layout, n, key)
