"""Tokenizers for megatron_let: sentencepiece, local Hugging Face folders, and a null tokenizer.

Every tokenizer subclasses megatron-core's legacy tokenizer interface
(``megatron.core.datasets.megatron_tokenizer.MegatronLegacyTokenizer`` -- in megatron-core 0.16.1
this is the class that older releases called ``MegatronTokenizer``), because megatron-core's
``GPTDataset`` reads ``eod``/``pad``/``vocab_size`` from it and hashes its ``unique_identifiers``
into the dataset-index cache key.

Common surface (all types):
    vocab_size, eod (= the EOS id), eos, bos, pad, tokenize(text) -> list[int], detokenize(ids),
    tokenize_with_offsets(text) -> (ids, [(start, end), ...]) in *character* offsets of ``text``,
    offsets(ids, text) -> start offsets (megatron-core's optional API).

Special ids that a tokenizer does not define are reported as ``NO_TOKEN`` (-1), the value
sentencepiece itself uses and megatron-core's datasets treat as "no pad token".

Offsets convention (shared so that character-offset alignment between two tokenizers is
consistent): a token made from part of one character (byte-fallback / byte-level pieces of a
multi-byte character) carries the span of that whole character; a token that covers no text
(e.g. sentencepiece's dummy-prefix "▁" at the start) has an empty span (start == end).
"""

from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from typing import Iterable, Iterator, Sequence

import sentencepiece
from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

NO_TOKEN = -1
"""Id reported for a special token the tokenizer does not define."""

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")

