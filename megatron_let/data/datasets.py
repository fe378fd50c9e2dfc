"""GPT pretraining datasets (through megatron-core's builder) and a resumable data-parallel iterator.

* ``DataConfig`` -- the data section of a run's configuration.
* ``build_datasets`` -- train/valid/test ``GPTDataset`` (or ``MockGPTDataset``) via megatron-core's
  ``BlendedMegatronDatasetBuilder``; every ``--data-path`` prefix is validated first.
* ``PretrainingSampler`` / ``build_data_iterator`` -- deterministic micro-batches for one
  data-parallel rank, resumable from ``consumed_samples``, optionally drawing from a
  ``selection_index`` (SALT's data selection).

Sample order: the dataset is already shuffled by megatron-core (seeded); the sampler walks global
sample positions 0, 1, 2, ... in order. Positions are grouped in chunks of
``micro_batch_size * data_parallel_size``; inside a chunk DP rank r takes the contiguous slice
``[r * micro_batch_size, (r + 1) * micro_batch_size)``. Equivalently position i belongs to rank
``(i // micro_batch_size) % data_parallel_size``. A global batch of G samples (G a multiple of
micro_batch_size * dp) is the next G positions whatever the number of micro-batches, so resuming
from ``consumed_samples`` reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_let.data.epochs import EpochCycle, GreedyBlend
from megatron_let.data.indexed import IndexedDatasetSummary, parse_data_path, validate_indexed_dataset
from megatron_let.data.tokenizers import TOKENIZER_TYPES

_SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """Parse a ``--split`` string like ``"969,30,1"`` into three normalised fractions.

    Missing trailing parts are 0 (``"98,2"`` -> train/valid only).
    """
    # quotes kept by a shell array ("--split '99,1,0'" in Megatron-LM's launchers): megatron-core
    # reads only the numbers, so do we
    parts = [p.strip() for p in re.split(r"[,/]", str(split).strip().strip("'\""))]
    if not 1 <= len(parts) <= 3 or any(p == "" for p in parts):
        raise ValueError(f"--split {split!r} must be up to three comma-separated numbers, e.g. '969,30,1'")
    # Plain decimals only: megatron-core re-parses the string with the regex [.0-9]+.
    if not all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", p) for p in parts):
        raise ValueError(f"--split {split!r} must contain only plain non-negative numbers, e.g. '969,30,1'")
    values = [float(p) for p in parts]
    if sum(values) <= 0:
        raise ValueError(f"--split {split!r} needs a positive sum")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


@dataclass
class DataConfig:
    """Data settings of a run (Megatron flag names in comments)."""

    data_path: list[str] | None = None  # --data-path: "prefix ..." or "w1 prefix1 w2 prefix2 ..."
    split: str = "969,30,1"  # --split: train,valid,test weights over each dataset's documents
    seq_length: int = 1024  # --seq-length
    mock_data: bool = False  # --mock-data: synthetic tokens, no files
    seed: int = 1234  # --seed: dataset shuffling (document order, sample order)
    tokenizer_type: str = "SentencePieceTokenizer"  # --tokenizer-type
    tokenizer_model: str | None = None  # --tokenizer-model
    vocab_size: int | None = None  # --vocab-size (NullTokenizer)
    num_workers: int = 0  # --num-workers: DataLoader worker processes
    data_cache_path: str | None = None  # --data-cache-path: where index caches go (default: next to the data)
    reset_position_ids: bool = False  # --reset-position-ids: positions restart after each EOD
    reset_attention_mask: bool = False  # --reset-attention-mask: emit per-document attention masks
    eod_mask_loss: bool = False  # --eod-mask-loss: no loss on EOD tokens
    mmap_bin_files: bool = True  # --no-mmap-bin-files: read the .bin files instead of mapping them
    split_fractions: list[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.data_path, str):
            self.data_path = [self.data_path]
        has_data = bool(self.data_path)
        if has_data and self.mock_data:
            raise ValueError("give either --data-path or --mock-data, not both")
        if not has_data and not self.mock_data:
            raise ValueError("no training data: give --data-path (preprocessed prefixes) or --mock-data")
        if has_data:
            parse_data_path(self.data_path)  # syntax errors surface at config time
        if isinstance(self.seq_length, bool) or not isinstance(self.seq_length, int) or self.seq_length < 1:
            raise ValueError(f"--seq-length must be a positive integer, got {self.seq_length!r}")
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(
                f"unknown --tokenizer-type {self.tokenizer_type!r}; valid types: {', '.join(TOKENIZER_TYPES)}"
            )
        self.split_fractions = parse_split(self.split)


def _split_document_ranges(num_documents: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Document range of each split, with megatron-core's rounding of the split book-ends."""
    bounds = np.concatenate([[0.0], np.cumsum(fractions)])
    return [
        (int(round(bounds[i] * num_documents)), int(round(bounds[i + 1] * num_documents)))
        for i in range(3)
    ]


