"""Megatron indexed datasets (``prefix.bin`` + ``prefix.idx``): validation, ``--data-path`` parsing,
and jsonl -> indexed-dataset preprocessing (the engine of ``tools/preprocess_data.py``).

``.idx`` layout written by megatron-core's ``IndexedDatasetBuilder`` (all little-endian):

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version (1)
    uint8     dtype code of the tokens in .bin (megatron.core.datasets.indexed_dataset.DType)
    uint64    S = number of sequences
    uint64    D = number of document boundaries (= number of documents + 1, starts with 0)
    int32[S]  sequence lengths (tokens)
    int64[S]  sequence byte offsets into .bin
    int64[D]  document boundaries (sequence indices; first 0, last S)
    int8[S]   sequence modes (multimodal datasets only)

The checker reads this with plain numpy and never memory-maps a file whose size disagrees with the
header, so a corrupt or truncated dataset fails with a ValueError instead of a crash deep in
megatron-core.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
# megatron-core's DType codes -> numpy dtypes (see indexed_dataset.DType).
_DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
# Chunk size (tokens) when scanning .bin for out-of-vocabulary ids.
_SCAN_CHUNK = 1 << 24
# Written by tools/preprocess_data.py beside the .bin/.idx: tokenizer, its vocabulary, the id range.
META_SUFFIX = ".meta.json"
META_FORMAT = 1
# Datasets without a .meta.json: bytes of .bin read (spread over the file) to estimate the id range.
SAMPLED_SCAN_BYTES = 16 << 20
_SAMPLED_SCAN_WINDOWS = 64


@dataclass(frozen=True)
class IndexedDatasetSummary:
    """What ``validate_indexed_dataset`` found."""

    prefix: str
    num_documents: int
    num_sequences: int
    num_tokens: int
    dtype: str
    multimodal: bool
    max_token: int | None = None  # only when a vocab check was requested


def _corrupt(prefix: str, what: str) -> ValueError:
    return ValueError(f"corrupt indexed dataset {prefix!r} (from --data-path): {what}")


def validate_indexed_dataset(prefix: str, vocab_size: int | None = None) -> IndexedDatasetSummary:
    """Check that ``prefix.idx``/``prefix.bin`` form a consistent megatron indexed dataset.

    Args:
        prefix: path prefix (without ``.bin``/``.idx``), as given in ``--data-path``.
        vocab_size: if given, also scan every token in ``.bin`` and require ids < vocab_size
            (reads the whole file; off by default).

    Returns:
        An ``IndexedDatasetSummary``.

    Raises:
        FileNotFoundError: ``prefix.idx`` or ``prefix.bin`` is missing.
        ValueError: ``"corrupt indexed dataset ..."`` for a bad header, inconsistent sizes/pointers,
            a .bin whose size disagrees with the .idx, or out-of-vocabulary tokens.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
    if missing:
        hint = ""
        if prefix.endswith((".bin", ".idx")):
            hint = f"; --data-path takes the prefix without extension, e.g. {prefix[:-4]!r}"
        raise FileNotFoundError(
            f"indexed dataset prefix {prefix!r} (from --data-path): missing {', '.join(missing)} "
            f"(need both {idx_path} and {bin_path}; create them with tools/preprocess_data.py){hint}"
        )

    idx_size = os.path.getsize(idx_path)
    bin_size = os.path.getsize(bin_path)
    if idx_size < _HEADER_BYTES:
        raise _corrupt(prefix, f"{idx_path} has {idx_size} bytes, shorter than the {_HEADER_BYTES}-byte header")
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER_BYTES)
    if header[:9] != _MAGIC:
        raise _corrupt(prefix, f"{idx_path} does not start with the index magic {_MAGIC!r}")
    (version,) = struct.unpack("<Q", header[9:17])
    if version != 1:
        raise _corrupt(prefix, f"{idx_path} has index version {version}, expected 1")
    dtype_code = header[17]
    if dtype_code not in _DTYPE_CODES:
        raise _corrupt(prefix, f"{idx_path} has unknown token dtype code {dtype_code}")
    dtype = np.dtype(_DTYPE_CODES[dtype_code])
    num_seq, num_doc_bounds = struct.unpack("<QQ", header[18:34])

    # Sizes are checked with Python ints before any array is read, so absurd counts cannot
    # trigger huge allocations or out-of-range reads.
    body = idx_size - _HEADER_BYTES
    plain = 4 * num_seq + 8 * num_seq + 8 * num_doc_bounds
    if body == plain:
        multimodal = False
    elif body == plain + num_seq:
        multimodal = True
    else:
        raise _corrupt(
            prefix,
            f"{idx_path} is {idx_size} bytes but its header announces {num_seq} sequences and "
            f"{num_doc_bounds} document boundaries ({_HEADER_BYTES + plain} bytes expected)",
        )
    if num_doc_bounds < 1:
        raise _corrupt(prefix, f"{idx_path} has no document boundaries (need at least the leading 0)")

    with open(idx_path, "rb") as f:
        f.seek(_HEADER_BYTES)
        lengths = np.fromfile(f, dtype="<i4", count=num_seq)
        pointers = np.fromfile(f, dtype="<i8", count=num_seq)
        doc_bounds = np.fromfile(f, dtype="<i8", count=num_doc_bounds)

    if num_seq and lengths.min() < 0:
        raise _corrupt(prefix, f"{idx_path} has a negative sequence length")
    byte_lengths = lengths.astype(np.int64) * dtype.itemsize
    expected_pointers = np.zeros(num_seq, dtype=np.int64)
    if num_seq > 1:
        np.cumsum(byte_lengths[:-1], out=expected_pointers[1:])
    if not np.array_equal(pointers, expected_pointers):
        bad = int(np.flatnonzero(pointers != expected_pointers)[0])
        raise _corrupt(
            prefix,
            f"sequence {bad} starts at byte {int(pointers[bad])} of {bin_path}, expected "
            f"{int(expected_pointers[bad])} from the sequence lengths",
        )
    num_tokens = int(lengths.sum(dtype=np.int64))
    if num_tokens * dtype.itemsize != bin_size:
        raise _corrupt(
            prefix,
            f"{bin_path} is {bin_size} bytes but {idx_path} describes {num_tokens} tokens of "
            f"{dtype.name} ({num_tokens * dtype.itemsize} bytes); the .bin is truncated or "
            "does not belong to this .idx",
        )
    if doc_bounds[0] != 0 or doc_bounds[-1] != num_seq or (np.diff(doc_bounds) < 0).any():
        raise _corrupt(
            prefix,
            f"{idx_path} document boundaries must rise from 0 to {num_seq} "
            f"(got first {int(doc_bounds[0])}, last {int(doc_bounds[-1])})",
        )

    max_token = None
    if vocab_size is not None and num_tokens:
        min_token, max_token = _token_range(bin_path, dtype, num_tokens)
        if max_token >= vocab_size or min_token < 0:
            raise _corrupt(
                prefix, f"{bin_path} holds token ids outside [0, {vocab_size}) (min {min_token}, max {max_token})"
            )

    return IndexedDatasetSummary(
        prefix=prefix,
        num_documents=int(num_doc_bounds) - 1,
        num_sequences=int(num_seq),
        num_tokens=num_tokens,
        dtype=dtype.name,
        multimodal=multimodal,
        max_token=max_token,
    )


