"""Bad input fails before any compute, with a message naming the problem, both as a real run and
as ``--dry-run`` (the same preflight, the same message, exit code 2).

``BAD_INPUT_CASES`` is the table (docs/reliability.md is generated from it): importing this module
builds nothing; the files the cases refer to (``{assets}/...``) are made once by the ``assets``
fixture. Each case runs in-process through ``pretrain_let.main`` (what ``pretrain_let.py`` runs)
with a hook that fails the test if the process group or the model is ever built; a few cases also
run as real processes to prove the exit code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import List, NamedTuple

import numpy as np
import pytest

from launch import TINY_MODEL, run_pretrain


class BadInput(NamedTuple):
    name: str
    description: str
    argv: List[str]  # pretrain_let.py flags; {assets} is the folder the assets fixture builds
    expected: str  # regex the error message must match


BASE = TINY_MODEL + ["--objective", "baseline", "--micro-batch-size", "2", "--train-iters", "2"]
MOCK = ["--mock-data", "--vocab-size", "200"]
NULL_DATA = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "200", "--data-path"]
LET = TINY_MODEL + MOCK + ["--objective", "let", "--micro-batch-size", "2", "--train-iters", "2",
                           "--teacher-path"]

BAD_INPUT_CASES: List[BadInput] = [
    # model and parallel sizes
    BadInput("num-layers-0", "--num-layers 0", BASE + MOCK + ["--num-layers", "0"],
             r"--num-layers must be > 0, got 0"),
    BadInput("seq-length-0", "--seq-length 0", BASE + MOCK + ["--seq-length", "0"],
             r"--seq-length must be > 0, got 0"),
    BadInput("hidden-size-0", "--hidden-size 0", BASE + MOCK + ["--hidden-size", "0"],
             r"--hidden-size must be > 0, got 0"),
    BadInput("heads-0", "--num-attention-heads 0", BASE + MOCK + ["--num-attention-heads", "0"],
             r"--num-attention-heads must be > 0, got 0"),
    BadInput("vocab-size-negative", "--vocab-size -5", BASE + ["--mock-data", "--vocab-size", "-5"],
             r"--vocab-size must be > 0, got -5"),
    BadInput("micro-batch-0", "--micro-batch-size 0", BASE + MOCK + ["--micro-batch-size", "0"],
             r"--micro-batch-size must be > 0, got 0"),
    BadInput("heads-vs-tp", "attention heads not divisible by TP",
             BASE + MOCK + ["--tensor-model-parallel-size", "3"],
             r"--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
    BadInput("layers-vs-pp", "layers not divisible by PP",
             BASE + MOCK + ["--num-layers", "5", "--pipeline-model-parallel-size", "2"],
             r"--num-layers 5 is not divisible by --pipeline-model-parallel-size 2"),
    BadInput("unknown-flag", "a misspelt flag", BASE + MOCK + ["--tensor-parallel-size", "2"],
             r"unrecognized arguments: --tensor-parallel-size"),
    # data
    BadInput("split-abc", "--split abc", BASE + MOCK + ["--split", "abc"],
             r"--split 'abc' must contain only plain non-negative numbers"),
    BadInput("split-zero", "--split 0,0,0", BASE + MOCK + ["--split", "0,0,0"],
             r"--split '0,0,0' needs a positive sum"),
    BadInput("split-four-parts", "--split 1,2,3,4", BASE + MOCK + ["--split", "1,2,3,4"],
             r"--split '1,2,3,4' must be up to three comma-separated numbers"),
    BadInput("data-path-missing", "--data-path prefix without .bin/.idx",
             BASE + NULL_DATA + ["{assets}/nothing"], r"nothing.*missing .*nothing\.idx"),
    BadInput("data-idx-corrupt", "a corrupt .idx", BASE + NULL_DATA + ["{assets}/corrupt"],
             r"corrupt indexed dataset .*corrupt"),
    BadInput("empty-train-split", "--split giving the train split no documents",
             BASE + NULL_DATA + ["{assets}/in_range_text_document", "--split", "0,1,0"],
             r"train split of .*in_range_text_document.* is empty"),
    BadInput("token-ids-beyond-vocab", "token ids >= the student vocabulary (dataset .meta.json)",
             BASE + NULL_DATA + ["{assets}/wide_text_document"],
             r"wide_text_document.* holds token id 299 \(recorded in .*wide_text_document\.meta\.json\) "
             r"outside the student vocabulary \[0, 200\) \(--vocab-size 200, padded to 256\); it was "
             r"tokenized with NullTokenizer"),
    BadInput("token-ids-beyond-vocab-old-dataset",
             "token ids >= the student vocabulary (dataset without .meta.json: scanned)",
             BASE + NULL_DATA + ["{assets}/old_wide"],
             r"old_wide.* holds token id 250 \(full scan of the \.bin\) outside the student "
             r"vocabulary \[0, 200\)"),
    # tokenizer
    BadInput("tokenizer-folder-empty", "a Hugging Face tokenizer folder without tokenizer files",
             BASE + MOCK + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                            "{assets}/empty_folder"],
             r"tokenizer folder .*empty_folder.* contains none of tokenizer\.json"),
    BadInput("tokenizer-json-garbage", "a Hugging Face tokenizer folder with a garbage tokenizer.json",
             BASE + MOCK + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                            "{assets}/garbage_hf_tokenizer"],
             r"tokenizer folder .*garbage_hf_tokenizer .*cannot be loaded"),
    BadInput("vocab-size-below-tokenizer", "--vocab-size smaller than the tokenizer's vocabulary",
             BASE + MOCK + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                            "{assets}/hf_tokenizer_300"],
             r"--vocab-size 200 is smaller than the 300 ids of --tokenizer-model .*hf_tokenizer_300"),
    BadInput("sentencepiece-garbage", "a garbage sentencepiece model",
             BASE + MOCK + ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                            "{assets}/garbage.model"],
             r"--tokenizer-model .*garbage\.model is not a readable sentencepiece model"),
    # SALT data selection
    BadInput("kd-selection-garbage", "a garbage --kd-data-selection file",
             TINY_MODEL + MOCK + ["--objective", "salt", "--teacher-path", "{assets}/teacher",
                                  "--kd-data-selection", "{assets}/garbage.npy"],
             r"--kd-data-selection .*garbage\.npy is not a readable \.npy file"),
    BadInput("kd-selection-2d", "a --kd-data-selection array that is not 1-D",
             TINY_MODEL + MOCK + ["--objective", "salt", "--teacher-path", "{assets}/teacher",
                                  "--kd-data-selection", "{assets}/selection_2d.npy"],
             r"--kd-data-selection .*selection_2d\.npy must be a non-empty 1-D integer array"),
    BadInput("kd-selection-out-of-range", "a --kd-data-selection index beyond the training samples",
             TINY_MODEL + MOCK + ["--objective", "salt", "--teacher-path", "{assets}/teacher",
                                  "--micro-batch-size", "2", "--train-iters", "2",
                                  "--kd-data-selection", "{assets}/selection_far.npy"],
             r"--kd-data-selection .*selection_far\.npy indexes sample 9 but the training dataset has "
             r"4 samples \(--train-iters x --global-batch-size\)"),
    BadInput("kd-selection-with-let", "--kd-data-selection with an objective without KD phase",
             LET + ["{assets}/teacher", "--kd-data-selection", "{assets}/selection.npy"],
             r"--kd-data-selection is only used by an objective with a KD data phase "
             r"\(--objective salt\), not --objective let"),
    # checkpoint directory
    BadInput("save-is-file", "--save naming a file", BASE + MOCK + ["--save", "{assets}/a_file"],
             r"--save .*a_file is a file, not a directory"),
    BadInput("save-unwritable", "--save under a read-only directory",
             BASE + MOCK + ["--save", "/sys/megatron_let_save"],
             r"--save /sys/megatron_let_save cannot be created: its parent /sys is not writable"),
    # teacher
    BadInput("let-layer-beyond-depth", "--let-student-layer beyond the student's depth",
             LET + ["{assets}/teacher", "--let-student-layer", "9"],
             r"--let-student-layer 9 is outside the student's layers 1\.\.4"),
    BadInput("teacher-encoder", "a BERT (encoder) folder as teacher", LET + ["{assets}/bert"],
             r"teacher .*bert.* is a bert model \(BertForMaskedLM\), an encoder with bidirectional "
             r"attention"),
    BadInput("teacher-missing-tensors", "a teacher folder missing a weight tensor",
             LET + ["{assets}/teacher_missing"],
             r"teacher .*teacher_missing.* lacks 1 of its \d+ weight tensors "
             r"\(model\.layers\.1\.mlp\.up_proj\.weight\)"),
    BadInput("teacher-positions-llama", "a Llama teacher with fewer positions than --seq-length",
             LET + ["{assets}/teacher_short"],
             r"teacher .*teacher_short.* handles at most 16 positions \(max_position_embeddings in "
             r"config\.json\) but --seq-length is 32"),
    BadInput("teacher-positions-gpt2", "a GPT-2 teacher with fewer positions than --seq-length",
             LET + ["{assets}/gpt2_short"],
             r"teacher .*gpt2_short.* handles at most 16 positions \(n_positions in config\.json\) "
             r"but --seq-length is 32"),
    BadInput("teacher-garbage-weights", "a teacher whose weight file is garbage",
             LET + ["{assets}/teacher_garbage"],
             r"teacher weight file .*teacher_garbage/model\.safetensors is unreadable"),
]


# ---------------------------------------------------------------------------------------------
# assets
# ---------------------------------------------------------------------------------------------


def _indexed(prefix, docs, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        b.add_document(np.asarray(d, dtype=dtype), [len(d)])
    b.finalize(prefix + ".idx")
    return prefix


def _preprocess(tmp, name, vocab, docs):
    from megatron_let.data.indexed import preprocess_jsonl

    path = os.path.join(tmp, name + ".jsonl")
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": " ".join(map(str, d))}) + "\n")
    return preprocess_jsonl(path, os.path.join(tmp, name), "NullTokenizer", None, vocab_size=vocab,
                            log_stream=None)


def _teacher_variants(root):
    import safetensors.torch as st
    import torch
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    from tiny_teachers import save_tiny_llama_teacher

    teacher = os.path.join(root, "teacher")
    save_tiny_llama_teacher(teacher, vocab_size=200)
    missing = os.path.join(root, "teacher_missing")
    os.makedirs(missing)
    shutil.copy(os.path.join(teacher, "config.json"), missing)
    sd = st.load_file(os.path.join(teacher, "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    st.save_file(sd, os.path.join(missing, "model.safetensors"), metadata={"format": "pt"})
    garbage = os.path.join(root, "teacher_garbage")
    os.makedirs(garbage)
    shutil.copy(os.path.join(teacher, "config.json"), garbage)
    with open(os.path.join(garbage, "model.safetensors"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(4096))
    short = os.path.join(root, "teacher_short")
    os.makedirs(short)
    with open(os.path.join(teacher, "config.json")) as f:
        config = json.load(f)
    config["max_position_embeddings"] = 16
    with open(os.path.join(short, "config.json"), "w") as f:
        json.dump(config, f)
    shutil.copy(os.path.join(teacher, "model.safetensors"), short)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=200, n_positions=16, n_embd=32, n_layer=2, n_head=4)
                    ).save_pretrained(os.path.join(root, "gpt2_short"))
    BertForMaskedLM(BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64)
                    ).save_pretrained(os.path.join(root, "bert"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad_input_assets"))
    corrupt = _indexed(os.path.join(root, "corrupt"), [list(range(50)), list(range(70))])
    with open(corrupt + ".idx", "r+b") as f:
        f.write(b"GARBAGE!")
    _indexed(os.path.join(root, "old_wide"), [list(range(100)), list(range(150, 251))])
    docs = [list(range(i, i + 40)) for i in range(0, 150, 10)]
    _preprocess(root, "in_range", 200, docs)
    _preprocess(root, "wide", 300, docs + [[298, 299, 5]])
    os.makedirs(os.path.join(root, "empty_folder"))
    os.makedirs(os.path.join(root, "garbage_hf_tokenizer"))
    with open(os.path.join(root, "garbage_hf_tokenizer", "tokenizer.json"), "w") as f:
        f.write("{garbage")
    with open(os.path.join(root, "garbage.model"), "wb") as f:
        f.write(b"not a sentencepiece model")
    with open(os.path.join(root, "garbage.npy"), "wb") as f:
        f.write(b"not numpy")
    np.save(os.path.join(root, "selection.npy"), np.arange(4))
    np.save(os.path.join(root, "selection_far.npy"), np.array([0, 9]))
    np.save(os.path.join(root, "selection_2d.npy"), np.zeros((2, 2), dtype=np.int64))
    with open(os.path.join(root, "a_file"), "w") as f:
        f.write("x")
    _teacher_variants(root)
    _hf_tokenizer(os.path.join(root, "hf_tokenizer_300"), 300)
    return root


def _hf_tokenizer(folder, size):
    """A word-level Hugging Face tokenizer of ``size`` ids (the last one is EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(size - 1)}
    vocab["<eos>"] = size - 1
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>").save_pretrained(folder)


