"""HFTeacher's vocabulary-sliced logits and its BOS convention, against Hugging Face's own forward."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_teachers import BOS_ID, save_tiny_llama_teacher  # noqa: E402

from megatron_let.objectives.kd_loss import teacher_vocab_shard, vocab_shard_range  # noqa: E402
from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig  # noqa: E402
from megatron_let.teacher.inspection import teacher_bos_token_id  # noqa: E402

VOCAB = 97


def _configs() -> dict:
    """Families whose LM head output is post-processed differently (or not at all)."""
    common = dict(vocab_size=VOCAB, max_position_embeddings=64, num_hidden_layers=2)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    return {
        "llama": transformers.LlamaConfig(tie_word_embeddings=True, **llama_like, **common),
        # soft-capped logits: 30 * tanh(z / 30); a small cap so that it bends these logits
        "gemma2": transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                            num_key_value_heads=1, head_dim=16, sliding_window=4,
                                            final_logit_softcapping=0.5, **common),
        "cohere": transformers.CohereConfig(logit_scale=0.25, **llama_like, **common),  # z * scale
        "granite": transformers.GraniteConfig(logits_scaling=4.0, **llama_like, **common),  # z / s
        "opt": transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=4,
                                      word_embed_proj_dim=16, **common),  # head after project_out
        "gpt_neox": transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64,
                                               num_attention_heads=4, tie_word_embeddings=False,
                                               **common),
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, config in _configs().items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        out[name] = folder
    return out


def _reference(folder) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _ids(rows=2, seq=11, vocab=VOCAB, seed=1):
    return torch.randint(3, vocab, (rows, seq), generator=torch.Generator().manual_seed(seed))


def _head_calls(teacher: HFTeacher) -> list:
    calls = [0]
    teacher.model.get_output_embeddings().register_forward_hook(
        lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("arch", list(_configs()))
def test_sliced_logits_equal_full_logits(folders, arch):
    teacher = HFTeacher.load(TeacherConfig(path=str(folders[arch])))
    calls = _head_calls(teacher)
    ids = _ids()
    with torch.no_grad():
        full = _reference(folders[arch])(input_ids=ids).logits
    first = teacher.logits(ids, vocab_range=(0, VOCAB))  # the first sliced call checks the head once
    torch.testing.assert_close(first, full, atol=1e-5, rtol=1e-5)
    assert calls == [1]  # that check, on a few tokens
    for start, stop in [(0, 50), (50, VOCAB), (13, 14), (40, 40)]:
        got = teacher.logits(ids, vocab_range=(start, stop))
        assert got.shape == (2, 11, stop - start) and got.is_contiguous()
        torch.testing.assert_close(got, full[..., start:stop], atol=1e-5, rtol=1e-5)
    assert calls == [1]  # the full LM head never ran on the batch: only its rows did


def test_tp_shards_of_a_padded_vocabulary_cover_it(folders):
    """The ranges each TP rank asks for (vocab 97 padded to 128) tile the real ids."""
    teacher = HFTeacher.load(TeacherConfig(path=str(folders["llama"])))
    ids = _ids()
    full = teacher.logits(ids)
    assert teacher_vocab_shard(VOCAB, 128) == (0, VOCAB)  # no TP group: the whole vocabulary
    for world, padded in [(2, 128), (4, 128), (2, 194)]:
        spans = [vocab_shard_range(VOCAB, padded, world, r) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == VOCAB
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        got = torch.cat([teacher.logits(ids, vocab_range=s) for s in spans], dim=-1)
        torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    assert vocab_shard_range(VOCAB, 128, 4, 3) == (96, VOCAB)  # one real id in the last shard
    assert vocab_shard_range(30, 128, 4, 2) == (64, 64)  # all padding: empty
    with pytest.raises(ValueError, match="not divisible"):
        vocab_shard_range(VOCAB, 127, 2, 0)


def test_unknown_logit_post_processing_falls_back_to_full_logits(folders, capsys):
    """A model whose forward changes the head's output in a way the slice does not know: the
    first call notices, warns, and slices the model's own full logits instead."""

    class Doubled(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2 + 1
            return out

    model = Doubled.from_pretrained(folders["llama"]).eval()
    teacher = HFTeacher(model, TeacherConfig(path=str(folders["llama"])))
    ids = _ids()
    with torch.no_grad():
        full = model(input_ids=ids).logits
    torch.testing.assert_close(teacher.logits(ids, vocab_range=(10, 60)), full[..., 10:60])
    assert "does not reproduce Doubled's logits" in capsys.readouterr().out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_bf16_slice_keeps_the_sliced_path(folders, device, capsys):
    """In bf16 (the CUDA default) a weight slice may round differently from the full matmul in
    the last bit; the one-time check tolerates that and does not fall back to full logits."""
    teacher = HFTeacher.load(TeacherConfig(path=str(folders["gemma2"]), dtype="bfloat16"), device)
    ids = _ids().to(device)
    with torch.no_grad():
        full = teacher.model(input_ids=ids).logits.float()
    got = teacher.logits(ids, vocab_range=(30, 90))
    assert got.dtype == torch.bfloat16 and teacher._head_ok is True
    assert "does not reproduce" not in capsys.readouterr().out
    torch.testing.assert_close(got.float(), full[..., 30:90], atol=2e-2 * max(1.0, float(full.abs().max())),
                               rtol=0)


def test_bad_vocab_range(folders):
    teacher = HFTeacher.load(TeacherConfig(path=str(folders["llama"])))
    with pytest.raises(ValueError, match=r"vocab_range \(5, 98\) is outside the teacher vocabulary \[0, 97\]"):
        teacher.logits(_ids(), vocab_range=(5, 98))
    with pytest.raises(ValueError, match=r"vocab_range \(7, 6\)"):
        teacher.logits(_ids(), vocab_range=(7, 6))
    with pytest.raises(ValueError, match="pair"):
        teacher.logits(_ids(), vocab_range=(1, 2, 3))


# ---------------------------------------------------------------------------------------- BOS
@pytest.fixture(scope="module")
def bos_folders(tmp_path_factory):
    out = {}
    for kind in ("bos", "plain"):
        folder = tmp_path_factory.mktemp(f"tok_{kind}")
        save_tiny_llama_teacher(folder, vocab_size=VOCAB, hidden_size=32, num_layers=3, tokenizer=kind)
        out[kind] = folder
    return out


def test_bos_is_read_from_what_the_tokenizer_does(bos_folders, folders):
    assert teacher_bos_token_id(bos_folders["bos"]) == BOS_ID
    assert teacher_bos_token_id(bos_folders["plain"]) is None  # has a BOS token, never adds it
    assert teacher_bos_token_id(folders["llama"]) is None  # no tokenizer: config's bos is not used
    assert HFTeacher.load(TeacherConfig(path=str(bos_folders["bos"]))).bos_token_id == BOS_ID
    assert HFTeacher.load(TeacherConfig(path=str(bos_folders["bos"]), bos=False)).bos_token_id is None


@pytest.mark.parametrize("layer", [-1, 2])
def test_bos_teacher_states_equal_hf_on_bos_prefixed_input(bos_folders, layer):
    folder = bos_folders["bos"]
    teacher = HFTeacher.load(TeacherConfig(path=str(folder), layer=layer))
    ref = _reference(folder)
    ids = _ids()
    with_bos = torch.cat([torch.full((2, 1), BOS_ID), ids], dim=1)
    with torch.no_grad():
        out = ref(input_ids=with_bos, output_hidden_states=True)
    want = out.hidden_states[-1 if layer == -1 else layer][:, 1:]
    got = teacher.hidden_states(ids)
    assert got.shape == (2, 11, 32)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    if layer == -1:
        torch.testing.assert_close(teacher.logits(ids), out.logits[:, 1:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(teacher.logits(ids, vocab_range=(20, 70)), out.logits[:, 1:, 20:70],
                                   atol=1e-5, rtol=1e-5)
    # the BOS-free states differ: the prefix is not a no-op
    with torch.no_grad():
        raw = ref(input_ids=ids, output_hidden_states=True).hidden_states[-1 if layer == -1 else layer]
    assert (got - raw).abs().max() > 1e-3

    # with a (right-padding) attention mask, as the LET† token aligner passes: BOS is attended
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        out = ref(input_ids=with_bos, attention_mask=torch.cat([torch.ones(2, 1, dtype=mask.dtype), mask], 1),
                  output_hidden_states=True)
    torch.testing.assert_close(teacher.hidden_states(ids, attention_mask=mask),
                               out.hidden_states[-1 if layer == -1 else layer][:, 1:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind, bos", [("plain", True), ("bos", False)])
def test_no_bos_equals_hf_on_raw_input(bos_folders, kind, bos):
    """A tokenizer that adds no BOS, or bos=False (--no-teacher-bos): the input is used as is."""
    folder = bos_folders[kind]
    teacher = HFTeacher.load(TeacherConfig(path=str(folder), bos=bos))
    ids = _ids()
    with torch.no_grad():
        out = _reference(folder)(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(teacher.hidden_states(ids), out.hidden_states[-1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(teacher.logits(ids), out.logits, atol=1e-6, rtol=1e-6)


def test_bos_needs_one_more_position(bos_folders):
    """The tiny teachers have 128 positions: 128 tokens fit without BOS, not with it."""
    ids = _ids(rows=1, seq=128)
    with pytest.raises(ValueError, match=r"teacher input of 129 tokens \(128 \+ the BOS token\) exceeds "
                                         r"the teacher's 128 positions.*--no-teacher-bos"):
        HFTeacher.load(TeacherConfig(path=str(bos_folders["bos"]))).hidden_states(ids)
    no_bos = HFTeacher.load(TeacherConfig(path=str(bos_folders["bos"]), bos=False))
    assert no_bos.hidden_states(ids).shape == (1, 128, 32)
    with pytest.raises(ValueError, match="teacher input of 129 tokens exceeds"):
        no_bos.logits(_ids(rows=1, seq=129))


def test_bos_fidelity_measure_equals_hf_by_hand(bos_folders, tmp_path):
    """tools/teacher_bos_nll.py's numbers, recomputed here with plain transformers."""
    import importlib.util
    import json
    import os

    from megatron_let.teacher.bos_fidelity import pack_windows

    folder = bos_folders["bos"]
    g = torch.Generator().manual_seed(3)
    docs = [" ".join(f"w{int(i)}" for i in torch.randint(3, VOCAB, (n,), generator=g)) for n in (40, 25, 61)]
    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("teacher_bos_nll", os.path.join(root, "tools", "teacher_bos_nll.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "bos.json"
    assert tool.main(["--teacher-path", str(folder), "--text", str(text), "--seq-length", "20",
                      "--num-windows", "3", "--out", str(out), str(tmp_path / "bos.md")]) == 0
    got = json.loads(out.read_text())[0]
    assert "| 3 x 20 |" in (tmp_path / "bos.md").read_text()

    # reference: the same packing by hand (EOS=2 after each document), HF's forward on each window
    stream = []
    for d in docs:
        stream += [int(w[1:]) for w in d.split()] + [2]
    windows = torch.tensor(stream[: (len(stream) // 21) * 21]).view(-1, 21)
    windows = windows[torch.tensor([0, (len(windows) - 1) / 2, len(windows) - 1]).round().long()]
    assert torch.equal(pack_windows([[int(w[1:]) for w in d.split()] for d in docs], 2, 20, 3), windows)
    ref = _reference(folder)
    nll = {True: [], False: []}
    cos = []
    for w in windows:
        states = {}
        for bos in (True, False):
            ids = torch.cat([torch.tensor([BOS_ID]), w[:-1]]) if bos else w[:-1]
            with torch.no_grad():
                out = ref(input_ids=ids[None], output_hidden_states=True)
            logits, hidden = out.logits[0], out.hidden_states[-1][0]
            if bos:
                logits, hidden = logits[1:], hidden[1:]
            nll[bos].append(torch.nn.functional.cross_entropy(logits, w[1:]).item())
            states[bos] = hidden
        cos.append(torch.nn.functional.cosine_similarity(states[True], states[False], dim=-1).mean().item())
    assert got["bos_token_id"] == BOS_ID and got["windows"] == 3
    assert got["nll_with_bos"] == pytest.approx(sum(nll[True]) / 3, rel=1e-5)
    assert got["nll_without_bos"] == pytest.approx(sum(nll[False]) / 3, rel=1e-5)
    assert got["hidden_cosine"] == pytest.approx(sum(cos) / 3, rel=1e-5)
    # a teacher that adds no BOS has nothing to compare: a clear error, exit status 2
    assert tool.main(["--teacher-path", str(bos_folders["plain"]), "--text", str(text),
                      "--seq-length", "20", "--num-windows", "3"]) == 2

def test_preflight_counts_the_bos_position(bos_folders):
    """inspect_teacher (the preflight's teacher check, before any weight loads) counts BOS too."""
    from megatron_let.teacher.inspection import inspect_teacher

    with pytest.raises(ValueError, match=r"at most 128 positions .* --seq-length 128 \+ the BOS token"
                                         r".*--no-teacher-bos"):
        inspect_teacher(bos_folders["bos"], seq_length=128, bos=True)
    inspect_teacher(bos_folders["bos"], seq_length=127, bos=True)
    inspect_teacher(bos_folders["bos"], seq_length=128, bos=False)
    inspect_teacher(bos_folders["plain"], seq_length=128, bos=True)  # its tokenizer adds no BOS
