"""Tests for the data layer: tokenizers, preprocessing, indexed-dataset validation, GPT datasets,
and the resumable data-parallel iterator.

References are independent of the code under test: the raw ``sentencepiece`` processor and the raw
``tokenizers`` library for token ids, megatron-core's own ``IndexedDataset`` reader for the written
files, and hand-computed index lists for the sampler.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_let.data.datasets import (
    DataConfig,
    PretrainingSampler,
    build_data_iterator,
    build_datasets,
    parse_split,
)
from megatron_let.data.indexed import parse_data_path, validate_indexed_dataset
from megatron_let.data.tokenizers import SPM_SPECIAL_IDS, TOKENIZER_TYPES, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the quick brown fox jumps over a lazy dog while alpha beta gamma delta héllo wörld "
    "naïve café ümlaut €uro 2024 31415 ✓ data model token"
).split()
VOCAB = 350
SEQ = 16


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _make_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 30))]
        if rng.random() < 0.3:  # some documents span lines
            words.insert(rng.randint(1, len(words) - 1), "\n")
        docs.append(" ".join(words).replace(" \n ", "\n"))
    return docs


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def corpus(work):
    docs = _make_docs(160, seed=0)
    path = work / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d, "id": i}) + "\n")
            if i == 10:
                f.write("\n")  # blank lines are skipped, not documents
    return path, docs


@pytest.fixture(scope="module")
def sp_model(work, corpus):
    path, _ = corpus
    tool = _load_tool("train_tokenizer")
    prefix = work / "tok" / "sp"
    tool.main(
        ["--input", str(path), "--model-prefix", str(prefix), "--vocab-size", str(VOCAB),
         "--model-type", "bpe", "--character-coverage", "1.0", "--max-sentences", "10000",
         "--num-threads", "1"]
    )
    return str(prefix) + ".model"


@pytest.fixture(scope="module")
def sp_reference(sp_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=sp_model)


@pytest.fixture(scope="module")
def preprocessed(work, corpus, sp_model):
    """Preprocess the corpus with 1 and 2 workers; returns {workers: prefix}."""
    path, _ = corpus
    tool = _load_tool("preprocess_data")
    out = {}
    for workers in (1, 2):
        prefix = work / f"pp{workers}" / "corpus"
        tool.main(
            ["--input", str(path), "--json-keys", "text", "--output-prefix", str(prefix),
             "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
             "--append-eod", "--workers", str(workers), "--log-interval", "50"]
        )
        out[workers] = str(prefix) + "_text_document"
    return out


@pytest.fixture(scope="module")
def sp_tok(sp_model):
    return build_tokenizer("SentencePieceTokenizer", sp_model)


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------


def test_trained_sentencepiece_layout_and_roundtrip(sp_tok, sp_reference, corpus):
    _, docs = corpus
    assert sp_tok.vocab_size == VOCAB == sp_reference.get_piece_size()
    assert (sp_tok.unk, sp_tok.bos, sp_tok.eod, sp_tok.pad) == (0, 1, 2, 3) == tuple(SPM_SPECIAL_IDS.values())
    assert sp_reference.id_to_piece(2) == "</s>" and sp_reference.id_to_piece(3) == "<pad>"
    assert sp_reference.is_byte(4) and sp_reference.id_to_piece(4) == "<0x00>"
    assert sp_tok.eos == sp_tok.eod
    for d in docs[:40] + ["unseen ✗ chars 漢字 \t tabs  and   spaces"]:
        ids = sp_tok.tokenize(d)
        assert ids == sp_reference.encode(d)
        assert sp_tok.detokenize(ids) == d  # identity normalization + byte fallback
    assert sp_reference.unk_id() not in sp_tok.tokenize("漢字")  # byte fallback, no <unk>


def test_train_tokenizer_unigram_plain_text_and_errors(work):
    import sentencepiece

    txt = work / "plain.txt"
    txt.write_text("\n".join(_make_docs(150, seed=3)), encoding="utf-8")
    tool = _load_tool("train_tokenizer")
    prefix = work / "tok" / "uni"
    tool.main(["--input", str(txt), "--model-prefix", str(prefix), "--vocab-size", "300",
               "--model-type", "unigram", "--character-coverage", "1.0", "--num-threads", "1"])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(prefix) + ".model")
    assert sp.get_piece_size() == 300 and sp.eos_id() == 2
    assert (work / "tok" / "uni.vocab").is_file()

    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        tool.main(["--input", str(work / "nope.jsonl"), "--model-prefix", str(prefix), "--vocab-size", "300"])
    bad = work / "bad_train.jsonl"
    bad.write_text('{"text": "fine line"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        tool.main(["--input", str(bad), "--model-prefix", str(prefix), "--vocab-size", "300", "--num-threads", "1"])
    with pytest.raises(ValueError, match="too small"):
        tool.main(["--input", str(txt), "--model-prefix", str(prefix), "--vocab-size", "100"])


def _check_sp_offsets(tok, sp, text):
    """Reference: sentencepiece's own pieces; '▁' stands for a space (the first piece also carries
    the dummy-prefix space); byte pieces of one character together are that character's bytes."""
    ids, spans = tok.tokenize_with_offsets(text)
    assert ids == sp.encode(text)
    pos = 0
    i = 0
    while i < len(ids):
        start, end = spans[i]
        assert 0 <= start <= end <= len(text)
        if sp.is_byte(ids[i]):
            group = [j for j in range(i, len(ids)) if spans[j] == spans[i] and sp.is_byte(ids[j])]
            raw = bytes(int(sp.id_to_piece(ids[j])[3:5], 16) for j in group)
            assert raw.decode("utf-8") == text[start:end]
            i = group[-1] + 1
        else:
            piece = sp.id_to_piece(ids[i]).replace("▁", " ")
            # the first piece also holds the dummy-prefix space sentencepiece puts before the text
            assert piece == (" " if i == 0 else "") + text[start:end]
            i += 1
        if end > start:
            assert start == pos, "spans must tile the text"
            pos = end
    assert pos == len(text)