def _argv(case: BadInput, assets: str) -> List[str]:
    return [a.replace("{assets}", assets) for a in case.argv]


class _ComputeStarted(AssertionError):
    pass


def _main_in_process(argv, monkeypatch, capsys):
    """pretrain_let.main(argv) in this process; fails if the process group or the model is built."""
    import megatron_let.model.llama as llama
    import megatron_let.runtime.device as device

    import pretrain_let

    def forbidden(*_a, **_k):
        raise _ComputeStarted("compute started: the preflight let a bad input through")

    monkeypatch.setattr(device, "initialize_distributed", forbidden)
    monkeypatch.setattr(llama, "build_student", forbidden)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    capsys.readouterr()
    try:
        rc = pretrain_let.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert lines, err
    return lines[-1]


@pytest.mark.parametrize("case", BAD_INPUT_CASES, ids=[c.name for c in BAD_INPUT_CASES])
def test_bad_input_fails_before_compute_as_run_and_dry_run(case, assets, monkeypatch, capsys):
    argv = _argv(case, assets)
    results = {}
    for mode, extra in (("run", []), ("dry-run", ["--dry-run"])):
        rc, out, err = _main_in_process(argv + extra, monkeypatch, capsys)
        assert rc == 2, (mode, rc, out[-2000:], err[-2000:])
        line = _error_line(err)
        assert re.search(case.expected, line), (mode, line)
        assert "iteration" not in out and "dry run OK" not in out, out
        results[mode] = line
    assert results["run"] == results["dry-run"]  # one preflight, one message


