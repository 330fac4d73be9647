#!/usr/bin/env bash
# Every parallel layout (tp2, pp2, dp2 with ZeRO-1, -2 and -3, tp2·pp2·dp2 with ZeRO-1 and
# -3) on ONE GPU through the staged MPI path (--comm mpi: several ranks share the device,
# collectives stage device buffers through the host) against one rank: 5 steps of `tiny`
# in fp32 on the device, the same synthetic global batch; the loss of every step and every
# parameter afterwards within 1e-5 relative (tools/gpu/compare_runs.py). Then ZeRO-2 in
# bf16 (its working copies updated and gathered in place inside the kept weights) against
# ZeRO-3 in bf16 (the same reductions, updates and bf16 weights: equal bit for bit), and
# ZeRO-2 resumed from its step-3 checkpoint against the straight run (bit for bit); ZeRO-1
# in bf16 (only its shard of the fp32 masters, the bf16 copies gathered) against ZeRO-0 in
# bf16 with clipping off (two ranks sum alike in any order: bit for bit), and ZeRO-1
# resumed from its step-3 checkpoint (master shards) against the straight run. On a GPU,
# last, ZeRO-0 in bf16 with the atomic dQ against the same with the deterministic one.
# Run by check.sh on a lent machine (needs the pack's environment: env.sh's MPIRUN, $BIN).
#   layouts.sh OUTDIR
# DEVICE=cpu rehearses the script itself on a machine without a GPU (tools/gpu/rehearse.sh).
# COMM=nccl runs the layouts over NCCL instead, one GPU per rank: on the emulated device
# (tests/e2e/emulated_layouts.sh), whose NCCL carries several ranks; a real NCCL refuses
# two ranks on one GPU.
set -uo pipefail
OUTDIR=$1
source "${PACK:?run from check.sh or rehearse.sh}/tools/env.sh"
vchat_gpu_env "$PACK"
BIN=$PACK/bin
DEVICE=${DEVICE:-cuda}
RUNS=$(mktemp -d)
PY=python3  # with numpy (the lent machine's has it; Debian's /usr/bin/python3 here)
$PY -c "import numpy" 2>/dev/null || PY=/usr/bin/python3
COMMON=(--device "$DEVICE" --comm "${COMM:-mpi}" --model inputs/models/tiny.json --train full --steps 5
        --micro-batch-size 2 --global-batch 8 --seq-len 128 --lr 1e-3 --adam-eps 1e-6 --warmup 2
        --weight-decay 0.1 --comm-timeout 120 --threads 1)
# Each layout gets LAYOUT_TIMEOUT_S (default 60 s on a GPU): one that hangs fails alone
# instead of spending the whole stage's time and the layouts after it.
LAYOUT_TIMEOUT_S=${LAYOUT_TIMEOUT_S:-60}
run() {  # run TAG NP OPTIONS...
  local tag=$1 np=$2; shift 2
  timeout -k 5 "$LAYOUT_TIMEOUT_S" "${MPIRUN[@]}" -np "$np" "$BIN/vchat-train" "${COMMON[@]}" --precision "${PREC:-fp32}" \
    "$@" --metrics "$RUNS/$tag.jsonl" \
    --save-dir "$RUNS/$tag" > "$OUTDIR/layout-$tag.log" 2>&1 || { echo "layout $tag: vchat-train failed (rc $?)"; tail -5 "$OUTDIR/layout-$tag.log"; return 1; }
  "$BIN/vchat-ckpt" consolidate "$RUNS/$tag" --out "$RUNS/$tag.safetensors" >> "$OUTDIR/layout-$tag.log" 2>&1 ||
    { echo "layout $tag: consolidate failed"; return 1; }
}
fail=0
run one 1 || exit 1
for layout in "tp2:2:--tp 2" "pp2:2:--pp 2" "dp2z1:2:--zero 1" "dp2z2:2:--zero 2" "dp2z3:2:--zero 3" "tp2pp2dp2z1:8:--tp 2 --pp 2 --zero 1 --overlap-grad-reduce on" \
              "tp2pp2dp2z3:8:--tp 2 --pp 2 --zero 3"; do
  IFS=: read -r tag np opts <<< "$layout"
  # shellcheck disable=SC2086
  if run "$tag" "$np" $opts; then
    $PY tools/gpu/compare_runs.py "$RUNS/one" "$RUNS/$tag" --tol 1e-5 || fail=1
  else
    fail=1
  fi
done
# bf16 needs the GPU; the rehearsal on the CPU runs the same pairs in fp32 (equal there too).
PAIR=$([[ $DEVICE == cuda ]] && echo bf16 || echo fp32)
if PREC=$PAIR run "${PAIR}z3" 2 --zero 3 && PREC=$PAIR run "${PAIR}z2" 2 --zero 2 --save-every 3; then
  $PY tools/gpu/compare_runs.py "$RUNS/${PAIR}z3" "$RUNS/${PAIR}z2" --tol 0 || fail=1
  if PREC=$PAIR run "${PAIR}z2resumed" 2 --zero 2 --resume "$RUNS/${PAIR}z2/step_00000003"; then
    $PY tools/gpu/compare_runs.py "$RUNS/${PAIR}z2" "$RUNS/${PAIR}z2resumed" --tol 0 --params-only || fail=1
  else
    fail=1
  fi
else
  fail=1
fi
# Clipping off: ZeRO-0 and -1 sum the squares of other partitions (last-bit differences in
# the norm would reach the weights through the clip coefficient).
if PREC=$PAIR run "${PAIR}z0" 2 --zero 0 --clip-grad 0 && PREC=$PAIR run "${PAIR}z1" 2 --zero 1 --clip-grad 0 --save-every 3; then
  $PY tools/gpu/compare_runs.py "$RUNS/${PAIR}z0" "$RUNS/${PAIR}z1" --tol 0 || fail=1
  if PREC=$PAIR run "${PAIR}z1resumed" 2 --zero 1 --clip-grad 0 --resume "$RUNS/${PAIR}z1/step_00000003"; then
    $PY tools/gpu/compare_runs.py "$RUNS/${PAIR}z1" "$RUNS/${PAIR}z1resumed" --tol 0 --params-only || fail=1
  else
    fail=1
  fi
else
  fail=1
fi
# The atomic dQ (--attention-backward atomic-dq: dQ added up in the dK/dV pass, its fp32
# sums in the hardware's order) trains as the deterministic backward does: the same bf16 run
# within bf16's rounding (a GPU only: the CPU's backward has one form; over the staged
# path only, as on the lent GPU: the NCCL variant adds nothing to what this compares).
if [[ $DEVICE == cuda && ${COMM:-mpi} == mpi ]]; then
  if PREC=bf16 run bf16z0atomic 2 --zero 0 --clip-grad 0 --attention-backward atomic-dq; then
    $PY tools/gpu/compare_runs.py "$RUNS/bf16z0" "$RUNS/bf16z0atomic" --tol 1e-2 || fail=1
  else
    fail=1
  fi
fi
rm -rf "$RUNS"
exit $fail
