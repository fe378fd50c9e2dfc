"""HFTeacher against Hugging Face's own forward, on tiny random models of each supported family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig, resolve_dtype  # noqa: E402
from megatron_let.teacher.inspection import check_vocab_compatible, inspect_teacher  # noqa: E402

VOCAB = 97
LAYERS = 4


def _configs() -> dict:
    """Tiny configs of every family the teacher must handle (same depth and vocab)."""
    common = dict(vocab_size=VOCAB, max_position_embeddings=64)
    return {
        "llama": transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, **common,
        ),
        "gpt_neox": transformers.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, **common,
        ),
        "opt": transformers.OPTConfig(
            hidden_size=32, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=4,
            word_embed_proj_dim=32, **common,
        ),
        "qwen2": transformers.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, **common,
        ),
        "gemma3_text": transformers.Gemma3TextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, sliding_window=4, **common,
        ),
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Each tiny model saved (safetensors) into its own folder, as a user's --teacher-path would be."""
    out = {}
    for name, config in _configs().items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = folder
    return out


def _reference(folder: Path) -> torch.nn.Module:
    """The same weights loaded independently through plain transformers, fp32, eval."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    return ids, mask


ARCHS = ["llama", "gpt_neox", "opt", "qwen2", "gemma3_text"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", [-1, 2])
def test_hidden_states_match_hf(folders, arch, layer):
    teacher = HFTeacher.load(TeacherConfig(path=str(folders[arch]), layer=layer), device="cpu")
    ref = _reference(folders[arch])
    ids, mask = _batch()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    got = teacher.hidden_states(ids, attention_mask=mask)
    want = expected[-1] if layer == -1 else expected[layer]
    assert got.shape == (2, 11, teacher.hidden_size)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # Also without a mask (the training path feeds unpadded sequences).
    with torch.no_grad():
        expected = ref(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(
        teacher.hidden_states(ids), expected[-1] if layer == -1 else expected[layer], atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_explicit_last_layer_equals_default(folders, arch):
    """layer=num_layers is the same tensor as layer=-1 (HF's hidden_states[num_layers] == [-1])."""
    a = HFTeacher.load(TeacherConfig(path=str(folders[arch]), layer=-1))
    b = HFTeacher.load(TeacherConfig(path=str(folders[arch]), layer=LAYERS))
    ids, _ = _batch(3)
    assert b.layer == a.layer == LAYERS
    torch.testing.assert_close(a.hidden_states(ids), b.hidden_states(ids), atol=0, rtol=0)


def _count_calls(teacher: HFTeacher) -> tuple[list[int], list[int], list]:
    """Attach call counters to every transformer block and to the LM head."""
    model = teacher.model
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == LAYERS][0]
    counts = [0] * LAYERS
    head = [0]
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(lambda *a, i=i: counts.__setitem__(i, counts[i] + 1)))
    handles.append(
        model.get_output_embeddings().register_forward_hook(lambda *a: head.__setitem__(0, head[0] + 1))
    )
    return counts, head, handles


@pytest.mark.parametrize("arch", ARCHS)
def test_middle_layer_skips_later_layers(folders, arch):
    teacher = HFTeacher.load(TeacherConfig(path=str(folders[arch]), layer=2))
    counts, head, handles = _count_calls(teacher)
    ids, _ = _batch()
    teacher.hidden_states(ids)
    assert counts == [1, 1, 0, 0]
    assert head == [0]
    # The stopping hook is removed afterwards: a full forward runs every block once more.
    teacher.logits(ids)
    assert counts == [2, 2, 1, 1]
    assert head == [1]
    for h in handles:
        h.remove()


