#!/usr/bin/env bash
# A prep killed mid-way (SIGKILL: no cleanup runs) leaves nothing that looks complete: no
# manifest.json and no shard outside .staging/. A rerun with --overwrite then succeeds.
# Usage: prep_interrupted.sh BUILD_DIR
set -euo pipefail
BUILD=$1
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
"$BUILD"/vchat-synth --out "$W/synth" --samples 1500 --image-size 224 --seed 5 > /dev/null 2>&1
"$BUILD"/vchat-prep tokenizer --corpus "$W/synth/corpus.txt" --out "$W/tok" --vocab-size 512 > /dev/null
ARGS=(convert --format llava --input "$W/synth/data.json" --images "$W/synth" --tokenizer "$W/tok.model"
      --out "$W/out" --name s --image-size 224 --shard-samples 50 --threads 1 --quiet)
# Kill the prep (SIGKILL: no cleanup runs) once it has finished at least one shard, so the
# kill provably lands mid-way, after something was written.
OMP_NUM_THREADS=1 "$BUILD"/vchat-prep "${ARGS[@]}" &
pid=$!
deadline=$((SECONDS + 60))  # a generous bound; the loop leaves as soon as a shard exists
while [ $SECONDS -lt $deadline ]; do
  ls "$W/out/.staging"/shard_*.h5 > /dev/null 2>&1 && break
  kill -0 $pid 2> /dev/null || break
  sleep 0.01
done
ls "$W/out/.staging"/shard_*.h5 > /dev/null 2>&1 || { echo "FAIL: no finished shard before the prep ended; make the input larger"; exit 1; }
kill -9 $pid
wait $pid 2> /dev/null || true
[ ! -e "$W/out/manifest.json" ] || { echo "FAIL: an interrupted prep left a manifest"; exit 1; }
if ls "$W/out"/*.h5 > /dev/null 2>&1; then echo "FAIL: an interrupted prep published shards"; exit 1; fi
if "$BUILD"/vchat-prep verify "$W/out" > /dev/null 2>&1; then echo "FAIL: verify accepted an interrupted prep"; exit 1; fi
"$BUILD"/vchat-prep "${ARGS[@]}" --overwrite > /dev/null
"$BUILD"/vchat-prep verify "$W/out" > /dev/null
echo "4 passed, 0 failed"