def test_sentencepiece_offsets(sp_tok, sp_reference, corpus):
    _, docs = corpus
    for text in docs[:20] + ["héllo ✓ wörld😀 end", "  two  spaces\nnew line €"]:
        _check_sp_offsets(sp_tok, sp_reference, text)
    text = "café ✓ fox"
    ids, spans = sp_tok.tokenize_with_offsets(text)
    assert sp_tok.offsets(ids, text) == [s for s, _ in spans]
    with pytest.raises(ValueError, match="not the tokenization"):
        sp_tok.offsets(ids[:-1], text)


@pytest.fixture(scope="module")
def hf_folder(work, corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _, docs = corpus
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<pad>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    raw.train_from_iterator(docs, trainer)
    folder = work / "hf_tok"
    PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<pad>", bos_token="<s>"
    ).save_pretrained(str(folder))
    return folder


def test_huggingface_tokenizer_matches_its_library(hf_folder, corpus):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    _, docs = corpus
    tok = build_tokenizer("HuggingFaceTokenizer", str(hf_folder))
    ref = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(hf_folder), local_files_only=True)
    assert tok.vocab_size == len(hf) == ref.get_vocab_size()
    assert tok.eod == ref.token_to_id("<|endoftext|>") == hf.eos_token_id
    assert tok.pad == ref.token_to_id("<pad>") and tok.bos == ref.token_to_id("<s>")
    for text in docs[:30] + ["unseen ✗ 漢字 😀"]:
        ids = tok.tokenize(text)
        assert ids == ref.encode(text).ids == hf(text, add_special_tokens=False)["input_ids"]
        assert tok.detokenize(ids) == text

    # offsets: every token's span decodes to exactly that text (tokens sharing a span are the
    # byte pieces of one character and decode to it together), and spans tile the text.
    for text in docs[:20] + ["héllo ✓ wörld😀 end"]:
        ids, spans = tok.tokenize_with_offsets(text)
        assert ids == ref.encode(text).ids
        pos, i = 0, 0
        while i < len(ids):
            j = i
            while j + 1 < len(ids) and spans[j + 1] == spans[i]:
                j += 1
            start, end = spans[i]
            assert start == pos
            assert ref.decode(ids[i : j + 1]) == text[start:end]
            pos, i = end, j + 1
        assert pos == len(text)