def test_last_layer_skips_lm_head(folders):
    teacher = HFTeacher.load(TeacherConfig(path=str(folders["llama"])))
    counts, head, _ = _count_calls(teacher)
    teacher.hidden_states(_batch()[0])
    assert counts == [1] * LAYERS
    assert head == [0]


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_logits_match_hf(folders, arch):
    teacher = HFTeacher.load(TeacherConfig(path=str(folders[arch])))
    ref = _reference(folders[arch])
    ids, mask = _batch(5)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
    got = teacher.logits(ids, attention_mask=mask)
    assert got.shape == (2, 11, VOCAB)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_frozen_eval_and_properties(folders):
    teacher = HFTeacher.load(TeacherConfig(path=str(folders["llama"])))
    model = teacher.model
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training and not any(m.training for m in model.modules())
    ref = _reference(folders["llama"])
    assert teacher.num_parameters == sum(p.numel() for p in ref.parameters())
    assert (teacher.hidden_size, teacher.num_layers, teacher.vocab_size) == (32, LAYERS, VOCAB)
    assert teacher.device == torch.device("cpu") and teacher.dtype == torch.float32
    out = teacher.hidden_states(_batch()[0])
    assert not out.requires_grad and out.grad_fn is None
    # The output can enter a student's autograd graph as a constant (no inference-mode tensor).
    student = torch.randn(2, 11, 32, requires_grad=True)
    torch.nn.functional.cosine_similarity(student, out, dim=-1).sum().backward()
    assert student.grad is not None


def test_dtype_resolution(folders):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    teacher = HFTeacher.load(TeacherConfig(path=str(folders["llama"]), dtype="bfloat16"))
    assert teacher.dtype == torch.bfloat16
    assert teacher.hidden_states(_batch()[0]).dtype == torch.bfloat16


def test_release(folders):
    teacher = HFTeacher.load(TeacherConfig(path=str(folders["llama"]), layer=2))
    assert teacher.is_loaded
    teacher.release()
    assert not teacher.is_loaded
    assert teacher._model is None and teacher._base is None and teacher._layers is None
    with pytest.raises(RuntimeError, match="teacher released"):
        teacher.hidden_states(_batch()[0])
    with pytest.raises(RuntimeError, match="teacher released"):
        teacher.logits(_batch()[0])
    assert teacher.hidden_size == 32  # metadata stays available for logging


