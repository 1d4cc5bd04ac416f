#!/usr/bin/env bash
# DMC retrofit of Llama 2 7B with the paper's recipe (TP=4 + sequence parallel, LR 3e-5, bf16,
# global batch 1024 x 4096 tokens; zero_out 250 -> retrofit ramp -> finetune 2k).
# Settings: configs/retrofit/llama2_7b.yaml; with a leading `--recipe efficient`,
# configs/retrofit/llama2_7b_efficient.yaml (docs/training.md). Run the same command on
# every node:
#
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 GPUS_PER_NODE=8 \
#   DATA_PATH=/data/corpus TOKENIZER_MODEL=/llama/tokenizer.model \
#   LOAD=/ckpt/llama2_7b SAVE=/runs/llama2_7b_dmc4 scripts/retrofit_llama2_7b.sh
set -euo pipefail
RECIPE=llama2_7b RECIPE_SCRIPT=retrofit_llama2_7b.sh MODEL_PARALLEL=4 \
    exec "$(dirname "$0")/retrofit_llama2_common.sh" "$@"
