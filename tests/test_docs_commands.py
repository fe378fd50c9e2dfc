"""Documented commands cannot rot: every command in a ```bash block of README.md and docs/*.md is
checked.

* ``pretrain_let.py`` (plain or under ``torchrun``) runs through ``--dry-run`` with the world size
  its torchrun line implies (``--nproc_per_node`` × ``--nnodes``; plain ``python``: unset);
* an example launcher (``bash examples/llama_*/*.sh``, also behind ``sbatch``'s ``LAUNCHER=``) is
  run with its documented environment and ``--dry-run`` appended (``PYTHON=true``, so it only
  prints the command it builds), and that command goes through the same dry run;
* ``tools/*.py`` and ``benchmarks/*.py`` commands are parsed by the script's own ``build_parser()``
  (unknown flags, bad choices or types, missing required flags fail); ``--help`` must exit 0;
* other scripts must exist and pass ``bash -n``; ``pytest`` targets and ``.venv/bin/*`` programs
  must exist.

Paths are swapped for test assets: data prefixes for a small indexed dataset, teacher folders for
config-only SmolLM2-shaped folders (the 1.7B shape when the documented name says so) with a
49152-token Hugging Face tokenizer, checkpoint and log folders for temporary ones. A
documented ``[--optional flag]`` is checked with the flag; an elided ``...`` is dropped.
"""

from __future__ import annotations

import glob
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

from launch import ROOT
from test_launchers import launcher_env, save_config_only_teacher, shown_command

DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
VOCAB = 49152  # SmolLM2's vocabulary: the documented teachers and tokenizers


# ---------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------


@dataclass
class DocCommand:
    source: str                 # "docs/launching.md:23"
    env: Dict[str, str]
    words: List[str]            # program and arguments, comments and elisions removed
    text: str = field(repr=False, default="")


def bash_blocks(text: str):
    """(first line number, body) of every ```bash fenced block."""
    for m in re.finditer(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M):
        yield text.count("\n", 0, m.start()) + 2, m.group(1)


def _unbracket(words: List[str]) -> List[str]:
    """``[--flag value]`` -> ``--flag value`` (checked as given); a bracketed placeholder such as
    ``[extra pretrain_let.py flags]`` and a ``...`` elision are dropped."""
    out, group = [], None
    for w in words:
        if group is None and w.startswith("["):
            group, w = [], w[1:]
        if group is not None:
            closing = w.endswith("]")
            group.append(w[:-1] if closing else w)
            if closing:
                if group and group[0].startswith("-"):
                    out.extend(g for g in group if g)
                group = None
            continue
        if w not in ("...", "…"):
            out.append(w)
    return out


def commands_in(text: str, name: str) -> List[DocCommand]:
    out = []
    for first_line, body in bash_blocks(text):
        lines = body.split("\n")
        i = 0
        while i < len(lines):
            start, logical = i, lines[i]
            while logical.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                logical = logical.rstrip()[:-1] + " " + lines[i]
            i += 1
            words = shlex.split(logical, comments=True)
            if not words:
                continue
            env = {}
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            if words:
                out.append(DocCommand(f"{name}:{first_line + start}", env, _unbracket(words), logical))
    return out


def all_commands() -> List[DocCommand]:
    out = []
    for name in DOCS:
        out.extend(commands_in(open(os.path.join(ROOT, name)).read(), name))
    return out


# ---------------------------------------------------------------------------------------------
# test assets and path swapping
# ---------------------------------------------------------------------------------------------