def test_bad_input_exit_code_in_a_real_process(assets):
    case = next(c for c in BAD_INPUT_CASES if c.name == "token-ids-beyond-vocab")
    # (the dry run's exit code in a real process: tests/test_dry_run.py)
    proc = run_pretrain(_argv(case, assets), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(case.expected, proc.stderr.splitlines()[-1]), proc.stderr[-3000:]
    assert "iteration" not in proc.stdout


def test_global_batch_not_divisible_under_torchrun():
    proc = run_pretrain(BASE + MOCK + ["--global-batch-size", "6"], nproc=2, check=False)
    assert proc.returncode != 0
    assert "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2" \
        in proc.stderr
    assert "iteration        1" not in proc.stdout


# ---------------------------------------------------------------------------------------------
# warnings (the run goes on) and the checks' building blocks
# ---------------------------------------------------------------------------------------------


def _warnings_before_compute(argv, monkeypatch, capsys):
    """Run argv in-process up to compute (the hook stops it there); return its stderr warnings,
    and check the dry run prints the same ones."""
    with pytest.raises(_ComputeStarted):
        _main_in_process(argv, monkeypatch, capsys)
    err = capsys.readouterr().err
    run = [line for line in err.splitlines() if "warning:" in line]
    rc, out, err = _main_in_process(argv + ["--dry-run"], monkeypatch, capsys)
    assert rc == 0 and "dry run OK" in out
    assert [line for line in err.splitlines() if "warning:" in line] == run
    return run


def test_repeated_data_warns(assets, monkeypatch, capsys):
    # in_range: 15 documents x 40 tokens = 600 tokens; split 969,30,1 gives the train split
    # ~96.9% of them, ~18 samples of 32 tokens; 20 steps x 2 samples = 40 samples ~ 2.2 epochs
    argv = BASE + NULL_DATA + [f"{assets}/in_range_text_document", "--train-iters", "20"]
    warnings = _warnings_before_compute(argv, monkeypatch, capsys)
    expected = 600 * 0.969 / 32
    assert len(warnings) == 1, warnings
    assert (f"the run repeats its data: about 40 training samples of --seq-length 32 are drawn "
            f"from --data-path '{assets}/in_range_text_document', whose train split holds about "
            f"{expected:,.0f} ({40 / expected:.1f} epochs)") in warnings[0]
    # 8 steps = 16 samples < 18: no warning
    argv = BASE + NULL_DATA + [f"{assets}/in_range_text_document", "--train-iters", "8"]
    assert _warnings_before_compute(argv, monkeypatch, capsys) == []


def test_low_disk_space_warns(assets, tmp_path, monkeypatch, capsys):
    import megatron_let.training.preflight as preflight

    monkeypatch.setattr(preflight, "free_bytes", lambda path: 1000)
    argv = BASE + MOCK + ["--save", str(tmp_path / "ck"), "--save-interval", "1"]
    warnings = _warnings_before_compute(argv, monkeypatch, capsys)
    assert len(warnings) == 1 and "0.00 GiB free on its filesystem, but 2 checkpoint(s) of about" \
        in warnings[0], warnings
    assert not (tmp_path / "ck").exists()  # the probe creates nothing


def test_checkpoint_size_estimate_against_a_saved_checkpoint(megatron_single_process, tmp_path):
    """The free-space warning's estimate against the bytes of a real checkpoint of the same run."""
    from megatron_let.training.arguments import parse_args
    from megatron_let.training.preflight import checkpoint_bytes
    from megatron_let.training.trainer import Trainer

    # one step: Adam moments exist only after the first update
    cfg = parse_args(BASE + MOCK + ["--train-iters", "1", "--save", str(tmp_path / "ck")])
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.train()
    trainer.close()
    saved = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "ck")
                for f in fs)
    estimate = checkpoint_bytes(cfg.model, 1, bf16=False)
    assert 0.8 * saved <= estimate <= 1.2 * saved, (estimate, saved)
    assert trainer.preflight.checkpoint_bytes == estimate


