#!/usr/bin/env bash
# Reproduce the LET paper's claims at small scale, end to end, on a CPU (docs/results.md).
#
#   bash examples/reproduce/run.sh                       # full profile: corpus -> ... -> tables/plots
#   REPRO_PROFILE=smoke bash examples/reproduce/run.sh   # tiny, seconds per stage (tests)
#
# Stages (a finished stage or run is reused when its command is unchanged; delete its folder to redo):
#   1 corpus      examples/reproduce/build_corpus.py: Shakespeare + Python docs + Linux kernel docs,
#                 held-out valid/test documents (>= 20 MB in the full profile)
#   2 tokenizer   tools/train_tokenizer.py: sentencepiece BPE on the training split only
#   3 tokenize    tools/preprocess_data.py
#   4 teacher     pretrain a small teacher T (baseline objective), export it with tools/export_hf.py
#                 (--verify: HF logits == megatron_let logits); every student uses it via --teacher-path
#   5 init        the student M's initial checkpoint (--train-iters 0 --save): every method loads it
#                 (--no-load-optim --no-load-rng), and the data order is fixed by --seed: same start,
#                 same batches
#   6 main        M four ways: baseline, LET (λ0, k, S_stop scaled from the paper), RKD, SALT
#   7 ablations   (ABLATIONS=1) λ0 sweep; teacher->student layer pairs L2M, L2L, M2E (L2E = LET)
#   8 report      tools/compare_runs.py tables + tools/plot_runs.py figures under OUT_DIR/report;
#                 PUBLISH=1 copies them to docs/figures/reproduce_*.{csv,png} and renders docs/results.md
#                 from examples/reproduce/results_template.md (render_results.py)
#
# Environment: REPRO_PROFILE full|smoke (default full); OUT_DIR (default runs/reproduce/<profile>);
# SOURCES_DIR (archive cache, default runs/reproduce/sources); ABLATIONS 0|1 (default 1:
# run them); PARALLEL_RUNS (student runs at once, default 4, so the four methods share the machine alike; each uses OMP_NUM_THREADS=1);
# PUBLISH 0|1 (default 0); any variable of examples/reproduce/config.sh.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/../.." && pwd)"
PY="${PYTHON:-${ROOT}/.venv/bin/python}"
REPRO_PROFILE="${REPRO_PROFILE:-full}"
die() { echo "reproduce: error: $*" >&2; exit 2; }
case "${REPRO_PROFILE}" in full|smoke) ;; *) die "REPRO_PROFILE must be full or smoke, got '${REPRO_PROFILE}'" ;; esac
# shellcheck source=config.sh
source "${HERE}/config.sh"
OUT_DIR="${OUT_DIR:-${ROOT}/runs/reproduce/${REPRO_PROFILE}}"
SOURCES_DIR="${SOURCES_DIR:-${ROOT}/runs/reproduce/sources}"
ABLATIONS="${ABLATIONS:-1}"
PARALLEL_RUNS="${PARALLEL_RUNS:-4}"
PUBLISH="${PUBLISH:-0}"
case "${ABLATIONS}" in 0|1) ;; *) die "ABLATIONS must be 0 or 1, got '${ABLATIONS}'" ;; esac
case "${PUBLISH}" in 0|1) ;; *) die "PUBLISH must be 0 or 1, got '${PUBLISH}'" ;; esac
[[ "${PARALLEL_RUNS}" =~ ^[1-9][0-9]*$ ]] || die "PARALLEL_RUNS must be a positive integer, got '${PARALLEL_RUNS}'"
[[ -x "${PY}" ]] || die "python ${PY} not found (create the venv: bash scripts/install.sh)"
for v in TRAIN_ITERS TEACHER_ITERS EVAL_INTERVAL EVAL_ITERS LET_STOP_STEP; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "${v} must be a positive integer, got '${!v}'"
done
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore

