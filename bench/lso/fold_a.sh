#!/usr/bin/env bash
# Leave-source-out fold A (examples/data/lso/fold-a): each recipe's pair trained on the fold's training families only,
# then judged by eval-refs on the fold's eval set. Resumable: a finished adapter or evaluation is skipped.
# Usage: bash bench/lso/fold_a.sh [RECIPE ...]   (default: every recipe below, in order)
set -euo pipefail
cd "$(dirname "$0")/../.."
TF=${TF:-.venv/bin/toss-filter}
FOLD=examples/data/lso/fold-a
OUT=${OUT:-out/lso/fold-a}
RECIPE="--max-length 256 --target-modules all-linear --rank 8 --alpha 16 --learning-rate 1e-3 --epochs 1 \
  --batch-size 8 --micro-batch-size 8 --seed 0"
BASE=HuggingFaceTB/SmolLM2-135M-Instruct

# recipe name -> θu data, θs data (θs continues θu)
declare -A UTILITY=(
  [shipped-recipe]="$FOLD/utility.jsonl"
  [aligned-safeinstr]="$FOLD/utility.jsonl $FOLD/refusals.jsonl"
  [aligned-mit]="$FOLD/utility.jsonl $FOLD/refusals_mit.jsonl"
)
declare -A SAFETY=(
  [shipped-recipe]="$FOLD/safety.jsonl"
  [aligned-safeinstr]="$FOLD/safety.jsonl"
  [aligned-mit]="$FOLD/safety.jsonl"
)
for name in "${@:-aligned-safeinstr shipped-recipe aligned-mit}"; do
  for r in $name; do
    dir=$OUT/$r
    [ -f "$dir/utility/training.json" ] || $TF train-ref ${UTILITY[$r]} --base-model $BASE --output "$dir/utility" $RECIPE
    [ -f "$dir/safety/training.json" ] || $TF train-ref ${SAFETY[$r]} --base-model $BASE --init-adapter "$dir/utility" \
      --output "$dir/safety" $RECIPE
    [ -f "$dir/eval/eval-refs.json" ] || $TF eval-refs $FOLD/eval.jsonl --safety-model "$dir/safety" \
      --utility-model "$dir/utility" --output "$dir/eval" --max-length 320
  done
done
