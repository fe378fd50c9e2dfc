#!/usr/bin/env bash
# Pretrain the paper's LLaMA 1B-scale student (24 x 2048, 1.41B parameters).
# RKD: (1 - 0.667) x NLL + 0.667 x KD(rho = 0.25) against the teacher's logits for the whole run.
#
# Usage (from any directory; extra pretrain_let.py flags go last and win):
#   DATA_PATH=/data/pile_text_document bash examples/llama_1b/pretrain_rkd.sh [--flag value ...]
#
# Main environment variables (all of them: docs/launching.md):
#   DATA_PATH       .bin/.idx prefix(es) from tools/preprocess_data.py, or MOCK_DATA=1
#   TEACHER_PATH    teacher folder (default $MEGATRON_LET_CACHE/teachers/smollm2-135m-instruct, i.e.
#                   ~/.cache/megatron_let/...: SmolLM2-135M-Instruct, built by examples/quickstart.sh)
#   TOKENIZER_MODEL tokenizer folder (default: TEACHER_PATH, the paper uses the teacher's vocabulary)
#   CHECKPOINT_DIR  --save and --load (a restarted job resumes), TENSORBOARD_DIR
#   GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   torchrun
#   TP, PP, MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE, TRAIN_ITERS, LR
# Append --dry-run to validate the configuration and print the layout without starting anything.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

recipe_llama_1b
run_pretrain rkd "$@"
