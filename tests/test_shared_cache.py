"""launch.build_once: a folder shared by pytest-xdist workers (the SmolLM2 teacher cache) is built by one
worker while the others wait, never by two at once."""

import os
import subprocess
import sys
import time

from launch import ROOT, base_env

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
