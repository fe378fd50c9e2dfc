"""Megatron-LM's memory and speed features leave the computation unchanged, and LET stays correct.

Activation recompute (full/selective), the interleaved pipeline (virtual stages) and overlapped
gradient reduction must give the per-step losses and grad norms of a plain single-process run from
the same initial checkpoint; the layer-k capture must inject the alignment loss exactly once per
micro-batch also when layer k is recomputed, and raise when it does not.

LET runs use ``--let-stop-step 2`` over 3 steps: steps 1-2 align at layer k, step 3 runs after
the teacher's release, i.e. the plain language-modelling (baseline) path on the same layout (so
every LET run also checks the baseline path; two runs use ``--objective baseline`` itself). Runs
are cached per configuration and shared between tests to keep the module's time down.
"""

import pytest
import torch

from launch import TINY_MODEL, read_metrics, run_pretrain, train_in_process
from tiny_teachers import save_tiny_llama_teacher

STEPS = 3
COMMON = TINY_MODEL + ["--mock-data", "--vocab-size", "200", "--micro-batch-size", "2",
                       "--global-batch-size", "4", "--seed", "11"]


def let_args(teacher, layer):
    return ["--objective", "let", "--teacher-path", teacher, "--let-lambda", "1.0",
            "--let-student-layer", str(layer), "--let-stop-step", "2"]


# baseline runs also evaluate (iterations 2 and 3): evaluation must work on every layout too
BASELINE = ["--objective", "baseline", "--eval-interval", "2", "--eval-iters", "1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    save_tiny_llama_teacher(d)
    return str(d)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """One initial model for every run (the objective does not change the weights' layout)."""
    d = str(tmp_path_factory.mktemp("init"))
    run_pretrain(COMMON + BASELINE + ["--train-iters", "0", "--save", d])
    return d


@pytest.fixture(scope="module")
def runner(tmp_path_factory, init):
    cache = {}

    def run(objective, extra=(), nproc=1):
        key = (tuple(objective), tuple(extra), nproc)
        if key not in cache:
            metrics = str(tmp_path_factory.mktemp("run") / "m.jsonl")
            proc = run_pretrain(COMMON + list(objective) + [
                "--train-iters", str(STEPS), "--load", init, "--no-load-optim", "--no-load-rng",
                "--metrics-jsonl", metrics] + list(extra), nproc=nproc)
            m = read_metrics(metrics)
            assert sorted(m) == list(range(1, STEPS + 1)), proc.stdout[-2000:]
            for i, rec in read_metrics(metrics, split="valid").items():
                m[i]["valid lm loss"] = rec["lm loss"]
            cache[key] = (m, proc.stdout)
        return cache[key]

    return run


def assert_same_steps(got, ref, aligned_steps):
    for i in range(1, STEPS + 1):
        for key in ("lm loss", "total loss", "grad norm", "align loss"):
            if key == "align loss" and i not in aligned_steps:
                assert key not in got[i] and key not in ref[i]
                continue
            assert key in got[i], (i, key, got[i])
            assert got[i][key] == pytest.approx(ref[i][key], rel=1e-4, abs=1e-5), (i, key)
        if "valid lm loss" in ref[i]:
            assert got[i]["valid lm loss"] == pytest.approx(ref[i]["valid lm loss"], rel=1e-5), i
    assert got[1]["lm loss"] > 4.0


RECOMPUTE = {
    "full-uniform": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                     "--recompute-num-layers", "1"],
    "full-block": ["--recompute-granularity", "full", "--recompute-method", "block",
                   "--recompute-num-layers", "2"],
    "selective": ["--recompute-granularity", "selective"],
}


@pytest.mark.parametrize("layout,recompute,objective", [
    ([], "full-uniform", "let"),  # TP=1 (single process): layer 2 is its own recomputed block
    (["--tensor-model-parallel-size", "2"], "full-block", "let"),  # layers 1-2, k=2 inside
    (["--tensor-model-parallel-size", "2"], "selective", "let"),
    (["--pipeline-model-parallel-size", "2"], "full-uniform", "let"),  # k=2 ends stage 0
    (["--pipeline-model-parallel-size", "2"], "selective", "baseline"),
])
def test_recompute_matches_no_recompute(layout, recompute, objective, runner, teacher):
    obj = let_args(teacher, 2) if objective == "let" else BASELINE
    ref, _ = runner(obj)
    got, _ = runner(obj, layout + RECOMPUTE[recompute], nproc=2 if layout else 1)
    assert_same_steps(got, ref, aligned_steps=(1, 2) if objective == "let" else ())


