"""The suite on pytest-xdist workers: launch.build_once builds a shared folder (the SmolLM2 teacher cache)
in one worker while the others wait, never in two at once; each worker computes on its share of the
cores; scripts/run_tests.sh runs the workers and the dev extra installs what they need."""

import os
import re
import subprocess
import sys
import time

from launch import ROOT, base_env, xdist_worker_threads

# One worker: waits for the start signal, then asks for the shared folder; its build takes a second, so
# two unguarded workers would both find the folder missing and both build it.
WORKER = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from launch import build_once
root = Path(sys.argv[2])
(root / f"ready{sys.argv[3]}").touch()
while not (root / "go").exists():
    time.sleep(0.01)

def build(folder):
    with open(root / "builds.log", "a") as log:
        log.write(f"start {sys.argv[3]}\\n")
    time.sleep(1.0)
    folder.mkdir()
    (folder / "done").write_text("ok")
    with open(root / "builds.log", "a") as log:
        log.write(f"end {sys.argv[3]}\\n")

out = build_once(root / "shared", lambda f: (f / "done").is_file(), build)
print((out / "done").read_text())
"""


def test_two_workers_build_the_shared_folder_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, ROOT, str(tmp_path), str(i)], env=base_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0].strip() for o in outs] == ["ok", "ok"]  # both got the finished folder
    log = (tmp_path / "builds.log").read_text().split()
    assert len(log) == 4 and log[0] == "start" and log[2] == "end", log  # one build, start to end
    assert os.listdir(tmp_path / "shared") == ["done"]


def test_each_worker_gets_its_share_of_the_cores():
    assert xdist_worker_threads({}, cpus=2) is None  # plain pytest: torch's default
    assert xdist_worker_threads({"PYTEST_XDIST_WORKER_COUNT": "1"}, cpus=2) is None
    assert xdist_worker_threads({"PYTEST_XDIST_WORKER_COUNT": "2"}, cpus=2) == 1
    assert xdist_worker_threads({"PYTEST_XDIST_WORKER_COUNT": "4"}, cpus=2) == 1
    assert xdist_worker_threads({"PYTEST_XDIST_WORKER_COUNT": "2"}, cpus=16) == 8


def test_run_tests_uses_the_workers_the_dev_extra_installs():
    script = open(os.path.join(ROOT, "scripts", "run_tests.sh")).read()
    # --no-loadscope-reorder: xdist hands the files out in conftest's order (longest first)
    assert '-n "${WORKERS}" --dist loadfile --no-loadscope-reorder' in script and 'WORKERS="${TEST_WORKERS:-2}"' in script
    dev = re.search(r"^dev = \[(.*)\]$", open(os.path.join(ROOT, "pyproject.toml")).read(), re.M).group(1)
    assert '"pytest-xdist' in dev and '"filelock' in dev, dev
    # -n stays out of addopts: the nested `pytest -m gpu` of scripts/gpu_check.sh must run serially
    assert "-n" not in re.search(r"^addopts = (.*)$", open(os.path.join(ROOT, "pyproject.toml")).read(), re.M).group(1)


def test_slowest_files_are_handed_out_first():
    from pathlib import Path
    from types import SimpleNamespace

    from conftest import SLOW_FILES_FIRST, slow_files_first

    names = ["test_a.py::x", "test_quickstart.py::e2e", "test_a.py::y", "test_reproduce.py::smoke",
             "test_z.py::z", "test_gpu_check.py::dry", "test_quickstart.py::bad"]
    items = [SimpleNamespace(path=Path("tests") / n.split("::")[0], name=n) for n in names]
    slow_files_first(items)
    assert [i.name for i in items] == ["test_reproduce.py::smoke", "test_gpu_check.py::dry", "test_quickstart.py::e2e",
                                       "test_quickstart.py::bad", "test_a.py::x", "test_a.py::y", "test_z.py::z"]
    assert all(os.path.isfile(os.path.join(ROOT, "tests", name)) for name in SLOW_FILES_FIRST)  # not renamed