# Files that make a folder loadable by transformers' AutoTokenizer without a network.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class _TokenizerBase(MegatronLegacyTokenizer):
    """Shared plumbing: cache identity, offsets helper, lazily built vocab maps."""

    def __init__(self, tokenizer_path: str | None, **options: object) -> None:
        # We fill megatron-core's identity fields ourselves instead of calling its __init__, which
        # only adds a misleading "legacy tokenizer is deprecated" warning on every construction.
        self.unique_identifiers = OrderedDict()
        self.unique_identifiers["class"] = type(self).__name__
        self.unique_identifiers["tokenizer_path"] = [] if tokenizer_path is None else [tokenizer_path]
        for key, value in options.items():
            self.unique_identifiers[key] = str(value)
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)
        self._inv_vocab: dict[int, str] | None = None

    # --- megatron-core interface -------------------------------------------------------------
    @property
    def inv_vocab(self) -> dict[int, str]:
        """Id -> token text."""
        if self._inv_vocab is None:
            self._inv_vocab = {i: t for t, i in self.vocab.items()}
        return self._inv_vocab

    @property
    def eos(self) -> int:
        """The EOS id (same as ``eod``)."""
        return self.eod

    def offsets(self, ids: Sequence[int], text: str) -> list[int]:
        """Start character offset of each token of ``ids``, which must be the tokenization of ``text``."""
        own_ids, spans = self.tokenize_with_offsets(text)
        if list(map(int, ids)) != own_ids:
            raise ValueError(
                f"{type(self).__name__}.offsets: ids are not the tokenization of the given text "
                f"({len(ids)} ids given, tokenizing the text gives {len(own_ids)})"
            )
        return [start for start, _ in spans]

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and the (start, end) character span of each token."""
        raise NotImplementedError


def _byte_to_char_converter(text: str):
    """Return a function mapping (byte_begin, byte_end) in UTF-8 ``text`` to character (start, end).

    A begin inside a character rounds down to that character, an end inside one rounds up, so a
    span always covers whole characters.
    """
    if len(text.encode("utf-8")) == len(text):  # pure ASCII: bytes are characters
        return lambda b, e: (b, e)
    char_starts = [0]
    for ch in text:
        char_starts.append(char_starts[-1] + len(ch.encode("utf-8")))

    def convert(b: int, e: int) -> tuple[int, int]:
        start = bisect.bisect_right(char_starts, b) - 1
        end = bisect.bisect_left(char_starts, e)
        return start, max(start, end)

    return convert


class SentencePieceTokenizer(_TokenizerBase):
    """A sentencepiece ``.model`` file.

    ``tokenize`` adds no BOS/EOS; documents are separated by ``eod`` in the preprocessed data.
    """

    def __init__(self, model_path: str) -> None:
        super().__init__(model_path)
        self._model_path = model_path
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as err:  # sentencepiece: "could not parse ModelProto"
            raise ValueError(
                f"--tokenizer-model {model_path} is not a readable sentencepiece model: {err}"
            ) from None
        self._eod = int(self._sp.eos_id())
        if self._eod < 0:
            raise ValueError(
                f"sentencepiece model {model_path} (from --tokenizer-model) defines no EOS piece "
                "(eos_id=-1), which is needed as the end-of-document token; train one with "
                "tools/train_tokenizer.py"
            )
        self._vocab: dict[str, int] | None = None

    def __getstate__(self) -> dict:
        # The C++ processor is rebuilt from the file in the receiving process (DataLoader workers).
        return {"model_path": self._model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])

    @property
    def vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> int:
        return int(self._sp.bos_id())

    @property
    def pad(self) -> int:
        return int(self._sp.pad_id())

    @property
    def unk(self) -> int:
        return int(self._sp.unk_id())

    def tokenize(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        proto = self._sp.encode(text, out_type="proto")
        convert = _byte_to_char_converter(text)
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        for piece in proto.pieces:
            ids.append(int(piece.id))
            spans.append(convert(int(piece.begin), int(piece.end)))
        # sentencepiece gives the leading byte pieces of a multi-byte character an empty span and
        # the last one the whole character; give all of them the character's span (see module doc).
        for i in range(len(ids) - 2, -1, -1):
            start, end = spans[i]
            if start == end and self._sp.is_byte(ids[i]) and spans[i + 1][0] == start:
                spans[i] = spans[i + 1]
        return ids, spans


class HuggingFaceTokenizer(_TokenizerBase):
    """A local Hugging Face tokenizer folder (``tokenizer.json`` / ``tokenizer_config.json``).

    Loaded with ``local_files_only=True``: never touches the network. ``tokenize`` adds no special
    tokens (no BOS), so ids equal ``hf_tokenizer(text, add_special_tokens=False).input_ids``.
    ``vocab_size`` is ``len(hf_tokenizer)`` (base vocabulary plus added tokens).
    """

    def __init__(self, folder: str) -> None:
        # lazy: transformers takes seconds to import; only a HuggingFaceTokenizer needs it
        from transformers import AutoTokenizer

        super().__init__(folder)
        self._folder = folder
        try:
            self._tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except Exception as err:  # transformers raises anything from JSONDecodeError to OSError
            raise ValueError(
                f"Hugging Face tokenizer folder {folder} (from --tokenizer-model) cannot be loaded: "
                f"{type(err).__name__}: {err}"
            ) from None
        if self._tok.eos_token_id is None:
            raise ValueError(
                f"Hugging Face tokenizer in {folder} (from --tokenizer-model) defines no eos_token, "
                "which is needed as the end-of-document token; set eos_token in tokenizer_config.json"
            )
        self._vocab: dict[str, int] | None = None

    def __getstate__(self) -> dict:
        return {"folder": self._folder}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])

    @property
    def hf_tokenizer(self):
        """The underlying transformers tokenizer."""
        return self._tok

    @property
    def vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = dict(self._tok.get_vocab())
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eod(self) -> int:
        return int(self._tok.eos_token_id)

    @property
    def bos(self) -> int:
        return NO_TOKEN if self._tok.bos_token_id is None else int(self._tok.bos_token_id)

    @property
    def pad(self) -> int:
        return NO_TOKEN if self._tok.pad_token_id is None else int(self._tok.pad_token_id)

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not getattr(self._tok, "is_fast", False):
            raise ValueError(
                f"Hugging Face tokenizer in {self._folder} is not a fast (Rust) tokenizer, which is "
                "needed for character offsets; provide a folder with tokenizer.json"
            )
        enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]


class NullTokenizer(_TokenizerBase):
    """No real tokenizer: text is whitespace-separated integer ids (for mock data and tests).

    ``vocab_size`` is the given size; ids ``0 .. vocab_size-2`` are ordinary tokens and
    ``eod = vocab_size - 1`` so every id fits an embedding table of ``vocab_size`` rows.
    """

    def __init__(self, vocab_size: int) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"NullTokenizer needs an integer --vocab-size >= 2, got {vocab_size!r}")
        super().__init__(None, vocab_size=vocab_size)
        self._vocab_size = vocab_size

    @property
    def vocab(self) -> dict[str, int]:
        return {str(i): i for i in range(self._vocab_size)}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1

    @property
    def bos(self) -> int:
        return NO_TOKEN

    @property
    def pad(self) -> int:
        return NO_TOKEN

    def _parse(self, word: str) -> int:
        try:
            value = int(word)
        except ValueError:
            raise ValueError(f"NullTokenizer expects whitespace-separated integers, got {word!r}") from None
        if not 0 <= value < self._vocab_size:
            raise ValueError(f"NullTokenizer: id {value} is outside [0, {self._vocab_size})")
        return value

    def tokenize(self, text: str) -> list[int]:
        return [self._parse(w) for w in text.split()]

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for word in text.split():
            start = text.index(word, pos)
            pos = start + len(word)
            ids.append(self._parse(word))
            spans.append((start, pos))
        return ids, spans


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: str | None, vocab_size: int | None = None
) -> _TokenizerBase:
    """Build a tokenizer by type name.

    Args:
        tokenizer_type: one of ``TOKENIZER_TYPES``.
        tokenizer_model: a sentencepiece ``.model`` file (or a folder holding ``tokenizer.model``)
            for ``SentencePieceTokenizer``; a local folder with ``tokenizer.json`` /
            ``tokenizer_config.json`` for ``HuggingFaceTokenizer``; unused for ``NullTokenizer``.
        vocab_size: required for ``NullTokenizer``; ignored otherwise.

    Raises:
        ValueError: unknown type, or missing ``vocab_size`` for the null tokenizer.
        FileNotFoundError: the model file/folder does not exist.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; valid types: {', '.join(TOKENIZER_TYPES)}")
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size")
        return NullTokenizer(int(vocab_size))

    if not tokenizer_model:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
    path = os.path.expanduser(tokenizer_model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer model {path!r} (from --tokenizer-model) does not exist")

    if tokenizer_type == "SentencePieceTokenizer":
        if os.path.isdir(path):
            candidate = os.path.join(path, "tokenizer.model")
            if not os.path.isfile(candidate):
                raise FileNotFoundError(
                    f"--tokenizer-model {path!r} is a folder without tokenizer.model; "
                    "pass the sentencepiece .model file"
                )
            path = candidate
        return SentencePieceTokenizer(path)

    # HuggingFaceTokenizer
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"--tokenizer-model {path!r} must be a Hugging Face tokenizer folder "
            f"(containing {' or '.join(_HF_TOKENIZER_FILES)}), not a file"
        )
    if not any(os.path.isfile(os.path.join(path, f)) for f in _HF_TOKENIZER_FILES):
        raise FileNotFoundError(
            f"Hugging Face tokenizer folder {path!r} (from --tokenizer-model) contains none of "
            f"{', '.join(_HF_TOKENIZER_FILES)}"
        )
    return HuggingFaceTokenizer(path)


