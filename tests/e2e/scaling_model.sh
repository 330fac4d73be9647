#!/usr/bin/env bash
# bench/scaling_model.py, the paper model behind the 7B/13B/70B traffic table in
# bench/RESULTS.md, must predict the bytes a real run moves: an 8-rank tp=2 x pp=2 x dp=2
# run (with images, full training) under ZeRO 1 and ZeRO 3, rank 0's DP, TP and PP bytes
# per step from --metrics against the model, within 2%.
# Usage: scaling_model.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
BUILD=$1
SRC=$2
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
MPI=(mpirun -np 8 --oversubscribe --bind-to none)
[ "$(id -u)" -ne 0 ] || MPI+=(--allow-run-as-root)
cd "$SRC"
for zero in 1 2 3; do
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "${MPI[@]}" "$BUILD"/vchat-train --model inputs/models/tiny.json \
    --train full --tp 2 --pp 2 --zero $zero --steps 3 --micro-batch-size 2 --micro-batches 3 --seq-len 96 \
    --max-images 3 --threads 1 --comm-timeout 120 --metrics "$W/m$zero.jsonl" > /dev/null
  echo "ZeRO $zero:"
  /usr/bin/python3 bench/scaling_model.py validate "$W/m$zero.jsonl" --model tiny --tp 2 --pp 2 --dp 2 \
    --zero $zero --train full
done