def test_bin_weights_load_with_weights_only(folders, tmp_path):
    """A pytorch_model.bin folder loads (through torch.load(weights_only=True)) and matches."""
    src = folders["gpt_neox"]
    ref = _reference(src)
    folder = tmp_path / "bin_teacher"
    folder.mkdir()
    shutil.copy(src / "config.json", folder / "config.json")
    torch.save(ref.state_dict(), folder / "pytorch_model.bin")
    teacher = HFTeacher.load(TeacherConfig(path=str(folder)))
    ids, _ = _batch()
    with torch.no_grad():
        want = ref(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(teacher.hidden_states(ids), want, atol=1e-6, rtol=1e-6)


def test_bin_with_arbitrary_objects_is_refused(folders, tmp_path):
    """weights_only loading refuses a pickle holding a non-tensor object (it could run code)."""
    import fractions

    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(folders["gpt_neox"] / "config.json", folder / "config.json")
    torch.save({"gpt_neox.embed_in.weight": torch.zeros(VOCAB, 32), "x": fractions.Fraction(1, 3)},
               folder / "pytorch_model.bin")
    # refused while the folder is inspected (before any weight loads), naming the file
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is unreadable.*Weights only load failed"):
        HFTeacher.load(TeacherConfig(path=str(folder)))


def test_bad_inputs(folders):
    teacher = HFTeacher.load(TeacherConfig(path=str(folders["llama"])))
    with pytest.raises(ValueError, match="2-D"):
        teacher.hidden_states(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        teacher.hidden_states(torch.zeros(1, 5))
    with pytest.raises(RuntimeError, match=f"vocabulary has {VOCAB}"):  # device-side check
        teacher.hidden_states(torch.full((1, 5), VOCAB))
    with pytest.raises(ValueError, match="attention_mask shape"):
        teacher.hidden_states(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 4))


def test_inspect_teacher(folders):
    info = inspect_teacher(folders["opt"], layer=3)
    ref = _reference(folders["opt"])
    assert info.model_type == "opt"
    assert info.architectures == ["OPTForCausalLM"]
    assert (info.hidden_size, info.num_layers, info.vocab_size, info.layer) == (32, LAYERS, VOCAB, 3)
    assert info.num_parameters == sum(p.numel() for p in ref.parameters())
    assert info.weight_files == ["model.safetensors"]
    assert info.tokenizer_size is None  # no tokenizer saved in these folders
    assert inspect_teacher(folders["opt"]).layer == LAYERS


def test_inspect_teacher_errors(folders, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"does not exist \(--teacher-path\)"):
        inspect_teacher(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        inspect_teacher(empty)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(folders["llama"] / "config.json", no_weights / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights"):
        inspect_teacher(no_weights)
    with pytest.raises(ValueError, match=f"has {LAYERS} layers"):
        inspect_teacher(folders["llama"], layer=LAYERS + 1)
    with pytest.raises(ValueError, match=f"has {LAYERS} layers"):
        HFTeacher.load(TeacherConfig(path=str(folders["llama"]), layer=LAYERS + 1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTeacher.load(TeacherConfig(path=str(missing)))


def test_teacher_config_validation():
    with pytest.raises(ValueError, match="layer=0"):
        TeacherConfig(path="x", layer=0)
    with pytest.raises(ValueError, match="layer=-2"):
        TeacherConfig(path="x", layer=-2)
    with pytest.raises(ValueError, match="dtype"):
        TeacherConfig(path="x", dtype="int8")
    with pytest.raises(ValueError, match="path"):
        TeacherConfig(path="")
    assert TeacherConfig(path="x").trust_remote_code is False


def test_opt_projected_final_width(tmp_path):
    """OPT-350m-style models project the final state to word_embed_proj_dim; hidden_size follows."""
    config = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=16, max_position_embeddings=64, do_layer_norm_before=False,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    final = HFTeacher.load(TeacherConfig(path=str(tmp_path)))
    middle = HFTeacher.load(TeacherConfig(path=str(tmp_path), layer=1))
    ids, _ = _batch()
    assert final.hidden_size == 16 and final.hidden_states(ids).shape[-1] == 16
    assert middle.hidden_size == 32 and middle.hidden_states(ids).shape[-1] == 32
    assert inspect_teacher(tmp_path).hidden_size == 16


def test_check_vocab_compatible():
    assert check_vocab_compatible(49152, 49152, 49280) == 49152
    # Teacher embedding padded beyond its tokenizer (Qwen2-style): either size is accepted.
    assert check_vocab_compatible(151936, 151665, 151680, teacher_tokenizer_size=151665) == 151665
    assert check_vocab_compatible(151936, 151936, 151936, teacher_tokenizer_size=151665) == 151936
    with pytest.raises(ValueError, match=r"student vocabulary size 32000 \(padded to 32128\).*teacher's vocabulary size 49152"):
        check_vocab_compatible(49152, 32000, 32128)
    with pytest.raises(ValueError, match="tokenizer: 151665 tokens"):
        check_vocab_compatible(151936, 151000, 151040, teacher_tokenizer_size=151665)
    with pytest.raises(ValueError, match="smaller than the student"):
        check_vocab_compatible(100, 100, 99)
    with pytest.raises(ValueError, match="positive int"):
        check_vocab_compatible(0, 100, 100)
    with pytest.raises(ValueError, match="inconsistent"):
        check_vocab_compatible(100, 100, 100, teacher_tokenizer_size=101)


def test_inspect_reads_tokenizer_size(folders, tmp_path):
    """With a tokenizer in the folder, inspect_teacher reports len(tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / "with_tok"
    shutil.copytree(folders["llama"], folder)
    vocab = {f"t{i}": i for i in range(90)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    fast.add_special_tokens({"eos_token": "<eos>"})
    fast.save_pretrained(folder)
    info = inspect_teacher(folder)
    assert info.tokenizer_size == len(fast) == 91
    assert check_vocab_compatible(info.vocab_size, 91, 96, info.tokenizer_size) == 91
    json.loads((folder / "config.json").read_text())  # folder intact
