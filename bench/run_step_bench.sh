#!/usr/bin/env bash
# One training step of the `small` config on CPU: vchat vs the same model and batch in
# PyTorch (bench/torch_step.py) on the same number of threads, measured in the same run.
# Prints a markdown table row per case; copy them into bench/RESULTS.md with the date.
#   bash bench/run_step_bench.sh [threads] [build dir]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-$(nproc)}
BUILD=${2:-build}
BATCH=$(mktemp -d)/batch.safetensors
echo "| model | train | attention | B x L | images | threads | vchat ms | PyTorch ms | speed-up (PyTorch/vchat) |"
echo "|---|---|---|---|---|---|---|---|---|"
for train in default lora full; do
  for attention in mmca causal; do
    v=$("$BUILD"/vchat-bench-step --model inputs/models/small.json --train $train --attention $attention \
          --batch 2 --seq-len 512 --images 4 --threads "$THREADS" --warmup 1 --iters 3 --batch-out "$BATCH")
    t=$(/usr/bin/python3 bench/torch_step.py --batch-file "$BATCH" --train $train --attention $attention \
          --lora-rank 8 --lora-alpha 16 --threads "$THREADS" --warmup 1 --iters 3)
    vms=$(echo "$v" | sed -n 's/^vchat_step_ms median=\([0-9.]*\).*/\1/p')
    tms=$(echo "$t" | sed -n 's/^torch_step_ms median=\([0-9.]*\).*/\1/p')
    imgs=$(echo "$v" | sed -n 's/.*images=\([0-9]*\).*/\1/p')
    ratio=$(awk -v a="$tms" -v b="$vms" 'BEGIN { printf "%.2f", a / b }')
    echo "| small | $train | $attention | 2 x 512 | $imgs | $THREADS | $vms | $tms | $ratio |"
  done
done
