#!/usr/bin/env bash
# Verify megatron_let's GPU path on one H100/H200 with no network, and write one report.
#
#   bash scripts/gpu_check.sh --wheels DIR [--out DIR] [--budget-s 570]   # on the GPU machine
#   bash scripts/gpu_check.sh --prepare-wheels DIR                        # here (PyPI): fill DIR
#   bash scripts/gpu_check.sh --cpu-dry-run [--out DIR]                   # the same steps, tiny, on CPU
#   ... --second-pass-mcore 0.19.2     (or GPU_CHECK_SECOND_MCORE=0.19.2) # then the gpu tests again
#
# The whole check, wheel install included, stays within --budget-s (default 570 s: under 10 minutes
# on one H200); each step's cap is scaled down to what is left. The optional second pass installs
# megatron-core VERSION (Python >= 3.12; --prepare-wheels with the same option downloads it) into its
# own folder and runs `pytest -m gpu` once more (at most 240 s more), reported in OUT/mcore-VERSION,
# so that the megatron-core pin can be widened the day it passes. The exit code is the first pass's.
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
export GPU_CHECK_T0="${GPU_CHECK_T0:-$(date +%s)}"  # the budget counts from here
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${ROOT}/runs/gpu_check"
WHEELS=""
PREPARE=""
DRY=0
BUDGET=""
SECOND="${GPU_CHECK_SECOND_MCORE:-}"

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

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) [[ $# -ge 2 ]] || die "--wheels needs a folder"; WHEELS="$2"; shift 2 ;;
        --prepare-wheels) [[ $# -ge 2 ]] || die "--prepare-wheels needs a folder"; PREPARE="$2"; shift 2 ;;
        --out) [[ $# -ge 2 ]] || die "--out needs a folder"; OUT="$2"; shift 2 ;;
        --budget-s) [[ $# -ge 2 ]] || die "--budget-s needs seconds"; BUDGET="$2"; shift 2 ;;
        --cpu-dry-run) DRY=1; shift ;;
        --second-pass-mcore) [[ $# -ge 2 ]] || die "--second-pass-mcore needs a version"; SECOND="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
command -v "${PY}" >/dev/null 2>&1 || die "PYTHON=${PY} is not on PATH"

if [[ -n "${PREPARE}" ]]; then
    # cp312 manylinux wheels for the GPU image, without their dependencies (torch etc. are there).
    reqs=()
    for entry in "${PACKAGES[@]}"; do reqs+=("${entry#*=}"); done
    [[ -n "${SECOND}" ]] && reqs+=("megatron-core==${SECOND}")
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
SITE2="${OUT}/site-packages-mcore-${SECOND}"
if [[ -n "${SECOND}" ]] && ! PYTHONPATH="${SITE2}" "${PY}" -c \
        "import megatron.core, sys; sys.exit(megatron.core.__version__ != '${SECOND}')" >/dev/null 2>&1; then
    [[ -n "${WHEELS}" ]] || die "--second-pass-mcore ${SECOND}: megatron-core ${SECOND} is not installed in ${SITE2}: pass --wheels DIR (made by --prepare-wheels with --second-pass-mcore ${SECOND})"
    [[ -d "${WHEELS}" ]] || die "--wheels ${WHEELS} is not a folder"
    SECOND_INSTALL=1
fi
export PYTHONPATH="${ROOT}:${SITE}:${PYTHONPATH:-}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

args=(--out "${OUT}")
[[ -n "${BUDGET}" ]] && args+=(--budget-s "${BUDGET}")
[[ "${DRY}" == 1 ]] && args+=(--cpu-dry-run)
cd "${ROOT}"
rc=0
"${PY}" -m megatron_let.runtime.gpu_check "${args[@]}" || rc=$?
if [[ -n "${SECOND}" ]]; then
    if [[ "${SECOND_INSTALL:-0}" == 1 ]]; then
        echo "gpu_check.sh: second pass: installing megatron-core==${SECOND} from ${WHEELS} into ${SITE2}"
        "${PY}" -m pip install --quiet --no-index --no-deps --find-links "${WHEELS}" --target "${SITE2}" \
            "megatron-core==${SECOND}" || { echo "gpu_check.sh: second pass: install failed"; exit "${rc}"; }
    fi
    second=(--out "${OUT}/mcore-${SECOND}" --second-pass)
    [[ "${DRY}" == 1 ]] && second+=(--cpu-dry-run --budget-s 900)
    GPU_CHECK_T0="$(date +%s)" PYTHONPATH="${SITE2}:${PYTHONPATH}" \
        "${PY}" -m megatron_let.runtime.gpu_check "${second[@]}" \
        && echo "gpu_check.sh: second pass with megatron-core ${SECOND}: ok" \
        || echo "gpu_check.sh: second pass with megatron-core ${SECOND}: NOT OK (see ${OUT}/mcore-${SECOND})"
fi
exit "${rc}"