def test_huggingface_tokenizer_pickles(hf_folder):
    import pickle

    tok = build_tokenizer("HuggingFaceTokenizer", str(hf_folder))
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize("quick brown fox") == tok.tokenize("quick brown fox")


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", None, vocab_size=50)
    assert tok.vocab_size == 50 and tok.eod == 49 and tok.pad == -1
    text = " 3  17\n5 "
    assert tok.tokenize(text) == [3, 17, 5]
    assert tok.tokenize_with_offsets(text) == ([3, 17, 5], [(1, 2), (4, 6), (7, 8)])
    assert tok.detokenize([3, 17, 5]) == "3 17 5"
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("3 50")
    with pytest.raises(ValueError, match="integers"):
        tok.tokenize("3 x")
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer", None)


def test_build_tokenizer_errors(work, hf_folder):
    with pytest.raises(ValueError) as err:
        build_tokenizer("GPT2BPETokenizer", "x")
    for name in TOKENIZER_TYPES:
        assert name in str(err.value)
    missing = str(work / "missing.model")
    with pytest.raises(FileNotFoundError, match=r"missing\.model.*--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", missing)
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer", str(work / "no_folder"))
    empty = work / "empty_hf"
    empty.mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(empty))
    with pytest.raises(FileNotFoundError, match="folder"):
        build_tokenizer("HuggingFaceTokenizer", str(hf_folder / "tokenizer.json"))


# ------------------------------------------------------------------------------------------------
# Preprocessing and the indexed files
# ------------------------------------------------------------------------------------------------


def _reference_docs(sp_reference, docs):
    return [np.array(sp_reference.encode(d) + [sp_reference.eos_id()], dtype=np.int64) for d in docs]


def test_preprocess_matches_direct_tokenization(preprocessed, corpus, sp_reference):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    _, docs = corpus
    ref = _reference_docs(sp_reference, docs)
    for workers, prefix in preprocessed.items():
        ds = IndexedDataset(prefix)
        assert ds.index.dtype == np.uint16  # DType.optimal_dtype(350)
        assert len(ds) == len(docs) and len(ds.document_indices) == len(docs) + 1
        for i, expected in enumerate(ref):
            np.testing.assert_array_equal(ds[i].astype(np.int64), expected, err_msg=f"workers={workers} doc {i}")
    for ext in (".bin", ".idx"):
        assert Path(preprocessed[1] + ext).read_bytes() == Path(preprocessed[2] + ext).read_bytes()


def test_preprocess_hf_tokenizer(work, corpus, hf_folder):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer

    path, docs = corpus
    ref = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    eos = ref.token_to_id("<|endoftext|>")
    prefix = work / "pp_hf" / "c"
    _load_tool("preprocess_data").main(
        ["--input", str(path), "--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer",
         "--tokenizer-model", str(hf_folder), "--append-eod", "--workers", "2"]
    )
    ds = IndexedDataset(str(prefix) + "_text_document")
    for i in (0, 7, len(docs) - 1):
        assert ds[i].tolist() == ref.encode(docs[i]).ids + [eos]


