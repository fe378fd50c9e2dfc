#!/usr/bin/env bash
# Reproduce the LET paper's claims at small scale, end to end, on a CPU, over seeds (docs/results.md).
#
#   bash examples/reproduce/run.sh                       # full profile: corpus -> ... -> tables/plots
#   REPRO_PROFILE=smoke bash examples/reproduce/run.sh   # tiny, seconds per stage (tests)
#   PUBLISH=1 bash examples/reproduce/crossover.sh       # issue 23's study (REPRO_PROFILE=crossover:
#                                                        # students that outgrow their teacher)
#
# Stages (a finished stage or run is reused when its command is unchanged; delete its folder to redo):
#   1 corpus      examples/reproduce/build_corpus.py: Shakespeare + Python docs + Linux kernel docs,
#                 held-out valid/test documents (>= 20 MB in the full profile)
#   2 mixes       examples/reproduce/make_mixes.py: the training documents dealt into halves A/B;
#                 the student mixes of MIXES: `all` (half A, every source; a single-source corpus
#                 such as CORPUS_FLAGS="--sources linux-docs" MIXES=all works) and `pyshake` (half A,
#                 Python docs + Shakespeare), and the disjoint teacher's set (half B) when the
#                 teacher stage runs
#   3 tokenizer   tools/train_tokenizer.py: sentencepiece BPE on the training split only
#   4 tokenize    tools/preprocess_data.py, one dataset per mix
#   5 teachers    pretrain small teachers T (baseline objective): `same` on the students' data
#                 (mix all) and, only when the teacher stage runs, `disjoint` on half B; export each
#                 with tools/export_hf.py (--verify)
#   6 init        one initial student checkpoint per seed (--train-iters 0 --save); every run of that
#                 seed loads it (--no-load-optim --no-load-rng) and reads the batches --seed orders
#   7 main        per mix and seed: baseline, LET (cosine), LET (logsum), SALT; RKD at the first seed
#   8 teacher     LET with the disjoint teacher, first seed, each mix
#   9 grid        λ0 x S_stop grid (GRID_LAMBDAS x GRID_STOPS of the run) and its baseline, first
#                 seed, mix all
#  10 best        the BEST_SETTINGS grid settings of lowest final validation loss, at the other seeds
#                 (listed, best first, in OUT_DIR/best_settings.txt)
#  11 layers      teacher->student layer pairs (LAYER_PAIRS of L2M L2L M2E; L2E = LET), first seed
#  12 settings    SETTINGS ("λ0:S_stop% ...", e.g. "3:40 10:40") and ADAPTIVE ("r0[:S_stop%] ...":
#                 --let-lambda-mode grad-ratio; S_stop defaults to the paper's) at every seed, on
#                 SETTINGS_MIXES, with the baseline and the paper's setting; the report adds the
#                 best stage's settings and where each run crosses the teacher (as for sizes)
#  13 sizes       crossover / student size: per SIZE_STUDENTS entry ("NAME=model flags;..."), its
#                 own initial checkpoints, then baseline, LET at the paper's setting, SIZE_SETTINGS
#                 and SIZE_ADAPTIVE at every seed for SIZE_TRAIN_ITERS steps on mix all; the report
#                 finds where each curve crosses the teacher's final validation loss and compares
#                 each grad-ratio run with each fixed setting there and at the end (paired)
#  14 report      tools/compare_runs.py tables per seed, examples/reproduce/study.py mean ± sd tables
#                 over seeds, the grid and the figures under REPORT_DIR, for the stages of
#                 REPORT_STAGES (the paper's claims when it has main, teacher, grid, best and
#                 layers); PUBLISH=1 (full and smoke profiles) copies them to
#                 docs/figures/reproduce_*.{csv,png} and renders docs/results.md from
#                 examples/reproduce/results_template.md (render_results.py)
#
# Environment: REPRO_PROFILE full|smoke|crossover (default full); STAGES (default: the profile's
# PROFILE_STAGES, config.sh); REPORT_STAGES (the stages whose tables the report writes; default:
# STAGES, or PROFILE_STAGES when STAGES is just "report"); REPORT_DIR (default OUT_DIR/report);
# OUT_DIR (default runs/reproduce/<profile>);
# SOURCES_DIR (archive cache, default runs/reproduce/sources); PARALLEL_RUNS (student runs at once,
# default 4, each with OMP_NUM_THREADS=1); PUBLISH 0|1 (default 0; the full profile's page);
# ALLOW_CHANGED_ARCHIVES 0|1 (default 0: a
# corpus archive that differs from examples/reproduce/archives.json is an error); any variable of
# examples/reproduce/config.sh (GRID_LAMBDAS, GRID_STOPS, SETTINGS, ADAPTIVE, SIZE_*, EVAL_INTERVAL...).
# Speed-ups are resolved to one evaluation interval at the step a run reaches its target; the
# tables report that resolution and a linearly interpolated estimate (examples/reproduce/study.py);
# a smaller EVAL_INTERVAL resolves them more finely.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/../.." && pwd)"
PY="${PYTHON:-${ROOT}/.venv/bin/python}"
REPRO_PROFILE="${REPRO_PROFILE:-full}"
die() { echo "reproduce: error: $*" >&2; exit 2; }
case "${REPRO_PROFILE}" in full|smoke|crossover) ;; *) die "REPRO_PROFILE must be full, smoke or crossover, got '${REPRO_PROFILE}'" ;; esac
# shellcheck source-path=SCRIPTDIR source=config.sh
source "${HERE}/config.sh"
OUT_DIR="${OUT_DIR:-${ROOT}/runs/reproduce/${REPRO_PROFILE}}"
SOURCES_DIR="${SOURCES_DIR:-${ROOT}/runs/reproduce/sources}"
PARALLEL_RUNS="${PARALLEL_RUNS:-4}"
PUBLISH="${PUBLISH:-0}"
ALL_STAGES="teachers init main teacher grid best layers settings sizes report"
ALLOW_CHANGED_ARCHIVES="${ALLOW_CHANGED_ARCHIVES:-0}"
PROFILE_STAGES="${PROFILE_STAGES:-${ALL_STAGES}}"  # the profile's stages (config.sh)
STAGES="${STAGES:-${PROFILE_STAGES}}"
# what the report covers: the stages of this invocation, or the profile's when only the report is asked
if [[ -z "${REPORT_STAGES:-}" ]]; then
    read -r -a _asked <<< "${STAGES}"
    if [[ "${_asked[*]}" == report ]]; then REPORT_STAGES="${PROFILE_STAGES}"; else REPORT_STAGES="${STAGES}"; fi
