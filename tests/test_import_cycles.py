"""No import cycles inside ``megatron_let`` (issue 24: estimates shared instead of imported in a circle).

The graph is built from the source with :mod:`ast`, so imports inside functions count too (a lazy
import hides a dependency but does not remove it). An edge goes from a module to the module an
import names: ``from megatron_let.a import b`` points at ``megatron_let.a.b`` when that is a module,
else at ``megatron_let.a``. Imports under ``if TYPE_CHECKING:`` never run and are left out; the
implicit import of a parent package is not an edge (a package's ``__init__`` re-exporting its
submodules is not a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "megatron_let"


def module_files(root: Path, package: str) -> Dict[str, Path]:
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(modules: Dict[str, Path], package: str) -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod
                           for a in node.names]
            for target in targets:
                # `import a.b.c` names a.b.c; walk up to the nearest module we have
                while target and target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name and target.split(".")[0] == package:
                    graph[name].add(target)
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    components: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, comp) for comp in components]


def _cycle_in(graph: Dict[str, Set[str]], comp: List[str]) -> List[str]:
    """A concrete path start -> ... -> start inside one strongly connected component."""
    members = set(comp)
    start = comp[0]
    parent = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return list(reversed(path)) + [start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    return comp


def test_no_import_cycles_in_package():
    modules = module_files(ROOT, PACKAGE)
    assert len(modules) > 20, "package not found"
    cycles = find_cycles(import_graph(modules, PACKAGE))
    assert not cycles, "import cycles inside megatron_let:\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def _write_package(tmp_path: Path, files: Dict[str, str]) -> Dict[str, Path]:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return module_files(tmp_path, "pkg")


@pytest.mark.parametrize("files, expected", [
    # function-level import closing a circle (today's trainer <-> dry_run shape)
    ({"pkg/__init__.py": "", "pkg/a.py": "def f():\n    from pkg.b import g\n",
      "pkg/b.py": "from pkg import a\n"}, [["pkg.a", "pkg.b", "pkg.a"]]),
    # relative imports, three modules
    ({"pkg/__init__.py": "", "pkg/sub/__init__.py": "", "pkg/sub/x.py": "from . import y\n",
      "pkg/sub/y.py": "from ..z import q\n", "pkg/z.py": "import pkg.sub.x\nq = 1\n"},
     [["pkg.sub.x", "pkg.sub.y", "pkg.z", "pkg.sub.x"]]),
    # no cycle: the package re-exports a submodule that imports a sibling; TYPE_CHECKING skipped
    ({"pkg/__init__.py": "from pkg.a import f\n", "pkg/a.py": "from pkg.b import g\n",
      "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n"
                  "g = 1\n"}, []),
])
def test_cycle_finder_on_known_graphs(tmp_path, files, expected):
    modules = _write_package(tmp_path, files)
    assert find_cycles(import_graph(modules, "pkg")) == expected
