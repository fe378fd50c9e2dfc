"""Perplexity / bits per byte of a checkpoint equal an independent computation with the Hugging Face
forward of the same weights on the same token windows (in one process and with TP=2 under torchrun).
"""

import importlib.util
import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from launch import ROOT, run_script

WORDS = ("the quick brown fox jumps over lazy dog while a small cat sleeps under warm sun and birds "
         "sing über café naïve 東京 42 7").split()


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(megatron_single_process, tmp_path_factory):
    """Corpus -> sentencepiece tokenizer -> indexed dataset; random HF Llama -> imported checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_let.data.indexed import preprocess_jsonl
    from megatron_let.data.tokenizers import train_sentencepiece

    d = tmp_path_factory.mktemp("ppl")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + "." for _ in range(30)]
    with open(d / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    sp_model = train_sentencepiece([str(d / "corpus.jsonl")], str(d / "sp"), vocab_size=300)
    with open(os.devnull, "w") as devnull:
        result = preprocess_jsonl(str(d / "corpus.jsonl"), str(d / "data" / "corpus"), "SentencePieceTokenizer",
                                  sp_model, append_eod=True, log_stream=devnull)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.1)).eval()
    hf.save_pretrained(str(d / "hf"))
    tool = _tool("import_hf")
    tool.import_hf(tool.build_parser().parse_args([
        "--hf", str(d / "hf"), "--save", str(d / "ckpt"), "--seq-length", "32",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model]))
    return dict(dir=d, hf=hf, sp_model=sp_model, prefix=result.output_prefixes["text"],
                corpus_bytes=sum(len(doc.encode("utf-8")) for doc in docs), num_tokens=result.num_tokens["text"])


_REFERENCE_CACHE = {}


def _reference(setup, n=None):
    """NLL of the HF model on the dataset's windows, computed with HF's forward and torch CE."""
    if n in _REFERENCE_CACHE:
        return _REFERENCE_CACHE[n]
    from megatron_let.data.tokenizers import build_tokenizer
    from megatron_let.evaluation.perplexity import PerplexityConfig, build_eval_dataset

    tok = build_tokenizer("SentencePieceTokenizer", setup["sp_model"])
    ds = build_eval_dataset(PerplexityConfig(data_path=[setup["prefix"]]), 32, tok, "SentencePieceTokenizer",
                            setup["sp_model"])
    n = len(ds) if n is None else n
    tokens = torch.stack([torch.as_tensor(ds[i]["tokens"]) for i in range(n)]).long()
    labels = torch.stack([torch.as_tensor(ds[i]["labels"]) for i in range(n)]).long()
    with torch.no_grad():
        logits = setup["hf"](input_ids=tokens).logits
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1), reduction="sum")
    _REFERENCE_CACHE[n] = float(nll), labels.numel(), len(ds)
    return _REFERENCE_CACHE[n]


def test_perplexity_equals_hf_reference_in_process(setup):
    from megatron_let.data.tokenizers import build_tokenizer
    from megatron_let.evaluation.perplexity import PerplexityConfig, build_eval_dataset, evaluate_perplexity
    from megatron_let.export.checkpoint_io import load_student
    from megatron_let.runtime.device import ParallelConfig

    model, cfg, _ = load_student(str(setup["dir"] / "ckpt"), ParallelConfig())
    tok = build_tokenizer("SentencePieceTokenizer", setup["sp_model"])
    ds = build_eval_dataset(PerplexityConfig(data_path=[setup["prefix"]]), 32, tok, "SentencePieceTokenizer",
                            setup["sp_model"])
    results = {}
    for n in (None, 7):  # a full pass, and the first 7 windows (not a multiple of the micro-batch)
        res = results[n] = evaluate_perplexity(model, cfg, tok, ds, eval_samples=n, micro_batch_size=3)
        nll, count, total = _reference(setup, n)
        assert res.tokens == count and res.samples == (n or total)
        assert res.loss == pytest.approx(nll / count, rel=1e-5)
        assert res.ppl == pytest.approx(math.exp(nll / count), rel=1e-4)
        assert res.bits_per_byte == pytest.approx(res.nll_sum / (math.log(2) * res.bytes), rel=1e-12)
    # A full pass predicts every token but the first and the last partial window: its bytes are the
    # corpus' bytes minus those few tokens' text (EOD separators decode to nothing).
    res = results[None]
    uncovered = setup["num_tokens"] - res.tokens
    assert 0 <= setup["corpus_bytes"] - res.bytes <= 12 * uncovered
    with pytest.raises(ValueError, match="exceeds the .* windows of one pass"):
        evaluate_perplexity(model, cfg, tok, ds, eval_samples=len(ds) + 1)


def test_perplexity_cli_tp2_equals_hf_reference(setup, tmp_path):
    out = tmp_path / "ppl.json"
    run_script("tools/evaluate.py", ["--task", "ppl", "--load", str(setup["dir"] / "ckpt"),
                                     "--data-path", setup["prefix"], "--tensor-model-parallel-size", "2",
                                     "--micro-batch-size", "5", "--output", str(out)], nproc=2)
    res = json.load(open(out))
    nll, count, total = _reference(setup)
    assert res["samples"] == total and res["tokens"] == count
    assert res["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(nll / (math.log(2) * res["bytes"]), rel=1e-5)


def test_window_bytes_and_config_errors():
    from megatron_let.evaluation.perplexity import PerplexityConfig, window_bytes

    class Chars:  # a tokenizer whose ids are characters, eod = 0
        eod = 0

        @staticmethod
        def detokenize(ids):
            return "".join(chr(i) for i in ids)

    # targets "é", EOD, "ab": 2 + 0 + 2 bytes; the preceding token "x" is not counted
    assert window_bytes(Chars, [ord("x"), ord("é"), 0, ord("a")], [ord("é"), 0, ord("a"), ord("b")],
                        [1, 1, 1, 1]) == 4
    # an EOD before the window is no prefix; a target with loss_mask 0 is not counted
    assert window_bytes(Chars, [0, ord("a"), ord("b")], [ord("a"), ord("b"), ord("c")], [1, 0, 1]) == 2
    with pytest.raises(ValueError, match="--data-path is required"):
        PerplexityConfig(data_path=[]).validate()
    with pytest.raises(ValueError, match="without weights"):
        PerplexityConfig(data_path=["0.5", "a", "0.5", "b"]).validate()
    with pytest.raises(ValueError, match="--eval-split"):
        PerplexityConfig(data_path=["a"], eval_split="dev").validate()
