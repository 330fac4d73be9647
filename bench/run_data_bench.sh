#!/usr/bin/env bash
# Data path throughput on this machine: vchat-prep convert (images/s, 1 and 2 MPI ranks),
# the loader (samples/s per rank from page-cached shards, 224 and 336 px), and beside it the
# rate at which vchat-train consumes samples for the tiny config (2 ranks).
#   bash bench/run_data_bench.sh [build dir]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
export OPENBLAS_NUM_THREADS=1
MPI=(mpirun --bind-to none)
[ "$(id -u)" -ne 0 ] || MPI+=(--allow-run-as-root)
N=${N:-1500}

for S in 224 336; do
  "$BUILD"/vchat-synth --out "$W/synth$S" --samples "$N" --image-size "$S" --seed 3 > /dev/null 2>&1
done
"$BUILD"/vchat-prep tokenizer --corpus "$W/synth224/corpus.txt" --out "$W/tok" --vocab-size 512 > /dev/null

echo "| what | setting | throughput |"
echo "|---|---|---|"
for ranks in 1 2; do
  threads=$((2 / ranks))
  out=$(OMP_NUM_THREADS=$threads "${MPI[@]}" -np $ranks "$BUILD"/vchat-prep convert --format llava \
        --input "$W/synth224/data.json" --images "$W/synth224" --tokenizer "$W/tok.model" --out "$W/p$ranks" \
        --name b --image-size 224 --quiet --overwrite --threads $threads)
  echo "| vchat-prep convert, 224 px PNG in | $ranks rank(s) x $threads thread(s) | $(echo "$out" | sed -n 's/.*(\([0-9.]*\) images\/s).*/\1/p') images/s |"
done
for S in 224 336; do
  T=$(( (S / 14) * (S / 14) + 1 ))
  OMP_NUM_THREADS=2 "$BUILD"/vchat-prep convert --format llava --input "$W/synth$S/data.json" --images "$W/synth$S" \
    --tokenizer "$W/tok.model" --out "$W/d$S" --name b --image-size $S --image-tokens $T --max-tokens 4096 --quiet > /dev/null
  cat "$W/d$S"/*.h5 > /dev/null  # page cache
  r=$("$BUILD"/vchat-bench-loader --data "$W/d$S" --tokens-per-image $T --image-size $S --seq-len 4096 --micro-batch 8 --steps 30)
  echo "| loader (HDF5 read + collate), 1 rank | $S px, ViT-L/14 ($T tokens/image), micro-batch 8 | $(echo "$r" | sed -n 's/.*samples\/s=\([0-9.]*\).*/\1/p') samples/s |"
done
# The trainer's appetite: tiny config, 2 ranks, samples/s over all ranks.
"$BUILD"/vchat-synth --out "$W/tiny" --samples 2000 --image-size 32 --seed 3 > /dev/null 2>&1
"$BUILD"/vchat-prep convert --format llava --input "$W/tiny/data.json" --images "$W/tiny" --tokenizer "$W/tok.model" \
  --out "$W/dt" --name t --image-size 32 --image-tokens 17 --quiet > /dev/null
log=$(OMP_NUM_THREADS=1 "${MPI[@]}" -np 2 "$BUILD"/vchat-train --config inputs/train/demo.ini --steps 60 --log-every 1 \
      --val-fraction 0 --data t="$W/dt":1)
ms=$(echo "$log" | sed -n 's/^step.*| \([0-9.]*\) ms |.*/\1/p' | tail -40 | sort -n | awk '{a[NR]=$1} END {print a[int(NR/2)+1]}')
echo "| vchat-train consumption, tiny config | 2 ranks, global batch 32, median step $ms ms | $(awk -v m="$ms" 'BEGIN { printf "%.0f", 32 / (m / 1000) }') samples/s (all ranks) |"
