"""Megatron-LM's logging and profiling flags (issue 21 items 2, 3 and 5).

* FLOP counts against independent counts: torch's FlopCounterMode on the student's forward +
  backward and on the HF teacher's forward, and a count from the student's own weight shapes;
* ``--log-throughput`` on CPU: the logged TFLOP/s equals the run's logged FLOPs / step time;
* ``--profile``: the trace holds exactly the profiled steps and the named ranges;
* ``--log-params-norm`` / ``--log-num-zeros-in-grad`` against the parameters and gradients
  themselves, and unchanged under TP = 2 and DP = 2 (each duplicate counted once).
The host-sync guarantee of these flags is checked in test_performance_features.py.
"""

import gzip
import json
import os
import types

import pytest
import torch

from launch import TINY_MODEL, read_metrics, run_pretrain, train_in_process
from tiny_teachers import save_tiny_llama_teacher

COMMON = TINY_MODEL + ["--mock-data", "--vocab-size", "200", "--micro-batch-size", "2",
                       "--global-batch-size", "4", "--seed", "11"]
LET = ["--objective", "let", "--let-lambda", "1.0", "--let-student-layer", "2",
       "--let-stop-step", "2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    save_tiny_llama_teacher(d)
    return str(d)


# ----------------------------------------------------------------------------- FLOP counts


def _counted_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("tied,groups", [(False, 2), (True, None)])
def test_student_flops_match_flop_counter(megatron_single_process, tied, groups):
    """Megatron-LM's count (every GEMM 3x: forward, data and weight gradients) equals what torch
    counts in a forward + backward of the student; the student's local attention multiplies the
    full s x s score matrix, which the count states as ``causal=False``."""
    from megatron_let.model.llama import LlamaConfig, build_student
    from megatron_let.runtime.device import ParallelConfig
    from megatron_let.training.estimates import megatron_training_flops

    cfg = LlamaConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                      num_query_groups=groups, seq_length=16, vocab_size=100,
                      untie_embeddings_and_output_weights=not tied)
    model = build_student(cfg, ParallelConfig())
    b = 3
    ids = torch.randint(0, 100, (b, 16))
    pos = torch.arange(16).expand(b, 16)

    def step():
        model(ids, pos, None).float().pow(2).mean().backward()

    counted = _counted_flops(step)
    assert counted == pytest.approx(megatron_training_flops(cfg, b, causal=False), rel=1e-9)
    # the causal count takes half of the score matrix: below the dense count
    assert megatron_training_flops(cfg, b) < counted


@pytest.mark.parametrize("tied", [False, True])
def test_student_flops_from_weight_shapes(megatron_single_process, tied):
    """Per token 6 x (linear weights of the layers + the output layer's V_pad x h, also when it is
    the embedding) + 6 x L x s x q (causal QK^T and AV, forward + backward), with the linear
    weights read off the built model (GQA: narrower K/V)."""
    from megatron_let.model.llama import LlamaConfig, build_student
    from megatron_let.runtime.device import ParallelConfig
    from megatron_let.training.estimates import megatron_training_flops

    cfg = LlamaConfig(num_layers=3, hidden_size=64, ffn_hidden_size=160, num_attention_heads=8,
                      num_query_groups=2, seq_length=24, vocab_size=300,
                      untie_embeddings_and_output_weights=not tied)
    model = build_student(cfg, ParallelConfig())
    linear = sum(p.numel() for n, p in model.named_parameters()
                 if n.startswith("decoder.layers.") and n.endswith("weight") and p.dim() == 2)
    out = model.embedding.word_embeddings.weight.numel()  # V_pad x h, the output GEMM's weight
    per_token = 6 * (linear + out) + 6 * cfg.num_layers * cfg.seq_length * cfg.hidden_size
    assert megatron_training_flops(cfg, 5) == pytest.approx(5 * cfg.seq_length * per_token,
                                                            rel=1e-12)


