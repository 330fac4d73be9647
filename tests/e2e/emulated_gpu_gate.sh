#!/usr/bin/env bash
# vchat-train refuses, before touching the GPU, one it cannot run on, and says what to do:
# a GPU older than sm_80 (no bf16 tensor cores), and one whose architecture the build left
# out (VCHAT_CUDA_ARCHS; on a GPU the first kernel would fail with "no kernel image is
# available"), under --device cuda and --device auto alike (auto does not fall back to the
# CPU behind a visible GPU's back). An A100 (compute capability 8.0) trains, and the log
# names it. The emulated device plays each GPU (VCHAT_EMU_GPU).
# Usage: emulated_gpu_gate.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
BUILD=$1
cd "$2"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
ARGS=(--model inputs/models/tiny.json --train full --steps 2 --micro-batch-size 2 --global-batch 2 --seq-len 128
      --threads 1)
fail=0
refused() {  # refused GPU DEVICE WORDS...: exits non-zero, and the error holds each of WORDS
  local gpu=$1 device=$2; shift 2
  VCHAT_EMU_GPU=$gpu timeout 120 "$BUILD/tests/vchat-train-emulated" --device "$device" "${ARGS[@]}" > "$W/out" 2>&1
  local rc=$?
  if [ $rc -eq 0 ] || [ $rc -eq 124 ]; then
    echo "FAIL: VCHAT_EMU_GPU=$gpu --device $device: exit $rc, expected a refusal"; cat "$W/out"; fail=1; return
  fi
  for w in "$@"; do
    grep -qF -- "$w" "$W/out" || { echo "FAIL: VCHAT_EMU_GPU=$gpu --device $device: no '$w' in:"; cat "$W/out"; fail=1; }
  done
  grep -q "^step " "$W/out" && { echo "FAIL: VCHAT_EMU_GPU=$gpu: a step ran"; fail=1; }
}
for device in cuda auto; do
  refused 75 $device "compute capability 7.5" "needs compute capability 8.0 or newer" "--device cpu"
  refused 86,nocode $device "has no code for CUDA device 0" "compute capability 8.6" \
          "compiled for CUDA architectures" '-DVCHAT_CUDA_ARCHS="80;90;86"' "--device cpu"
done
VCHAT_EMU_GPU=80 timeout 300 "$BUILD/tests/vchat-train-emulated" --device cuda --precision bf16 "${ARGS[@]}" \
  --metrics "$W/m.jsonl" --tensorboard "$W/tb" > "$W/out" 2>&1 || { echo "FAIL: an A100 (8.0) did not train"; cat "$W/out"; fail=1; }
grep -q "^step     2/2" "$W/out" || { echo "FAIL: no step 2 on an A100"; cat "$W/out"; fail=1; }
# The step line gives the GPU's memory beside the host's, and so do the metrics (at least
# what the optimizer keeps on the device between steps: the trained weights' fp32 masters and
# bf16 working copies, their gradients and Adam moments; the peak adds the activations) and
# TensorBoard.
grep -qE "^step .* \| mem [0-9.]+ GB host, [0-9.]+ GB GPU \| eta" "$W/out" ||
  { echo "FAIL: the step line gives no GPU memory"; cat "$W/out"; fail=1; }
python3 - "$W/m.jsonl" <<'PY' || fail=1
import json, sys
last = [json.loads(l) for l in open(sys.argv[1]) if '"validation"' not in l][-1]
gpu = last.get("peak_gpu_memory_bytes", 0)
state = last["mem_params"] + last["mem_grads"] + last["mem_optimizer"]
if not gpu > state:
    sys.exit(f"FAIL: peak_gpu_memory_bytes {gpu} is not above the optimizer's state on the device, {state} bytes")
PY
grep -aqF "train/peak_gpu_memory_gb" "$W"/tb/events.out.tfevents.* ||
  { echo "FAIL: no train/peak_gpu_memory_gb in the TensorBoard events"; fail=1; }
# The log names the GPU it runs on.
grep -qF "device cuda:0 (vchat emulated GPU, compute capability 8.0, 2 SMs, 16.0 GiB), bf16" "$W/out" ||
  { echo "FAIL: the log does not name the GPU"; cat "$W/out"; fail=1; }
[ $fail -eq 0 ] && echo "vchat-train: refuses sm_75 and a GPU outside the build, naming what to do; an A100 trains, named in the log, with its memory reported"
exit $fail
