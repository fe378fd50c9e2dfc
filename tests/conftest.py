import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


@pytest.fixture(scope="session")
def megatron_single_process():
    """Initialise a 1-rank gloo group + megatron parallel state once for in-process tests."""
    import torch
    from megatron_let.runtime.device import ParallelConfig, initialize_distributed

    initialize_distributed(torch.device("cpu"), ParallelConfig(), seed=1234)
    yield