# ---------------------------------------------------------------------------------------------
# Training a sentencepiece model (used by tools/train_tokenizer.py)
# ---------------------------------------------------------------------------------------------

SPM_SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
"""Special-token layout of models trained by ``train_sentencepiece``: <unk>=0, <s>=1, </s>=2 (EOD),
<pad>=3; the 256 byte-fallback pieces <0x00>..<0xFF> follow, then the learned pieces."""


def iter_training_lines(paths: Sequence[str], json_key: str = "text") -> Iterator[str]:
    """Yield the non-empty lines of each input: the ``json_key`` field of ``.jsonl``/``.json`` lines
    (a document with newlines gives one line per newline-separated part), or raw lines otherwise.

    Raises FileNotFoundError for a missing file, ValueError naming file and line for bad JSON.
    """
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"training input {path!r} (from --input) does not exist")
    for path in paths:
        is_json = path.endswith((".jsonl", ".json"))
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if is_json:
                    text = _json_field(line, json_key, path, line_no)
                    for part in text.split("\n"):
                        if part.strip():
                            yield part
                else:
                    yield line.rstrip("\n")


def _json_field(line: str, key: str, path: str, line_no: int) -> str:
    """Parse one jsonl line and return its string field ``key``, with errors naming the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {line_no}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} line {line_no}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"{path} line {line_no}: missing key {key!r} (keys: {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{path} line {line_no}: field {key!r} is {type(value).__name__}, expected a string")
    return value


def train_sentencepiece(
    inputs: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    max_sentences: int = 1_000_000,
    json_key: str = "text",
    num_threads: int | None = None,
    seed: int = 1234,
) -> str:
    """Train a sentencepiece model on text/jsonl files and return the path of ``<prefix>.model``.

    Byte fallback is on (no <unk> at encode time), normalization is the identity and whitespace is
    kept as is, so ``detokenize(tokenize(text)) == text``; digits are split. Special ids follow
    ``SPM_SPECIAL_IDS``. At most ``max_sentences`` lines (sampled with shuffling) are used.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type must be bpe or unigram, got {model_type!r}")
    min_vocab = len(SPM_SPECIAL_IDS) + 256 + 1
    if vocab_size < min_vocab:
        raise ValueError(f"--vocab-size {vocab_size} is too small: byte fallback needs at least {min_vocab}")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"--character-coverage must be in (0, 1], got {character_coverage}")
    if max_sentences < 1:
        raise ValueError(f"--max-sentences must be >= 1, got {max_sentences}")
    if not inputs:
        raise ValueError("--input needs at least one file")
    for path in inputs:  # fail before training starts
        if not os.path.isfile(path):
            raise FileNotFoundError(f"training input {path!r} (from --input) does not exist")

    # Sentence sampling/shuffling uses sentencepiece's global generator: seed it for reproducibility.
    sentencepiece.set_random_generator_seed(seed)
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    input_errors: list[Exception] = []

    def lines() -> Iterator[str]:
        # sentencepiece wraps exceptions raised by the iterator; keep ours to re-raise them as is.
        try:
            yield from iter_training_lines(inputs, json_key)
        except (ValueError, OSError) as err:
            input_errors.append(err)
            raise

    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            seed_sentencepiece_size=min(1_000_000, max(10 * vocab_size, 10_000)),
            unk_id=SPM_SPECIAL_IDS["unk"],
            bos_id=SPM_SPECIAL_IDS["bos"],
            eos_id=SPM_SPECIAL_IDS["eos"],
            pad_id=SPM_SPECIAL_IDS["pad"],
            num_threads=num_threads or max(1, min(8, os.cpu_count() or 1)),
            minloglevel=1,
        )
    except RuntimeError as err:  # sentencepiece reports bad settings (e.g. vocab too large) this way
        if input_errors:
            raise input_errors[0] from None
        raise ValueError(f"sentencepiece training of {model_prefix!r} failed: {err}") from None
    return model_prefix + ".model"
