"""Imports sit at module top level (issue 24 item 5): an import inside a function hides what a module
depends on, so each one that stays must say why in one comment - on its line, or on the line just
above it (one comment covers the imports that directly follow it). Reasons that qualify: an optional
dependency (lm-eval, wandb, Transformer Engine, triton, apex, gguf), the start-up time of a CLI (a
heavy package such as megatron.core or transformers kept off a light import path), an import cycle,
or an import that must wait for the environment (CUDA_VISIBLE_DEVICES, a worker's sys.path).

The check reads the source with :mod:`ast`, like tests/test_import_cycles.py."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("megatron_let", "tools", "benchmarks")


def unexplained_imports(source: str) -> List[int]:
    """Line numbers of imports inside functions with no comment on their line or just above the
    first import of their run of consecutive imports."""
    lines = source.splitlines()
    tree = ast.parse(source)
    found: List[int] = []

    def commented(node: ast.stmt) -> bool:
        own = lines[node.lineno - 1: node.end_lineno]
        above = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
        return any("#" in line for line in own) or above.startswith("#")

    def visit(body: List[ast.stmt], in_function: bool) -> None:
        covered = False  # the previous statement of this body is an explained import
        for node in body:
            is_import = isinstance(node, (ast.Import, ast.ImportFrom))
            if is_import and in_function:
                covered = covered or commented(node)
                if not covered:
                    found.append(node.lineno)
            else:
                covered = False
            inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for field in ("body", "orelse", "finalbody", "handlers"):
                child = getattr(node, field, None)
                if isinstance(child, list) and child and isinstance(child[0], (ast.stmt, ast.excepthandler)):
                    visit(child, inner)

    visit(tree.body, False)
    return sorted(found)


def test_function_level_imports_state_their_reason():
    offenders = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for line in unexplained_imports(path.read_text()):
                offenders.append(f"{rel}:{line}")
    assert not offenders, ("imports inside functions without a reason comment (move them to the top "
                           "of the module, or say why in one comment):\n" + "\n".join(offenders))


@pytest.mark.parametrize("source, expected", [
    ("import os\ndef f():\n    import json\n    return json\n", [3]),
    ("def f():\n    # lazy: optional dependency\n    import wandb\n    import wandb.sdk\n", []),
    ("def f():\n    import wandb  # optional dependency\n", []),
    ("def f():\n    # why\n    import a\n    x = 1\n    import b\n", [5]),
    ("class C:\n    def m(self):\n        try:\n            import lm_eval\n        except ImportError:\n"
     "            import sys\n", [4, 6]),
    ("import os\nif os.name:\n    import json\n", []),  # module level: not this check's business
])
def test_the_check_on_known_sources(source, expected):
    assert unexplained_imports(source) == expected
