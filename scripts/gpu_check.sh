#!/usr/bin/env bash
# Verify megatron_let's GPU path on one H100/H200 with no network, and write one report.
#
#   bash scripts/gpu_check.sh --wheels DIR [--out DIR] [--budget-s 450]   # on the GPU machine (default 450 s)
#   bash scripts/gpu_check.sh --prepare-wheels DIR                        # here (PyPI): fill DIR
#   bash scripts/gpu_check.sh --cpu-dry-run [--out DIR]                   # the same steps, tiny, on CPU
#
# The GPU machine's image is expected to have Python 3.12, CUDA torch, Triton, transformers,
# tensorboard and sentencepiece; what is missing of the pure-Python rest (megatron-core, pytest and
# its dependencies, psutil) is installed from the --wheels folder, offline, into a private target
# folder (the image's site-packages are not touched). Then megatron_let/runtime/gpu_check.py runs
# `pytest -m gpu`, the cosine-alignment benchmark and the training benchmark (~1B student, seq 1280,
# a random teacher with SmolLM2-135M's architecture), that teacher's forward eager vs
# --teacher-compile, and writes gpu_check_report.{md,json}.
# Environment: PYTHON (default python3) is the interpreter to use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${ROOT}/runs/gpu_check"
WHEELS=""
PREPARE=""
DRY=0
BUDGET=""

# import name -> requirement (versions as tested with megatron-core 0.16.1 on Python 3.12)
PACKAGES=(
    "megatron.core=megatron-core==0.16.1"
    "pytest=pytest==9.2.0"
    "pluggy=pluggy==1.7.0"
    "iniconfig=iniconfig==2.3.1"
    "pygments=pygments==2.21.0"
    "packaging=packaging==26.4"
    "psutil=psutil==7.2.2"
)

usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) [[ $# -ge 2 ]] || die "--wheels needs a folder"; WHEELS="$2"; shift 2 ;;
        --prepare-wheels) [[ $# -ge 2 ]] || die "--prepare-wheels needs a folder"; PREPARE="$2"; shift 2 ;;
        --out) [[ $# -ge 2 ]] || die "--out needs a folder"; OUT="$2"; shift 2 ;;
        --budget-s) [[ $# -ge 2 ]] || die "--budget-s needs seconds"; BUDGET="$2"; shift 2 ;;
        --cpu-dry-run) DRY=1; shift ;;
        -h|--help) usage 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
command -v "${PY}" >/dev/null 2>&1 || die "PYTHON=${PY} is not on PATH"

if [[ -n "${PREPARE}" ]]; then
    # cp312 manylinux wheels for the GPU image, without their dependencies (torch etc. are there).
    reqs=()
    for entry in "${PACKAGES[@]}"; do reqs+=("${entry#*=}"); done
    mkdir -p "${PREPARE}"
    "${PY}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "${PREPARE}" "${reqs[@]}"
    echo "gpu_check.sh: wheels for Python 3.12 in ${PREPARE}; copy it to the GPU machine and run"
    echo "    bash scripts/gpu_check.sh --wheels ${PREPARE}"
    exit 0
fi

SITE="${OUT}/site-packages"
missing=()
for entry in "${PACKAGES[@]}"; do
    module="${entry%%=*}"
    if ! PYTHONPATH="${SITE}:${PYTHONPATH:-}" "${PY}" -c "import ${module}" >/dev/null 2>&1; then
        missing+=("${entry#*=}")
    fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
    [[ -n "${WHEELS}" ]] || die "missing ${missing[*]}: pass --wheels DIR (made by --prepare-wheels)"
    [[ -d "${WHEELS}" ]] || die "--wheels ${WHEELS} is not a folder"
    echo "gpu_check.sh: installing ${missing[*]} from ${WHEELS} into ${SITE}"
    "${PY}" -m pip install --quiet --no-index --no-deps --find-links "${WHEELS}" --target "${SITE}" "${missing[@]}"
fi
export PYTHONPATH="${ROOT}:${SITE}:${PYTHONPATH:-}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

args=(--out "${OUT}")
[[ -n "${BUDGET}" ]] && args+=(--budget-s "${BUDGET}")
[[ "${DRY}" == 1 ]] && args+=(--cpu-dry-run)
cd "${ROOT}"
exec "${PY}" -m megatron_let.runtime.gpu_check "${args[@]}"
