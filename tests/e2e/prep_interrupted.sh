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
      --out "$W/out" --name s --image-size 224 --shard-samples 100 --threads 1 --quiet)
set +e
OMP_NUM_THREADS=1 timeout -s KILL 0.5 "$BUILD"/vchat-prep "${ARGS[@]}"  # the prep process itself is killed
rc=$?
set -e
[ $rc -eq 137 ] || { echo "FAIL: prep was not interrupted (exit $rc); make the input larger"; exit 1; }
[ ! -e "$W/out/manifest.json" ] || { echo "FAIL: an interrupted prep left a manifest"; exit 1; }
if ls "$W/out"/*.h5 > /dev/null 2>&1; then echo "FAIL: an interrupted prep published shards"; exit 1; fi
if "$BUILD"/vchat-prep verify "$W/out" > /dev/null 2>&1; then echo "FAIL: verify accepted an interrupted prep"; exit 1; fi
"$BUILD"/vchat-prep "${ARGS[@]}" --overwrite > /dev/null
"$BUILD"/vchat-prep verify "$W/out" > /dev/null
echo "4 passed, 0 failed"
