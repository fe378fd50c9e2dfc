"""The trainer only orchestrates (issue 24): ``training/trainer.py`` stays under MAX_TRAINER_LINES,
reaches the teacher only through the public methods of its lifecycle component, and it and the
modules split out of it import at module top (a dependency a reader sees)."""

import ast
import os

from launch import ROOT

MAX_TRAINER_LINES = 500
TRAINER = os.path.join(ROOT, "megatron_let", "training", "trainer.py")
# the trainer's seam with megatron_let.teacher.lifecycle.TeacherLifecycle
TEACHER_API = {"attach", "update", "begin_step", "micro_batch", "after_forward", "end_step",
               "check_outputs", "step_values", "metric_names"}
# the modules that hold what trainer.py used to: no import hidden inside a function
SPLIT_MODULES = ["training/trainer.py", "teacher/lifecycle.py", "training/run_checkpoints.py",
                 "training/model_setup.py", "data/run_datasets.py"]


def _tree(path):
    with open(path, encoding="utf-8") as fh:
        return ast.parse(fh.read(), path)


def test_trainer_is_short():
    with open(TRAINER, encoding="utf-8") as fh:
        n = sum(1 for _ in fh)
    assert n <= MAX_TRAINER_LINES, (
        f"megatron_let/training/trainer.py has {n} lines (> {MAX_TRAINER_LINES}): the trainer only "
        "orchestrates; move what is not the loop into the module that owns it")


def test_trainer_uses_only_the_teacher_components_methods():
    used = set()
    for node in ast.walk(_tree(TRAINER)):
        # self.teacher.<name>
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "teacher" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            used.add(node.attr)
    assert used, "the trainer no longer calls its teacher component as self.teacher"
    assert used <= TEACHER_API, f"the trainer reaches into the teacher's lifecycle: {used - TEACHER_API}"
    from megatron_let.teacher.lifecycle import TeacherLifecycle

    for name in TEACHER_API:
        assert callable(getattr(TeacherLifecycle, name)), name


def test_split_modules_import_at_top():
    for rel in SPLIT_MODULES:
        path = os.path.join(ROOT, "megatron_let", rel)
        lazy = [f"{rel}:{node.lineno}" for fn in ast.walk(_tree(path))
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert not lazy, f"imports inside functions (move them to the module top): {lazy}"
