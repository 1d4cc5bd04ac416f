#!/usr/bin/env bash
# DMC retrofit of Llama 2 70B with the paper's recipe (TP=8 x PP=4, LR 1.5e-5, bf16,
# global batch 1024 x 4096 tokens; zero_out 250 -> retrofit ramp -> finetune 2k).
# Settings: configs/retrofit/llama2_70b.yaml; with a leading `--recipe efficient`,
# configs/retrofit/llama2_70b_efficient.yaml (docs/training.md). Run the same command on
# every node:
#
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 GPUS_PER_NODE=8 \
#   DATA_PATH=/data/corpus TOKENIZER_MODEL=/llama/tokenizer.model \
#   LOAD=/ckpt/llama2_70b SAVE=/runs/llama2_70b_dmc4 scripts/retrofit_llama2_70b.sh
set -euo pipefail
RECIPE=llama2_70b RECIPE_SCRIPT=retrofit_llama2_70b.sh MODEL_PARALLEL=32 \
    exec "$(dirname "$0")/retrofit_llama2_common.sh" "$@"
