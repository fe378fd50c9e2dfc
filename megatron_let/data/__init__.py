"""Data layer: tokenizers, megatron indexed datasets, GPT datasets and the resumable DP iterator.

Names are imported lazily so that e.g. ``megatron_let.data.indexed`` (numpy only) does not pull in
megatron-core and torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "tokenizers": (
        "NO_TOKEN",
        "TOKENIZER_TYPES",
        "SPM_SPECIAL_IDS",
        "build_tokenizer",
        "SentencePieceTokenizer",
        "HuggingFaceTokenizer",
        "NullTokenizer",
        "train_sentencepiece",
    ),
    "indexed": (
        "IndexedDatasetSummary",
        "validate_indexed_dataset",
        "parse_data_path",
        "preprocess_jsonl",
        "PreprocessResult",
        "read_dataset_meta",
        "write_dataset_meta",
        "sampled_token_range",
    ),
    "datasets": (
        "DataConfig",
        "parse_split",
        "build_datasets",
        "PretrainingSampler",
        "SelectionDataset",
        "build_data_iterator",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
