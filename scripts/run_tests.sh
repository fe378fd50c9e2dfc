#!/usr/bin/env bash
# The test suite on a fresh machine: installs the environment, then runs pytest (CPU, gloo, 2 processes).
#   bash scripts/run_tests.sh [pytest args...]      e.g. bash scripts/run_tests.sh tests/test_model.py
# What it installs: the dev environment in .venv (scripts/install.sh --dev) and, only when run as root
# on Debian/Ubuntu without shellcheck, Debian's shellcheck system-wide (apt-get; RUN_TESTS_APT=0 skips
# that, and the lint tests then skip with the reason).
# pytest-xdist spreads the files over TEST_WORKERS workers (default 2, one per core; 0: no xdist),
# each file whole on one worker (--dist loadfile: a file's module fixtures are built once), the longest
# files first (tests/conftest.py SLOW_FILES_FIRST; --no-loadscope-reorder keeps that order); most
# training runs start warm (tests/warm_start.py). ~15 minutes measured on 2 cores (919 tests,
# 2026-12-04: 14:46 after the crossover study's driver test (+131 s of one worker); before it 12:13
# on a quiet machine, 13:49 and 14:13 from fresh clones, whose .ci/run took 15:32 and 15:57 with the
# install;
# 18:35 before megatron_let/runtime/jit_fusions.py, tests/hidden_imports and the warm starts); pytest
# prints a running count and, at the end, the 25 slowest tests and the reason of every skipped test.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
echo "[run_tests] installing the dev environment (bash scripts/install.sh --dev)"
bash "${ROOT}/scripts/install.sh" --dev
if ! command -v shellcheck >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == "0" ]] \
        && [[ "${RUN_TESTS_APT:-1}" == "1" ]]; then
    echo "[run_tests] installing Debian's shellcheck system-wide (apt-get install shellcheck;" \
         "RUN_TESTS_APT=0 skips this)"
    (apt-get update -qq && apt-get install -y -qq shellcheck) >/dev/null 2>&1 \
        || echo "[run_tests] shellcheck could not be installed; its tests will skip"
fi
cd "${ROOT}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORKERS="${TEST_WORKERS:-2}"
[[ "${WORKERS}" =~ ^[0-9]+$ ]] || { echo "[run_tests] TEST_WORKERS must be a number of workers (0: no xdist)" >&2; exit 2; }
echo "[run_tests] running pytest on ${WORKERS} workers (the whole of tests/: ~15 minutes on 2 cores)"
# -ra (pyproject's addopts) lists skip reasons; no path given: pyproject's testpaths (tests/).
# -n stays out of pyproject's addopts: the nested `pytest -m gpu` of scripts/gpu_check.sh runs serially.
exec "${ROOT}/.venv/bin/python" -m pytest -q -o console_output_style=count --durations=25 \
    -n "${WORKERS}" --dist loadfile --no-loadscope-reorder "$@"