VPP = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]


@pytest.mark.parametrize("layer,rank", [
    (2, 1),  # chunk 0 of stage 1: the first chunk, on the stage that does not embed
    (3, 0),  # chunk 1 of stage 0: a later chunk
])
def test_interleaved_pipeline_let_matches_single(layer, rank, runner, teacher):
    # 4 layers, PP=2, one layer per virtual stage: stage 0 holds layers 1 and 3, stage 1 2 and 4
    ref, _ = runner(let_args(teacher, layer))
    got, out = runner(let_args(teacher, layer), VPP, nproc=2)
    assert_same_steps(got, ref, aligned_steps=(1, 2))
    assert f"teacher loaded on rank {rank}" in out
    assert f"teacher loaded on rank {1 - rank}" not in out


def test_interleaved_pipeline_baseline_matches_single(runner, tmp_path_factory):
    ref, _ = runner(BASELINE)
    save = str(tmp_path_factory.mktemp("vpp_save"))
    got, _ = runner(BASELINE, VPP + ["--save", save], nproc=2)
    assert_same_steps(got, ref, aligned_steps=())
    # the chunks' checkpoint is layout-free: a single process evaluates the same weights
    metrics = str(tmp_path_factory.mktemp("vpp_load") / "m.jsonl")
    run_pretrain(COMMON + BASELINE + ["--train-iters", str(STEPS), "--load", save,
                                      "--metrics-jsonl", metrics])
    assert read_metrics(metrics, split="valid")[STEPS]["lm loss"] == pytest.approx(
        ref[STEPS]["valid lm loss"], rel=1e-5)


def test_overlap_grad_reduce_matches(runner, teacher):
    """DP=2 with the reduction overlapped in several small buckets (plain DP=2 equals the single
    process: test_parallel_equivalence.py), together with selective recompute at TP=1."""
    ref, _ = runner(let_args(teacher, 2))
    got, _ = runner(let_args(teacher, 2), ["--overlap-grad-reduce", "--ddp-bucket-size", "20000"]
                    + RECOMPUTE["selective"], nproc=2)
    assert_same_steps(got, ref, aligned_steps=(1, 2))


def _distributed_optimizer_on_cpu() -> bool:
    # megatron-core 0.16.1's DistributedOptimizer needs the CPU compatibility layer's optimizer
    # patches (issue 12); until they are in, the trainer refuses it on CPU with a clear error
    from megatron_let.runtime import cpu_compat

    return hasattr(cpu_compat, "apply_torch_adam_fallback_fixes")


@pytest.mark.skipif(not _distributed_optimizer_on_cpu(),
                    reason="the distributed optimizer does not run on CPU in this tree yet")
def test_overlap_param_gather_with_distributed_optimizer_matches(runner):
    """DP=2, distributed optimizer, gradient reduction and parameter all-gather overlapped; the
    evaluation in between must see fully gathered parameters (the forward pre-hooks disabled)."""
    ref, _ = runner(BASELINE)
    got, _ = runner(BASELINE, ["--use-distributed-optimizer", "--overlap-grad-reduce",
                               "--overlap-param-gather", "--ddp-bucket-size", "20000"], nproc=2)
    assert_same_steps(got, ref, aligned_steps=())
    assert "valid lm loss" in got[2] and "valid lm loss" in got[3]


# ----------------------------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def let_trainer_cfg(teacher, tmp_path_factory):
    from megatron_let.training.arguments import parse_args

    def make(extra=()):
        metrics = str(tmp_path_factory.mktemp("inproc") / "m.jsonl")
        return parse_args(COMMON + let_args(teacher, 2) + [
            "--train-iters", "2", "--metrics-jsonl", metrics] + list(extra)), metrics

    return make


