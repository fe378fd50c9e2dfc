"""docs/architecture.md stays true: every module (``megatron_let.x.y``) and function or class
(``megatron_let.x.y:name``, ``name.attr`` for a method) it names in backquotes exists, every
``--flag`` it names is a pretrain_let.py flag, and it describes every folder of megatron_let/."""

import importlib
import os
import re

import pytest

from launch import ROOT
from megatron_let.training.arguments import build_parser

DOC = os.path.join(ROOT, "docs", "architecture.md")
NAME = re.compile(r"`(megatron_let(?:\.\w+)*)(?::([\w.]+))?`")


def _text():
    with open(DOC, encoding="utf-8") as fh:
        return fh.read()


def resolve(module: str, attr: str = None):
    """The object a doc name refers to; a dotted name without ``:`` may end in a module's attribute
    (a package re-export). Raises ImportError / AttributeError for a name that does not exist."""
    try:
        obj = importlib.import_module(module)
    except ModuleNotFoundError:
        if "." not in module or attr is not None:
            raise
        parent, _, last = module.rpartition(".")
        obj = getattr(importlib.import_module(parent), last)
    for part in (attr.split(".") if attr else []):
        obj = getattr(obj, part)
    return obj


def test_every_named_module_and_function_exists():
    names = sorted(set(NAME.findall(_text())))
    assert len(names) >= 40, names  # the page names the step's path, not a handful
    missing = []
    for module, attr in names:
        try:
            resolve(module, attr or None)
        except (ImportError, AttributeError) as err:
            missing.append(f"{module}{':' + attr if attr else ''} ({err})")
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"


def test_the_check_catches_a_moved_name():
    with pytest.raises(AttributeError):
        resolve("megatron_let.teacher.step_prefetch", "StepTeacher.no_such_method")
    with pytest.raises((ImportError, AttributeError)):
        resolve("megatron_let.training.no_such_module")
    with pytest.raises(ImportError):
        resolve("megatron_let.no_such_folder.module", "function")


def test_every_named_flag_exists():
    flags = set(re.findall(r"`(--[a-z][a-z0-9-]*)`", _text()))
    assert flags, "the page names some pretrain_let.py flags"
    known = {opt for action in build_parser()._actions for opt in action.option_strings}
    assert not flags - known, f"not pretrain_let.py flags: {sorted(flags - known)}"


def test_every_folder_is_described():
    text = _text()
    pkg = os.path.join(ROOT, "megatron_let")
    folders = sorted(d for d in os.listdir(pkg) if os.path.isfile(os.path.join(pkg, d, "__init__.py")))
    described = set(re.findall(r"^\| `megatron_let/(\w+)/` \|", text, re.M))
    assert described == set(folders), {"not described": sorted(set(folders) - described),
                                       "no such folder": sorted(described - set(folders))}