mkdir -p "${OUT_DIR}" "${SOURCES_DIR}"
OUT_DIR="$(cd "${OUT_DIR}" && pwd)"
TIMINGS="${OUT_DIR}/timings.txt"  # stages of every invocation (reused stages take ~0 s)
T_ALL=${SECONDS}
stage_t=0 stage_name=""
stage() {
    end_stage
    stage_name="$1" stage_t=${SECONDS}
    echo; echo "=== ${stage_name} ($(date -u +%H:%M:%S) UTC)"
}
end_stage() {
    if [[ -n "${stage_name}" ]]; then
        printf '%-12s %6d s\n' "${stage_name}" $(( SECONDS - stage_t )) >> "${TIMINGS}"
    fi
}
# done_marker DIR CMD...: true when DIR/.done holds exactly this command (the step can be skipped)
is_done() { local dir=$1; shift; [[ -f "${dir}/.done" && "$(cat "${dir}/.done")" == "$*" ]]; }
mark_done() { local dir=$1; shift; printf '%s' "$*" > "${dir}/.done"; }

{ echo "profile ${REPRO_PROFILE} started $(date -u '+%F %T') UTC on $(hostname), $(nproc --all) cores";
  grep -m1 "model name" /proc/cpuinfo || true; } >> "${TIMINGS}"  # appended: one block per invocation

# ------------------------------------------------------------------------------------------------
stage corpus
CORPUS="${OUT_DIR}/corpus"
# shellcheck disable=SC2086
cmd=("${PY}" "${HERE}/build_corpus.py" --out "${CORPUS}" --cache "${SOURCES_DIR}" --min-total-mb "${MIN_CORPUS_MB}" ${CORPUS_FLAGS})
if is_done "${CORPUS}" "${cmd[*]}"; then echo "reusing ${CORPUS}"; else
    rm -rf "${CORPUS}"; "${cmd[@]}"; mark_done "${CORPUS}" "${cmd[*]}"; fi
SPLIT="$("${PY}" -c 'import json,sys; print(json.load(open(sys.argv[1]))["megatron_split"])' "${CORPUS}/manifest.json")"

stage tokenizer
TOK="${OUT_DIR}/tokenizer"
cmd=("${PY}" "${ROOT}/tools/train_tokenizer.py" --input "${CORPUS}/train.jsonl" --model-prefix "${TOK}/spm"
     --vocab-size "${VOCAB_SIZE}" --max-sentences "${TOKENIZER_SENTENCES}" --num-threads 2)
if is_done "${TOK}" "${cmd[*]} $(cat "${CORPUS}/.done")"; then echo "reusing ${TOK}"; else
    rm -rf "${TOK}"; mkdir -p "${TOK}"; "${cmd[@]}"; mark_done "${TOK}" "${cmd[*]} $(cat "${CORPUS}/.done")"; fi
TOKENIZER=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "${TOK}/spm.model")

stage tokenize
DATA_DIR="${OUT_DIR}/data"
DATA="${DATA_DIR}/corpus_text_document"
cmd=("${PY}" "${ROOT}/tools/preprocess_data.py" --input "${CORPUS}/corpus.jsonl" --output-prefix "${DATA_DIR}/corpus"
     "${TOKENIZER[@]}" --append-eod --workers 2 --log-interval 1000)
if is_done "${DATA_DIR}" "${cmd[*]} $(cat "${TOK}/.done")"; then echo "reusing ${DATA}"; else
    rm -rf "${DATA_DIR}"; mkdir -p "${DATA_DIR}"; "${cmd[@]}"; mark_done "${DATA_DIR}" "${cmd[*]} $(cat "${TOK}/.done")"; fi
DATA_ARGS=(--data-path "${DATA}" --split "${SPLIT}" --data-cache-path "${DATA_DIR}/cache" "${TOKENIZER[@]}")
UPSTREAM="$(cat "${DATA_DIR}/.done")"

# pretrain DIR ARGS...: one pretrain_let.py process writing DIR/{train.log,metrics.jsonl,tensorboard/}
pretrain() {
    local dir=$1; shift
    local -a cmd=("${PY}" "${ROOT}/pretrain_let.py" "$@" --device cpu "${DATA_ARGS[@]}"
                  --tensorboard-dir "${dir}/tensorboard" --metrics-jsonl "${dir}/metrics.jsonl")
    if is_done "${dir}" "${cmd[*]} ${UPSTREAM}"; then echo "reusing ${dir}"; return 0; fi
    rm -rf "${dir}"; mkdir -p "${dir}"
    printf '%q ' "${cmd[@]}" > "${dir}/command.sh"
    local t0=${SECONDS}
    if ! "${cmd[@]}" > "${dir}/train.log" 2>&1; then
        tail -n 30 "${dir}/train.log" >&2
        echo "reproduce: run ${dir} failed (log: ${dir}/train.log)" >&2
        return 1
    fi
    echo "$(( SECONDS - t0 ))" > "${dir}/wall_seconds"
    mark_done "${dir}" "${cmd[*]} ${UPSTREAM}"
    echo "finished ${dir##*/} in $(( SECONDS - t0 )) s"
}

