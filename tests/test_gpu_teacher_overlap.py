"""GPU checks of ``--teacher-overlap`` (teacher/step_prefetch.py; ``pytest -m gpu``, run by
scripts/gpu_check.sh).

* In process, on CUDA: the step's teacher forwards enqueued on the side stream give exactly the
  inline forwards' hidden states and logits slice, and ran on a non-default stream.
* End to end: a LET run with the overlap (the default on CUDA) has the per-step losses and grad
  norms of a ``--no-teacher-overlap`` run. Under ``MEGATRON_LET_GPU_DRY_RUN=1`` (the check's CPU dry
  run) the same two runs are made on CPU, where the flag is a no-op.
"""

import os

import pytest
import torch

from launch import TINY_MODEL, gpu_impl_args, read_metrics, run_pretrain
from tiny_teachers import save_tiny_llama_teacher

GPU = torch.cuda.is_available()
DRY = os.environ.get("MEGATRON_LET_GPU_DRY_RUN") == "1"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (GPU or DRY), reason="needs a GPU (or MEGATRON_LET_GPU_DRY_RUN=1)")]
STEPS = 2


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("overlap_teacher")
    save_tiny_llama_teacher(d, vocab_size=200)
    return str(d)


@pytest.mark.skipif(not GPU, reason="the side stream exists on CUDA only")
def test_side_stream_teacher_equals_inline(teacher_dir):
    from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig
    from megatron_let.teacher.step_prefetch import StepTeacher, StepWork

    teacher = HFTeacher.load(TeacherConfig(path=teacher_dir, layer=-1), "cuda")
    torch.manual_seed(0)
    batches = [{"tokens": torch.randint(0, 200, (2, 32))} for _ in range(3)]
    st = StepTeacher(teacher, overlap=True)
    assert st.overlap and st.eager
    work = StepWork(hidden=True, logits=True, vocab_range=(0, 128))
    st.begin_step(batches, work)
    default = torch.cuda.default_stream().stream_id
    assert st.streams_used and default not in st.streams_used  # every forward on the side stream
    assert st.forwards == 6  # hidden + final state of 3 micro-batches
    for j, b in enumerate(batches):
        tokens = b["tokens"].cuda()
        hidden, sharded = st.hidden(j, tokens)
        assert not sharded
        torch.testing.assert_close(hidden, teacher.hidden_states(tokens), rtol=0, atol=0)
        torch.testing.assert_close(st.logits(j, tokens, (0, 128)),
                                   teacher.logits(tokens, vocab_range=(0, 128)), rtol=1e-6, atol=1e-6)
    st.end_step()


@pytest.mark.skipif(not GPU, reason="the side stream exists on CUDA only")
def test_begin_step_does_not_wait_for_the_device(teacher_dir, record_property):
    """The step's teacher work is enqueued without a host sync: with ~1 s of GPU work queued on
    the main stream ahead of the step (which the side stream must wait for), begin_step returns
    while the side stream is still pending, long before the device is done. Any blocking copy, any
    .item()/.tolist() or data-dependent branch (ours or transformers') would hold the host."""
    import time

    from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig
    from megatron_let.teacher.step_prefetch import StepTeacher, StepWork

    teacher = HFTeacher.load(TeacherConfig(path=teacher_dir, layer=-1), "cuda")
    torch.manual_seed(0)
    batches = [{"tokens": torch.randint(0, 200, (2, 32)).pin_memory()} for _ in range(4)]
    st = StepTeacher(teacher, overlap=True)
    work = StepWork(hidden=True, logits=True, vocab_range=(0, 128))
    st.begin_step(batches, work)  # warm-up: the once-per-teacher head check, allocator, kernels
    torch.cuda.synchronize()
    st.end_step()
    torch.cuda._sleep(2_000_000_000)  # ~1 s at ~2 GHz, queued on the main stream
    t0 = time.perf_counter()
    st.begin_step(batches, work)
    host_s = time.perf_counter() - t0
    pending = not st._stream.query()
    torch.cuda.synchronize()
    total_s = time.perf_counter() - t0
    record_property("begin_step_host_s", round(host_s, 4))
    record_property("begin_step_device_s", round(total_s, 4))
    assert pending, "the side stream was done when begin_step returned: the host waited for it"
    assert host_s < 0.5 * total_s, (host_s, total_s)
    st.end_step()


@pytest.mark.skipif(not GPU, reason="pinned memory needs CUDA")
def test_loader_batches_are_pinned_on_cuda():
    """The trainer's loader pins batches on CUDA, so its non_blocking copies are asynchronous."""
    from megatron_let.data.datasets import build_data_iterator

    ds = [{"tokens": torch.tensor([i, i + 1])} for i in range(8)]
    batch = next(build_data_iterator(ds, 2, 0, 0, 1, seed=0, pin_memory=True))
    assert batch["tokens"].is_pinned()


def _run(tmp_path, teacher_dir, extra):
    device = ["--device", "cuda", "--bf16", *gpu_impl_args()] if GPU else ["--device", "cpu"]
    model = list(TINY_MODEL)
    model[model.index("--device") + 1] = device[1]
    metrics = str(tmp_path / f"m{len(os.listdir(tmp_path))}.jsonl")
    run_pretrain(model + device[2:] + [
        "--objective", "let", "--let-lambda", "1.0", "--let-student-layer", "2", "--mock-data",
        "--vocab-size", "200", "--micro-batch-size", "2", "--global-batch-size", "8", "--seed", "5",
        "--teacher-path", teacher_dir, "--train-iters", str(STEPS), "--metrics-jsonl", metrics] + extra)
    return read_metrics(metrics)


def test_overlapped_teacher_run_equals_plain(teacher_dir, tmp_path, record_property):
    on = _run(tmp_path, teacher_dir, [])  # default: on with CUDA, a no-op on CPU
    off = _run(tmp_path, teacher_dir, ["--no-teacher-overlap"])
    for i in range(1, STEPS + 1):
        for key in ("lm loss", "align loss", "total loss", "grad norm"):
            assert on[i][key] == pytest.approx(off[i][key], rel=1e-5, abs=1e-6), (i, key)
        assert on[i]["teacher micro-batches"] == off[i]["teacher micro-batches"] == 4
        assert 0 < on[i]["teacher time share"] < 1  # CUDA events on the side stream: a real share
    record_property("teacher_share_overlap_on", round(on[STEPS]["teacher time share"], 4))
    record_property("teacher_share_overlap_off", round(off[STEPS]["teacher time share"], 4))
    record_property("step_s_overlap_on", round(on[STEPS]["step time"], 4))
    record_property("step_s_overlap_off", round(off[STEPS]["step time"], 4))
