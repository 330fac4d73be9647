#!/usr/bin/env bash
# Step time of the `small` config on CPU in every parallel mode for 1, 2 and 4 ranks, split
# into compute, communication (tensor- and data-parallel collectives) and pipeline bubble
# (time in pipeline send/recv, mostly waiting for the neighbour stage), with the bytes each
# rank moved per step (from --metrics).
# Strong scaling: every run trains the same global batch of 4 micro-batches of 1 × 512
# tokens of synthetic data, so speedup is one rank's time over N ranks'. One thread per rank;
# 4 ranks oversubscribe a 2-core machine (see bench/RESULTS.md).
#   bash bench/run_parallel_bench.sh [build dir] [train set]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
TRAIN=${2:-full}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
MPI=(mpirun --bind-to none --oversubscribe)
[ "$(id -u)" -ne 0 ] || MPI+=(--allow-run-as-root)
GLOBAL=4
echo "| ranks | layout | median step ms | compute ms | comm ms (share) | bubble ms (share) | DP MB | TP MB | PP MB | speedup vs 1 rank |"
echo "|---|---|---|---|---|---|---|---|---|---|"
BASE=""
run() {  # ranks, options
  local ranks=$1 opts=$2 tag
  tag=$(echo "$ranks $opts" | tr -c 'a-z0-9' '_')
  local dp=$ranks tp pp
  tp=$(echo "$opts" | sed -n 's/.*--tp \([0-9]*\).*/\1/p'); tp=${tp:-1}
  pp=$(echo "$opts" | sed -n 's/.*--pp \([0-9]*\).*/\1/p'); pp=${pp:-1}
  dp=$((ranks / tp / pp))
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "${MPI[@]}" -np "$ranks" "$BUILD"/vchat-train --model inputs/models/small.json \
    --train "$TRAIN" $opts --steps 5 --micro-batch-size 1 --micro-batches $((GLOBAL / dp)) --seq-len 512 \
    --max-images 4 --threads 1 --log-every 100 --metrics "$W/$tag.jsonl" > /dev/null
  /usr/bin/python3 - "$W/$tag.jsonl" "$ranks" "$opts" "${BASE:-0}" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]  # the first step warms up
med = lambda k: statistics.median(r[k] for r in rows) * 1e3
ms, comm, bub = med("seconds"), med("comm_seconds"), med("bubble_seconds")
last, base = rows[-1], float(sys.argv[4])
speed = f"{base / ms:.2f}x" if base > 0 else "1.00x (reference)"
print(f"| {sys.argv[2]} | {sys.argv[3] or '1 rank'} | {ms:.0f} | {ms - comm - bub:.0f} | {comm:.0f} ({100 * comm / ms:.0f}%) | "
      f"{bub:.0f} ({100 * bub / ms:.0f}%) | {last['comm_bytes'] / 1e6:.1f} | {last['tp_bytes'] / 1e6:.1f} | "
      f"{last['pp_bytes'] / 1e6:.1f} | {speed} |")
with open(sys.argv[1] + ".ms", "w") as f: f.write(str(ms))
PY
  if [ -z "$BASE" ]; then BASE=$(cat "$W/$tag.jsonl.ms"); fi
}
run 1 ""
for z in 0 1 2 3; do run 2 "--zero $z"; done
run 2 "--tp 2"
run 2 "--pp 2"
for z in 0 1 2 3; do run 4 "--zero $z"; done
run 4 "--tp 4"
run 4 "--pp 4"
run 4 "--tp 2 --pp 2"
run 4 "--tp 2 --zero 1"
run 4 "--pp 2 --zero 3"