def _scan_bin(bin_path: str, dtype: np.dtype, num_tokens: int) -> Iterator[np.ndarray]:
    with open(bin_path, "rb") as f:
        remaining = num_tokens
        while remaining:
            chunk = np.fromfile(f, dtype=dtype, count=min(remaining, _SCAN_CHUNK))
            remaining -= chunk.size
            yield chunk


def _token_range(bin_path: str, dtype: np.dtype, num_tokens: int) -> tuple[int, int]:
    lo, hi = None, None
    for chunk in _scan_bin(bin_path, dtype, num_tokens):
        c_lo, c_hi = int(chunk.min()), int(chunk.max())
        lo = c_lo if lo is None else min(lo, c_lo)
        hi = c_hi if hi is None else max(hi, c_hi)
    return lo, hi


def meta_path(prefix: str) -> str:
    return prefix + META_SUFFIX


def write_dataset_meta(prefix: str, meta: dict) -> str:
    """Record what a dataset was made with (``<prefix>.meta.json``), written atomically."""
    path = meta_path(prefix)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": META_FORMAT, **meta}, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_dataset_meta(prefix: str) -> dict | None:
    """The ``<prefix>.meta.json`` record, or None for datasets made before it existed.

    Raises ValueError naming the file when it is not the JSON object preprocess_data.py writes."""
    path = meta_path(prefix)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"dataset metadata {path} (beside --data-path {prefix!r}) is unreadable: {err}") from None
    required = ("max_token_id", "min_token_id", "vocab_size", "num_tokens", "num_documents")
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), int) for k in required):
        raise ValueError(
            f"dataset metadata {path} (beside --data-path {prefix!r}) lacks integer fields {list(required)}; "
            "re-create it with tools/preprocess_data.py or delete it"
        )
    return meta