_train = train_in_process


def test_capture_invariant_raises_when_hook_misses_a_microbatch(megatron_single_process,
                                                                 let_trainer_cfg, monkeypatch):
    from megatron_let.training import layer_capture

    real_hook = layer_capture.LayerCapture._hook
    calls = {"n": 0}

    def missing_second(self, module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 2:  # the second micro-batch's forward slips past the capture
            self._pending = None
            return output
        return real_hook(self, module, inputs, output)

    monkeypatch.setattr(layer_capture.LayerCapture, "_hook", missing_second)
    cfg, _ = let_trainer_cfg()
    with pytest.raises(layer_capture.CaptureInvariantError,
                       match="injected the alignment loss 1 time.*for 2 micro-batch"):
        _train(cfg)


@pytest.mark.parametrize("loss,mode", [("cosine", "linear"), ("cca", "linear"),
                                       ("cosine", "grad-ratio")])
def test_forward_backward_makes_no_host_device_sync(megatron_single_process, let_trainer_cfg,
                                                    monkeypatch, loss, mode):
    """No .item()/float()/int()/bool() on a tensor while the step's micro-batches run (LET with the
    teacher and full recompute, i.e. the capture's deferred path); metrics reduce once per step,
    also with --log-params-norm/--log-num-zeros-in-grad/--log-timers-to-tensorboard/
    --log-memory-to-tensorboard/--log-throughput (their values join that one reduction).
    Every copy this project makes to a device in that time is ``non_blocking`` (asynchronous from
    the loader's pinned memory on CUDA). grad-ratio: the gradient norms at layer k are measured in
    that backward without a sync too."""
    import sys

    import megatron.core.pipeline_parallel as pp

    real_get = pp.get_forward_backward_func
    names = ("item", "__float__", "__int__", "__bool__", "tolist")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    # Direct callers outside this project whose conversions are known and accepted:
    allowed_callers = (
        # the RNG tracker's fork compares CPU RNG states: host tensors on any device, no sync
        "megatron/core/tensor_parallel/random.py",
    )
    state = {"steps": 0, "finalizing": False}

    def forbidden(name):
        def check(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if state["finalizing"] or caller.endswith(allowed_callers):
                return originals[name](self, *a, **k)
            raise AssertionError(f"Tensor.{name} called inside the forward-backward of a step "
                                 f"(from {caller}:{sys._getframe(1).f_lineno})")
        return check

    # megatron-core's finalize_model_grads runs once after the last micro-batch (step level): it
    # tests the global token count before scaling the gradients
    import megatron.core.distributed as ddp_mod

    real_finalize = ddp_mod.finalize_model_grads

    def finalize(*a, **k):
        state["finalizing"] = True
        try:
            return real_finalize(*a, **k)
        finally:
            state["finalizing"] = False

    monkeypatch.setattr(ddp_mod, "finalize_model_grads", finalize)

    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
        if (isinstance(target, (str, torch.device)) and "/megatron_let/" in caller
                and not kwargs.get("non_blocking", args[2] if len(args) > 2 else False)):
            raise AssertionError(f"blocking Tensor.to({target}) inside the forward-backward of a "
                                 f"step (from {caller}:{sys._getframe(1).f_lineno})")
        return real_to(self, *args, **kwargs)

    def get_forward_backward_func():
        inner = real_get()

        def wrapped(**kwargs):
            with monkeypatch.context() as m:
                for name in names:
                    m.setattr(torch.Tensor, name, forbidden(name))
                m.setattr(torch.Tensor, "to", to)
                out = inner(**kwargs)
            state["steps"] += 1
            return out
        return wrapped

    monkeypatch.setattr(pp, "get_forward_backward_func", get_forward_backward_func)

    # Megatron-LM's logging flags add device tensors to the step's one reduction: no conversion
    # and no collective of their own between the update and that reduction
    from megatron_let.training.observability import StepObserver

    real_accumulate = StepObserver.accumulate
    collectives = {"n": 0}

    def accumulate(self, *a, **k):
        def no_collective(*_a, **_k):
            collectives["n"] += 1
            raise AssertionError("a collective inside StepObserver.accumulate")
        with monkeypatch.context() as m:
            for name in names:
                m.setattr(torch.Tensor, name, forbidden(name))
            m.setattr(torch.distributed, "all_reduce", no_collective)
            out = real_accumulate(self, *a, **k)
        state["accumulated"] = state.get("accumulated", 0) + 1
        return out

    monkeypatch.setattr(StepObserver, "accumulate", accumulate)
    cfg, metrics = let_trainer_cfg(RECOMPUTE["full-uniform"] + [
        "--log-params-norm", "--log-num-zeros-in-grad", "--log-timers-to-tensorboard",
        "--log-memory-to-tensorboard", "--log-throughput", "--let-loss", loss,
        "--let-lambda-mode", mode])
    trainer = _train(cfg)
    assert state["steps"] == 2 and trainer.teacher.capture is not None and trainer.teacher.capture.fired == 4
    assert state["accumulated"] == 2 and collectives["n"] == 0
    m = read_metrics(metrics)
    assert m[1]["align loss"] != 0 and m[2]["lm loss"] > 4.0
    for key in ("params-norm", "num-zeros", "forward-backward-time", "throughput"):
        assert key in m[2], key
    if mode == "grad-ratio":
        assert m[1]["lm grad rms"] > 0 and m[1]["align grad rms"] > 0 and m[2]["lambda"] > 0


def test_inject_loss_grad_output_is_not_a_view():
    """megatron's deallocate_pipeline_outputs asserts ``out._base is None`` on a stage's output."""
    from megatron_let.training.layer_capture import InjectLossGrad

    h = torch.randn(3, 2, 4, requires_grad=True)
    loss = (h.detach() * 0 + h).pow(2).sum()
    out = InjectLossGrad.apply(h * 1.0, loss, 0.5)
    assert out._base is None
    out.sum().backward()
    torch.testing.assert_close(h.grad, 1.0 + 0.5 * 2 * h.detach())


# ----------------------------------------------------------------------------------- flags


def test_dry_run_layout_shows_model_chunks(teacher, monkeypatch):
    from megatron_let.training.arguments import parse_args
    from megatron_let.training.dry_run import format_plan, plan_run

    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = parse_args(["--dry-run", "--num-layers", "8", "--hidden-size", "64", "--num-attention-heads",
                      "4", "--seq-length", "32", "--device", "cpu", "--mock-data", "--vocab-size",
                      "200", "--micro-batch-size", "2", "--global-batch-size", "8",
                      *let_args(teacher, 5)[:-2], "--pipeline-model-parallel-size", "2",
                      "--num-layers-per-virtual-pipeline-stage", "2"])
    plan = plan_run(cfg)
    # megatron-core's interleaved assignment: chunk c of stage p holds layers (c*PP + p)*n + 1..
    assert [r.chunks for r in plan.layout.placements()] == [((1, 2), (5, 6))] * 2 + \
        [((3, 4), (7, 8))] * 2
    text = format_plan(plan)
    assert "4 layers per stage in 2 interleaved chunks of 2" in text
    assert "student layer 5 is in model chunk 1 of stage 0" in text
    assert "1-2,5-6  embedding TEACHER" in text and "3-4,7-8  output" in text


@pytest.mark.parametrize("extra,message", [
    (["--recompute-granularity", "full"], "needs --recompute-method"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", "3"], "--recompute-num-layers 3 must divide the 4 layers"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"],
     "only apply to --recompute-granularity full"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], "needs --pipeline-model-parallel-size > 1"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
     "--num-layers-per-virtual-pipeline-stage 3 must divide the 2 layers per pipeline stage"),
    (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
])
def test_bad_feature_flags_name_the_problem(extra, message):
    from megatron_let.training.arguments import parse_args

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse_args(COMMON + BASELINE + extra)


def test_interleaved_pipeline_needs_microbatches_in_groups_of_pp(monkeypatch):
    from megatron_let.training.arguments import parse_args

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="the 1 micro-batches per step .* multiple of "
                                         "--pipeline-model-parallel-size 2"):
        parse_args(COMMON[:-4] + ["--global-batch-size", "2", "--seed", "1"] + BASELINE + VPP)