def test_preprocess_errors(work, sp_model):
    tool = _load_tool("preprocess_data")
    base = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model]
    out = work / "pp_err" / "x"
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        tool.main(["--input", str(work / "absent.jsonl"), "--output-prefix", str(out)] + base)

    bad = work / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": broken}\n', encoding="utf-8")
    for workers in ("1", "2"):
        with pytest.raises(ValueError, match=r"bad\.jsonl line 3: not valid JSON"):
            tool.main(["--input", str(bad), "--output-prefix", str(out), "--workers", workers] + base)
        assert not Path(str(out) + "_text_document.bin").exists(), "partial output must be removed"

    nokey = work / "nokey.jsonl"
    nokey.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: missing key 'text'"):
        tool.main(["--input", str(nokey), "--output-prefix", str(out)] + base)

    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        tool.main(["--input", str(nokey), "--output-prefix", str(out), "--tokenizer-type",
                   "SentencePieceTokenizer", "--tokenizer-model", str(work / "none.model")])


def test_validate_indexed_dataset(preprocessed, corpus, sp_reference, work):
    _, docs = corpus
    ref = _reference_docs(sp_reference, docs)
    summary = validate_indexed_dataset(preprocessed[1], vocab_size=VOCAB)
    assert summary.num_documents == summary.num_sequences == len(docs)
    assert summary.num_tokens == sum(len(r) for r in ref)
    assert summary.dtype == "uint16" and not summary.multimodal
    assert summary.max_token == max(int(r.max()) for r in ref)
    with pytest.raises(ValueError, match="corrupt indexed dataset.*outside"):
        validate_indexed_dataset(preprocessed[1], vocab_size=summary.max_token)

    def damaged(name: str, fn) -> str:
        prefix = str(work / "bad_ds" / name)
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        for ext in (".bin", ".idx"):
            shutil.copy(preprocessed[1] + ext, prefix + ext)
        fn(prefix)
        return prefix

    def truncate(path: str, nbytes: int) -> None:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - nbytes)

    def patch(path: str, offset: int, data: bytes) -> None:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    cases = {
        "bin_truncated": (lambda p: truncate(p + ".bin", 2), "truncated"),
        "bin_extra": (lambda p: patch(p + ".bin", os.path.getsize(p + ".bin"), b"\0\0"), "bytes"),
        "idx_magic": (lambda p: patch(p + ".idx", 0, b"XXIDIDX"), "magic"),
        "idx_version": (lambda p: patch(p + ".idx", 9, struct.pack("<Q", 2)), "version"),
        "idx_dtype": (lambda p: patch(p + ".idx", 17, bytes([42])), "dtype code"),
        "idx_truncated": (lambda p: truncate(p + ".idx", 8), "header announces"),
        "idx_tiny": (lambda p: truncate(p + ".idx", os.path.getsize(p + ".idx") - 5), "shorter than"),
        "idx_count": (lambda p: patch(p + ".idx", 18, struct.pack("<Q", 10**15)), "header announces"),
        # second sequence pointer (after the int32 lengths) moved by one token
        "idx_pointer": (lambda p: patch(p + ".idx", 34 + 4 * len(docs) + 8, struct.pack("<q", 1)), "starts at byte"),
        # a length grown by one: pointers no longer follow, .bin too short
        "idx_length": (lambda p: patch(p + ".idx", 34 + 4 * (len(docs) - 1),
                                       struct.pack("<i", len(ref[-1]) + 1)), "truncated"),
        "idx_docs": (lambda p: patch(p + ".idx", os.path.getsize(p + ".idx") - 8, struct.pack("<q", 7)), "boundaries"),
    }
    for name, (fn, message) in cases.items():
        prefix = damaged(name, fn)
        with pytest.raises(ValueError, match=f"corrupt indexed dataset.*{message}"):
            validate_indexed_dataset(prefix)

    with pytest.raises(FileNotFoundError) as err:
        validate_indexed_dataset(str(work / "nowhere" / "ds"))
    assert "nowhere/ds" in str(err.value) and "--data-path" in str(err.value)
    assert ".idx" in str(err.value) and ".bin" in str(err.value)
    prefix = damaged("no_bin", lambda p: os.remove(p + ".bin"))
    with pytest.raises(FileNotFoundError, match=r"missing .*no_bin\.bin"):
        validate_indexed_dataset(prefix)
    with pytest.raises(FileNotFoundError, match="without extension"):
        validate_indexed_dataset(preprocessed[1] + ".bin")