def test_teacher_load_refuses_missing_tensors_from_transformers_loading_info(assets, monkeypatch):
    """Behind the preflight's meta-device check, HFTeacher.load reads transformers' own loading
    info: with the preflight check unable to decide (an architecture meta loading cannot build),
    a missing tensor is still an error, not a random initialisation."""
    import megatron_let.teacher.hf_teacher as hf
    import megatron_let.teacher.inspection as inspection

    monkeypatch.setattr(inspection, "check_weights_present", lambda *a, **k: None)
    with pytest.raises(ValueError, match=r"lacks 1 of its \d+ weight tensors "
                                         r"\(model\.layers\.1\.mlp\.up_proj\.weight\)"):
        hf.HFTeacher.load(hf.TeacherConfig(path=os.path.join(assets, "teacher_missing")))
    teacher = hf.HFTeacher.load(hf.TeacherConfig(path=os.path.join(assets, "teacher")))
    assert teacher.num_layers == 3  # the complete folder loads


def test_sampled_scan_is_bounded_and_exact_when_the_file_fits(tmp_path):
    from megatron_let.data.indexed import sampled_token_range

    tokens = np.full(100_000, 7, dtype=np.uint16)
    tokens[0], tokens[-1], tokens[50_000] = 3, 900, 901  # start, end and a middle outlier
    prefix = _indexed(str(tmp_path / "big"), [tokens[:50_000], tokens[50_000:]])
    assert sampled_token_range(prefix) == (3, 901, True)  # 200 KB < budget: whole file
    lo, hi, exact = sampled_token_range(prefix, budget_bytes=4096, windows=8)
    # 8 windows of 256 tokens from 0 to the end: the first and last token are always read
    assert (lo, exact) == (3, False) and hi in (900, 901)


