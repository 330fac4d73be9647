#!/usr/bin/env bash
# Data-parallel step time of the `small` config on CPU for 1, 2 and 4 ranks and ZeRO 0/1/2,
# with the share spent in DP collectives and the bytes each rank moved (from --metrics).
# Each rank trains micro-batch 1 × seq 512 of synthetic data with 1 thread, so the global
# batch grows with the ranks (weak scaling). 4 ranks oversubscribe a 2-core machine.
#   bash bench/run_dp_bench.sh [build dir] [train set]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
TRAIN=${2:-full}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
MPI=(mpirun --bind-to none --oversubscribe)
[ "$(id -u)" -ne 0 ] || MPI+=(--allow-run-as-root)
echo "| ranks | zero | train | median step ms | comm ms (share) | DP bytes/rank/step | trained bytes Ψ | optimizer bytes/rank |"
echo "|---|---|---|---|---|---|---|---|"
for ranks in 1 2 4; do
  for zero in 0 1 2; do
    [ $ranks -eq 1 ] && [ $zero -gt 0 ] && continue
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "${MPI[@]}" -np $ranks "$BUILD"/vchat-train --model inputs/models/small.json \
      --train "$TRAIN" --zero $zero --steps 6 --micro-batch-size 1 --seq-len 512 --max-images 4 --threads 1 \
      --log-every 100 --metrics "$W/m_${ranks}_$zero.jsonl" > /dev/null
    /usr/bin/python3 - "$W/m_${ranks}_$zero.jsonl" $ranks $zero "$TRAIN" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]  # the first step warms up
ms = statistics.median(r["seconds"] for r in rows) * 1e3
comm = statistics.median(r["comm_seconds"] for r in rows) * 1e3
last = rows[-1]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} | {ms:.0f} | {comm:.0f} ({100 * comm / ms:.0f}%) | "
      f"{last['comm_bytes'] / 1e6:.1f} MB | {last['trained_bytes'] / 1e6:.1f} MB | {last['mem_optimizer'] / 1e6:.1f} MB |")
PY
  done
done
