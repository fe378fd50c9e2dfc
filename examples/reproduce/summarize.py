#!/usr/bin/env python
"""Print the setup facts of a reproduce run as markdown, computed from its artefacts.

    python examples/reproduce/summarize.py --out-dir runs/reproduce/full \\
        --teacher-model "--num-layers 3 ..." --student-model "--num-layers 6 ..."

Reads ``corpus/manifest.json`` (sources, sizes), ``mixes/*/manifest.json`` (the training sets),
the exported teachers (``teachers/*/hf``: parameters counted from their safetensors), the token
counts of the tokenized sets, the runs' ``wall_seconds`` and ``timings.txt``. Non-embedding parameters of the student are
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
    s_params = student.non_embedding_params()
    lines = ["## Setup (computed from the run's artefacts)", ""]
    lines.append(f"- corpus: {manifest['total_mb']} MB of text (train, valid, test documents: "
                 f"{manifest['megatron_split']})")
    for arc in manifest["archives"]:
        rec = arc.get("recorded")
        changed = "" if rec is None or arc.get("matches_record", True) else (
            f"; **not the recorded archive** `{rec['file']}` (sha256 `{rec['sha256'][:16]}…`) of the "
            "committed results (ALLOW_CHANGED_ARCHIVES=1)")
        lines.append(f"  - {arc['source']}: {arc['package']} `{arc['file']}` (sha256 `{arc['sha256']}`), "
                     f"{arc['documents']} documents, {arc['selection']}{changed}")
    lines.append("- training sets (examples/reproduce/make_mixes.py; the training documents dealt alternately "
                 "into halves A and B):")
    for mix in sorted((out / "mixes").glob("*/manifest.json")):
        m = json.loads(mix.read_text())
        tokens = ""
        idx = out / "data" / mix.parent.name / "corpus_text_document.idx"
        if idx.is_file():
            from megatron.core.datasets.indexed_dataset import IndexedDataset

            ds = IndexedDataset(str(idx)[:-4])
            tokens = f", {int(ds.sequence_lengths.sum()):,} tokens in all splits"
        sp = m["splits"]
        lines.append(f"  - {mix.parent.name}: half {m['half']}, train {sp['train']['documents']} documents "
                     f"{sp['train']['bytes'] / 2**20:.2f} MB {sp['train']['by_source']}; held out "
                     f"{sp['valid']['documents']} valid / {sp['test']['documents']} test documents "
                     f"(`--split {m['megatron_split']}`){tokens}")
    for name in ("same", "disjoint"):
        folder = out / "teachers" / name
        if not (folder / "hf").is_dir():
            continue
        t_exported = hf_non_embedding_params(folder / "hf")
        if t_formula != t_exported:
            raise ValueError(f"teacher non-embedding parameters: formula {t_formula} != exported {t_exported}")
        t_metrics = folder / "train" / "metrics.jsonl"
        t_valid = [r for r in map(json.loads, t_metrics.read_text().splitlines()) if r.get("split") == "valid"] \
            if t_metrics.is_file() else []
        data = "student_all (the students' documents)" if name == "same" else \
            "teacher_disjoint (no document of any student)"
        lines.append(f"- teacher `{name}`: {teacher.layers} layers x {teacher.hidden} (FFN {teacher.ffn}, "
                     f"{teacher.heads} heads), {t_exported:,} non-embedding parameters (counted in the exported "
                     f"HF folder), trained on {data}")
        if t_valid:
            last = t_valid[-1]
            lines.append(f"  - after {last['iteration']} steps: validation loss {last['lm loss']:.4f} "
                         f"(ppl {math.exp(last['lm loss']):.1f}) on its evaluation windows of the held-out "
                         "documents")
    lines.append(f"- student M: {student.layers} layers x {student.hidden} (FFN {student.ffn}, {student.heads} heads), "
                 f"{s_params:,} non-embedding parameters = {s_params / t_formula:.1f}x T")
    walls = sorted((out / "runs").glob("*/*/*/wall_seconds")) if (out / "runs").is_dir() else []
    if walls:
        secs = [int(w.read_text().strip()) for w in walls]
        lines.append(f"- {len(walls)} student runs, {sum(secs) / 3600:.2f} h of process wall-clock in all "
                     f"(median {sorted(secs)[len(secs) // 2]} s per run, {min(secs)}–{max(secs)} s; runs "
                     "shared the cores, so these are not speed measurements)")
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