fi
case "${PUBLISH}" in 0|1) ;; *) die "PUBLISH must be 0 or 1, got '${PUBLISH}'" ;; esac
if [[ "${PUBLISH}" == 1 && "${REPRO_PROFILE}" == crossover ]]; then
    die "the crossover profile's page combines two corpora: publish it with PUBLISH=1 bash examples/reproduce/crossover.sh"
fi
case "${ALLOW_CHANGED_ARCHIVES}" in 0|1) ;; *) die "ALLOW_CHANGED_ARCHIVES must be 0 or 1, got '${ALLOW_CHANGED_ARCHIVES}'" ;; esac
[[ "${PARALLEL_RUNS}" =~ ^[1-9][0-9]*$ ]] || die "PARALLEL_RUNS must be a positive integer, got '${PARALLEL_RUNS}'"
[[ -x "${PY}" ]] || die "python ${PY} not found (create the venv: bash scripts/install.sh)"
for v in TRAIN_ITERS TEACHER_ITERS EVAL_INTERVAL EVAL_ITERS LET_STOP_STEP BEST_SETTINGS SIZE_TRAIN_ITERS; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "${v} must be a positive integer, got '${!v}'"
done
for var in STAGES PROFILE_STAGES REPORT_STAGES; do
    for st in ${!var}; do
        [[ " ${ALL_STAGES} " == *" ${st} "* ]] || die "unknown stage '${st}' in ${var} (choose from: ${ALL_STAGES})"
    done