def test_teacher_forward_flops_match_flop_counter(teacher):
    """The teacher's forward (KD: all blocks + LM head) against torch's count of the HF model's
    forward, plus the masked half of the score matrices it multiplies; within 1 % (the count
    includes the RMSNorm weights among the block weights)."""
    from transformers import AutoModelForCausalLM

    from megatron_let.training.estimates import TeacherUse, teacher_forward_flops, teacher_summary

    # eager attention: plain matmuls that the counter sees (it has no rule for CPU SDPA kernels)
    hf = AutoModelForCausalLM.from_pretrained(teacher, attn_implementation="eager").eval()
    c = hf.config
    info = types.SimpleNamespace(path=teacher, model_type="llama", num_layers=c.num_hidden_layers,
                                 hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                                 layer=c.num_hidden_layers)
    summary = teacher_summary(info, trust_remote_code=False)
    use = TeacherUse(stages={0}, layers_run=c.num_hidden_layers, lm_head=True, active_steps=1)
    b, s = 2, 20
    ids = torch.randint(0, c.vocab_size, (b, s))
    with torch.no_grad():
        counted = _counted_flops(lambda: hf(ids))
    masked_half = b * c.num_hidden_layers * 2 * s * s * c.hidden_size
    assert counted == pytest.approx(teacher_forward_flops(summary, use, s, b) + masked_half,
                                    rel=0.01)


def test_device_peak_table():
    from megatron_let.training.observability import device_peak_tflops

    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_peak_tflops("NVIDIA H200") == 989.4
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert device_peak_tflops("NVIDIA A100 80GB PCIe") == 312.0
    assert device_peak_tflops("NVIDIA GeForce RTX 4090") is None


def test_observer_takes_the_peak_from_the_cuda_device_name(monkeypatch):
    """GPU path on CPU: a mocked device name selects the table's peak; --peak-tflops wins; no MFU
    on CPU without it."""
    from megatron_let.training.estimates import StepFlops
    from megatron_let.training.observability import StepObserver
    from megatron_let.training.observability_config import ObservabilityConfig

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    flops = StepFlops(student=6e15, teacher=2e15, teacher_active_steps=1)

    def make(device, peak=None):
        return StepObserver(ObservabilityConfig(log_throughput=True, peak_tflops=peak),
                            tensorboard_dir=None, rank=0, world=8, tp=1, pp=1,
                            distributed_optimizer=False, device=torch.device(device),
                            step_flops=flops)

    t = make("cuda").throughput(0, 2.0)
    assert t["throughput"] == pytest.approx(8e15 / (2.0 * 8 * 1e12))
    assert t["teacher-throughput"] == pytest.approx(2e15 / (2.0 * 8 * 1e12))
    assert t["mfu"] == pytest.approx(t["throughput"] / 989.4)
    assert make("cuda", peak=500.0).throughput(0, 2.0)["mfu"] == pytest.approx(t["throughput"] / 500)
    assert "mfu" not in make("cpu").throughput(0, 2.0)
    assert make("cpu").throughput(1, 2.0)["teacher flops"] == 0.0  # the teacher is released


