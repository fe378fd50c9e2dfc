"""How much the teacher's BOS convention matters on packed training windows.

Text is tokenized with the teacher's own tokenizer the way ``tools/preprocess_data.py
--append-eod`` does (no special tokens, the EOS id after every document), concatenated, and cut
into consecutive windows of ``seq_length + 1`` tokens, as megatron-core's GPT dataset packs them
(most windows start in the middle of a document); ``num_windows`` of them, evenly spread over the
text, are scored. Each window is scored twice, with the teacher's
BOS prepended (``TeacherConfig.bos=True``, the default) and without (``--no-teacher-bos``):

* NLL: mean next-token cross entropy of the teacher over the window's ``seq_length`` labels, and
  the same over the first 16 positions only (where the missing BOS hurts most);
* cosine: mean cosine similarity, over all positions, between the two runs' final hidden states
  (the tensor LET aligns the student to).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import torch
from transformers import AutoTokenizer

from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig

__all__ = ["BosFidelity", "read_documents", "pack_windows", "measure_bos_fidelity", "to_markdown"]

HEAD_POSITIONS = 16


@dataclasses.dataclass
class BosFidelity:
    teacher: str
    model_type: str
    bos_token_id: Optional[int]
    windows: int
    seq_length: int
    nll_with_bos: float
    nll_without_bos: float
    head_nll_with_bos: float  # first HEAD_POSITIONS positions of each window
    head_nll_without_bos: float
    hidden_cosine: float  # mean cosine of final hidden states, with vs without BOS


def read_documents(paths: Sequence[str], text_key: str = "text") -> List[str]:
    """Documents from ``.jsonl`` files (one JSON object per line, ``text_key`` field) or plain
    text files (one document each)."""
    docs = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"text file {path} does not exist")
        if p.suffix in (".jsonl", ".json"):
            for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    docs.append(str(json.loads(line)[text_key]))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno} has no {text_key!r} field: {e}") from e
        else:
            docs.append(p.read_text(encoding="utf-8"))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"no text in {list(paths)}")
    return docs


def pack_windows(token_docs: Iterable[Sequence[int]], eod: int, seq_length: int,
                 num_windows: int) -> torch.Tensor:
    """``[num_windows, seq_length + 1]`` windows of the EOD-joined documents, cut consecutively
    from the whole stream as the GPT dataset does, ``num_windows`` of them evenly spread."""
    stream: List[int] = []
    for ids in token_docs:
        stream.extend(int(i) for i in ids)
        stream.append(eod)
    total = len(stream) // (seq_length + 1)
    if total < num_windows:
        raise ValueError(
            f"the text has {len(stream)} tokens, fewer than {num_windows} windows of "
            f"{seq_length + 1}: pass more text or lower --num-windows / --seq-length"
        )
    windows = torch.tensor(stream[: total * (seq_length + 1)], dtype=torch.long).view(total, -1)
    pick = torch.linspace(0, total - 1, num_windows).round().long()
    return windows[pick]


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross entropy, fp32 (chunked by row to bound the fp32 copy of a big vocab)."""
    return torch.cat([
        torch.nn.functional.cross_entropy(logits[i].float(), labels[i], reduction="none")[None]
        for i in range(logits.shape[0])
    ])


def measure_bos_fidelity(teacher_path: str, texts: Sequence[str], seq_length: int = 512,
                         num_windows: int = 8, device: str = "cpu",
                         dtype: str = "auto") -> BosFidelity:
    """Score ``num_windows`` packed windows of ``texts`` with and without the teacher's BOS."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_path, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {teacher_path} has no EOS token to join documents with")
    with_bos = HFTeacher.load(TeacherConfig(path=teacher_path, dtype=dtype, bos=True), device)
    if with_bos.bos_token_id is None:
        raise ValueError(
            f"the tokenizer in {teacher_path} adds no BOS token: there is nothing to compare"
        )
    # the same weights, read without the prefix
    without = HFTeacher(with_bos.model, dataclasses.replace(with_bos.cfg, bos=False))
    docs = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
    windows = pack_windows(docs, int(tokenizer.eos_token_id), seq_length, num_windows)
    sums = {"with": [0.0, 0.0], "without": [0.0, 0.0]}
    cosine = 0.0
    for w in windows:
        tokens, labels = w[None, :-1].to(with_bos.device), w[None, 1:].to(with_bos.device)
        hidden = {}
        for name, teacher in (("with", with_bos), ("without", without)):
            hidden[name] = teacher.hidden_states(tokens)
            # the logits from the same forward: the LM head applied to those final states (the
            # vocabulary-slice path over the whole vocabulary, checked against HF's forward first)
            if not teacher._sliced_head_ok(tokens):
                raise ValueError(f"{teacher_path}: the teacher's LM head cannot be applied alone")
            with torch.no_grad():
                logits = teacher._head_logits(hidden[name], 0, teacher.vocab_size)
            nll = _nll(logits, labels)
            del logits
            sums[name][0] += float(nll.mean())
            sums[name][1] += float(nll[:, :HEAD_POSITIONS].mean())
        cosine += float(torch.nn.functional.cosine_similarity(
            hidden["with"].float(), hidden["without"].float(), dim=-1).mean())
    n = len(windows)
    return BosFidelity(
        teacher=teacher_path, model_type=str(getattr(with_bos.model.config, "model_type", "")),
        bos_token_id=with_bos.bos_token_id, windows=n, seq_length=seq_length,
        nll_with_bos=sums["with"][0] / n, nll_without_bos=sums["without"][0] / n,
        head_nll_with_bos=sums["with"][1] / n, head_nll_without_bos=sums["without"][1] / n,
        hidden_cosine=cosine / n,
    )


def to_markdown(results: Sequence[BosFidelity]) -> str:
    head = ["teacher", "BOS id", "windows x seq", "NLL with BOS", "NLL without", "ppl with / without",
            f"NLL first {HEAD_POSITIONS} with / without", "hidden cosine (with vs without)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        lines.append("| " + " | ".join([
            f"{Path(r.teacher).name} ({r.model_type})", str(r.bos_token_id),
            f"{r.windows} x {r.seq_length}", f"{r.nll_with_bos:.3f}", f"{r.nll_without_bos:.3f}",
            f"{math.exp(r.nll_with_bos):.1f} / {math.exp(r.nll_without_bos):.1f}",
            f"{r.head_nll_with_bos:.3f} / {r.head_nll_without_bos:.3f}", f"{r.hidden_cosine:.3f}",
        ]) + " |")
    return "\n".join(lines) + "\n"