def test_parse_data_path():
    assert parse_data_path(["a/b", "c"]) == [(None, "a/b"), (None, "c")]
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == [(0.3, "a"), (0.7, "b")]
    assert parse_data_path(["0.3 a 0.7 b"]) == [(0.3, "a"), (0.7, "b")]
    assert parse_data_path(["1", "only"]) == [(1.0, "only")]
    bad = {
        "empty": ([], "empty"),
        "odd": (["0.3", "a", "b"], "pairs"),
        "missing weight": (["0.3", "a", "b", "c"], "expected a weight"),
        "mixed": (["a", "0.5"], "mixes"),
        "negative": (["-1", "a"], "positive"),
        "zero": (["0", "a"], "positive"),
        "nan": (["nan", "a"], "positive"),
        "number as prefix": (["0.5", "1"], "expected a dataset prefix"),
    }
    for name, (tokens, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            parse_data_path(tokens)


# ------------------------------------------------------------------------------------------------
# GPT datasets
# ------------------------------------------------------------------------------------------------


def test_data_config_validation(preprocessed):
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("98,2") == pytest.approx([0.98, 0.02, 0.0])
    for split in ("1,2,3,4", "a,b", "1e3,1", "-1,2", "0,0,0", ""):
        with pytest.raises(ValueError, match="--split"):
            parse_split(split)
    with pytest.raises(ValueError, match="no training data"):
        DataConfig()
    with pytest.raises(ValueError, match="not both"):
        DataConfig(data_path=[preprocessed[1]], mock_data=True)
    with pytest.raises(ValueError, match="--seq-length"):
        DataConfig(mock_data=True, seq_length=0)
    with pytest.raises(ValueError, match="pairs"):
        DataConfig(data_path=["0.5", "a", "b"])
    with pytest.raises(ValueError, match="--tokenizer-type"):
        DataConfig(mock_data=True, tokenizer_type="bert")


@pytest.fixture(scope="module")
def gpt_datasets(preprocessed, sp_tok, work):
    cfg = DataConfig(data_path=[preprocessed[1]], split="90,10,0", seq_length=SEQ, seed=7,
                     data_cache_path=str(work / "cache"))
    # ask for ~1.5 epochs of the train split (90% of the tokens) so a second epoch is needed
    n_train = int(1.5 * validate_indexed_dataset(preprocessed[1]).num_tokens / SEQ)
    return build_datasets(cfg, sp_tok, n_train, 20, 0) + (n_train,)


def test_gpt_samples_are_slices_of_document_stream(gpt_datasets, corpus, sp_reference):
    train, valid, test, n_train = gpt_datasets
    assert test is None  # 0 samples requested
    _, docs = corpus
    ref = _reference_docs(sp_reference, docs)
    n_train_docs = round(0.9 * len(docs))
    for ds, doc_range, n in ((train, range(0, n_train_docs), n_train), (valid, range(n_train_docs, len(docs)), 20)):
        assert len(ds) == n
        base = ds.dataset  # megatron-core's dataset, built for one epoch
        order = np.asarray(base.document_index)
        assert sorted(order.tolist()) == list(doc_range)  # each split doc once
        stream = np.concatenate([ref[d] for d in order])
        for i in range(len(base)):
            start = int(base.shuffle_index[i]) * SEQ
            window = stream[start : start + SEQ + 1]
            sample = ds[i] if i < n else base[i]
            assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
            np.testing.assert_array_equal(sample["tokens"].numpy(), window[:-1])
            np.testing.assert_array_equal(sample["labels"].numpy(), window[1:])
            assert torch.equal(sample["loss_mask"], torch.ones(SEQ))
            assert torch.equal(sample["position_ids"], torch.arange(SEQ))
        if ds is train:  # ~1.5 epochs: the second is a permutation of the first epoch's samples
            e = len(base)
            assert e < n < 2 * e
            second = [ds.index(p) for p in range(e, 2 * e)]
            assert sorted(second) == list(range(e)) and second != list(range(e))
            for p in range(e, n, 7):
                np.testing.assert_array_equal(ds[p]["tokens"].numpy(), base[second[p - e]]["tokens"].numpy())


def test_pad_equal_to_eos_masks_nothing_and_stays_quiet(work, corpus, hf_folder):
    """SmolLM2/Llama-3 reuse EOS as pad: documents are packed, so no EOS label leaves the loss,
    and megatron-core's collision warning (it resets the pad id itself) is not shown."""
    import warnings

    from transformers import AutoTokenizer

    path, docs = corpus
    folder = work / "hf_tok_pad_eos"
    hf = AutoTokenizer.from_pretrained(str(hf_folder))
    hf.pad_token = hf.eos_token
    hf.save_pretrained(str(folder))
    tok = build_tokenizer("HuggingFaceTokenizer", str(folder))
    assert tok.pad == tok.eod
    prefix = work / "pp_pad_eos" / "c"
    _load_tool("preprocess_data").main(
        ["--input", str(path), "--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer",
         "--tokenizer-model", str(folder), "--append-eod"]
    )
    cfg = DataConfig(data_path=[str(prefix) + "_text_document"], split="1,0,0", seq_length=SEQ,
                     seed=3, data_cache_path=str(work / "cache_pad_eos"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, _, _ = build_datasets(cfg, tok, 40, 0, 0)
    assert not [w for w in caught if "pad token" in str(w.message)], [str(w.message) for w in caught]
    eos_labels = 0
    for i in range(40):
        sample = train[i]
        eos_labels += int((sample["labels"] == tok.eod).sum())
        assert torch.equal(sample["loss_mask"], torch.ones(SEQ))
    assert eos_labels > 0  # the check above covered EOS labels


def test_build_datasets_blend_mock_and_errors(preprocessed, sp_tok, work):
    cache = str(work / "cache")
    cfg = DataConfig(data_path=["0.3", preprocessed[1], "0.7", preprocessed[2]], split="90,10,0",
                     seq_length=SEQ, data_cache_path=cache)
    train, valid, _ = build_datasets(cfg, sp_tok, 100, 10, 0)
    assert len(train) == 100 and len(valid) == 10
    assert train[3]["tokens"].shape == (SEQ,)

    # "969,30,1" over 160 documents leaves the test split without documents.
    cfg = DataConfig(data_path=[preprocessed[1]], seq_length=SEQ, data_cache_path=cache)
    with pytest.raises(ValueError, match="test split .* is empty"):
        build_datasets(cfg, sp_tok, 10, 10, 10)
    with pytest.raises(ValueError, match="train_samples"):
        build_datasets(cfg, sp_tok, -1, 0, 0)
    cfg = DataConfig(data_path=[str(work / "gone" / "ds")], seq_length=SEQ, data_cache_path=cache)
    with pytest.raises(FileNotFoundError, match="--data-path"):
        build_datasets(cfg, sp_tok, 10, 0, 0)
    # unweighted blend of several prefixes = one epoch; asking for more is an error, not a short run
    cfg = DataConfig(data_path=[preprocessed[1], preprocessed[2]], split="100,0,0", seq_length=SEQ,
                     data_cache_path=cache)
    with pytest.raises(ValueError, match="give weights"):
        build_datasets(cfg, sp_tok, 10_000, 0, 0)

    null = build_tokenizer("NullTokenizer", None, vocab_size=97)
    cfg = DataConfig(mock_data=True, seq_length=SEQ, tokenizer_type="NullTokenizer", vocab_size=97)
    train, valid, test = build_datasets(cfg, null, 50, 0, 0)
    assert valid is None and test is None and len(train) == 50
    sample = train[5]
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert int(sample["tokens"].max()) < 97


def test_reset_flags_reach_samples(preprocessed, sp_tok, work):
    cfg = DataConfig(data_path=[preprocessed[1]], split="100,0,0", seq_length=SEQ, data_cache_path=str(work / "cache"),
                     reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    train, _, _ = build_datasets(cfg, sp_tok, 40, 0, 0)
    for i in range(40):
        s = train[i]
        tokens = s["tokens"]
        eod = (tokens == sp_tok.eod).nonzero().flatten().tolist()
        # reference: positions count from 0 after each EOD, no loss on EOD inputs
        expected_pos, p = [], 0
        for t in tokens.tolist():
            expected_pos.append(p)
            p = 0 if t == sp_tok.eod else p + 1
        assert s["position_ids"].tolist() == expected_pos
        assert s["loss_mask"].tolist() == [0.0 if t == sp_tok.eod else 1.0 for t in tokens.tolist()]
        assert s["attention_mask"].shape == (1, SEQ, SEQ)
        # reference mask (True = masked): future tokens and tokens of an earlier document
        doc = torch.tensor([sum(1 for e in eod if e < k) for k in range(SEQ)])
        rows, cols = torch.meshgrid(torch.arange(SEQ), torch.arange(SEQ), indexing="ij")
        assert torch.equal(s["attention_mask"][0], (cols > rows) | (doc[cols] != doc[rows]))


# ------------------------------------------------------------------------------------------------
# Sampler and iterator
# ------------------------------------------------------------------------------------------------


def test_pretraining_sampler_hand_computed():
    assert list(PretrainingSampler(20, 0, 2, 1, 2)) == [[2, 3], [6, 7], [10, 11], [14, 15], [18, 19]]
    assert list(PretrainingSampler(20, 8, 2, 0, 2)) == [[8, 9], [12, 13], [16, 17]]
    assert list(PretrainingSampler(10, 0, 3, 0, 1)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # drop last partial
    assert len(PretrainingSampler(20, 8, 2, 0, 2)) == 3
    with pytest.raises(ValueError, match="multiple"):
        PretrainingSampler(20, 3, 2, 0, 2)
    with pytest.raises(ValueError, match="outside"):
        PretrainingSampler(20, 0, 2, 2, 2)
    with pytest.raises(ValueError, match="no full micro-batch"):
        PretrainingSampler(20, 20, 2, 0, 2)


def _batches(it, n):
    return [next(it) for _ in range(n)]


def test_iterator_resume_and_dp_partition(gpt_datasets):
    train = gpt_datasets[0]
    mb, dp = 2, 2
    # resume: consumed_samples = k continues exactly where a fresh iterator is after k samples
    fresh = _batches(build_data_iterator(train, mb, 0, 1, dp, seed=0), 10)
    resumed = _batches(build_data_iterator(train, mb, 12, 1, dp, seed=0), 7)
    for a, b in zip(fresh[3:], resumed):
        assert a.keys() == b.keys() == {"tokens", "labels", "loss_mask", "position_ids"}
        for key in a:
            assert torch.equal(a[key], b[key])
    assert fresh[0]["tokens"].shape == (mb, SEQ)

    # DP=2: rank slices are disjoint and together cover positions 0..N-1 in order
    n_chunks = 6
    per_rank = [_batches(build_data_iterator(train, mb, 0, r, dp, seed=0), n_chunks) for r in range(dp)]
    rows = []
    for c in range(n_chunks):
        for r in range(dp):
            rows.extend(per_rank[r][c]["tokens"])
    expected = [train[i]["tokens"] for i in range(n_chunks * mb * dp)]
    assert all(torch.equal(a, b) for a, b in zip(rows, expected)) and len(rows) == len(expected)

    # the iterator ends after the last full chunk
    total = len(train)
    last_start = (total // (mb * dp) - 1) * (mb * dp)
    tail = list(build_data_iterator(train, mb, last_start, 0, dp, seed=0))
    assert len(tail) == 1
    with pytest.raises(ValueError, match="no dataset"):
        build_data_iterator(None, mb, 0, 0, dp, seed=0)


def test_iterator_selection_index(gpt_datasets):
    train = gpt_datasets[0]
    selection = np.array([17, 3, 250, 42, 9])
    m = len(selection)
    rows = [b["tokens"][0] for b in _batches(build_data_iterator(train, 1, 0, 0, 1, seed=5, selection_index=selection), 3 * m)]
    by_index = {int(i): train[int(i)]["tokens"] for i in selection}

    def which(row):
        hits = [i for i, t in by_index.items() if torch.equal(t, row)]
        assert len(hits) == 1
        return hits[0]

    drawn = [which(r) for r in rows]
    for c in range(3):  # each cycle is a permutation of the selection
        assert sorted(drawn[c * m : (c + 1) * m]) == sorted(selection.tolist())
    assert drawn[:m] != drawn[m : 2 * m] or drawn[m : 2 * m] != drawn[2 * m :]  # reshuffled per cycle

    # deterministic and resumable (also across DP ranks: rank 1 of 2 takes odd positions)
    again = [which(b["tokens"][0]) for b in _batches(
        build_data_iterator(train, 1, 4, 0, 1, seed=5, selection_index=selection), 3 * m - 4)]
    assert again == drawn[4:]
    odd = [which(b["tokens"][0]) for b in _batches(
        build_data_iterator(train, 1, 0, 1, 2, seed=5, selection_index=selection), 5)]
    assert odd == drawn[1:11:2]

    ordered = [which(b["tokens"][0]) for b in _batches(
        build_data_iterator(train, 1, 0, 0, 1, seed=5, selection_index=selection, shuffle_selection=False), 2 * m)]
    assert ordered == selection.tolist() * 2

    for bad, message in ((np.array([], dtype=int), "non-empty"), (np.array([0, len(train)]), "outside"),
                         (np.array([0.5]), "integer"), (np.array([[1, 2]]), "1-D")):
        with pytest.raises(ValueError, match=message):
            build_data_iterator(train, 1, 0, 0, 1, seed=5, selection_index=bad)


_DIST_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    import torch, torch.distributed as dist
    import torch.multiprocessing as mp

    def worker(rank, world, init, prefix, model, cache, out):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        from megatron_let.data import DataConfig, build_datasets, build_data_iterator, build_tokenizer
        tok = build_tokenizer("SentencePieceTokenizer", model)
        cfg = DataConfig(data_path=[prefix], split="90,10,0", seq_length=16, seed=11, data_cache_path=cache)
        train, valid, _ = build_datasets(cfg, tok, 64, 8, 0)
        it = build_data_iterator(train, 2, 0, rank, world, seed=0)
        rows = [b["tokens"].tolist() for b in (next(it) for _ in range(4))]
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"len": [len(train), len(valid)], "rows": rows,
                       "ref": [train[i]["tokens"].tolist() for i in range(16)]}, f)
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        import megatron_let.data.datasets  # import megatron-core once, then fork the ranks
        init, prefix, model, cache, out = sys.argv[1:]
        mp.start_processes(worker, args=(2, init, prefix, model, cache, out), nprocs=2, start_method="fork")
    """
)


def test_build_datasets_under_torch_distributed(preprocessed, sp_model, work):
    """Two gloo ranks: megatron-core builds on rank 0, barriers, rank 1 loads the cache."""
    script = work / "dist_data.py"
    script.write_text(_DIST_SCRIPT)
    out = work / "dist_out"
    cache = work / "dist_cache"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), f"file://{work / 'dist_init'}", preprocessed[1], sp_model, str(cache), str(out)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in range(2))
    assert r0["len"] == r1["len"] and r0["ref"] == r1["ref"]  # same dataset on both ranks
    # rank r's micro-batch c holds global positions 4c + 2r, 4c + 2r + 1
    for r, res in enumerate((r0, r1)):
        for c, batch in enumerate(res["rows"]):
            assert batch == [r0["ref"][4 * c + 2 * r], r0["ref"][4 * c + 2 * r + 1]]
