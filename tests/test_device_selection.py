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
