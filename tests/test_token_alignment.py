"""LET† (mismatched tokenizers): character-offset alignment of teacher states to student tokens."""

import json

import pytest
import torch

from launch import TINY_MODEL, read_metrics, run_pretrain, run_script
from megatron_let.teacher.token_alignment import map_student_to_teacher, student_token_ends

TEXT = ("the quick brown fox jumps over the lazy dog. " * 3 +
        "pack my box with five dozen liquor jugs! sphinx of black quartz, judge my vow. ") * 20


def test_mapping_hand_example():
    # student tokens end at chars 3, 7, 10, 10 (an empty token); teacher tokens [0,5) [5,10)
    assert map_student_to_teacher([3, 7, 10, 10], [(0, 5), (5, 10)]) == [0, 1, 1, 1]
    assert map_student_to_teacher([0, 1], [(0, 1), (1, 2)]) == [0, 0]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A sentencepiece student tokenizer, and a tiny Llama teacher with its own (BPE) tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_let.data.tokenizers import train_sentencepiece
    from tiny_teachers import save_tiny_llama_teacher

    d = tmp_path_factory.mktemp("mismatch")
    corpus = d / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": TEXT[i * 37:(i * 37) + 400]}) + "\n")
    spm = train_sentencepiece([str(corpus)], str(d / "student"), vocab_size=300)

    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=350, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    teacher = d / "teacher"
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    save_tiny_llama_teacher(teacher, vocab_size=len(tok))
    tok.save_pretrained(str(teacher))
    run_script("tools/preprocess_data.py", [
        "--input", str(corpus), "--output-prefix", str(d / "data"), "--tokenizer-type",
        "SentencePieceTokenizer", "--tokenizer-model", spm, "--append-eod"])
    return {"spm": spm, "teacher": str(teacher), "data": str(d / "data_text_document")}


def test_teacher_states_follow_character_spans(assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_let.data.tokenizers import build_tokenizer
    from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig
    from megatron_let.teacher.token_alignment import TokenAligner

    student = build_tokenizer("SentencePieceTokenizer", assets["spm"])
    ids = torch.tensor([student.tokenize(TEXT[:120])[:30], student.tokenize(TEXT[200:330])[:30]])
    aligner = TokenAligner(student, build_tokenizer("HuggingFaceTokenizer", assets["teacher"]))
    got = aligner.teacher_hidden(HFTeacher.load(TeacherConfig(path=assets["teacher"])), ids)
    assert got.shape == (2, 30, 48)

    # reference: HF tokenizer offsets + HF forward, char -> teacher token table built directly
    hf_tok = AutoTokenizer.from_pretrained(assets["teacher"])
    hf = AutoModelForCausalLM.from_pretrained(assets["teacher"]).eval()
    for b in range(2):
        text = student.detokenize(ids[b].tolist())
        enc = hf_tok(text, return_offsets_mapping=True, add_special_tokens=False)
        owner = {}
        for j, (s, e) in enumerate(enc["offset_mapping"]):
            for c in range(s, e):
                owner.setdefault(c, j)
        with torch.no_grad():
            states = hf(torch.tensor([enc["input_ids"]]), output_hidden_states=True).hidden_states[-1][0]
        for i in range(30):
            end = len(student.detokenize(ids[b, : i + 1].tolist()))
            j = owner[max(end - 1, 0)]
            torch.testing.assert_close(got[b, i], states[j], atol=1e-5, rtol=1e-5)


def test_let_run_with_mismatched_tokenizers(assets, tmp_path):
    metrics = str(tmp_path / "m.jsonl")
    base = TINY_MODEL + ["--objective", "let", "--teacher-path", assets["teacher"],
                         "--data-path", assets["data"], "--tokenizer-type", "SentencePieceTokenizer",
                         "--tokenizer-model", assets["spm"], "--micro-batch-size", "2",
                         "--train-iters", "2", "--split", "90,10,0", "--let-student-layer", "2"]
    proc = run_pretrain(base, check=False)
    assert proc.returncode == 2 and "differs from the teacher's vocabulary" in proc.stderr
    run_pretrain(base + ["--let-tokenizer-mismatch", "--metrics-jsonl", metrics])
    m = read_metrics(metrics)
    assert -1.0 <= m[1]["cosine similarity"] <= 1.0 and m[1]["align loss"] == pytest.approx(
        -m[1]["cosine similarity"])
