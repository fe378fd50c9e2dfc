#!/usr/bin/env bash
# Pretrain the paper's LLaMA 7B student (32 x 4096, 6.7B parameters).
# LET (Late-to-Early Training): NLL + lambda(s) x (-cos) between student layer 3 and the teacher's last hidden state, lambda decaying from 0.1 to 0 at step 1500.
#
# Usage (from any directory; extra pretrain_let.py flags go last and win):
#   DATA_PATH=/data/pile_text_document bash examples/llama_7b/pretrain_let.sh [--flag value ...]
#
# Main environment variables (all of them: docs/launching.md):
#   DATA_PATH       .bin/.idx prefix(es) from tools/preprocess_data.py, or MOCK_DATA=1
#   TEACHER_PATH    teacher folder (default $MEGATRON_LET_CACHE/teachers/smollm2-1.7b: SmolLM2-1.7B,
#                   not on PyPI; bring an HF or GGUF copy through tools/prepare_teacher.py)
#   TOKENIZER_MODEL tokenizer folder (default: TEACHER_PATH, the paper uses the teacher's vocabulary)
#   CHECKPOINT_DIR  --save and --load (a restarted job resumes), TENSORBOARD_DIR
#   GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   torchrun
#   TP, PP, MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE, TRAIN_ITERS, LR
# Append --dry-run to validate the configuration and print the layout without starting anything.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

recipe_llama_7b
run_pretrain let "$@"