def sampled_token_range(
    prefix: str, budget_bytes: int = SAMPLED_SCAN_BYTES, windows: int = _SAMPLED_SCAN_WINDOWS,
    summary: IndexedDatasetSummary | None = None,
) -> tuple[int, int, bool]:
    """(min id, max id, exact) of ``prefix.bin`` from at most ``budget_bytes`` read in ``windows``
    evenly spaced windows (the whole file when it fits: then ``exact`` is True).

    For datasets without ``.meta.json``: bounded time however large the corpus is, at the price of
    possibly missing a rare out-of-range id."""
    summary = validate_indexed_dataset(prefix) if summary is None else summary
    dtype = np.dtype(summary.dtype)
    n = summary.num_tokens
    if n == 0:
        return 0, 0, True
    data = np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(n,))
    per_window = max(1, budget_bytes // dtype.itemsize // windows)
    if per_window * windows >= n:
        return int(data.min()), int(data.max()), True
    starts = np.linspace(0, n - per_window, windows).astype(np.int64)
    lo, hi = None, None
    for start in starts:
        chunk = np.asarray(data[start:start + per_window])
        lo = int(chunk.min()) if lo is None else min(lo, int(chunk.min()))
        hi = int(chunk.max()) if hi is None else max(hi, int(chunk.max()))
    return lo, hi, False


def _as_weight(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def parse_data_path(tokens: Sequence[str]) -> list[tuple[float | None, str]]:
    """Parse Megatron's ``--data-path`` list.

    Two forms:
      * ``prefix1 prefix2 ...``: unweighted; the weight of each entry is ``None`` (megatron-core
        then blends in proportion to dataset sizes);
      * ``w1 prefix1 w2 prefix2 ...``: positive weights (normalised later by megatron-core).
    Tokens containing whitespace are split (so a single quoted string also works).

    Raises:
        ValueError: empty list, odd weighted list, a weight that is not a positive finite number,
            or a mix of the two forms.
    """
    if isinstance(tokens, str):
        tokens = [tokens]
    flat = [t for token in tokens for t in str(token).split()]
    if not flat:
        raise ValueError("--data-path is empty: give 'prefix ...' or 'weight prefix weight prefix ...'")

    if _as_weight(flat[0]) is None:
        numeric = [t for t in flat if _as_weight(t) is not None]
        if numeric:
            raise ValueError(
                f"--data-path mixes prefixes and numbers {numeric}: either list only prefixes or "
                "put a weight before every prefix ('w1 prefix1 w2 prefix2 ...')"
            )
        return [(None, p) for p in flat]

    if len(flat) % 2:
        raise ValueError(
            f"--data-path with weights needs 'weight prefix' pairs, got {len(flat)} tokens: {flat}"
        )
    pairs: list[tuple[float | None, str]] = []
    for i in range(0, len(flat), 2):
        weight_text, prefix = flat[i], flat[i + 1]
        weight = _as_weight(weight_text)
        if weight is None:
            raise ValueError(
                f"--data-path entry {i // 2}: expected a weight before {prefix!r}, got {weight_text!r}"
            )
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(
                f"--data-path weight {weight_text!r} for {prefix!r} must be a positive number "
                "(drop the dataset instead of giving it weight 0)"
            )
        if _as_weight(prefix) is not None:
            raise ValueError(
                f"--data-path entry {i // 2}: expected a dataset prefix after weight {weight_text!r}, "
                f"got the number {prefix!r}"
            )
        pairs.append((weight, prefix))
    return pairs


# ---------------------------------------------------------------------------------------------
# Preprocessing jsonl -> indexed dataset
# ---------------------------------------------------------------------------------------------

_WORKER_STATE: dict = {}


def _init_worker(tokenizer_args: tuple, json_keys: tuple, append_eod: bool, input_path: str) -> None:
    """Pool initializer: each worker builds its own tokenizer once."""
    # lazy: indexed.py stays numpy-only (data/__init__.py); tokenizers, megatron.core only to preprocess
    from megatron_let.data.tokenizers import build_tokenizer

    _WORKER_STATE["tokenizer"] = build_tokenizer(*tokenizer_args)
    _WORKER_STATE["json_keys"] = json_keys
    _WORKER_STATE["append_eod"] = append_eod
    _WORKER_STATE["input_path"] = input_path


def _encode_line(item: tuple[int, str]) -> tuple[int, dict[str, np.ndarray], int]:
    """Tokenize one jsonl line: returns (line number, {key: token ids}, bytes of the line)."""
    # lazy: indexed.py stays numpy-only (data/__init__.py); tokenizers, megatron.core only to preprocess
    from megatron_let.data.tokenizers import _json_field

    line_no, line = item
    tok = _WORKER_STATE["tokenizer"]
    out: dict[str, np.ndarray] = {}
    for key in _WORKER_STATE["json_keys"]:
        path = _WORKER_STATE["input_path"]
        text = _json_field(line, key, path, line_no)
        try:
            ids = tok.tokenize(text)
        except ValueError as err:  # e.g. NullTokenizer: an id outside its vocabulary
            raise ValueError(f"{path} line {line_no}: field {key!r}: {err}") from None
        if _WORKER_STATE["append_eod"]:
            ids = list(ids) + [tok.eod]
        arr = np.asarray(ids, dtype=np.int64)
        # the .bin dtype is sized for the vocabulary: a larger id would wrap around silently
        if arr.size and (arr.min() < 0 or arr.max() >= tok.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= tok.vocab_size)][0])
            raise ValueError(
                f"{path} line {line_no}: field {key!r} tokenizes to id {bad}, outside the "
                f"tokenizer's vocabulary [0, {tok.vocab_size})"
            )
        out[key] = arr
    return line_no, out, len(line.encode("utf-8"))


