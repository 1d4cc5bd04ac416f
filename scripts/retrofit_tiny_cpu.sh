#!/usr/bin/env bash
# Tiny DMC retrofit on a CPU: zero_out -> retrofit -> finetune on configs/tiny_gqa.yaml
# with TP=2 over gloo (two torchrun processes), on the default English corpus with a
# 256-token tokenizer built on the fly. A few minutes on 2 cores; ends by printing the
# achieved vs the target compression ratio (exit status 1 if the target was missed).
#
#   scripts/retrofit_tiny_cpu.sh              # run dir: runs/tiny_cpu (resumes if present)
#   OUT=/tmp/tiny scripts/retrofit_tiny_cpu.sh --dmc-target-cr 3   # extra flags win
#
# Settings: configs/retrofit/tiny_cpu.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
OUT=${OUT:-runs/tiny_cpu}
DATA=${DATA:-$OUT/data}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

"$PYTHON" -m megatron_dmc.training.tiny_data "$DATA"

"$TORCHRUN" --standalone --nproc-per-node 2 \
    -m megatron_dmc.train \
    --config configs/retrofit/tiny_cpu.yaml \
    --data-path "$DATA/corpus" \
    --valid-data-path "$DATA/corpus_held_out" \
    --tokenizer-dir "$DATA/tokenizer" \
    --save "$OUT/run" \
    "$@"

echo "--- $OUT/run: mean over the last 5 logged steps"
"$PYTHON" -m megatron_dmc.training.summary "$OUT/run" --last 5
