#!/usr/bin/env bash
# Issue 23's study: does LET still pay once the student outgrows its teacher, at two student sizes,
# and does the grad-ratio schedule find λ without a grid? (docs/results-crossover.md)
#
#   PUBLISH=1 bash examples/reproduce/crossover.sh                 # ~2 h on 2 shared cores
#   REPRO_PROFILE=smoke bash examples/reproduce/crossover.sh       # every step, tiny (tests)
#
# Four invocations of examples/reproduce/run.sh (REPRO_PROFILE=crossover, examples/reproduce/config.sh):
#   1 the reproduction's corpus: a small teacher, then the x8 student trained past the point where
#     the baseline beats the teacher: the λ0 x S_stop grid (first seed), the grid's best settings at
#     every seed, SETTINGS and the grad-ratio schedule (ADAPTIVE) at every seed
#   2 the same corpus, student x32 (SIZE_STUDENTS): baseline, the paper's setting, SETTINGS plus the
#     grid's BEST_SETTINGS best settings, grad-ratio; each at every seed
#   3 a held-out corpus (HELDOUT_CORPUS_FLAGS: kernel documentation only; its own tokenizer and a
#     teacher of another seed) in HELDOUT_DIR: the fixed settings of step 2 and grad-ratio, both sizes
#   4 the reports (both corpora); PUBLISH=1 copies their figures and CSVs to FIGURES_DIR/crossover_*
#     and renders RESULTS_PAGE from examples/reproduce/crossover_template.md
# Finished runs are reused (run.sh's markers). Environment: REPRO_PROFILE (default crossover),
# OUT_DIR (default runs/reproduce/<profile>), HELDOUT_DIR (default OUT_DIR_heldout), PUBLISH 0|1,
# RESULTS_PAGE (default docs/results-crossover.md), FIGURES_DIR (default docs/figures), REPORT_DIR
# and HELDOUT_REPORT_DIR (default: each OUT_DIR's report/), and any variable of config.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/../.." && pwd)"
PY="${PYTHON:-${ROOT}/.venv/bin/python}"
die() { echo "crossover: error: $*" >&2; exit 2; }
export REPRO_PROFILE="${REPRO_PROFILE:-crossover}"
PUBLISH="${PUBLISH:-0}"
case "${PUBLISH}" in 0|1) ;; *) die "PUBLISH must be 0 or 1, got '${PUBLISH}'" ;; esac
case "${REPRO_PROFILE}" in crossover|smoke) ;; *) die "REPRO_PROFILE must be crossover or smoke, got '${REPRO_PROFILE}'" ;; esac
# shellcheck source-path=SCRIPTDIR source=config.sh
source "${HERE}/config.sh"
OUT_DIR="${OUT_DIR:-${ROOT}/runs/reproduce/${REPRO_PROFILE}}"
HELDOUT_DIR="${HELDOUT_DIR:-${OUT_DIR%/}_heldout}"
REPORT_DIR="${REPORT_DIR:-${OUT_DIR}/report}"
HELDOUT_REPORT_DIR="${HELDOUT_REPORT_DIR:-${HELDOUT_DIR}/report}"
RESULTS_PAGE="${RESULTS_PAGE:-${ROOT}/docs/results-crossover.md}"
FIGURES_DIR="${FIGURES_DIR:-${ROOT}/docs/figures}"
RUN=(bash "${HERE}/run.sh")
WRITE_PAGE="${PUBLISH}"
export PYTHON="${PY}" PUBLISH=0  # run.sh publishes the full profile's page only

echo "=== 1/4 corpus, teacher, grid and settings (x8), ${OUT_DIR}"
OUT_DIR="${OUT_DIR}" REPORT_DIR="${REPORT_DIR}" STAGES="teachers init grid best settings" "${RUN[@]}"
[[ -s "${OUT_DIR}/best_settings.txt" ]] || die "${OUT_DIR}/best_settings.txt missing: the best stage did not run"
mapfile -t best < "${OUT_DIR}/best_settings.txt"
FIXED="${SETTINGS}"  # the named settings and the grid's BEST_SETTINGS best ones, each once
for setting in "${best[@]}"; do [[ " ${FIXED} " == *" ${setting} "* ]] || FIXED="${FIXED:+${FIXED} }${setting}"; done
echo "fixed settings for the other size and corpus: ${FIXED} (the grid's best: ${best[*]})"

echo "=== 2/4 the other student size, ${OUT_DIR}"
OUT_DIR="${OUT_DIR}" REPORT_DIR="${REPORT_DIR}" SIZE_SETTINGS="${FIXED}" STAGES="sizes" "${RUN[@]}"

echo "=== 3/4 the held-out corpus (${HELDOUT_CORPUS_FLAGS}), ${HELDOUT_DIR}"
OUT_DIR="${HELDOUT_DIR}" REPORT_DIR="${HELDOUT_REPORT_DIR}" CORPUS_FLAGS="${HELDOUT_CORPUS_FLAGS}" \
    MIN_CORPUS_MB="${HELDOUT_MIN_CORPUS_MB}" TEACHER_SEED="${HELDOUT_TEACHER_SEED:-${TEACHER_SEED}}" MIXES=all \
    SETTINGS_MIXES=all SETTINGS="${FIXED}" SIZE_SETTINGS="${FIXED}" STAGES="teachers init settings sizes report" \
    "${RUN[@]}"

echo "=== 4/4 reports"
OUT_DIR="${OUT_DIR}" REPORT_DIR="${REPORT_DIR}" SIZE_SETTINGS="${FIXED}" STAGES="report" \
    REPORT_STAGES="grid best settings sizes" "${RUN[@]}"
if [[ "${WRITE_PAGE}" == 1 ]]; then
    mkdir -p "${FIGURES_DIR}"
    rm -f "${FIGURES_DIR}"/crossover_*
    for pair in ":${REPORT_DIR}" "heldout_:${HELDOUT_REPORT_DIR}"; do
        prefix="${pair%%:*}" dir="${pair#*:}"
        for f in "${dir}"/*.csv "${dir}"/*.png; do
            [[ -e "${f}" ]] && cp "${f}" "${FIGURES_DIR}/crossover_${prefix}$(basename "${f}")"
        done
    done
    "${PY}" "${HERE}/render_results.py" --report "${REPORT_DIR}" --report "heldout=${HELDOUT_REPORT_DIR}" \
        --template "${HERE}/crossover_template.md" --out "${RESULTS_PAGE}"
    echo "published ${REPORT_DIR} and ${HELDOUT_REPORT_DIR} to ${FIGURES_DIR}/crossover_* and ${RESULTS_PAGE}"
fi