def _check_splits_nonempty(
    summaries: Sequence[IndexedDatasetSummary], fractions: Sequence[float], sizes: Sequence[int], split: str
) -> None:
    """A requested split with no documents would make megatron-core loop forever; refuse it."""
    for s in summaries:
        for name, (beg, end), size in zip(_SPLIT_NAMES, _split_document_ranges(s.num_sequences, fractions), sizes):
            if size > 0 and end <= beg:
                raise ValueError(
                    f"{name} split of {s.prefix!r} is empty: --split {split!r} over its "
                    f"{s.num_sequences} documents gives the {name} split no documents, but "
                    f"{size} {name} samples were requested (use more data, change --split, or "
                    f"request 0 {name} samples)"
                )


def _builder_class():
    """megatron-core's builder, patched for one single-process bug.

    In megatron-core 0.16.1 ``BlendedDataset`` calls ``torch.distributed.get_rank()`` on a cache
    miss even when torch.distributed is not initialised, so a weighted blend with a cache path
    crashes in a single process. Without torch.distributed we hand the blended dataset a config
    copy without cache path: it then rebuilds its (cheap, C++-built) blending index in memory.
    The per-dataset GPT indices are still cached.
    """
    class _Builder(BlendedMegatronDatasetBuilder):
        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            if cls is BlendedDataset and not torch.distributed.is_initialized() and args[-1].path_to_cache:
                config = copy.copy(args[-1])  # shallow copy: no __post_init__ re-run
                config.path_to_cache = None
                args = (*args[:-1], config)
            return BlendedMegatronDatasetBuilder.build_generic_dataset(
                cls, is_built_on_rank, synchronize_ranks, *args
            )

    return _Builder


def build_datasets(
    cfg: DataConfig,
    tokenizer,
    train_samples: int,
    valid_samples: int,
    test_samples: int,
    is_built_on_rank: Callable[[], bool] | None = None,
):
    """Build (train, valid, test) GPT datasets with megatron-core's ``BlendedMegatronDatasetBuilder``.

    Each returned dataset yields dicts of 1-D tensors ``tokens``, ``labels`` (= tokens shifted by
    one), ``loss_mask``, ``position_ids`` (and ``attention_mask`` only with
    ``reset_attention_mask``; otherwise the model applies its causal mask). A split with 0
    requested samples is not built and returned as ``None``.

    Each split is exactly as long as requested, and its sample order does not depend on that
    length (megatron-core builds one epoch, :mod:`megatron_let.data.epochs` adds the others), so
    a longer run reads a shorter run's samples first. An unweighted ``--data-path`` with several
    prefixes is megatron-core's one-epoch size-proportional blend (no further epochs).

    Works without torch.distributed and under it; in the distributed case every rank must call
    this (megatron-core builds on rank 0, barriers, then the other ranks load the cached indices,
    so ``data_cache_path`` must be visible to all ranks). ``is_built_on_rank`` defaults to
    "every rank".

    Raises:
        ValueError: bad sample counts, a corrupt dataset, an empty requested split, or a blend
            that cannot supply the requested number of samples.
        FileNotFoundError: a ``--data-path`` prefix lacks its .bin/.idx.
    """
    sizes = [train_samples, valid_samples, test_samples]
    for name, n in zip(_SPLIT_NAMES, sizes):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{name}_samples must be a non-negative integer, got {n!r}")
    sizes = [int(n) for n in sizes]
    if tokenizer is None:
        raise ValueError("build_datasets needs a tokenizer (for eod/pad ids); see build_tokenizer")

    entries = None
    if not cfg.mock_data:
        entries = parse_data_path(cfg.data_path)
        summaries = [validate_indexed_dataset(prefix) for _, prefix in entries]
        _check_splits_nonempty(summaries, cfg.split_fractions, sizes, cfg.split)
    # One epoch per megatron-core dataset, our epochs on top (data/epochs.py): the sample at
    # each position then does not depend on how many samples this run asks for.
    one_epoch = [1 if n > 0 else 0 for n in sizes]
    if entries is None or (len(entries) == 1 and entries[0][0] is None):
        blend = None if entries is None else ([entries[0][1]], None)
        built = _build_megatron(cfg, tokenizer, blend, one_epoch, is_built_on_rank)
        return tuple(None if ds is None else EpochCycle(ds, cfg.seed, n) for ds, n in zip(built, sizes))
    if entries[0][0] is not None:  # a weighted blend: each prefix cycled, blended greedily
        per_prefix = [_build_megatron(cfg, tokenizer, ([p], None), one_epoch, is_built_on_rank)
                      for _, p in entries]
        weights = [w for w, _ in entries]
        return tuple(
            None if n == 0 else GreedyBlend([EpochCycle(b[i], cfg.seed) for b in per_prefix], weights, n)
            for i, n in enumerate(sizes))
    # unweighted prefixes: megatron-core blends one epoch of each by size (prefix-stable)
    datasets = _build_megatron(cfg, tokenizer, ([p for _, p in entries], None), sizes, is_built_on_rank)
    for name, ds, n in zip(_SPLIT_NAMES, datasets, sizes):
        if n > 0 and ds is not None and len(ds) < n:
            raise ValueError(
                f"the {name} dataset has {len(ds)} samples but {n} were requested; an unweighted "
                "--data-path with several prefixes yields one epoch only -- give weights "
                "('w1 prefix1 w2 prefix2 ...') to sample more"
            )
    return tuple(datasets)


