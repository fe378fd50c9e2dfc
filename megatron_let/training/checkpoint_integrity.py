"""Checkpoint integrity: a manifest of every file's size and CRC-32, verified at load.

``manifest.json`` is the last file written into ``iter_XXXXXXX.tmp`` before it is renamed, so a
checkpoint folder with a readable manifest is complete. The checksums are computed (and verified)
by all ranks in parallel, each over its share of the files; CRC-32 (zlib) runs at ~4 GB/s in memory,
so the cost is that of reading the checkpoint back once (measured in docs/reliability.md).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import zlib
from typing import Dict, List, Optional

from megatron_let.training.errors import CheckpointError, DiskFullError

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 16 * 2**20


def list_files(path: str) -> List[str]:
    """Relative paths of every file of a checkpoint folder except the manifest, sorted."""
    out = []
    for dirpath, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), path)
            if rel != MANIFEST and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def crc32_file(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


def checksum_share(path: str, rank: int = 0, world: int = 1) -> Dict[str, Dict[str, int]]:
    """``{file: {size, crc32}}`` for this rank's share (every ``world``-th file) of ``path``."""
    return {rel: {"size": os.path.getsize(os.path.join(path, rel)),
                  "crc32": crc32_file(os.path.join(path, rel))}
            for rel in list_files(path)[rank::world]}


def write_manifest(path: str, iteration: int, files: Dict[str, Dict[str, int]]) -> None:
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "iteration": iteration, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST))


def read_manifest(path: str) -> Optional[dict]:
    """The manifest of checkpoint folder ``path``; None when it has none (an older megatron_let)."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as f:
            manifest = json.load(f)
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"corrupt checkpoint manifest {file}: {e}") from None
    return manifest


def verify_share(path: str, manifest: dict, rank: int = 0, world: int = 1,
                 checksums: bool = True) -> List[str]:
    """Problems (one line each, naming the file) with this rank's share of the manifest's files.

    ``checksums=False`` only compares sizes (a cheap completeness test)."""
    problems = []
    for rel in sorted(manifest["files"])[rank::world]:
        want = manifest["files"][rel]
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            problems.append(f"{file} is missing")
            continue
        size = os.path.getsize(file)
        if size != want["size"]:
            problems.append(f"{file} has {size} bytes, the manifest says {want['size']} (truncated?)")
        elif checksums and crc32_file(file) != want["crc32"]:
            problems.append(f"{file} fails its CRC-32 check (corrupted bytes)")
    return problems


def is_complete(path: str) -> bool:
    """A folder that can be offered as a fallback: a manifest whose files all exist with the right
    sizes, or (older checkpoints without manifest) a readable dist_checkpointing metadata.json."""
    if not os.path.isdir(path):
        return False
    try:
        manifest = read_manifest(path)
    except CheckpointError:
        return False
    if manifest is None:
        try:
            with open(os.path.join(path, "metadata.json")) as f:
                json.load(f)
            return True
        except (OSError, ValueError):
            return False
    return not verify_share(path, manifest, checksums=False)


def check_metadata_json(path: str) -> None:
    """dist_checkpointing's own metadata.json: unreadable means a raw traceback deep in its loader."""
    file = os.path.join(path, "metadata.json")
    try:
        with open(file) as f:
            config = json.load(f)
        if not isinstance(config, dict) or "sharded_backend" not in config:
            raise ValueError("no 'sharded_backend' entry")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint file {file}: {e}") from None


_DISK_FULL_TEXT = ("no space left on device", "unexpected pos", "disk quota exceeded")


def _is_disk_full(exc: BaseException, seen=None) -> bool:
    seen = seen or set()
    if exc is None or id(exc) in seen:
        return False
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(t in str(exc).lower() for t in _DISK_FULL_TEXT):
        return True
    # torch.distributed.checkpoint's CheckpointException keeps the per-rank exceptions in .failures
    failures = getattr(exc, "failures", None)
    nested = [f[0] if isinstance(f, tuple) else f  # (exception, traceback) pairs
              for f in (failures.values() if isinstance(failures, dict) else [])]
    return any(_is_disk_full(e, seen) for e in [exc.__cause__, exc.__context__, *nested])


def disk_full_error(exc: BaseException, path: str) -> Optional[DiskFullError]:
    """A DiskFullError naming ``path`` and the free space when ``exc`` is an out-of-space error."""
    if not _is_disk_full(exc):
        return None
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        free = f"{shutil.disk_usage(probe or '.').free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:  # a CheckpointException: report the rank's error
        inner = next(iter(failures.values()))
        exc = inner[0] if isinstance(inner, tuple) else inner
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return DiskFullError(errno.ENOSPC,
                         f"disk full while saving checkpoint {path} ({free} there; {first}): free "
                         "space or point --save at a larger file system")
