#!/usr/bin/env bash
# The test suite on a fresh machine: installs the environment, then runs pytest (CPU, gloo, 2 processes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "${ROOT}/scripts/install.sh" --dev
if ! command -v shellcheck >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == "0" ]]; then
    (apt-get update -qq && apt-get install -y -qq shellcheck) >/dev/null 2>&1 || echo "shellcheck not installed; its test will skip"
fi
cd "${ROOT}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${ROOT}/.venv/bin/python" -m pytest -q tests "$@"