def content_key(prefixes) -> str:
    """What identifies the files behind ``prefixes``: path, size and modification time of each
    .idx/.bin. Part of megatron-core's index cache key, so a dataset re-preprocessed in place
    gets new indices instead of the old ones (wrong windows, IndexError)."""
    parts = []
    for prefix in prefixes:
        for ext in (".idx", ".bin"):
            st = os.stat(prefix + ext)
            parts.append([os.path.abspath(prefix + ext), st.st_size, st.st_mtime_ns])
    return hashlib.md5(json.dumps(parts).encode()).hexdigest()


def _content_keyed(cls):
    """``cls`` with :func:`content_key` among the config attributes of its cache key."""

    class ContentKeyed(cls):
        @staticmethod
        def _key_config_attributes():
            return cls._key_config_attributes() + ["data_content_key"]

    ContentKeyed.__name__ = cls.__name__  # cache file names stay megatron-core's
    return ContentKeyed


def _build_megatron(cfg: DataConfig, tokenizer, blend, sizes, is_built_on_rank):
    """megatron-core's builder over ``blend`` (None: mock data) for ``sizes`` samples."""
    config = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=blend,
        split=cfg.split,
        path_to_cache=cfg.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
        # The model builds causal masks itself; a [1, s, s] mask per sample only costs memory,
        # unless per-document masks were asked for.
        create_attention_mask=cfg.reset_attention_mask,
        mmap_bin_files=cfg.mmap_bin_files,
    )
    # Skip splits nobody asked for (megatron-core would otherwise build a full epoch of them).
    for i, n in enumerate(sizes):
        if n == 0:
            config.split_matrix[i] = None
    if blend is None:
        cls = MockGPTDataset
    else:
        cls = _content_keyed(GPTDataset)
        config.data_content_key = content_key(blend[0])

    builder = _builder_class()(cls, list(sizes), is_built_on_rank or (lambda: True), config)
    with warnings.catch_warnings():
        # Tokenizers that reuse EOS as pad (SmolLM2, Llama-3): megatron-core then resets the pad
        # id to -1 so no real token is masked, and warns. Documents are packed, never padded,
        # so that reset is exactly right and the warning is noise.
        warnings.filterwarnings("ignore", message="The pad token id in the tokenizer collides")
        return builder.build()


class PretrainingSampler:
    """Yields this DP rank's micro-batches of global sample positions, starting at ``consumed_samples``.

    Position i goes to DP rank ``(i // micro_batch_size) % data_parallel_size`` (see module doc).
    ``total_samples=None`` means an endless stream (used for cyclic selections); otherwise the last
    incomplete chunk of ``micro_batch_size * data_parallel_size`` positions is dropped.
    """

    def __init__(
        self,
        total_samples: int | None,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} is outside [0, {data_parallel_size})")
        chunk = micro_batch_size * data_parallel_size
        if consumed_samples < 0 or consumed_samples % chunk:
            raise ValueError(
                f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                f"micro_batch_size * data_parallel_size = {chunk}"
            )
        if total_samples is not None and consumed_samples + chunk > total_samples:
            raise ValueError(
                f"no full micro-batch left: consumed_samples={consumed_samples} + {chunk} exceeds the "
                f"{total_samples} samples of the dataset (build it with more samples)"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def __len__(self) -> int:
        if self.total_samples is None:
            raise TypeError("an endless PretrainingSampler (total_samples=None) has no length")
        chunk = self.micro_batch_size * self.data_parallel_size
        return (self.total_samples - self.consumed_samples) // chunk

    def __iter__(self) -> Iterator[list[int]]:
        chunk = self.micro_batch_size * self.data_parallel_size
        start = self.consumed_samples
        while self.total_samples is None or start + chunk <= self.total_samples:
            first = start + self.data_parallel_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))
            start += chunk


