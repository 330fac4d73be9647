#!/usr/bin/env bash
# vchat-train refuses, before touching the GPU, one it cannot run on, and says what to do:
# a GPU older than sm_80 (no bf16 tensor cores), and one whose architecture the build left
# out (VCHAT_CUDA_ARCHS; on a GPU the first kernel would fail with "no kernel image is
# available"), under --device cuda and --device auto alike (auto does not fall back to the
# CPU behind a visible GPU's back), and GPUs CUDA cannot use (a driver older than the
# runtime: the message gives both versions); without GPUs or a driver, auto trains on the
# CPU. An A100 (compute capability 8.0) trains, and the log names it. Two ranks take NCCL
# when each drives its own GPU, the staged MPI path when they share one (saying so), and
# --comm nccl is refused there naming them. The emulated device plays each GPU
# (VCHAT_EMU_GPU, VCHAT_EMU_GPU_BUS).
# Usage: emulated_gpu_gate.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
BUILD=$1
cd "$2"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
# One rank's run; two ranks (dp 2) take the same with twice the global batch.
BASE=(--model inputs/models/tiny.json --train full --steps 2 --micro-batch-size 2 --seq-len 128 --threads 1)
ARGS=("${BASE[@]}" --global-batch 2)
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
  # GPUs CUDA cannot use (a driver older than the runtime) are not "no GPU": auto does not
  # fall back to the CPU there either.
  refused olddriver $device "CUDA driver version is insufficient for CUDA runtime version" \
          "the NVIDIA driver supports CUDA 12.4, this build's runtime is CUDA 13.0" "update the NVIDIA driver" \
          "--device cpu"
done
refused none cuda "no CUDA device is visible to this process" "--device cpu"
# A machine without GPUs (none) or without an NVIDIA driver (nodriver): auto trains on the CPU.
for gpu in none nodriver; do
  VCHAT_EMU_GPU=$gpu timeout 300 "$BUILD/tests/vchat-train-emulated" --device auto "${ARGS[@]}" > "$W/out" 2>&1 ||
    { echo "FAIL: VCHAT_EMU_GPU=$gpu --device auto did not train"; cat "$W/out"; fail=1; }
  grep -q "^step     2/2" "$W/out" || { echo "FAIL: VCHAT_EMU_GPU=$gpu: no step 2"; cat "$W/out"; fail=1; }
  grep -q "device cuda" "$W/out" && { echo "FAIL: VCHAT_EMU_GPU=$gpu: --device auto chose cuda"; fail=1; }
done

# NCCL or the staged MPI path, chosen by all ranks together from which GPU each drives (its
# PCI bus id: VCHAT_EMU_GPU_BUS gives both ranks one GPU, else each has its own).
MPIRUN=(mpirun --oversubscribe --bind-to none -np 2 -x OMP_NUM_THREADS -x OPENBLAS_NUM_THREADS)
two_ranks() {  # two_ranks BUS COMM: 2 ranks of the emulated trainer into $W/out
  VCHAT_EMU_GPU_BUS=$1 timeout 300 "${MPIRUN[@]}" -x VCHAT_EMU_GPU_BUS "$BUILD/tests/vchat-train-emulated" \
    --device cuda --comm "$2" "${BASE[@]}" --global-batch 4 < /dev/null > "$W/out" 2>&1
}
two_ranks 01 nccl
rc=$?
[ $rc -eq 2 ] || { echo "FAIL: --comm nccl with two ranks on one GPU: exit $rc, expected 2"; cat "$W/out"; fail=1; }
for w in "--comm nccl: ranks 0 and 1 share GPU" ":01:00.0" "NCCL needs a GPU per rank" "--comm mpi"; do
  grep -qF -- "$w" "$W/out" || { echo "FAIL: --comm nccl on one GPU: no '$w' in:"; cat "$W/out"; fail=1; }
done
two_ranks 01 auto || { echo "FAIL: --comm auto, two ranks on one GPU, did not train"; cat "$W/out"; fail=1; }
grep -qF "collectives over MPI (device buffers staged through the host: ranks 0 and 1 share GPU" "$W/out" ||
  { echo "FAIL: --comm auto on one GPU did not take the staged path, saying why"; cat "$W/out"; fail=1; }
two_ranks "" auto || { echo "FAIL: --comm auto, a GPU per rank, did not train"; cat "$W/out"; fail=1; }
grep -q "collectives over NCCL$" "$W/out" || { echo "FAIL: --comm auto with a GPU per rank: not NCCL"; cat "$W/out"; fail=1; }
grep -q "^step     2/2" "$W/out" || { echo "FAIL: --comm auto over NCCL: no step 2"; cat "$W/out"; fail=1; }
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
[ $fail -eq 0 ] && echo "vchat-train: refuses sm_75, a GPU outside the build and a driver too old, naming what to do; auto trains on the CPU without GPU or driver; NCCL only with a GPU per rank (else staged, or refused under --comm nccl); an A100 trains, named in the log, with its memory reported"
exit $fail
