"""Hugging Face export/import: logits parity with megatron_let's forward, bit-exact round trips.

References are independent of our conversion code: Hugging Face's own ``LlamaForCausalLM`` forward
and the source safetensors files.
"""

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from launch import ROOT, TINY_MODEL, run_pretrain, run_script
from megatron_let.export.hf_import import HFImportConfig, import_hf

# The TINY_MODEL architecture of tests/launch.py, as a Hugging Face config.
TINY = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32)


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_hf(path, *, tied, seed=0, vocab=200, rope_theta=10000.0, eps=1e-5, norm_base=1.0,
                 dtype=torch.float32, arch=TINY):
    """A random HF Llama with GQA and non-trivial norm weights, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, rope_theta=rope_theta, rms_norm_eps=eps, tie_word_embeddings=tied,
                      initializer_range=0.1, eos_token_id=vocab - 1, bos_token_id=None, **arch)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(norm_base + 0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(str(path))
    return model


def _import(hf_dir, save, *extra):
    """megatron_let.export.hf_import with the settings tools/import_hf.py parses from these flags."""
    args = _tool("import_hf").build_parser().parse_args(["--hf", str(hf_dir), "--save", str(save), *extra])
    return import_hf(HFImportConfig(**vars(args)))


def _export(load, out, *extra):
    tool = _tool("export_hf")
    return tool.export(tool.build_parser().parse_args(["--load", str(load), "--out", str(out), *extra]))


def _assert_same_weights(src_dir, out_dir):
    a = load_file(os.path.join(src_dir, "model.safetensors"))
    b = load_file(os.path.join(out_dir, "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("tied,dtype", [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)],
                         ids=["untied", "tied", "untied-bf16"])
def test_import_export_round_trip_is_bit_exact(megatron_single_process, tmp_path, tied, dtype):
    src = tmp_path / "hf"
    save_tiny_hf(src, tied=tied, vocab=300, rope_theta=500.0, eps=1e-6, dtype=dtype)
    _import(src, tmp_path / "ckpt")
    _export(tmp_path / "ckpt", tmp_path / "out")
    _assert_same_weights(src, tmp_path / "out")

    cfg_src = json.load(open(src / "config.json"))
    cfg_out = json.load(open(tmp_path / "out" / "config.json"))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
                "max_position_embeddings"):
        assert cfg_out[key] == cfg_src[key], key
    assert cfg_out["rope_theta"] == 500.0
    assert cfg_out["torch_dtype"] == str(dtype).replace("torch.", "")
    assert ("lm_head.weight" in load_file(str(tmp_path / "out" / "model.safetensors"))) == (not tied)


def test_import_with_tp2_reshards_to_the_same_weights(megatron_single_process, tmp_path):
    """torchrun import at TP=2 (our own tensor slicing), merged back at TP=1 by dist_checkpointing."""
    src = tmp_path / "hf"
    save_tiny_hf(src, tied=False, vocab=300, seed=3)
    run_script("tools/import_hf.py", ["--hf", str(src), "--save", str(tmp_path / "ckpt"),
                                      "--tensor-model-parallel-size", "2"], nproc=2)
    _export(tmp_path / "ckpt", tmp_path / "out")
    _assert_same_weights(src, tmp_path / "out")


def test_shard_for_rank_pipeline_stage_and_tied_output():
    """Last pipeline stage of a tied model: local layer 0 is global layer 2, output = embedding."""
    from megatron_let.export.hf_conversion import hf_to_megatron, llama_config_from_hf, shard_for_rank

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=100, tie_word_embeddings=True, **TINY))
    cfg = llama_config_from_hf(hf.config.to_dict())
    full = hf_to_megatron(hf.state_dict(), cfg, padded_vocab_size=256)
    keys = ["decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.1.mlp.linear_fc2.weight",
            "decoder.final_layernorm.weight", "output_layer.weight"]
    local = shard_for_rank(full, keys, cfg, tp_rank=1, tp_size=2, layer_offset=2)
    torch.testing.assert_close(local[keys[0]], full["decoder.layers.2.self_attention.linear_qkv.weight"][64:], rtol=0, atol=0)
    torch.testing.assert_close(local[keys[1]], full["decoder.layers.3.mlp.linear_fc2.weight"][:, 64:], rtol=0, atol=0)
    emb = torch.cat([hf.model.embed_tokens.weight.detach(), torch.zeros(156, 64)])
    torch.testing.assert_close(local["output_layer.weight"], emb[128:], rtol=0, atol=0)


def test_tp2_trained_checkpoint_exports_with_matching_logits(megatron_single_process, tmp_path):
    """HF -> import -> 2 TP=2 training steps (resumed with --no-load-optim) -> export: the export's
    logits equal megatron_let's forward of the trained checkpoint (loaded at TP=1)."""
    from transformers import AutoModelForCausalLM

    from megatron_let.export.checkpoint_io import load_student
    from megatron_let.runtime.device import ParallelConfig

    src = tmp_path / "hf"
    save_tiny_hf(src, tied=False, norm_base=2.0, seed=5)
    _import(src, tmp_path / "imported")
    trained = tmp_path / "trained"
    proc = run_pretrain(TINY_MODEL + [
        "--objective", "baseline", "--mock-data", "--vocab-size", "200", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "2", "--load", str(tmp_path / "imported"),
        "--no-load-optim", "--no-load-rng", "--save", str(trained), "--tensor-model-parallel-size", "2",
    ], nproc=2)
    assert "resumed from" in proc.stdout and "at iteration 0" in proc.stdout
    out = tmp_path / "exported"
    proc = run_script("tools/export_hf.py", ["--load", str(trained), "--out", str(out), "--verify"])
    assert "verify: max" in proc.stdout

    # Training started from the imported weights: norms (2 +- 0.1 in the source, 1.0 at a fresh
    # init) moved by at most 2 Adam steps of lr 3e-3, but did move.
    before = load_file(os.path.join(src, "model.safetensors"))
    after = load_file(os.path.join(out, "model.safetensors"))
    assert after["model.embed_tokens.weight"].shape == (200, 64)  # unpadded rows only
    delta = (after["model.norm.weight"] - before["model.norm.weight"]).abs()
    assert 0 < delta.max() < 0.01

    model, cfg, _ = load_student(str(trained), ParallelConfig())
    hf = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).float().eval()
    ids = torch.randint(0, 200, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids, torch.arange(32).expand(3, 32), None)[..., :200]
        theirs = hf(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-4


def _tiny_bpe(folder, texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(str(folder))


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface"])
def test_export_writes_a_loadable_equivalent_tokenizer(megatron_single_process, tmp_path, kind):
    from transformers import AutoTokenizer

    from megatron_let.data.tokenizers import build_tokenizer, train_sentencepiece
    from megatron_let.export.hf_conversion import TOKENIZER_PROBES

    texts = [f"Sentence number {i}: the quick brown fox, über café — 東京 {i * 7}." for i in range(200)]
    (tmp_path / "corpus.txt").write_text("\n".join(texts), encoding="utf-8")
    if kind == "sentencepiece":
        model = train_sentencepiece([str(tmp_path / "corpus.txt")], str(tmp_path / "sp"), vocab_size=300)
        ours = build_tokenizer("SentencePieceTokenizer", model)
        args = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model]
        save_tiny_hf(tmp_path / "hf", tied=True, vocab=300)
    else:
        save_tiny_hf(tmp_path / "hf", tied=True, vocab=300)
        _tiny_bpe(tmp_path / "hf", texts)  # the HF folder carries its own tokenizer
        ours = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf"))
        args = []
    _import(tmp_path / "hf", tmp_path / "ckpt", *args)
    report = _export(tmp_path / "ckpt", tmp_path / "out")
    assert report["tokenizer"]["probe_mismatches"] == []
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    for text in (*TOKENIZER_PROBES, *texts[:5]):
        assert hf_tok.encode(text, add_special_tokens=False) == ours.tokenize(text), text
        assert hf_tok.decode(ours.tokenize(text)) == ours.detokenize(ours.tokenize(text))
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["eos_token_id"] == ours.eod == hf_tok.eos_token_id


def test_bad_inputs_raise_clear_errors(megatron_single_process, tmp_path):
    from megatron_let.export.hf_conversion import llama_config_from_hf

    base = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=100, max_position_embeddings=32)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        llama_config_from_hf({**base, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="rope type 'llama3'"):
        llama_config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="attention_bias"):
        llama_config_from_hf({**base, "attention_bias": True})
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        _import(tmp_path, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        _export(tmp_path / "missing", tmp_path / "out")
    save_tiny_hf(tmp_path / "hf", tied=False)
    with pytest.raises(ValueError, match="needs exactly TP x PP = 2 processes"):
        _import(tmp_path / "hf", tmp_path / "ckpt", "--tensor-model-parallel-size", "2")