done
read -r -a SEED_LIST <<< "${SEEDS}"
(( ${#SEED_LIST[@]} >= 2 )) || die "SEEDS needs at least two seeds for a spread, got '${SEEDS}'"
for sd in "${SEED_LIST[@]}"; do [[ "${sd}" =~ ^[0-9]+$ ]] || die "SEEDS must be integers, got '${sd}'"; done
SEED0="${SEED_LIST[0]}"
read -r -a MIX_LIST <<< "${MIXES}"
(( ${#MIX_LIST[@]} >= 1 )) || die "MIXES is empty (choose from: all pyshake)"
for m in "${MIX_LIST[@]}"; do case "${m}" in all|pyshake) ;; *) die "MIXES: unknown mix '${m}' (all, pyshake)" ;; esac; done
read -r -a SETTINGS_MIX_LIST <<< "${SETTINGS_MIXES}"
for m in "${SETTINGS_MIX_LIST[@]}"; do
    [[ " ${MIXES} " == *" ${m} "* ]] || die "SETTINGS_MIXES: mix '${m}' is not in MIXES ('${MIXES}')"
done
is_number() { [[ "$1" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] && [[ ! "$1" =~ ^0*\.?0*$ ]]; }  # a positive decimal
is_percent() { [[ "$1" =~ ^[1-9][0-9]?$ ]]; }  # 1..99
for pct in ${GRID_STOPS}; do is_percent "${pct}" || die "GRID_STOPS must be integers in 1..99, got '${pct}'"; done
for lam in ${GRID_LAMBDAS}; do is_number "${lam}" || die "GRID_LAMBDAS must be positive numbers, got '${lam}'"; done
# check_settings NAME VALUE...: each "λ0:S_stop%"
check_settings() {
    local name=$1 st; shift
    for st in "$@"; do
        # shellcheck disable=SC2015  # die only when a check fails
        [[ "${st}" == *:* ]] && is_number "${st%%:*}" && is_percent "${st##*:}" \
            || die "${name} entries must be λ0:S_stop% (e.g. 3:40), got '${st}'"
    done
}
# check_adaptive NAME VALUE...: each "r0" or "r0:S_stop%"
check_adaptive() {
    local name=$1 st; shift
    for st in "$@"; do
        { is_number "${st%%:*}" && { [[ "${st}" != *:* ]] || is_percent "${st##*:}"; }; } \
            || die "${name} entries must be r0 or r0:S_stop% (e.g. 1 or 1:40), got '${st}'"
    done
}
# shellcheck disable=SC2086
check_settings SETTINGS ${SETTINGS}
# shellcheck disable=SC2086
check_settings SIZE_SETTINGS ${SIZE_SETTINGS}
# shellcheck disable=SC2086
check_adaptive ADAPTIVE ${ADAPTIVE}
# shellcheck disable=SC2086
check_adaptive SIZE_ADAPTIVE ${SIZE_ADAPTIVE}
declare -A SIZE_FLAGS=()
SIZE_NAMES=()
IFS=';' read -r -a _sizes <<< "${SIZE_STUDENTS}"
for entry in "${_sizes[@]}"; do
    [[ -z "${entry// /}" ]] && continue
    name="${entry%%=*}"
    [[ "${entry}" == *=* && "${name}" =~ ^[A-Za-z0-9_]+$ && -n "${entry#*=}" ]] \
        || die "SIZE_STUDENTS entries must be NAME=model flags separated by ';', got '${entry}'"
    SIZE_FLAGS[${name}]="${entry#*=}"
    SIZE_NAMES+=("${name}")
done
wants() { [[ " ${STAGES} " == *" $1 "* ]]; }
reports() { [[ " ${REPORT_STAGES} " == *" $1 "* ]]; }  # the report shows stage $1's results
if wants sizes; then (( ${#SIZE_NAMES[@]} >= 1 )) || die "the sizes stage needs SIZE_STUDENTS"; fi
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
# shellcheck disable=SC2086,SC2206  # CORPUS_FLAGS: words
cmd=("${PY}" "${HERE}/build_corpus.py" --out "${CORPUS}" --cache "${SOURCES_DIR}" --min-total-mb "${MIN_CORPUS_MB}" ${CORPUS_FLAGS})
if [[ "${ALLOW_CHANGED_ARCHIVES}" == 1 ]]; then cmd+=(--allow-changed-archives); fi
if is_done "${CORPUS}" "${cmd[*]}"; then echo "reusing ${CORPUS}"; else
    rm -rf "${CORPUS}"; "${cmd[@]}"; mark_done "${CORPUS}" "${cmd[*]}"; fi

stage mixes
MIX_DIR="${OUT_DIR}/mixes"
# the training sets this invocation needs: student_all (the same-data teacher's and the grid's), the
# other mixes of MIXES, the disjoint teacher's set when the teacher stage (its only user) runs
SETS=(student_all)
for m in "${MIX_LIST[@]}"; do [[ "${m}" == all ]] || SETS+=("student_${m}"); done
if wants teacher; then SETS+=(teacher_disjoint); fi
for set_name in "${SETS[@]}"; do  # one folder (and marker) per set: another stage list reuses them
    cmd=("${PY}" "${HERE}/make_mixes.py" --corpus "${CORPUS}" --out "${MIX_DIR}" --mixes "${set_name}")
    if is_done "${MIX_DIR}/${set_name}" "${cmd[*]} $(cat "${CORPUS}/.done")"; then echo "reusing ${MIX_DIR}/${set_name}"; else
        rm -rf "${MIX_DIR:?}/${set_name}"; "${cmd[@]}"; mark_done "${MIX_DIR}/${set_name}" "${cmd[*]} $(cat "${CORPUS}/.done")"; fi
done

stage tokenizer
TOK="${OUT_DIR}/tokenizer"
cmd=("${PY}" "${ROOT}/tools/train_tokenizer.py" --input "${CORPUS}/train.jsonl" --model-prefix "${TOK}/spm"
     --vocab-size "${VOCAB_SIZE}" --max-sentences "${TOKENIZER_SENTENCES}" --num-threads 2)
if is_done "${TOK}" "${cmd[*]} $(cat "${CORPUS}/.done")"; then echo "reusing ${TOK}"; else
    rm -rf "${TOK}"; mkdir -p "${TOK}"; "${cmd[@]}"; mark_done "${TOK}" "${cmd[*]} $(cat "${CORPUS}/.done")"; fi
TOKENIZER=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "${TOK}/spm.model")

stage tokenize
DATA_DIR="${OUT_DIR}/data"
# data NAME: the trainer's data flags of one tokenized set (student_all, student_pyshake, teacher_disjoint)
declare -A DATA_FLAGS=()
for set_name in "${SETS[@]}"; do
    dir="${DATA_DIR}/${set_name}"
    cmd=("${PY}" "${ROOT}/tools/preprocess_data.py" --input "${MIX_DIR}/${set_name}/corpus.jsonl"
         --output-prefix "${dir}/corpus" "${TOKENIZER[@]}" --append-eod --workers 2 --log-interval 1000)
    upstream="$(cat "${TOK}/.done") $(cat "${MIX_DIR}/${set_name}/.done")"
    if is_done "${dir}" "${cmd[*]} ${upstream}"; then echo "reusing ${dir}"; else
        rm -rf "${dir}"; mkdir -p "${dir}"; "${cmd[@]}"; mark_done "${dir}" "${cmd[*]} ${upstream}"; fi
    split="$("${PY}" -c 'import json,sys; print(json.load(open(sys.argv[1]))["megatron_split"])' \
        "${MIX_DIR}/${set_name}/manifest.json")"
    DATA_FLAGS[${set_name}]="--data-path ${dir}/corpus_text_document --split ${split} --data-cache-path ${dir}/cache"
done
# a run depends on the set it reads and on student_all (the same-data teacher's), not on which other
# sets this invocation made
upstream_of() { cat "${DATA_DIR}/$1/.done" "${DATA_DIR}/student_all/.done" | cksum; }

# pretrain DIR SET ARGS...: one pretrain_let.py process on data set SET writing
# DIR/{train.log,metrics.jsonl,tensorboard/}
pretrain() {
    local dir=$1 set_name=$2; shift 2
    local -a data
    read -r -a data <<< "${DATA_FLAGS[${set_name}]}"
    local -a cmd=("${PY}" "${ROOT}/pretrain_let.py" "$@" --device cpu "${data[@]}" "${TOKENIZER[@]}"
                  --tensorboard-dir "${dir}/tensorboard" --metrics-jsonl "${dir}/metrics.jsonl")
    local up
    up="$(upstream_of "${set_name}")"
    if is_done "${dir}" "${cmd[*]} ${up}"; then echo "reusing ${dir}"; return 0; fi
    rm -rf "${dir}"; mkdir -p "${dir}"
    printf '%q ' "${cmd[@]}" > "${dir}/command.sh"
    local t0=${SECONDS}
    if ! "${cmd[@]}" > "${dir}/train.log" 2>&1; then
        tail -n 30 "${dir}/train.log" >&2
        echo "reproduce: run ${dir} failed (log: ${dir}/train.log)" >&2
        return 1
    fi
    echo "$(( SECONDS - t0 ))" > "${dir}/wall_seconds"
    mark_done "${dir}" "${cmd[*]} ${up}"
    echo "finished ${dir#"${OUT_DIR}"/} in $(( SECONDS - t0 )) s"
}

# queue CMD...: run one job in the background (at most PARALLEL_RUNS at once); wait_runs joins them
PIDS=()
queue() {
    while (( $(jobs -rp | wc -l) >= PARALLEL_RUNS )); do wait -n || true; done
    "$@" &
    PIDS+=($!)
}
wait_runs() {
    local pid failed=0
    for pid in "${PIDS[@]}"; do wait "${pid}" || failed=1; done
    PIDS=()
    (( failed == 0 )) || die "a run failed (see its train.log above)"
}

# ------------------------------------------------------------------------------------------------
TEACHERS="${OUT_DIR}/teachers"
declare -A TEACHER_SET=([same]=student_all [disjoint]=teacher_disjoint)
teacher_run() {  # NAME: pretrain teacher NAME on its set, then export it to TEACHERS/NAME/hf
    local name=$1 dir="${TEACHERS}/$1"
    # shellcheck disable=SC2086
    pretrain "${dir}/train" "${TEACHER_SET[${name}]}" ${TEACHER_MODEL} --tie-embeddings-and-output-weights \
        --seq-length "${SEQ}" --micro-batch-size "${TEACHER_MBS}" --train-iters "${TEACHER_ITERS}" \
        --lr "${TEACHER_LR}" --min-lr "${MIN_LR}" --lr-warmup-fraction 0.1 --lr-decay-style cosine \
        --weight-decay 0.01 --clip-grad 1.0 --seed "${TEACHER_SEED}" --objective baseline \
        --log-interval "${LOG_INTERVAL}" --eval-interval "${TEACHER_ITERS}" --eval-iters "${EVAL_ITERS}" \
        --save "${dir}/ckpt" || return 1
    if is_done "${dir}/hf" "$(cat "${dir}/train/.done")"; then echo "reusing ${dir}/hf"; return 0; fi
    rm -rf "${dir}/hf"
    "${PY}" "${ROOT}/tools/export_hf.py" --load "${dir}/ckpt" --out "${dir}/hf" \
        --tokenizer-model "${TOK}/spm.model" --dtype float32 --verify > "${dir}/export.log" 2>&1 \
        || { cat "${dir}/export.log" >&2; return 1; }
    mark_done "${dir}/hf" "$(cat "${dir}/train/.done")"
}
if wants teachers; then
    stage teachers
    queue teacher_run same
    if wants teacher; then queue teacher_run disjoint; fi  # its only user
fi

# shellcheck disable=SC2206
STUDENT=(${STUDENT_MODEL} --tie-embeddings-and-output-weights --seq-length "${SEQ}" --micro-batch-size "${MBS}"
         --lr "${LR}" --min-lr "${MIN_LR}" --lr-warmup-fraction 0.1 --lr-decay-style cosine --weight-decay 0.01
         --clip-grad 1.0)
INIT="${OUT_DIR}/student_init"
if wants init; then
    stage init  # (runs alongside the teachers: it needs no teacher)
    for sd in "${SEED_LIST[@]}"; do
        queue pretrain "${INIT}/s${sd}/log" student_all "${STUDENT[@]}" --seed "${sd}" --train-iters 0 \
            --objective baseline --save "${INIT}/s${sd}/ckpt"
    done
fi
wait_runs

RUNS="${OUT_DIR}/runs"
# student MIX SEED NAME ARGS...: queue one student run RUNS/MIX/sSEED/NAME from that seed's init
student() {
    local mix=$1 sd=$2 name=$3; shift 3
    queue pretrain "${RUNS}/${mix}/s${sd}/${name}" "student_${mix}" "${STUDENT[@]}" --seed "${sd}" \
        --train-iters "${TRAIN_ITERS}" --load "${INIT}/s${sd}/ckpt" --no-load-optim --no-load-rng \
        --log-interval "${LOG_INTERVAL}" --eval-interval "${EVAL_INTERVAL}" --eval-iters "${EVAL_ITERS}" "$@"
}
LET=(--objective let --teacher-path "${TEACHERS}/same/hf" --let-student-layer "${LET_STUDENT_LAYER}")
KD=(--teacher-path "${TEACHERS}/same/hf" --kd-weight "${KD_WEIGHT}" --kd-temperature "${KD_TEMPERATURE}")
# stop_at PERCENT [ITERS]: S_stop in steps, PERCENT of ITERS (default TRAIN_ITERS), at least 1
stop_at() { local s=$(( (${2:-${TRAIN_ITERS}} * $1 + 50) / 100 )); (( s >= 1 )) || s=1; echo "${s}"; }
# setting_label LAMBDA PERCENT [ITERS]: a table label naming the real S_stop
setting_label() { echo "λ0 $1, S_stop $(stop_at "$2" "${3:-}") ($2%)"; }
# adaptive_run R0[:PERCENT] [ITERS]: "NAME|S_STOP|LABEL" of a grad-ratio run (default S_stop: the paper's)
adaptive_run() {
    local r0="${1%%:*}" iters="${2:-${TRAIN_ITERS}}" stop pct
    if [[ "$1" == *:* ]]; then pct="${1##*:}"; stop="$(stop_at "${pct}" "${iters}")"
    else stop=$(( (iters * PAPER_STOP_STEP + PAPER_TOTAL_STEPS / 2) / PAPER_TOTAL_STEPS )); (( stop >= 1 )) || stop=1
         pct=$(( (100 * stop + iters / 2) / iters )); fi
    echo "adaptive_r${r0}_s${pct}|${stop}|grad-ratio r0 ${r0}, S_stop ${stop} (${pct}%)"
}
ADAPT=(--let-lambda-mode grad-ratio)

if wants main; then
    stage main
    echo "S_stop = ${LET_STOP_STEP} of ${TRAIN_ITERS} steps (paper: ${PAPER_STOP_STEP} of ~${PAPER_TOTAL_STEPS})"
    for mix in "${MIX_LIST[@]}"; do
        for sd in "${SEED_LIST[@]}"; do
            student "${mix}" "${sd}" baseline --objective baseline
            student "${mix}" "${sd}" let "${LET[@]}" --let-lambda "${LET_LAMBDA}" --let-stop-step "${LET_STOP_STEP}"
            student "${mix}" "${sd}" let_logsum "${LET[@]}" --let-lambda "${LET_LAMBDA}" \
                --let-stop-step "${LET_STOP_STEP}" --let-loss logsum
            student "${mix}" "${sd}" salt --objective salt "${KD[@]}" --kd-stop-step "${KD_STOP_STEP}" --kd-transition step
        done
        student "${mix}" "${SEED0}" rkd --objective rkd "${KD[@]}"
    done
fi
if wants teacher; then
    stage teacher
    for mix in "${MIX_LIST[@]}"; do
        student "${mix}" "${SEED0}" let_disjoint --objective let --teacher-path "${TEACHERS}/disjoint/hf" \
            --let-student-layer "${LET_STUDENT_LAYER}" --let-lambda "${LET_LAMBDA}" --let-stop-step "${LET_STOP_STEP}"
    done
fi
grid_name() { echo "grid_l$1_s$2"; }  # LAMBDA PERCENT
if wants grid; then
    stage grid
    student all "${SEED0}" baseline --objective baseline  # the grid's reference (main's run when it ran)
    for lam in ${GRID_LAMBDAS}; do
        for pct in ${GRID_STOPS}; do
            student all "${SEED0}" "$(grid_name "${lam}" "${pct}")" "${LET[@]}" --let-lambda "${lam}" \
                --let-stop-step "$(stop_at "${pct}")"
        done
    done
fi
wait_runs  # the grid decides the next stage

REPORT="${REPORT_DIR:-${OUT_DIR}/report}"
mkdir -p "${REPORT}"
STUDY=("${PY}" "${HERE}/study.py")
GRID_SPECS=()
for lam in ${GRID_LAMBDAS}; do
    for pct in ${GRID_STOPS}; do GRID_SPECS+=("${lam}:${pct}=$(grid_name "${lam}" "${pct}")"); done
done
if wants best; then
    stage best
    mapfile -t BEST < <("${STUDY[@]}" best --runs-dir "${RUNS}/all/s${SEED0}" --grid "${GRID_SPECS[@]}" \
                        --top "${BEST_SETTINGS}")
    echo "best grid settings (lowest final validation loss at seed ${SEED0}): ${BEST[*]}"
    printf '%s\n' "${BEST[@]}" > "${OUT_DIR}/best_settings.txt"  # best first (examples/reproduce/crossover.sh)
    for setting in "${BEST[@]}"; do
        lam="${setting%%:*}" pct="${setting##*:}"
        for sd in "${SEED_LIST[@]:1}"; do
            student all "${sd}" "$(grid_name "${lam}" "${pct}")" "${LET[@]}" --let-lambda "${lam}" \
                --let-stop-step "$(stop_at "${pct}")"
        done
    done
fi
if wants layers; then
    stage layers
    for pair in ${LAYER_PAIRS}; do
        case "${pair}" in  # teacher layer (-1 = last) -> student layer
            L2M) layers=(--let-teacher-layer -1 --let-student-layer "${STUDENT_MID_LAYER}") ;;
            L2L) layers=(--let-teacher-layer -1 --let-student-layer "${STUDENT_LAST_LAYER}") ;;
            M2E) layers=(--let-teacher-layer "${TEACHER_MID_LAYER}" --let-student-layer "${LET_STUDENT_LAYER}") ;;
            *) die "unknown layer pair '${pair}' in LAYER_PAIRS (L2M, L2L, M2E)" ;;
        esac
        student all "${SEED0}" "let_${pair}" --objective let --teacher-path "${TEACHERS}/same/hf" \
            --let-lambda "${LET_LAMBDA}" --let-stop-step "${LET_STOP_STEP}" "${layers[@]}"
    done
fi
wait_runs  # the best stage may have queued the same run directories
if wants settings; then
    stage settings  # named settings (the grid's run names: a grid run of the same setting is reused)
    for mix in "${SETTINGS_MIX_LIST[@]}"; do
        for sd in "${SEED_LIST[@]}"; do
            # the table's reference rows (main's runs when it ran): baseline and the paper's setting
            student "${mix}" "${sd}" baseline --objective baseline
            student "${mix}" "${sd}" let "${LET[@]}" --let-lambda "${LET_LAMBDA}" --let-stop-step "${LET_STOP_STEP}"
            for setting in ${SETTINGS}; do
                lam="${setting%%:*}" pct="${setting##*:}"
                student "${mix}" "${sd}" "$(grid_name "${lam}" "${pct}")" "${LET[@]}" --let-lambda "${lam}" \
                    --let-stop-step "$(stop_at "${pct}")"
            done
            for a in ${ADAPTIVE}; do
                IFS='|' read -r name stop _ <<< "$(adaptive_run "${a}")"
                student "${mix}" "${sd}" "${name}" "${LET[@]}" "${ADAPT[@]}" --let-grad-ratio "${a%%:*}" \
                    --let-stop-step "${stop}"
            done
        done
    done
fi
wait_runs
if wants sizes; then
    stage sizes  # crossover / student size: each size its own initial checkpoints, mix all
    for size in "${SIZE_NAMES[@]}"; do
        # shellcheck disable=SC2206
        model=(${SIZE_FLAGS[${size}]} --tie-embeddings-and-output-weights --seq-length "${SEQ}"
               --micro-batch-size "${MBS}" --lr "${LR}" --min-lr "${MIN_LR}" --lr-warmup-fraction 0.1
               --lr-decay-style cosine --weight-decay 0.01 --clip-grad 1.0)
        for sd in "${SEED_LIST[@]}"; do
            queue pretrain "${OUT_DIR}/size_init/${size}/s${sd}/log" student_all "${model[@]}" --seed "${sd}" \
                --train-iters 0 --objective baseline --save "${OUT_DIR}/size_init/${size}/s${sd}/ckpt"
        done
    done
    wait_runs
    paper_stop="$(( (SIZE_TRAIN_ITERS * PAPER_STOP_STEP + PAPER_TOTAL_STEPS / 2) / PAPER_TOTAL_STEPS ))"
    (( paper_stop >= 1 )) || paper_stop=1
    for size in "${SIZE_NAMES[@]}"; do
        # shellcheck disable=SC2206
        model=(${SIZE_FLAGS[${size}]} --tie-embeddings-and-output-weights --seq-length "${SEQ}"
               --micro-batch-size "${MBS}" --lr "${LR}" --min-lr "${MIN_LR}" --lr-warmup-fraction 0.1
               --lr-decay-style cosine --weight-decay 0.01 --clip-grad 1.0)
        for sd in "${SEED_LIST[@]}"; do
            sized() {  # NAME ARGS...: one run of this size and seed
                local name=$1; shift
                queue pretrain "${RUNS}/size_${size}/s${sd}/${name}" student_all "${model[@]}" --seed "${sd}" \
                    --train-iters "${SIZE_TRAIN_ITERS}" --load "${OUT_DIR}/size_init/${size}/s${sd}/ckpt" \
                    --no-load-optim --no-load-rng --log-interval "${LOG_INTERVAL}" \
                    --eval-interval "${EVAL_INTERVAL}" --eval-iters "${EVAL_ITERS}" "$@"
            }
            sized baseline --objective baseline
            sized let "${LET[@]}" --let-lambda "${LET_LAMBDA}" --let-stop-step "${paper_stop}"
            for setting in ${SIZE_SETTINGS}; do
                lam="${setting%%:*}" pct="${setting##*:}"
                sized "$(grid_name "${lam}" "${pct}")" "${LET[@]}" --let-lambda "${lam}" \
                    --let-stop-step "$(stop_at "${pct}" "${SIZE_TRAIN_ITERS}")"
            done
            for a in ${SIZE_ADAPTIVE}; do
                IFS='|' read -r name stop _ <<< "$(adaptive_run "${a}" "${SIZE_TRAIN_ITERS}")"
                sized "${name}" "${LET[@]}" "${ADAPT[@]}" --let-grad-ratio "${a%%:*}" --let-stop-step "${stop}"
            done
        done
    done
fi
wait_runs

# ------------------------------------------------------------------------------------------------
if wants report; then
    stage report
    rm -rf "${REPORT}"; mkdir -p "${REPORT}"
    if reports main; then
        MAIN_SPECS=(baseline=baseline LET=let "LET-logsum=let_logsum" SALT=salt RKD=rkd)
        for mix in "${MIX_LIST[@]}"; do
            "${STUDY[@]}" seeds --root "${RUNS}/${mix}" --seeds "${SEED_LIST[@]}" --runs "${MAIN_SPECS[@]}" \
                --pairs LET:SALT LET:LET-logsum LET:RKD --out "${REPORT}/main_${mix}" --title "mix ${mix}"
        done
    fi
    if reports teacher; then
        for mix in "${MIX_LIST[@]}"; do
            "${STUDY[@]}" seeds --root "${RUNS}/${mix}" --seeds "${SEED0}" --runs baseline=baseline \
                "LET (same-data teacher)=let" "LET (disjoint teacher)=let_disjoint" \
                --pairs "LET (disjoint teacher):LET (same-data teacher)" --out "${REPORT}/teacher_${mix}" --title "mix ${mix}, seed ${SEED0}"
        done
    fi
    BEST=()
    if reports grid; then
        "${STUDY[@]}" grid --runs-dir "${RUNS}/all/s${SEED0}" --grid "${GRID_SPECS[@]}" --train-iters "${TRAIN_ITERS}" \
            --out "${REPORT}/grid"
    fi
    if reports grid || reports best; then
        mapfile -t BEST < <("${STUDY[@]}" best --runs-dir "${RUNS}/all/s${SEED0}" --grid "${GRID_SPECS[@]}" \
                            --top "${BEST_SETTINGS}")
    fi
    if reports best; then
        best_specs=(baseline=baseline "LET (λ0 ${LET_LAMBDA}, S_stop ${LET_STOP_STEP})=let")
        for setting in "${BEST[@]}"; do
            lam="${setting%%:*}" pct="${setting##*:}"
            best_specs+=("$(setting_label "${lam}" "${pct}")=$(grid_name "${lam}" "${pct}")")
        done
        "${STUDY[@]}" seeds --root "${RUNS}/all" --seeds "${SEED_LIST[@]}" --runs "${best_specs[@]}" \
            --out "${REPORT}/best" --title "mix all, best grid settings"
    fi
    if reports layers; then
        layer_specs=(baseline=baseline L2E=let)
        for pair in ${LAYER_PAIRS}; do layer_specs+=("${pair}=let_${pair}"); done
        "${STUDY[@]}" seeds --root "${RUNS}/all" --seeds "${SEED0}" --runs "${layer_specs[@]}" \
            --out "${REPORT}/layers" --title "mix all, seed ${SEED0}"
    fi
    # teacher_windows MIX: TEACHER_WINDOWS = SEED=JSON, the teacher's loss on the validation windows a
    # student of that seed evaluates on MIX (EVAL_ITERS x MBS windows, shuffled by the seed)
    teacher_windows() {
        local mix=$1 sd out
        local -a data
        read -r -a data <<< "${DATA_FLAGS[student_${mix}]}"
        TEACHER_WINDOWS=()
        for sd in "${SEED_LIST[@]}"; do
            out="${REPORT}/teacher_windows_${mix}_s${sd}.json"
            if [[ ! -s "${out}" ]]; then
                "${PY}" "${ROOT}/tools/evaluate.py" --task ppl --load "${TEACHERS}/same/ckpt" "${data[@]}" \
                    --eval-split valid --seed "${sd}" --micro-batch-size "${MBS}" --eval-samples $(( EVAL_ITERS * MBS )) \
                    --device cpu --output "${out}" > "${out%.json}.log" 2>&1 \
                    || { cat "${out%.json}.log" >&2; die "the teacher's evaluation on seed ${sd}'s windows failed"; }
            fi
            TEACHER_WINDOWS+=("${sd}=${out}")
        done
    }
    # comparison ITERS PAPER_STOP "R0 ..." FIXED...: the runs of one table over seeds, as study.py specs
    # (baseline, the paper's setting, each fixed λ0:S_stop%, each grad-ratio r0) and pairs (each
    # grad-ratio run against each fixed setting)
    comparison() {
        local iters=$1 paper_stop=$2 adaptive=$3 setting a name label; shift 3
        specs=(baseline=baseline "λ0 ${LET_LAMBDA}, S_stop ${paper_stop} (paper)=let")
        pairs=()
        for setting in "$@"; do
            specs+=("$(setting_label "${setting%%:*}" "${setting##*:}" "${iters}")=$(grid_name "${setting%%:*}" "${setting##*:}")")
        done
        for a in ${adaptive}; do
            IFS='|' read -r name _ label <<< "$(adaptive_run "${a}" "${iters}")"
            specs+=("${label}=${name}")
            for setting in "$@"; do
                pairs+=("${label}:$(setting_label "${setting%%:*}" "${setting##*:}" "${iters}")")
            done
        done
    }
    if reports settings && [[ -n "${SETTINGS}${ADAPTIVE}" ]]; then
        for mix in "${SETTINGS_MIX_LIST[@]}"; do  # named settings and grad-ratio runs at every seed
            fixed=()  # the named settings, then (mix all) the grid's best ones the best stage ran at every seed
            for setting in ${SETTINGS}; do fixed+=("${setting}"); done
            if [[ "${mix}" == all ]] && reports best; then
                for setting in "${BEST[@]}"; do
                    [[ " ${fixed[*]} " == *" ${setting} "* ]] || fixed+=("${setting}")
                done
            fi
            comparison "${TRAIN_ITERS}" "${LET_STOP_STEP}" "${ADAPTIVE}" "${fixed[@]}"
            "${STUDY[@]}" seeds --root "${RUNS}/${mix}" --seeds "${SEED_LIST[@]}" --runs "${specs[@]}" \
                --pairs "${pairs[@]}" --out "${REPORT}/settings_${mix}" --title "mix ${mix}, named settings"
            teacher_windows "${mix}"
            "${STUDY[@]}" crossover --root "${RUNS}/${mix}" --seeds "${SEED_LIST[@]}" --runs "${specs[@]}" \
                --teacher-metrics "${TEACHERS}/same/train/metrics.jsonl" --out "${REPORT}/crossover_${mix}" \
                --pairs "${pairs[@]}" --teacher-windows "${TEACHER_WINDOWS[@]}" --title "main student, mix ${mix}"
        done
    fi
    if reports sizes; then
        paper_stop="$(( (SIZE_TRAIN_ITERS * PAPER_STOP_STEP + PAPER_TOTAL_STEPS / 2) / PAPER_TOTAL_STEPS ))"
        (( paper_stop >= 1 )) || paper_stop=1
        for size in "${SIZE_NAMES[@]}"; do
            # shellcheck disable=SC2086  # SIZE_SETTINGS: words
            comparison "${SIZE_TRAIN_ITERS}" "${paper_stop}" "${SIZE_ADAPTIVE}" ${SIZE_SETTINGS}
            "${STUDY[@]}" seeds --root "${RUNS}/size_${size}" --seeds "${SEED_LIST[@]}" --runs "${specs[@]}" \
                --pairs "${pairs[@]}" --out "${REPORT}/size_${size}" --title "student ${size}, ${SIZE_TRAIN_ITERS} steps, mix all"
            teacher_windows all
            "${STUDY[@]}" crossover --root "${RUNS}/size_${size}" --seeds "${SEED_LIST[@]}" --runs "${specs[@]}" \
                --teacher-metrics "${TEACHERS}/same/train/metrics.jsonl" --out "${REPORT}/crossover_${size}" \
                --pairs "${pairs[@]}" --teacher-windows "${TEACHER_WINDOWS[@]}" --title "student ${size}"
        done
    fi
    if reports main && reports teacher && reports grid && reports best && reports layers; then
        "${STUDY[@]}" claims --report "${REPORT}" --mixes "${MIX_LIST[@]}"  # the paper's claims, one line each
    fi
    "${PY}" "${HERE}/summarize.py" --out-dir "${OUT_DIR}" --teacher-model "${TEACHER_MODEL}" \
        --student-model "${STUDENT_MODEL}" > "${REPORT}/setup.md"
    cat "${REPORT}/setup.md"
    if [[ "${PUBLISH}" == 1 ]]; then
        FIG="${ROOT}/docs/figures"
        mkdir -p "${FIG}"
        rm -f "${FIG}"/reproduce_*
        for f in "${REPORT}"/*.csv "${REPORT}"/*.png; do
            [[ -e "${f}" ]] && cp "${f}" "${FIG}/reproduce_$(basename "${f}")"
        done
        "${PY}" "${HERE}/render_results.py" --report "${REPORT}" --template "${HERE}/results_template.md" \
            --out "${ROOT}/docs/results.md"
        echo "published ${REPORT} to ${FIG}/reproduce_* and docs/results.md"
    fi
fi
end_stage
printf '%-12s %6d s\n' total $(( SECONDS - T_ALL )) >> "${TIMINGS}"
cat "${TIMINGS}"