MAX_LINE_BYTES = 16 * 2**20  # --max-line-bytes default: one document's peak memory is ~35x this


def _nonblank_lines(path: str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their numbers. A line is read only up to ``max_line_bytes``: a longer
    one is refused with its number before it is held in memory (parsing and tokenizing a line
    costs a few tens of times its size)."""
    # bytes, decoded line by line, so that invalid UTF-8 is reported with its line
    with open(path, "rb") as f:
        line_no = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            line_no += 1
            if len(raw) > max_line_bytes:
                raise ValueError(
                    f"{path} line {line_no}: longer than --max-line-bytes {max_line_bytes} "
                    f"({max_line_bytes / 2**20:g} MiB); tokenizing one line takes a few tens of times "
                    "its size in memory: split the document, or raise --max-line-bytes if the "
                    "machine has the memory"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path} line {line_no}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte "
                    f"{err.start} of the line); re-encode the file as UTF-8"
                ) from None
            if line.strip():
                yield line_no, line


@dataclass(frozen=True)
class PreprocessResult:
    """Outcome of ``preprocess_jsonl``."""

    output_prefixes: dict[str, str]  # json key -> prefix of the written .bin/.idx
    num_documents: int
    num_empty_skipped: dict[str, int]
    num_tokens: dict[str, int]
    seconds: float
    max_token_id: dict[str, int] | None = None
    meta_paths: dict[str, str] | None = None


def preprocess_jsonl(
    input_path: str,
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str | None,
    vocab_size: int | None = None,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    log_interval: int = 1000,
    log_stream=sys.stderr,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> PreprocessResult:
    """Tokenize a jsonl file into megatron indexed datasets ``{output_prefix}_{key}_document``.

    One document per non-blank jsonl line (blank lines are skipped); each document is one sequence
    of the key's tokens (+ EOD with ``append_eod``). Documents with zero tokens are skipped and
    counted. Token dtype is ``DType.optimal_dtype(vocab_size)`` (uint16 below 65500 ids, else int32).

    Beside each ``.bin``/``.idx`` a ``.meta.json`` records the tokenizer, its vocabulary size and
    the id range (read by the training preflight to check ids against the run's vocabulary).

    Raises FileNotFoundError (input/tokenizer) or ValueError (bad arguments, a non-JSON or non-UTF-8
    line, a missing key, an id outside the tokenizer's vocabulary -- naming file and line) before or
    while reading; on error the partial outputs are removed.
    """
    # lazy: indexed.py stays numpy-only (data/__init__.py); tokenizers, megatron.core only to preprocess
    import multiprocessing as mp
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_let.data.tokenizers import build_tokenizer

    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"input file {input_path!r} (from --input) does not exist")
    json_keys = tuple(json_keys)
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise ValueError(f"--json-keys must be a non-empty list of distinct keys, got {list(json_keys)}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if log_interval < 1:
        raise ValueError(f"--log-interval must be >= 1, got {log_interval}")
    if max_line_bytes < 1:
        raise ValueError(f"--max-line-bytes must be >= 1, got {max_line_bytes}")
    if not output_prefix:
        raise ValueError("--output-prefix is empty")

    tokenizer_args = (tokenizer_type, tokenizer_model, vocab_size)
    tokenizer = build_tokenizer(*tokenizer_args)  # validates type/paths before any work
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    prefixes = {key: f"{output_prefix}_{key}_document" for key in json_keys}
    builders = {key: IndexedDatasetBuilder(prefixes[key] + ".bin", dtype=dtype) for key in json_keys}
    init_args = (tokenizer_args, json_keys, append_eod, input_path)
    pool = None
    empty = {key: 0 for key in json_keys}
    tokens = {key: 0 for key in json_keys}
    lo = {key: None for key in json_keys}
    hi = {key: None for key in json_keys}
    num_docs = 0
    total_bytes = 0
    t0 = time.time()
    try:
        if workers > 1:
            # Rust (HF) tokenizers warn and may deadlock if their thread pool is forked after use.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            pool = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(
                workers, initializer=_init_worker, initargs=init_args
            )
            encoded = pool.imap(_encode_line, _nonblank_lines(input_path, max_line_bytes), chunksize=64)
        else:
            _init_worker(*init_args)
            encoded = map(_encode_line, _nonblank_lines(input_path, max_line_bytes))

        for _, docs, nbytes in encoded:
            num_docs += 1
            total_bytes += nbytes
            for key, ids in docs.items():
                if ids.size == 0:
                    empty[key] += 1
                    continue
                builders[key].add_document(ids, [int(ids.size)])
                tokens[key] += int(ids.size)
                d_lo, d_hi = int(ids.min()), int(ids.max())
                lo[key] = d_lo if lo[key] is None else min(lo[key], d_lo)
                hi[key] = d_hi if hi[key] is None else max(hi[key], d_hi)
            if num_docs % log_interval == 0 and log_stream is not None:
                elapsed = max(time.time() - t0, 1e-9)
                print(
                    f"processed {num_docs} documents ({num_docs / elapsed:.1f} docs/s, "
                    f"{total_bytes / elapsed / 1024 ** 2:.2f} MB/s)",
                    file=log_stream,
                    flush=True,
                )
        if num_docs == 0:
            raise ValueError(f"input file {input_path!r} (from --input) contains no documents")
        meta_paths = {}
        for key in json_keys:
            builders[key].finalize(prefixes[key] + ".idx")
            # read at training start to check the ids against the run's vocabulary
            meta_paths[key] = write_dataset_meta(prefixes[key], {
                "tokenizer_type": tokenizer_type,
                "tokenizer_model": os.path.abspath(tokenizer_model) if tokenizer_model else None,
                "vocab_size": int(tokenizer.vocab_size),
                "min_token_id": -1 if lo[key] is None else lo[key],
                "max_token_id": -1 if hi[key] is None else hi[key],
                "num_documents": num_docs - empty[key],
                "num_tokens": tokens[key],
                "dtype": np.dtype(dtype).name,
                "json_key": key,
                "append_eod": bool(append_eod),
                "input": os.path.abspath(input_path),
            })
    except BaseException:
        for key in json_keys:
            builders[key].data_file.close()
            for ext in (".bin", ".idx", META_SUFFIX):
                if os.path.exists(prefixes[key] + ext):
                    os.remove(prefixes[key] + ext)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    seconds = time.time() - t0
    if log_stream is not None:
        for key in json_keys:
            print(
                f"wrote {prefixes[key]}.bin/.idx: {num_docs - empty[key]} documents, {tokens[key]} tokens "
                f"({np.dtype(dtype).name}); skipped {empty[key]} empty; {seconds:.1f}s",
                file=log_stream,
                flush=True,
            )
    return PreprocessResult(
        output_prefixes=prefixes,
        num_documents=num_docs,
        num_empty_skipped=empty,
        num_tokens=tokens,
        seconds=seconds,
        max_token_id={key: -1 if hi[key] is None else hi[key] for key in json_keys},
        meta_paths=meta_paths,
    )
