#!/usr/bin/env bash
# Shared launcher of scripts/retrofit_llama2_{7b,13b,70b}.sh (not run directly): one
# torchrun per node, the recipe's configs/retrofit/$RECIPE.yaml, paths from the
# environment; a leading `--recipe efficient` picks configs/retrofit/${RECIPE}_efficient.yaml.
# Other arguments are passed to megatron_dmc.train and win over the YAML.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat >&2 <<USAGE
usage: DATA_PATH=... TOKENIZER_MODEL=... LOAD=... SAVE=... scripts/$RECIPE_SCRIPT
           [--recipe paper|efficient] [flags]

--recipe paper (default): configs/retrofit/$RECIPE.yaml, the paper's recipe.
--recipe efficient: configs/retrofit/${RECIPE}_efficient.yaml (decision heads, merge delay
  64, distillation from the model with compression off, only the heads train).

Run on every node (same command, its own NODE_RANK):
  DATA_PATH        prefix of the indexed dataset (PREFIX.bin/.idx from
                   tools/preprocess_data.py --tokenizer-model TOKENIZER_MODEL)
  TOKENIZER_MODEL  Llama 2 tokenizer.model (the one that made DATA_PATH)
  LOAD             the Llama 2 checkpoint made by tools/convert_checkpoint.py import-hf
  SAVE             run directory: checkpoints, metrics.jsonl; a rerun resumes from it
  TARGET_CR        target compression ratio (default 4)
  VALID_DATA_PATH  optional held-out dataset prefix
  NNODES, NODE_RANK, GPUS_PER_NODE (default 1, 0, 8)
  MASTER_ADDR, MASTER_PORT         (default localhost, 6000)
  The world (NNODES x GPUS_PER_NODE) must be a multiple of TP x PP = $MODEL_PARALLEL.
USAGE
    exit 2
}

config="configs/retrofit/$RECIPE.yaml"
if [[ "${1:-}" == "--recipe" || "${1:-}" == --recipe=* ]]; then
    if [[ "$1" == --recipe=* ]]; then choice=${1#--recipe=}; shift; else choice=${2:-}; shift 2 || shift; fi
    case "$choice" in
        paper) ;;
        efficient) config="configs/retrofit/${RECIPE}_efficient.yaml" ;;
        *) echo "error: --recipe takes paper or efficient; got '$choice'" >&2; usage ;;
    esac
fi

missing=()
for name in DATA_PATH TOKENIZER_MODEL LOAD SAVE; do
    [[ -n "${!name:-}" ]] || missing+=("$name")
done
if (( ${#missing[@]} )); then
    echo "error: set ${missing[*]}" >&2
    usage
fi

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
TARGET_CR=${TARGET_CR:-4}
PYTHON=${PYTHON:-python}

world=$((NNODES * GPUS_PER_NODE))
if (( world % MODEL_PARALLEL )); then
    echo "error: $world GPUs is not a multiple of TP x PP = $MODEL_PARALLEL" >&2
    usage
fi

valid=()
[[ -n "${VALID_DATA_PATH:-}" ]] && valid=(--valid-data-path "$VALID_DATA_PATH")

export CUDA_DEVICE_MAX_CONNECTIONS=1
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megatron_dmc.train \
    --config "$config" \
    --data-path "$DATA_PATH" \
    "${valid[@]}" \
    --tokenizer-model "$TOKENIZER_MODEL" \
    --load "$LOAD" \
    --save "$SAVE" \
    --tensorboard-dir "$SAVE/tensorboard" \
    --dmc-target-cr "$TARGET_CR" \
    "$@"
