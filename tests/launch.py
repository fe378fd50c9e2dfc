"""Helpers to run pretrain_let.py / tools in subprocesses (single process or torchrun) for tests."""

import json
import os
import socket
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from filelock import FileLock

import warm_start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL = [
    "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32",
    "--max-position-embeddings", "32", "--device", "cpu", "--log-interval", "1",
    "--lr", "3e-3", "--lr-warmup-fraction", "0.0", "--lr-decay-style", "constant",
]


def gpu_impl_args() -> list:
    """``--transformer-impl`` for the gpu tests' CUDA runs: the default (TE) where Transformer Engine
    imports, else the local spec, which the GPU check's image (no TE) runs; [] on CPU."""
    import torch

    if not torch.cuda.is_available():
        return []
    from megatron_let.model.spec import te_importable

    return [] if te_importable() else ["--transformer-impl", "local"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_once(out: Path, is_current: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """A folder shared by pytest-xdist workers (and by concurrent sessions on one machine): the first
    to take ``out``.lock builds it unless ``is_current(out)``; the others wait and then reuse it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{out}.lock"):
        if not is_current(out):
            shutil.rmtree(out, ignore_errors=True)
            build(out)
    return out


def xdist_worker_threads(environ=os.environ, cpus=None):
    """In-process torch threads for one pytest-xdist worker: its share of the cores (two workers with
    two OpenMP threads each on two cores oversubscribe); None outside xdist or with one worker."""
    workers = int(environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return None
    return max(1, (cpus or os.cpu_count() or 1) // workers)


# Folder of stand-ins that make optional packages look absent to the suite's processes (conftest.py
# puts it on their PYTHONPATH): see tests/hidden_imports/wandb/__init__.py.
HIDDEN_IMPORTS = os.path.join(ROOT, "tests", "hidden_imports")


def hide_optional_imports() -> None:
    """Every process started from here on (by any test) sees wandb as not installed."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if HIDDEN_IMPORTS not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([HIDDEN_IMPORTS, *paths])


def with_wandb(env: dict) -> dict:
    """``env`` with the real wandb importable again (the W&B tests)."""
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != HIDDEN_IMPORTS]
    return dict(env, PYTHONPATH=os.pathsep.join(paths))


def base_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def run_script(script, args, nproc=1, timeout=300, check=True, env=None, warm=True):
    """Run ``script`` (path relative to the repo) with python or torchrun; returns CompletedProcess.
    ``warm``: forked from tests/warm_start.py's server when ``env`` allows; False: a cold start."""
    path = os.path.join(ROOT, script)
    port = free_port() if nproc > 1 else 0
    if nproc == 1:
        cmd = [sys.executable, path, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(port), path, *args]
    env = env or base_env()
    proc = None
    if warm:  # the same processes without their imports (tests/warm_start.py); None: start cold
        proc = warm_start.run(path, args, nproc, env, ROOT, timeout, cmd, torchrun=nproc > 1, port=port)
    if proc is None:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode})\nSTDOUT:\n{proc.stdout[-4000:]}\n"
            f"STDERR:\n{proc.stderr[-6000:]}"
        )
    return proc


def run_pretrain(args, nproc=1, timeout=300, check=True, warm=True):
    return run_script("pretrain_let.py", args, nproc=nproc, timeout=timeout, check=check, warm=warm)


def read_metrics(path, split="train"):
    """Per-iteration metrics written by --metrics-jsonl, keyed by iteration (last write wins)."""
    out = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec["split"] == split:
                out[rec["iteration"]] = rec
    return out


def train_in_process(cfg):
    """Set up, train and close a Trainer in this process (needs megatron_single_process)."""
    from megatron_let.training.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer
