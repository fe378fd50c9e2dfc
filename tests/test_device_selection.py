"""Device selection (runtime/device.py): LOCAL_RANK modulo the visible GPUs, tested on CPU with a
mocked CUDA (issue 20 item 9)."""

import pytest
import torch

from megatron_let.runtime import device as dev


@pytest.fixture
def fake_cuda(monkeypatch):
    def install(count):
        monkeypatch.setattr(dev, "cuda_usable", lambda: True)
        monkeypatch.setattr(dev, "cuda_device_count", lambda: count)
    return install


@pytest.mark.parametrize("local_rank,count,want", [
    ("0", 8, 0), ("5", 8, 5),  # one node, all of its GPUs visible to every process
    ("3", 1, 0), ("7", 1, 0),  # SLURM --gpus-per-task=1: each task sees only its own GPU
    ("5", 4, 1),  # two processes per visible GPU pair: wraps round
])
def test_local_rank_modulo_visible_gpus(fake_cuda, monkeypatch, local_rank, count, want):
    fake_cuda(count)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    for flag in ("auto", "cuda"):
        assert dev.resolve_device(flag) == torch.device("cuda", want)


def test_no_local_rank_is_gpu_zero_and_cpu_stays_cpu(fake_cuda, monkeypatch):
    fake_cuda(2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert dev.resolve_device("auto") == torch.device("cuda", 0)
    assert dev.resolve_device("cpu") == torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# The device policy lives in runtime/device.py only (issue 24 item 3): every module asks it, so one
# stand-in there fakes a GPU for all of them.

def test_no_module_probes_cuda_behind_the_policy():
    """Outside runtime/device.py nothing asks torch whether CUDA is there or touches the CUDA RNG.
    cpu_compat.py's stand-ins answer megatron-core's own calls on CPU."""
    import pathlib
    import re

    root = pathlib.Path(dev.__file__).resolve().parents[1]
    probe = re.compile(r"torch\.cuda\.(is_available|device_count|is_initialized|get_rng_state|"
                       r"set_rng_state)\(")
    allowed = {"runtime/device.py", "runtime/cpu_compat.py"}
    found = [f"{p.relative_to(root)}:{n}" for p in sorted(root.rglob("*.py"))
             if str(p.relative_to(root)) not in allowed
             for n, line in enumerate(p.read_text().splitlines(), 1) if probe.search(line)]
    assert not found, found


def test_planned_device_follows_the_probe_without_requiring_a_gpu(monkeypatch):
    monkeypatch.setattr(dev, "cuda_usable", lambda: False)
    assert [dev.planned_device_type(f) for f in ("auto", "cpu", "cuda")] == ["cpu", "cpu", "cuda"]
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        dev.resolve_device("cuda")
    monkeypatch.setattr(dev, "cuda_usable", lambda: True)
    assert [dev.planned_device_type(f) for f in ("auto", "cpu", "cuda")] == ["cuda", "cpu", "cuda"]


def test_checkpoint_rng_state_goes_through_the_policy(monkeypatch):
    """The checkpoint's CUDA generator state: saved and restored with a (stand-in) GPU, None and
    skipped without one, whatever the state says."""
    from megatron_let.training import checkpointing

    calls = []
    monkeypatch.setattr(dev, "cuda_usable", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: calls.append(int(s[0])))
    assert int(dev.device_rng_state()[0]) == 7
    dev.set_device_rng_state(torch.tensor([9], dtype=torch.uint8))
    dev.set_device_rng_state(None)  # saved on a CPU machine
    assert calls == [9]
    monkeypatch.setattr(dev, "cuda_usable", lambda: False)
    assert dev.device_rng_state() is None
    dev.set_device_rng_state(torch.tensor([5], dtype=torch.uint8))  # saved on a GPU, read on a CPU
    assert calls == [9]
    assert checkpointing.device_policy is dev


def test_peak_memory_and_cache_release_ask_the_policy(monkeypatch):
    from megatron_let.training import metrics

    released = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(True))
    monkeypatch.setattr(dev, "cuda_initialized", lambda: True)
    assert metrics.peak_memory_mb() == 3.0
    monkeypatch.setattr(dev, "cuda_initialized", lambda: False)
    assert metrics.peak_memory_mb() != 3.0  # the process's RSS instead
    monkeypatch.setattr(dev, "cuda_usable", lambda: True)
    dev.release_cached_memory(torch.device("cpu"))
    dev.release_cached_memory(torch.device("cuda", 0))
    assert released == [True]


def test_collective_device_follows_the_backend(monkeypatch):
    """NCCL collectives need their tensors on the current GPU; gloo, or no process group, the CPU."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    assert dev.collective_device() == torch.device("cpu")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for backend, want in (("nccl", torch.device("cuda")), ("gloo", torch.device("cpu"))):
        monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None, b=backend: b)
        assert dev.collective_device() == want