def test_gpu_timers_memory_and_ranges_with_cuda_stand_ins(monkeypatch, tmp_path):
    """The CUDA-only paths on CPU: timers from (recorded) CUDA events, the allocator's statistics
    under Megatron-LM's names, NVTX ranges and the cudaProfilerApi window around the profile."""
    from megatron_let.runtime import device as device_policy
    from megatron_let.training import observability as obs
    from megatron_let.training.observability_config import ObservabilityConfig

    clock = iter(range(100))
    calls = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = next(clock)  # recorded on the stream: no host wait

        def synchronize(self):
            calls.append("sync")

        def elapsed_time(self, end):
            return (end.t - self.t) * 250.0  # ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    timers = obs.StepTimers(enabled=True, cuda=True)
    with timers("forward-backward"):
        pass
    with timers("optimizer"):
        pass
    with timers("forward-backward"):  # a second span adds up
        pass
    assert timers.pop() == {"forward-backward-time": 0.5, "optimizer-time": 0.25}
    assert timers.pop() == {}

    monkeypatch.setattr(torch.cuda, "memory_stats", lambda: {
        "reserved_bytes.all.current": 4, "allocated_bytes.all.current": 3,
        "allocated_bytes.all.peak": 5, "allocation.all.current": 7})
    assert obs.memory_stats(cuda=True) == {"mem-reserved-bytes": 4, "mem-allocated-bytes": 3,
                                           "mem-max-allocated-bytes": 5, "mem-allocated-count": 7}

    class Cudart:
        def cudaProfilerStart(self):
            calls.append("start")

        def cudaProfilerStop(self):
            calls.append("stop")

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart())
    monkeypatch.setattr(device_policy, "cuda_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(f"push {name}"))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append("pop"))
    # the profiler itself records CPU activity only (no CUDA here)
    prof = obs.StepProfiler(ObservabilityConfig(profile=True, profile_step_start=1,
                                                profile_step_end=2), str(tmp_path), 0, cuda=False)
    prof.cuda = True  # the CUDA branches, with the profiler's activities already chosen
    real_profile = torch.profiler.profile
    monkeypatch.setattr(torch.profiler, "profile", lambda activities, **k: real_profile(
        activities=[a for a in activities if a != torch.profiler.ProfilerActivity.CUDA], **k))
    for step in range(3):
        prof.begin(step)
        calls.append(f"run {step}")
        with prof.step_range(step):
            with obs.named_range("teacher forward"):
                pass
        prof.end(step)
    assert calls[:3] == ["sync"] * 3  # one per span, after the step's reduction
    # the warm-up step (0) is outside the cudaProfilerApi window; step 1 (iteration 2) inside
    assert calls[3:] == ["run 0", "start", "run 1", "push iteration 2", "push teacher forward",
                         "pop", "pop", "stop", "run 2"]
    assert not obs._PROFILING and len(prof.trace_files) == 2


# ----------------------------------------------------------------------------- flag checks


@pytest.mark.parametrize("extra,message", [
    (["--profile"], "--profile writes its traces into --tensorboard-dir"),
    (["--profile", "--tensorboard-dir", "x", "--profile-step-start", "3",
      "--profile-step-end", "3"], "need 0 <= start < end"),
    (["--profile", "--tensorboard-dir", "x", "--profile-step-end", "99"], "beyond --train-iters"),
    (["--peak-tflops", "100"], "add --log-throughput"),
    (["--log-throughput", "--peak-tflops", "-1"], "must be a positive number"),
    (["--use-pytorch-profiler"], "add --profile"),
])
def test_bad_flags_are_refused_before_compute(extra, message):
    from megatron_let.training.arguments import parse_args

    with pytest.raises(ValueError, match=message):
        parse_args(COMMON + ["--objective", "baseline", "--train-iters", "4"] + extra)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def let_run(tmp_path_factory, teacher):
    """LET over 4 steps (teacher for steps 1-2) with every flag, profiling steps 2-3."""
    d = tmp_path_factory.mktemp("let_run")
    tb, metrics = str(d / "tb"), str(d / "m.jsonl")
    args = COMMON + LET + [
        "--teacher-path", teacher, "--train-iters", "4", "--tensorboard-dir", tb,
        "--metrics-jsonl", metrics, "--log-throughput", "--peak-tflops", "0.5",
        "--log-params-norm", "--log-num-zeros-in-grad", "--log-timers-to-tensorboard",
        "--log-memory-to-tensorboard", "--profile", "--use-pytorch-profiler",
        "--profile-step-start", "1", "--profile-step-end", "3"]
    proc = run_pretrain(args, timeout=600)
    return types.SimpleNamespace(args=args, tb=tb, metrics=read_metrics(metrics), out=proc.stdout)


def test_logged_throughput_is_flops_over_step_time(let_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_let.training.arguments import parse_args
    from megatron_let.training.estimates import megatron_training_flops

    m = let_run.metrics
    assert sorted(m) == [1, 2, 3, 4]
    cfg = parse_args(let_run.args)
    for i, rec in m.items():
        assert rec["student flops"] == megatron_training_flops(cfg.model, 4)
        assert (rec["teacher flops"] > 0) == (i <= 2)  # --let-stop-step 2 releases the teacher
        per_gpu = 1.0 / (rec["step time"] * 1e12)  # world size 1
        assert rec["throughput"] == pytest.approx(
            (rec["student flops"] + rec["teacher flops"]) * per_gpu, rel=1e-9)
        assert rec["teacher-throughput"] == pytest.approx(rec["teacher flops"] * per_gpu, rel=1e-9)
        assert rec["mfu"] == pytest.approx(rec["throughput"] / 0.5, rel=1e-9)
        for key in ("forward-backward-time", "optimizer-time", "iteration-time",
                    "mem-max-rss-bytes"):
            assert rec[key] > 0, key
        assert rec["forward-backward-time"] + rec["optimizer-time"] <= rec["step time"]
    acc = EventAccumulator(let_run.tb)
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("train/throughput")}
    assert tb == {i: pytest.approx(m[i]["throughput"], rel=1e-5) for i in m}
    for tag in ("train/mfu", "train/teacher-throughput", "train/params-norm", "train/num-zeros",
                "train/forward-backward-time", "train/mem-max-rss-bytes"):
        assert tag in acc.Tags()["scalars"], tag
    line = next(l for l in let_run.out.splitlines() if "iteration        1/" in l)
    for field in ("throughput per GPU (TFLOP/s/GPU):", "teacher TFLOP/s/GPU:", "MFU:",
                  "num zeros:", "params norm:"):
        assert field in line, field


def _trace_events(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def test_profile_holds_exactly_the_steps_and_named_ranges(let_run):
    files = os.listdir(let_run.tb)
    plugin = [f for f in files if f.startswith("rank0.") and f.endswith(".pt.trace.json")]
    assert len(plugin) == 1, files  # the TensorBoard plugin's layout
    chrome = os.path.join(let_run.tb, "torch_profile", "rank-0.json.gz")  # Megatron-LM's place
    for events in (_trace_events(os.path.join(let_run.tb, plugin[0])), _trace_events(chrome)):
        steps = sorted(e["name"] for e in events if e["name"].startswith("iteration "))
        assert steps == ["iteration 2", "iteration 3"]  # steps [1, 3): iterations 2 and 3
        spans = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in events
                 if e["name"].startswith("iteration ")}
        # 2 micro-batches per step; the teacher (and so the alignment) runs in steps 1-2 only
        for name, steps in (("teacher forward", ["iteration 2"]), ("alignment", ["iteration 2"]),
                            ("output loss", ["iteration 2", "iteration 3"])):
            inside = [e for e in events if e["name"] == name]
            assert len(inside) == 2 * len(steps), name
            for step in steps:
                a, b = spans[step]
                assert sum(a <= e["ts"] <= b for e in inside) == 2, (name, step)


def test_profile_names_the_kd_loss(tmp_path, teacher):
    tb = str(tmp_path / "tb")
    run_pretrain(COMMON + ["--objective", "rkd", "--teacher-path", teacher, "--kd-weight", "0.5",
                           "--train-iters", "2", "--tensorboard-dir", tb, "--profile",
                           "--profile-step-start", "0", "--profile-step-end", "1"], timeout=600)
    events = _trace_events(os.path.join(tb, "torch_profile", "rank-0.json.gz"))
    names = [e["name"] for e in events]
    assert names.count("iteration 1") == 1 and "iteration 2" not in names
    assert names.count("kd loss") == 2 and names.count("teacher forward") == 2


def test_params_norm_and_zeros_match_the_model(megatron_single_process, teacher, tmp_path):
    """The last step's logged values against the trained parameters and the gradients it
    stepped with (left in the DDP buffers), computed here with plain torch."""
    from megatron_let.training.arguments import parse_args

    metrics = str(tmp_path / "m.jsonl")
    cfg = parse_args(COMMON + LET + ["--teacher-path", teacher, "--train-iters", "2",
                                     "--metrics-jsonl", metrics, "--log-params-norm",
                                     "--log-num-zeros-in-grad"])
    trainer = train_in_process(cfg)
    params = [p for chunk in trainer.model for p in chunk.parameters()]
    norm = torch.sqrt(sum(p.detach().double().pow(2).sum() for p in params)).item()
    zeros = sum(int((p.main_grad == 0).sum()) for p in params)
    last = read_metrics(metrics)[2]
    assert last["params-norm"] == pytest.approx(norm, rel=1e-6)
    assert last["num-zeros"] == zeros
    assert zeros > 0  # rows of the padded vocabulary never seen in a batch


LAYOUT_FLAGS = ["--objective", "baseline", "--train-iters", "2", "--log-params-norm",
                "--log-num-zeros-in-grad"]


def _layout_run(path, init, extra, nproc):
    run_pretrain(COMMON + LAYOUT_FLAGS + ["--metrics-jsonl", str(path), "--load", init,
                                          "--no-load-optim", "--no-load-rng"] + extra,
                 nproc=nproc, timeout=600)
    return read_metrics(str(path))


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    """The same initial weights for every layout (a pipeline stage initialises its own)."""
    d = str(tmp_path_factory.mktemp("init"))
    run_pretrain(COMMON + ["--objective", "baseline", "--train-iters", "0", "--save", d])
    return d


@pytest.fixture(scope="module")
def single_process_norms(tmp_path_factory, init_checkpoint):
    return _layout_run(tmp_path_factory.mktemp("single") / "m.jsonl", init_checkpoint, [], 1)


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"],
                                    ["--pipeline-model-parallel-size", "2"], []])