def save_tokenizer(path, vocab_size: int) -> None:
    """A word-level Hugging Face tokenizer with exactly ``vocab_size`` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(str(path))


@dataclass
class Assets:
    root: str
    data: str
    teachers: Dict[str, str]
    tokenizer: str

    def teacher(self, documented: str, vocab: Optional[int] = None) -> str:
        """A config-only teacher standing in for ``documented`` (1.7B shape if its name says so)."""
        size = "1.7b" if "1.7b" in documented.lower() else "135m"
        vocab = vocab or VOCAB
        key = f"{size}-{vocab}"
        if key not in self.teachers:
            path = os.path.join(self.root, f"teacher-{key}")
            save_config_only_teacher(path, size)
            if vocab != VOCAB:
                import json

                cfg = json.load(open(os.path.join(path, "config.json")))
                cfg["vocab_size"] = vocab
                json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
            else:
                save_tokenizer(path, VOCAB)
            self.teachers[key] = path
        return self.teachers[key]

    def folder(self, documented: str) -> str:
        path = os.path.join(self.root, "out", documented.strip("/~.").replace("/", "_") or "x")
        os.makedirs(path, exist_ok=True)
        return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("doc_assets")
    prefix = str(root / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    # enough documents that every split of the documented --split values (969,30,1) gets some
    for _ in range(1200):
        n = int(torch.randint(20, 60, (1,), generator=g))
        builder.add_document(torch.randint(0, VOCAB, (n,), generator=g, dtype=torch.int64), [n])
    builder.finalize(prefix + ".idx")
    tokenizer = str(root / "tokenizer")
    save_tokenizer(tokenizer, VOCAB)
    return Assets(str(root), prefix, {}, tokenizer)


def _is_weight(word: str) -> bool:
    """A blend weight of --data-path / DATA_PATH ("0.3 prefix 0.7 prefix")."""
    try:
        float(word)
        return True
    except ValueError:
        return False


FOLDER_FLAGS = ("--save", "--load", "--tensorboard-dir", "--wandb-save-dir", "--data-cache-path")
FILE_FLAGS = ("--metrics-jsonl",)


def swap_pretrain_args(args: List[str], assets: Assets) -> List[str]:
    """Documented paths -> test assets, flag by flag."""
    out, i = [], 0
    vocab = None
    if "--vocab-size" in args:
        vocab = int(args[args.index("--vocab-size") + 1])
    while i < len(args):
        a = args[i]
        out.append(a)
        i += 1
        if a == "--data-path":
            while i < len(args) and not args[i].startswith("--"):
                value = args[i]
                out.append(value if _is_weight(value) else assets.data)
                i += 1
        elif a == "--teacher-path" and i < len(args):
            out.append(assets.teacher(args[i], vocab))
            i += 1
        elif a == "--tokenizer-model" and i < len(args):
            out.append(assets.tokenizer)
            i += 1
        elif a in FOLDER_FLAGS and i < len(args):
            out.append(assets.folder(args[i]))
            i += 1
        elif a in FILE_FLAGS and i < len(args):
            out.append(os.path.join(assets.folder(args[i]), "metrics.jsonl"))
            i += 1
    return out


def swap_launcher_env(env: Dict[str, str], assets: Assets) -> Dict[str, str]:
    env = dict(env)
    vocab = int(env["VOCAB_SIZE"]) if env.get("VOCAB_SIZE") else None
    if "DATA_PATH" in env:
        env["DATA_PATH"] = " ".join(w if _is_weight(w) else assets.data for w in env["DATA_PATH"].split())
    env["TEACHER_PATH"] = assets.teacher(env.get("TEACHER_PATH", ""), vocab)
    env["TOKENIZER_MODEL"] = assets.tokenizer
    env["CHECKPOINT_DIR"] = assets.folder(env.get("CHECKPOINT_DIR", "checkpoints"))
    for key in ("TENSORBOARD_DIR", "DATA_CACHE_PATH"):
        if key in env:
            env[key] = assets.folder(env[key])
    return env


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------


def dry_run(args: List[str], world: Optional[int], monkeypatch) -> str:
    """pretrain_let.py --dry-run in this process; returns '' on success, else the error output."""
    import pretrain_let

    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    out, err = io.StringIO(), io.StringIO()
    argv = [a for a in args if a != "--dry-run"] + ["--dry-run"]
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = pretrain_let.main(argv)
        except SystemExit as e:  # argparse: unknown flag, bad value
            rc = e.code
    if rc == 0 and "dry run OK" in out.getvalue():
        return ""
    return f"exit {rc}: {err.getvalue().strip()[-1500:]}"


def torchrun_split(words: List[str]):
    """torchrun [opts] SCRIPT args -> (world size, SCRIPT, args)."""
    opts = {}
    i = 1
    while i < len(words) and words[i].startswith("-"):
        flag = words[i].split("=", 1)
        if len(flag) == 2:
            opts[flag[0]] = flag[1]
            i += 1
        else:
            opts[flag[0]] = words[i + 1] if i + 1 < len(words) else ""
            i += 2
    nproc = opts.get("--nproc_per_node", opts.get("--nproc-per-node", "1"))
    nnodes = opts.get("--nnodes", "1").split(":")[-1]
    return int(nproc) * int(nnodes), words[i], words[i + 1:]


def _load_script(path: str):
    spec = importlib.util.spec_from_file_location(f"doc_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _Parsed(Exception):
    """Raised right after a script's argparse parser accepted its arguments: nothing else runs."""