def test_preprocess_records_dataset_metadata(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = [[5, 6, 7], [150, 3], [199, 0, 1, 2]]
    result = _preprocess(str(tmp_path), "meta", 200, docs)
    prefix = result.output_prefixes["text"]
    with open(prefix + ".meta.json") as f:
        meta = json.load(f)
    ds = IndexedDataset(prefix)  # megatron-core's reader: the reference
    stored = np.concatenate([ds[i] for i in range(len(ds))])
    assert meta["max_token_id"] == int(stored.max()) == 199
    assert meta["min_token_id"] == int(stored.min()) == 0
    assert meta["num_tokens"] == stored.size == 9
    assert meta["num_documents"] == len(ds) == 3
    assert (meta["tokenizer_type"], meta["vocab_size"], meta["dtype"]) == ("NullTokenizer", 200,
                                                                            "uint16")


def test_preprocess_names_file_and_line(tmp_path):
    from megatron_let.data.indexed import preprocess_jsonl

    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"text": "1 2"}\n\n{"text": "caf\xe9"}\n')
    out_of_range = tmp_path / "ids.jsonl"
    out_of_range.write_text('{"text": "1 2"}\n{"text": "3 400"}\n')
    for path, message in ((bad_utf8, r"latin1\.jsonl line 3: not valid UTF-8 \(byte 0xe9"),
                          (out_of_range, r"ids\.jsonl line 2: field 'text': NullTokenizer: id 400 is "
                                         r"outside \[0, 200\)")):
        with pytest.raises(ValueError, match=message):
            preprocess_jsonl(str(path), str(tmp_path / "out"), "NullTokenizer", None, vocab_size=200,
                             log_stream=None)
        assert not list(tmp_path.glob("out_*"))  # partial outputs removed