# ------------------------------------------------------------------------------------------------
stage teacher
TEACHER="${OUT_DIR}/teacher"
# shellcheck disable=SC2086
pretrain "${TEACHER}/train" ${TEACHER_MODEL} --tie-embeddings-and-output-weights --seq-length "${SEQ}" \
    --micro-batch-size "${TEACHER_MBS}" --train-iters "${TEACHER_ITERS}" --lr "${TEACHER_LR}" --min-lr "${MIN_LR}" \
    --lr-warmup-fraction 0.1 --lr-decay-style cosine --weight-decay 0.01 --clip-grad 1.0 --seed "${TEACHER_SEED}" \
    --objective baseline --log-interval "${LOG_INTERVAL}" --eval-interval "${TEACHER_ITERS}" --eval-iters "${EVAL_ITERS}" \
    --save "${TEACHER}/ckpt"
TEACHER_HF="${TEACHER}/hf"
if is_done "${TEACHER_HF}" "$(cat "${TEACHER}/train/.done")"; then echo "reusing ${TEACHER_HF}"; else
    rm -rf "${TEACHER_HF}"
    "${PY}" "${ROOT}/tools/export_hf.py" --load "${TEACHER}/ckpt" --out "${TEACHER_HF}" \
        --tokenizer-model "${TOK}/spm.model" --dtype float32 --verify 2>&1 | tee "${TEACHER}/export.log"
    mark_done "${TEACHER_HF}" "$(cat "${TEACHER}/train/.done")"
fi

# ------------------------------------------------------------------------------------------------
# shellcheck disable=SC2206
STUDENT=(${STUDENT_MODEL} --tie-embeddings-and-output-weights --seq-length "${SEQ}" --micro-batch-size "${MBS}"
         --lr "${LR}" --min-lr "${MIN_LR}" --lr-warmup-fraction 0.1 --lr-decay-style cosine --weight-decay 0.01
         --clip-grad 1.0 --seed "${SEED}")
stage init
INIT="${OUT_DIR}/student_init"
pretrain "${INIT}/log" "${STUDENT[@]}" --train-iters 0 --objective baseline --save "${INIT}/ckpt"

RUNS="${OUT_DIR}/runs"
COMMON=("${STUDENT[@]}" --train-iters "${TRAIN_ITERS}" --load "${INIT}/ckpt" --no-load-optim --no-load-rng
        --log-interval "${LOG_INTERVAL}" --eval-interval "${EVAL_INTERVAL}" --eval-iters "${EVAL_ITERS}")
LET_ARGS=(--objective let --teacher-path "${TEACHER_HF}" --let-stop-step "${LET_STOP_STEP}")
KD_ARGS=(--teacher-path "${TEACHER_HF}" --kd-weight "${KD_WEIGHT}" --kd-temperature "${KD_TEMPERATURE}")

# student NAME ARGS...: queue one student run (at most PARALLEL_RUNS at once); wait_runs joins them
PIDS=()
student() {
    local name=$1; shift
    while (( $(jobs -rp | wc -l) >= PARALLEL_RUNS )); do wait -n || true; done
    pretrain "${RUNS}/${name}" "${COMMON[@]}" "$@" &
    PIDS+=($!)
}
wait_runs() {
    local pid failed=0
    for pid in "${PIDS[@]}"; do wait "${pid}" || failed=1; done
    PIDS=()
    (( failed == 0 )) || die "a student run failed (see its train.log above)"
}

stage main
echo "S_stop = ${LET_STOP_STEP} of ${TRAIN_ITERS} steps (paper: ${PAPER_STOP_STEP} of ~${PAPER_TOTAL_STEPS})"
student baseline --objective baseline
student let "${LET_ARGS[@]}" --let-lambda "${LET_LAMBDA}" --let-student-layer "${LET_STUDENT_LAYER}"
student rkd --objective rkd "${KD_ARGS[@]}"
student salt --objective salt "${KD_ARGS[@]}" --kd-stop-step "${KD_STOP_STEP}" --kd-transition step
wait_runs