def test_params_norm_and_zeros_do_not_depend_on_the_layout(tmp_path, layout, single_process_norms,
                                                           init_checkpoint):
    """TP duplicates (norm weights), pipeline stages and DP replicas each counted once: TP = 2,
    PP = 2 and DP = 2 log the single process's values."""
    ref = single_process_norms
    got = _layout_run(tmp_path / "m.jsonl", init_checkpoint, layout, 2)
    for i in (1, 2):
        assert got[i]["params-norm"] == pytest.approx(ref[i]["params-norm"], rel=1e-5)
        assert got[i]["num-zeros"] == ref[i]["num-zeros"]


@pytest.mark.gpu
def test_gpu_throughput_mfu_timers_memory_and_profile(tmp_path, teacher, record_property):
    """On a GPU: MFU against the table's peak for the device, CUDA-event timers, the allocator's
    statistics and CUDA kernels in the profile (scripts/gpu_check.sh; CPU under --cpu-dry-run)."""
    from megatron_let.training.observability import device_peak_tflops

    cuda = torch.cuda.is_available()
    device = ["--device", "cuda", "--bf16"] if cuda else ["--device", "cpu"]
    model = [w for w in COMMON]
    i = model.index("--device")
    del model[i:i + 2]
    tb, metrics = str(tmp_path / "tb"), str(tmp_path / "m.jsonl")
    run_pretrain(model + device + LET + [
        "--teacher-path", teacher, "--train-iters", "4", "--tensorboard-dir", tb,
        "--metrics-jsonl", metrics, "--log-throughput", "--log-timers-to-tensorboard",
        "--log-memory-to-tensorboard", "--log-params-norm", "--log-num-zeros-in-grad",
        "--profile", "--profile-step-start", "1", "--profile-step-end", "3"], timeout=600)
    m = read_metrics(metrics)
    peak = device_peak_tflops(torch.cuda.get_device_name()) if cuda else None
    for rec in m.values():
        assert rec["throughput"] == pytest.approx(
            (rec["student flops"] + rec["teacher flops"]) / (rec["step time"] * 1e12), rel=1e-9)
        assert 0 < rec["forward-backward-time"] <= rec["iteration-time"] * 1.05
        if peak is not None:
            assert rec["mfu"] == pytest.approx(rec["throughput"] / peak, rel=1e-9)
        else:
            assert "mfu" not in rec
        if cuda:
            assert rec["mem-max-allocated-bytes"] >= rec["mem-allocated-bytes"] > 0
    record_property("tiny_model_tflops_per_gpu", m[4]["throughput"])
    events = _trace_events(os.path.join(tb, "torch_profile", "rank-0.json.gz"))
    names = {e["name"] for e in events}
    assert {"iteration 2", "iteration 3", "teacher forward", "alignment"} <= names
    assert "iteration 1" not in names and "iteration 4" not in names
    if cuda:
        assert any(e.get("cat") == "kernel" for e in events)
