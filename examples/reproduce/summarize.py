#!/usr/bin/env python
"""Print the setup facts of a reproduce run as markdown, computed from its artefacts.

    python examples/reproduce/summarize.py --out-dir runs/reproduce/full \\
        --teacher-model "--num-layers 3 ..." --student-model "--num-layers 6 ..."

Reads ``corpus/manifest.json`` (sources, sizes, split), the exported teacher (``teacher/hf``:
parameters counted from its safetensors), the token count of the tokenized corpus, each run's
``wall_seconds``/``command.sh`` and ``timings.txt``. Non-embedding parameters of the student are
computed from its architecture flags with the same formula as for the teacher, which is checked
against the teacher's exported tensors (so the formula cannot silently drift from the model).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional


@dataclass
class Arch:
    """The transformer shape given by pretrain_let.py flags (LLaMA: SwiGLU MLP, RMSNorm, GQA)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int

    @classmethod
    def from_flags(cls, flags: str) -> "Arch":
        tok = shlex.split(flags)
        val: Dict[str, int] = {}
        for i, t in enumerate(tok):
            if t.startswith("--") and i + 1 < len(tok):
                try:
                    val[t[2:]] = int(tok[i + 1])
                except ValueError:
                    pass
        try:
            heads = val["num-attention-heads"]
            return cls(val["num-layers"], val["hidden-size"], val["ffn-hidden-size"], heads,
                       val.get("num-query-groups", heads))
        except KeyError as err:
            raise ValueError(f"model flags {flags!r} lack --{err.args[0]}") from None

    def non_embedding_params(self) -> int:
        """Transformer-layer parameters plus the final norm (embedding / output layer excluded)."""
        h, d = self.hidden, self.hidden // self.heads
        attn = h * h + 2 * h * self.groups * d + h * h  # q, k, v, output projection
        mlp = 3 * h * self.ffn  # gate, up, down
        return self.layers * (attn + mlp + 2 * h) + h


def hf_non_embedding_params(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors in {folder}")
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                if "embed_tokens" not in k and "lm_head" not in k:
                    n += fh.get_slice(k).get_shape().numel() if hasattr(fh.get_slice(k).get_shape(), "numel") \
                        else _numel(fh.get_slice(k).get_shape())
    return n


def _numel(shape: List[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--teacher-model", required=True, help="the teacher's model flags")
    p.add_argument("--student-model", required=True, help="the student's model flags")
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    manifest_path = out / "corpus" / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} missing: run the corpus stage first")
    manifest = json.loads(manifest_path.read_text())
    teacher, student = Arch.from_flags(a.teacher_model), Arch.from_flags(a.student_model)
    t_formula = teacher.non_embedding_params()
    t_exported = hf_non_embedding_params(out / "teacher" / "hf")
    if t_formula != t_exported:
        raise ValueError(f"teacher non-embedding parameters: formula {t_formula} != exported {t_exported}")
    s_params = student.non_embedding_params()
    t_metrics = out / "teacher" / "train" / "metrics.jsonl"
    t_valid = [r for r in map(json.loads, t_metrics.read_text().splitlines()) if r.get("split") == "valid"] \
        if t_metrics.is_file() else []
    idx = out / "data" / "corpus_text_document.idx"
    lines = ["## Setup (computed from the run's artefacts)", ""]
    lines.append(f"- corpus: {manifest['total_mb']} MB of text, `--split {manifest['megatron_split']}` "
                 "(train, valid, test documents)")
    for arc in manifest["archives"]:
        lines.append(f"  - {arc['source']}: {arc['package']} `{arc['file']}` (sha256 `{arc['sha256'][:16]}…`), "
                     f"{arc['documents']} documents, {arc['selection']}")
    for s, v in manifest["splits"].items():
        lines.append(f"  - {s}: {v['documents']} documents, {v['bytes'] / 2**20:.2f} MB, {v['by_source']}")
    if idx.is_file():
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds = IndexedDataset(str(idx)[:-4])
        lines.append(f"- tokens (sentencepiece, all splits): {int(ds.sequence_lengths.sum()):,}")
    lines.append(f"- teacher T: {teacher.layers} layers x {teacher.hidden} (FFN {teacher.ffn}, {teacher.heads} heads), "
                 f"{t_exported:,} non-embedding parameters (counted in the exported HF folder)")
    if t_valid:
        last = t_valid[-1]
        lines.append(f"  - after {last['iteration']} steps: validation loss {last['lm loss']:.4f} "
                     f"(ppl {math.exp(last['lm loss']):.1f}) on the same held-out documents as the students")
    lines.append(f"- student M: {student.layers} layers x {student.hidden} (FFN {student.ffn}, {student.heads} heads), "
                 f"{s_params:,} non-embedding parameters = {s_params / t_exported:.1f}x T")
    runs = out / "runs"
    if runs.is_dir():
        lines += ["", "| run | wall-clock (s, whole process) |", "|---|---|"]
        for d in sorted(runs.iterdir()):
            w = d / "wall_seconds"
            if w.is_file():
                lines.append(f"| {d.name} | {w.read_text().strip()} |")
    t = out / "timings.txt"
    if t.is_file():
        lines += ["", "Stage timings:", "", "```", t.read_text().rstrip(), "```"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"summarize.py: error: {err}")