if [[ "${ABLATIONS}" == 1 ]]; then
    stage ablations
    for lam in ${ABLATION_LAMBDAS}; do
        student "let_lambda${lam}" "${LET_ARGS[@]}" --let-lambda "${lam}" --let-student-layer "${LET_STUDENT_LAYER}"
    done
    for pair in ${ABLATION_PAIRS}; do
        case "${pair}" in  # teacher layer (-1 = last) -> student layer
            L2M) layers=(--let-teacher-layer -1 --let-student-layer "${STUDENT_MID_LAYER}") ;;
            L2L) layers=(--let-teacher-layer -1 --let-student-layer "${STUDENT_LAST_LAYER}") ;;
            M2E) layers=(--let-teacher-layer "${TEACHER_MID_LAYER}" --let-student-layer "${LET_STUDENT_LAYER}") ;;
            *) die "unknown layer pair '${pair}' in ABLATION_PAIRS (L2M, L2L, M2E)" ;;
        esac
        student "let_${pair}" "${LET_ARGS[@]}" --let-lambda "${LET_LAMBDA}" "${layers[@]}"
    done
    wait_runs
fi

# ------------------------------------------------------------------------------------------------
stage report
REPORT="${OUT_DIR}/report"
rm -rf "${REPORT}"; mkdir -p "${REPORT}"
# report NAME RUN=DIR...: comparison table (md/csv) and figures of one group of runs
report() {
    local group=$1; shift
    local -a specs=() present=()
    local spec
    for spec in "$@"; do [[ -f "${spec#*=}/.done" ]] && specs+=("${spec%%=*}=${spec#*=}/tensorboard"); done
    (( ${#specs[@]} >= 2 )) || { echo "report ${group}: fewer than two finished runs, skipped"; return 0; }
    "${PY}" "${ROOT}/tools/compare_runs.py" --runs "${specs[@]}" --baseline baseline \
        --out "${REPORT}/${group}.md" "${REPORT}/${group}.csv"
    "${PY}" "${ROOT}/tools/plot_runs.py" --runs "${specs[@]}" --out "${REPORT}/${group}_plots" --smooth 5
}
report main baseline="${RUNS}/baseline" LET="${RUNS}/let" RKD="${RUNS}/rkd" SALT="${RUNS}/salt"
if [[ "${ABLATIONS}" == 1 ]]; then
    lam_specs=(baseline="${RUNS}/baseline" "lambda${LET_LAMBDA}=${RUNS}/let")
    for lam in ${ABLATION_LAMBDAS}; do lam_specs+=("lambda${lam}=${RUNS}/let_lambda${lam}"); done
    report lambda "${lam_specs[@]}"
    pair_specs=(baseline="${RUNS}/baseline" L2E="${RUNS}/let")
    for pair in ${ABLATION_PAIRS}; do pair_specs+=("${pair}=${RUNS}/let_${pair}"); done
    report layers "${pair_specs[@]}"
fi
"${PY}" "${HERE}/summarize.py" --out-dir "${OUT_DIR}" --teacher-model "${TEACHER_MODEL}" \
    --student-model "${STUDENT_MODEL}" > "${REPORT}/setup.md"
cat "${REPORT}/setup.md"

if [[ "${PUBLISH}" == 1 ]]; then
    FIG="${ROOT}/docs/figures"
    mkdir -p "${FIG}"
    for f in "${REPORT}"/*.csv; do cp "${f}" "${FIG}/reproduce_$(basename "${f}")"; done
    for d in "${REPORT}"/*_plots; do
        g="$(basename "${d}" _plots)"
        for f in "${d}"/*.png; do cp "${f}" "${FIG}/reproduce_${g}_$(basename "${f}")"; done
    done
    "${PY}" "${HERE}/render_results.py" --report "${REPORT}" --template "${HERE}/results_template.md" \
        --out "${ROOT}/docs/results.md"
    echo "published ${REPORT} to ${FIG}/reproduce_* and docs/results.md"
fi
end_stage
printf '%-12s %6d s\n' total $(( SECONDS - T_ALL )) >> "${TIMINGS}"
cat "${TIMINGS}"
