#!/usr/bin/env python
"""Cut the reproduction corpus into the training sets of the seed study (docs/results.md).

    python examples/reproduce/make_mixes.py --corpus runs/reproduce/full/corpus --out runs/reproduce/full/mixes

The training documents of each source (in build_corpus.py's (source, path) order) are dealt
alternately into two halves, A and B, so the halves share no document but have the same make-up.
Three training sets are written, each with its own held-out documents:

  student_all       half A of every source (natural proportions; mostly Linux kernel docs).
                    Held out: every valid/test document.
  student_pyshake   half A of python-docs and shakespeare only: another corpus mix (no kernel docs).
                    Held out: the valid/test documents of those two sources.
  teacher_disjoint  half B of every source: a teacher that never saw a document any student trains
                    on (the paper's teacher, SmolLM, was also trained on other text).

The same-data teacher trains on student_all itself (every student text of either mix is in it).

Each set is a folder with ``corpus.jsonl`` (train, then valid, then test documents) and
``manifest.json`` (document counts per split and source, bytes, and ``megatron_split``: the
``--split`` string that makes the trainer's valid/test splits exactly the held-out documents).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

SPLITS = ("train", "valid", "test")
# name -> (half of the training documents, sources; None = every source)
MIXES: Dict[str, tuple] = {
    "student_all": ("A", None),
    "student_pyshake": ("A", ("python-docs", "shakespeare")),
    "teacher_disjoint": ("B", None),
}


def read_jsonl(path: Path) -> List[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def halves(train: Sequence[dict]) -> Dict[str, List[dict]]:
    """Deal each source's training documents alternately into halves A and B (order kept)."""
    out: Dict[str, List[dict]] = {"A": [], "B": []}
    seen: Dict[str, int] = {}
    for doc in train:
        i = seen.get(doc["source"], 0)
        seen[doc["source"]] = i + 1
        out["A" if i % 2 == 0 else "B"].append(doc)
    return out


def build_mixes(corpus: Path, out: Path, names: Sequence[str] = tuple(MIXES)) -> Dict[str, dict]:
    """Write the requested sets under ``out`` (only those: a single-source corpus has no
    ``student_pyshake`` and need not); returns their manifests. The disjointness of the teacher's
    set from every student set is checked on all sets the corpus can make, written or not."""
    unknown = [n for n in names if n not in MIXES]
    if unknown:
        raise ValueError(f"unknown mix {unknown}: choose from {list(MIXES)}")
    docs = {}
    for split in SPLITS:
        path = corpus / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run examples/reproduce/build_corpus.py first")
        docs[split] = read_jsonl(path)
    half = halves(docs["train"])
    manifests = {}
    train_docs = {}  # name -> its training documents' (source, path), for the disjointness check
    for name in MIXES:
        which, sources = MIXES[name]
        keep = (lambda d: True) if sources is None else (lambda d, s=frozenset(sources): d["source"] in s)
        train_docs[name] = {(d["source"], d["path"]) for d in half[which] if keep(d)}
        if name not in names:
            continue
        parts = {"train": [d for d in half[which] if keep(d)],
                 "valid": [d for d in docs["valid"] if keep(d)],
                 "test": [d for d in docs["test"] if keep(d)]}
        for split, lst in parts.items():
            if not lst:
                raise ValueError(f"mix {name}: no {split} documents (sources {sources}) in {corpus}")
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "corpus.jsonl", "w", encoding="utf-8") as fh:
            for split in SPLITS:
                for d in parts[split]:
                    fh.write(json.dumps(d) + "\n")
        manifest = {
            "half": which, "sources": sorted({d["source"] for d in parts["train"]}),
            "megatron_split": ",".join(str(len(parts[s])) for s in SPLITS),
            "splits": {s: {"documents": len(parts[s]),
                           "bytes": sum(len(d["text"].encode("utf-8")) for d in parts[s]),
                           "by_source": dict(Counter(d["source"] for d in parts[s]))} for s in SPLITS},
        }
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        manifests[name] = manifest
        print(f"make_mixes: {name}: train {len(parts['train'])} docs "
              f"{manifest['splits']['train']['bytes'] / 2**20:.2f} MB {manifest['splits']['train']['by_source']}, "
              f"--split {manifest['megatron_split']}", file=sys.stderr)
    _check_disjoint(train_docs)
    return manifests


def _check_disjoint(train_docs: Dict[str, set]) -> None:
    """The disjoint teacher must share no training document with any student set."""
    teacher = train_docs.get("teacher_disjoint")
    if teacher is None:
        return
    for name, docs in train_docs.items():
        if name.startswith("student_") and teacher & docs:
            raise AssertionError(f"teacher_disjoint shares training documents with {name}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="build_corpus.py's output folder")
    p.add_argument("--out", required=True)
    p.add_argument("--mixes", nargs="+", default=list(MIXES), help=f"subset of {list(MIXES)}")
    a = p.parse_args(argv)
    build_mixes(Path(a.corpus), Path(a.out), a.mixes)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"make_mixes.py: error: {err}")
