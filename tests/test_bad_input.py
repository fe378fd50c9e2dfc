"""Bad input fails before training starts, with a message naming the problem (exit code 2)."""

import os

import pytest

from launch import TINY_MODEL, run_pretrain

BASE = TINY_MODEL + ["--objective", "baseline", "--micro-batch-size", "2", "--train-iters", "2"]
MOCK = ["--mock-data", "--vocab-size", "200"]


def _fails(args, nproc=1):
    proc = run_pretrain(args, nproc=nproc, check=False)
    assert proc.returncode != 0
    assert "pretrain_let.py: error:" in proc.stderr or "unrecognized arguments" in proc.stderr
    assert "iteration        1" not in proc.stdout  # nothing was trained
    return proc.stderr


def _write_tiny_dataset(tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "tiny_text_document")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for n in (50, 70, 90):
        b.add_document(np.arange(n, dtype=np.uint16) % 100, [n])
    b.finalize(prefix + ".idx")
    return prefix


def test_missing_data_path_files(tmp_path):
    err = _fails(BASE + ["--data-path", str(tmp_path / "nothing"), "--tokenizer-type",
                         "NullTokenizer", "--vocab-size", "200"])
    assert "nothing" in err and ".idx" in err


def test_corrupt_idx(tmp_path):
    prefix = _write_tiny_dataset(tmp_path)
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"GARBAGE!")
    err = _fails(BASE + ["--data-path", prefix, "--tokenizer-type", "NullTokenizer",
                         "--vocab-size", "200"])
    assert "corrupt" in err


def test_heads_not_divisible_by_tp():
    err = _fails(BASE + MOCK + ["--tensor-model-parallel-size", "3"])
    assert "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3" in err


def test_layers_not_divisible_by_pp():
    err = _fails(BASE + MOCK + ["--num-layers", "5", "--pipeline-model-parallel-size", "2"])
    assert "--num-layers 5 is not divisible by --pipeline-model-parallel-size 2" in err


def test_global_batch_not_divisible_under_torchrun():
    err = _fails(BASE + MOCK + ["--global-batch-size", "6"], nproc=2)  # micro 2 x dp 2 = 4
    assert "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2" in err


def test_unknown_flag():
    err = _fails(BASE + MOCK + ["--tensor-parallel-size", "2"])
    assert "unrecognized arguments: --tensor-parallel-size" in err


def test_let_layer_beyond_depth(tmp_path):
    from tiny_teachers import save_tiny_llama_teacher

    save_tiny_llama_teacher(tmp_path, vocab_size=200)
    err = _fails(TINY_MODEL + MOCK + ["--objective", "let", "--teacher-path", str(tmp_path),
                                      "--let-student-layer", "9", "--train-iters", "2"])
    assert "--let-student-layer 9 is outside the student's layers 1..4" in err
