#!/usr/bin/env bash
# The end-to-end demo behind `make demo`: synthetic visual task → tokenizer → HDF5 shards
# → tiny VisualChat model trained with 2 MPI ranks (data parallel) → validation loss and
# held-out answer accuracy. Everything it writes goes under build/demo/.
#   bash tools/demo.sh [build dir] [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
STEPS=${2:-600}
OUT=$BUILD/demo
mkdir -p "$OUT"

MPIRUN=(mpirun -np 2 --bind-to none)
if [ "$(id -u)" -eq 0 ]; then MPIRUN+=(--allow-run-as-root); fi
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

echo "== 1/4 synthetic visual task (shapes, colours, counts; single- and multi-image, multi-round)"
"$BUILD"/vchat-synth --out "$OUT/synth" --samples 4000 --image-size 32 --seed 1 --overwrite

echo "== 2/4 tokenizer (sentencepiece BPE, byte fallback)"
"$BUILD"/vchat-prep tokenizer --corpus "$OUT/synth/corpus.txt" --out "$OUT/tokenizer" --vocab-size 512

echo "== 3/4 HDF5 shards (2 ranks)"
"${MPIRUN[@]}" "$BUILD"/vchat-prep convert --format llava --input "$OUT/synth/data.json" --images "$OUT/synth" \
  --tokenizer "$OUT/tokenizer.model" --out "$OUT/shards" --name synth --image-size 32 --image-tokens 17 \
  --max-tokens 512 --shard-samples 1000 --overwrite
"$BUILD"/vchat-prep verify "$OUT/shards"
"$BUILD"/vchat-prep inspect "$OUT/shards" --sample 0

echo "== 4/4 training the tiny model, 2 ranks (data parallel)"
"${MPIRUN[@]}" "$BUILD"/vchat-train --config inputs/train/demo.ini --steps "$STEPS" \
  --data synth="$OUT/shards":1 --tokenizer "$OUT/tokenizer.model"