class SelectionDataset(torch.utils.data.Dataset):
    """Endless view of ``dataset`` through ``selection_index``, cycling over the selection.

    Position p reads ``dataset[selection[order_c[p % m]]]`` with ``c = p // m`` the cycle and
    ``order_c`` a permutation seeded by ``(seed, c)`` (identity when ``shuffle`` is False), so
    each cycle visits every selected sample once and the stream is a pure function of p.
    """

    def __init__(self, dataset, selection_index: np.ndarray, seed: int, shuffle: bool = True) -> None:
        selection = np.asarray(selection_index)
        if selection.ndim != 1 or selection.size == 0:
            raise ValueError(f"selection_index must be a non-empty 1-D array, got shape {selection.shape}")
        if not np.issubdtype(selection.dtype, np.integer):
            raise ValueError(f"selection_index must hold integer sample indices, got dtype {selection.dtype}")
        n = len(dataset)
        if selection.min() < 0 or selection.max() >= n:
            raise ValueError(
                f"selection_index holds indices outside [0, {n}) (min {int(selection.min())}, "
                f"max {int(selection.max())})"
            )
        self.dataset = dataset
        self.selection = selection.astype(np.int64)
        self.seed = int(seed)
        self.shuffle = shuffle
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, cycle: int) -> np.ndarray:
        if cycle not in self._orders:
            if len(self._orders) >= 2:  # consecutive reads only ever touch one or two cycles
                self._orders.pop(min(self._orders))
            m = self.selection.size
            self._orders[cycle] = (
                np.random.default_rng([self.seed, cycle]).permutation(m) if self.shuffle else np.arange(m)
            )
        return self._orders[cycle]

    def dataset_index(self, position: int) -> int:
        """Index into the underlying dataset read at global position ``position``."""
        cycle, j = divmod(int(position), self.selection.size)
        return int(self.selection[self._order(cycle)[j]])

    def __getitem__(self, position: int):
        return self.dataset[self.dataset_index(position)]


SAMPLE_LOG_ENV = "MEGATRON_LET_TEST_SAMPLE_LOG"  # tests: append "position md5(tokens)" per sample read


class _SampleLog(torch.utils.data.Dataset):
    """Records every sample read (its global position and a hash of its tokens), so tests can
    prove that a resumed run reads exactly an uninterrupted run's samples."""

    def __init__(self, source, path: str) -> None:
        self.source, self.path = source, path

    def __getitem__(self, position: int):
        sample = self.source[position]
        digest = hashlib.md5(sample["tokens"].numpy().tobytes()).hexdigest()
        with open(self.path, "a") as f:
            f.write(f"{position} {digest}\n")
        return sample


def build_data_iterator(
    ds,
    micro_batch_size: int,
    consumed_samples: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    seed: int,
    selection_index: np.ndarray | None = None,
    shuffle_selection: bool = True,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Iterator of this DP rank's micro-batches: dicts of ``[micro_batch_size, seq_length]`` tensors.

    Deterministic given ``consumed_samples`` (a global sample count, a multiple of
    ``micro_batch_size * data_parallel_size``), so a resumed run continues exactly. With
    ``selection_index`` the stream cycles endlessly over those dataset indices (shuffled per cycle
    with ``seed`` unless ``shuffle_selection`` is False) and ``consumed_samples`` counts samples
    drawn from the selection; switching back to the full data is the caller's business. Without
    it the iterator ends after the dataset's last full chunk; ``seed`` is then unused (the dataset
    is already shuffled by megatron-core). ``pin_memory`` (set on CUDA): batches in page-locked
    memory, so the trainer's ``non_blocking`` copies to the GPU are asynchronous.
    """
    if ds is None:
        raise ValueError("build_data_iterator got no dataset (was this split requested with 0 samples?)")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if selection_index is not None:
        source = SelectionDataset(ds, selection_index, seed, shuffle_selection)
        total = None
    else:
        source = ds
        total = len(ds)
    if os.environ.get(SAMPLE_LOG_ENV):
        source = _SampleLog(source, os.environ[SAMPLE_LOG_ENV])
    sampler = PretrainingSampler(total, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
    loader = torch.utils.data.DataLoader(
        source,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
    return iter(loader)