def check_script_flags(script: str, args: List[str], monkeypatch) -> str:
    """A tools/ or benchmarks/ command: its own argparse parser accepts the documented flags.
    Scripts with ``build_parser()`` are asked directly; others run ``main`` until their first
    ``parse_args`` returns."""
    import argparse
    import inspect

    path = os.path.join(ROOT, script)
    if not os.path.isfile(path):
        return f"{script} does not exist"
    module = _load_script(path)
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        try:
            if hasattr(module, "build_parser"):
                module.build_parser().parse_args(args)
            else:
                real = argparse.ArgumentParser.parse_args

                def parse_then_stop(self, argv=None, namespace=None):
                    real(self, argv, namespace)
                    raise _Parsed()

                monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
                monkeypatch.setattr(sys, "argv", [path, *args])
                try:
                    module.main(args) if inspect.signature(module.main).parameters else module.main()
                finally:
                    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", real)
                return f"{script}: main() returned without parsing its arguments"
        except _Parsed:
            pass
        except SystemExit as e:
            if e.code not in (0, None):
                return f"{script} rejects the documented flags: {err.getvalue().strip()[-800:]}"
    return ""


def run_launcher_dry(script: str, env: Dict[str, str], args: List[str], assets: Assets, monkeypatch) -> str:
    path = os.path.join(ROOT, script)
    if not os.path.isfile(path):
        return f"{script} does not exist"
    full_env = launcher_env(**swap_launcher_env(env, assets), PYTHON="true")
    proc = subprocess.run(["bash", path, *args, "--dry-run"], env=full_env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    if proc.returncode != 0:
        return f"{script} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}"
    words = shown_command(proc.stdout, "python")
    world = int(words[0].split("=", 1)[1]) if words[0].startswith("WORLD_SIZE=") else None
    pretrain = words[words.index("pretrain_let.py") + 1:]
    return dry_run(swap_pretrain_args(pretrain, assets), world, monkeypatch)


def check_command(cmd: DocCommand, assets: Assets, monkeypatch) -> tuple[str, str]:
    """(kind, problem) for one documented command; problem '' when it passes."""
    words, env = cmd.words, cmd.env
    program = words[0]
    if (program in ("python", "python3") or program.endswith("/python")) and words[1:3] == ["-m", "pytest"]:
        words, program = words[2:], "pytest"
    if (program in ("python", "python3") or program.endswith("/python")) and len(words) > 2 and \
            words[1] == "-m" and words[2] in ("megatron_let.runtime.torchrun", "torch.distributed.run"):
        words, program = ["torchrun", *words[3:]], "torchrun"  # torchrun's own arguments follow
    if program == "pytest":
        missing = [w for w in words[1:] if w.startswith("tests/") and not os.path.exists(os.path.join(ROOT, w))]
        return "pytest", f"missing test files {missing}" if missing else ""
    if program in ("python", "python3") or program.endswith("/python"):
        script, args, world = words[1], words[2:], None
    elif program == "torchrun" or program.endswith("/torchrun"):
        world, script, args = torchrun_split(words)
    elif program == "bash" and len(words) > 1:
        script, args = words[1], words[2:]
        if re.fullmatch(r"examples/llama_[^/]+/[^/]+\.sh", script):
            return "launcher", run_launcher_dry(script, env, args, assets, monkeypatch)
        if not os.path.isfile(os.path.join(ROOT, script)):
            return "script", f"{script} does not exist"
        proc = subprocess.run(["bash", "-n", os.path.join(ROOT, script)], capture_output=True, text=True)
        return "script", proc.stderr.strip()
    elif program == "sbatch":
        batch = [w for w in words[1:] if w.endswith(".sbatch")]
        if not batch or not os.path.isfile(os.path.join(ROOT, batch[0])):
            return "sbatch", f"sbatch script {batch} does not exist"
        if "LAUNCHER" not in env:
            return "sbatch", ""  # nothing to dry-run: the script itself is checked elsewhere
        nodes = words[words.index("--nodes") + 1] if "--nodes" in words else "1"
        extra = words[words.index(batch[0]) + 1:]
        return "launcher", run_launcher_dry(env["LAUNCHER"], {**env, "NNODES": nodes}, extra, assets,
                                            monkeypatch)
    elif program.startswith(".venv/bin/"):
        exe = os.path.join(os.path.dirname(sys.executable), os.path.basename(program))
        return "venv", "" if os.access(exe, os.X_OK) else f"{program} is not installed in the environment"
    elif program == "tensorboard":
        exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")
        return "venv", "" if os.access(exe, os.X_OK) else "tensorboard is not installed in the environment"
    else:
        return "other", ""
    # a python program
    if script == "pretrain_let.py":
        if args == ["--help"]:
            return "help", check_script_flags_pretrain_help()
        return "pretrain", dry_run(swap_pretrain_args(args, assets), world, monkeypatch)
    if re.fullmatch(r"(tools|benchmarks|examples/reproduce)/[^/]+\.py", script):
        return "tool", check_script_flags(script, args, monkeypatch)
    return "other", ""


def check_script_flags_pretrain_help() -> str:
    from megatron_let.training.arguments import build_parser

    with redirect_stdout(io.StringIO()) as out:
        try:
            build_parser().parse_args(["--help"])
        except SystemExit as e:
            if e.code not in (0, None):
                return f"pretrain_let.py --help exited {e.code}"
    return "" if "--teacher-path" in out.getvalue() else "pretrain_let.py --help printed no flags"


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def test_every_documented_command_is_valid(assets, monkeypatch):
    commands = all_commands()
    results = [(cmd, *check_command(cmd, assets, monkeypatch)) for cmd in commands]
    failures = [f"{cmd.source}: {cmd.text.strip()[:200]}\n    -> {problem}"
                for cmd, kind, problem in results if problem]
    assert not failures, "documented commands that no longer work:\n" + "\n".join(failures)
    kinds = [kind for _, kind, _ in results]
    # the extraction found what the docs are known to hold (guards against a parser that skips all)
    readme = [(cmd, kind) for cmd, kind, _ in results if cmd.source.startswith("README.md:")]
    assert any(kind == "pretrain" and cmd.words[0] == "torchrun" for cmd, kind in readme), \
        "README's headline torchrun pretrain_let.py command was not found"
    assert kinds.count("launcher") >= 4 and kinds.count("pretrain") >= 2 and kinds.count("tool") >= 8, kinds


def test_the_headline_command_checks_its_world_size(assets, monkeypatch):
    """The README's torchrun line implies 8 processes: the dry run sees WORLD_SIZE=8 (DP 8)."""
    from megatron_let.training.arguments import parse_args
    from megatron_let.training.dry_run import plan_run

    cmd = next(c for c in all_commands() if c.source.startswith("README.md:") and c.words[0] == "torchrun")
    world, script, args = torchrun_split(cmd.words)
    assert (world, script) == (8, "pretrain_let.py")
    monkeypatch.setenv("WORLD_SIZE", "8")
    plan = plan_run(parse_args(swap_pretrain_args(args, assets)))
    assert (plan.layout.world_size, plan.layout.tp, plan.layout.dp) == (8, 1, 8)


BROKEN_DOC = """
Some text.

```bash
source .venv/bin/activate
torchrun --nproc_per_node 8 pretrain_let.py \\
    --model-preset llama-1b --seq-length 1280 --micro-batch-size 4 --global-batch-size 2048 \\
    --tensor-model-parallel-size 2 --sequence-parallel --bf16 --train-iters 20000 \\
    --mock-data --vocab-size 49152 --objective baseline
python tools/evaluate.py --task ppl --load CKPT --no-such-flag 1
NNODES=3 MOCK_DATA=1 bash examples/llama_7b/pretrain_let.sh   # 24 GPUs at TP 2: DP 12 x 4 does not divide 2048
```
"""


def test_invalid_documented_commands_are_reported(assets, monkeypatch):
    """The old headline (FFN 5461 at TP=2), an unknown tool flag and a launcher whose global batch
    does not divide are all caught, with the reason."""
    cmds = commands_in(BROKEN_DOC, "broken.md")
    assert [c.words[0] for c in cmds] == ["source", "torchrun", "python", "bash"]
    assert cmds[3].env == {"NNODES": "3", "MOCK_DATA": "1"}
    problems = [check_command(c, assets, monkeypatch)[1] for c in cmds]
    assert problems[0] == ""
    assert "--ffn-hidden-size 5461 is not divisible by --tensor-model-parallel-size 2" in problems[1]
    assert "unrecognized arguments: --no-such-flag 1" in problems[2]
    assert "--global-batch-size 2048 is not divisible" in problems[3], problems[3]


def test_extraction_handles_continuations_brackets_and_comments():
    doc = ("```bash\n# a comment\nA=1 B='x y' python tools/export_hf.py --load c \\\n"
           "    --out e [--dtype bfloat16] [--verify]  # trailing\nsbatch --nodes 4 s.sbatch [extra flags]\n"
           "python pretrain_let.py --tokenizer-model t ...\n```\n")
    cmds = commands_in(doc, "x.md")
    assert [(c.source, c.env, c.words) for c in cmds] == [
        ("x.md:3", {"A": "1", "B": "x y"},
         ["python", "tools/export_hf.py", "--load", "c", "--out", "e", "--dtype", "bfloat16", "--verify"]),
        ("x.md:5", {}, ["sbatch", "--nodes", "4", "s.sbatch"]),
        ("x.md:6", {}, ["python", "pretrain_let.py", "--tokenizer-model", "t"]),
    ]
    assert torchrun_split(["torchrun", "--nproc_per_node", "4", "--nnodes=2", "x.py", "--a"]) == (8, "x.py", ["--a"])


def test_the_signal_forwarding_agent_counts_as_torchrun(assets, monkeypatch):
    doc = ("```bash\nsource .venv/bin/activate\npython -m megatron_let.runtime.torchrun --nproc_per_node 2 "
           "pretrain_let.py --model-preset tiny --mock-data --vocab-size 200 --objective baseline "
           "--global-batch-size 6 --micro-batch-size 2\n```\n")
    cmd = commands_in(doc, "x.md")[1]
    kind, problem = check_command(cmd, assets, monkeypatch)
    # world size 2 from the agent's arguments: 6 is not divisible by micro-batch 2 x DP 2
    assert kind == "pretrain" and "--global-batch-size 6 is not divisible" in problem, problem


NEEDS_ENV = re.compile(r"(python3?|torchrun|pytest|tensorboard|pip)$")


def test_blocks_activate_the_environment_before_using_it():
    """A fresh shell has no torch: a block that calls python/torchrun/pytest/tensorboard/pip by
    name activates .venv first (launchers and scripts find .venv themselves)."""
    offenders = []
    for name in DOCS:
        for first_line, body in bash_blocks(open(os.path.join(ROOT, name)).read()):
            active = False
            for cmd in commands_in(f"```bash\n{body}```\n", name):
                if cmd.words[:2] == ["source", ".venv/bin/activate"]:
                    active = True
                elif NEEDS_ENV.fullmatch(cmd.words[0]) and not active:
                    offenders.append(f"{name}:{first_line}: {cmd.text.strip()[:100]}")
    assert not offenders, "commands that fail in a fresh shell (no `source .venv/bin/activate` " \
                          "before them in their block):\n" + "\n".join(offenders)