def test_stale_or_foreign_dataset_metadata_warns(tmp_path):
    from megatron_let.training.preflight import check_dataset_ids

    result = _preprocess(str(tmp_path), "d", 300, [[1, 2, 3], [4, 5, 150]])
    prefix = result.output_prefixes["text"]
    warnings = []
    check = check_dataset_ids(prefix, None, 200, 256, "--vocab-size 200", warnings, 1 << 20)
    assert (check.max_id, check.id_source) == (150, f"recorded in {prefix}.meta.json")
    assert warnings == [f"--data-path {prefix!r} was tokenized with a vocabulary of 300 ids "
                        "(NullTokenizer) but the run's is 200 (--vocab-size 200)"]
    with open(prefix + ".meta.json") as f:
        meta = json.load(f)
    meta.update(num_tokens=99, max_token_id=0)  # no longer describes the .bin
    with open(prefix + ".meta.json", "w") as f:
        json.dump(meta, f)
    warnings = []
    check = check_dataset_ids(prefix, None, 300, 384, "--vocab-size 300", warnings, 1 << 20)
    assert (check.max_id, check.id_source) == (150, "full scan of the .bin")  # the real maximum
    assert len(warnings) == 1 and "describes 99 tokens but" in warnings[0] and "stale" in warnings[0]


def test_preprocess_memory_is_bounded_per_line(tmp_path):
    """A line above --max-line-bytes is refused with its number before it is held in memory
    (tokenizing it would take a few tens of times its size); shorter lines are processed."""
    import subprocess
    import sys

    from launch import ROOT, base_env

    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        f.write('{"text": "1 2"}\n')
        f.write('{"text": "' + "7 " * (12 * 2**20) + '"}\n')  # a 24 MiB line
        f.write('{"text": "3"}\n')
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "1 2"}\n{"text": "' + "7 " * 300_000 + '"}\n')  # 600 KB: under 1 MiB

    def peak(path, out):
        """(exit code, last stderr line, peak RSS in MiB) of the tool in a fresh process."""
        probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, "
                 "text=True); print(p.returncode); print((p.stderr.strip().splitlines() or [''])[-1]); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        cmd = [sys.executable, "-c", probe, sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
               "--input", str(path), "--output-prefix", str(tmp_path / out), "--tokenizer-type",
               "NullTokenizer", "--vocab-size", "200", "--max-line-bytes", str(2**20)]
        lines = subprocess.run(cmd, capture_output=True, text=True, env=base_env(), timeout=300,
                               check=True).stdout.splitlines()
        return int(lines[0]), lines[1], int(lines[2]) / 1024

    rc, err, big_peak = peak(big, "big")
    assert rc == 1 and err == (f"preprocess_data.py: error: {big} line 2: longer than --max-line-bytes "
                               "1048576 (1 MiB); tokenizing one line takes a few tens of times its size "
                               "in memory: split the document, or raise --max-line-bytes if the machine "
                               "has the memory"), err
    assert not list(tmp_path.glob("big_*"))  # partial outputs removed
    rc, err, small_peak = peak(small, "small")
    assert rc == 0, err
    assert big_peak < small_peak + 16, (big_peak, small_peak)  # the 24 MiB line was never read whole
