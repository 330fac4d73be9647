#!/usr/bin/env bash
# The device check's benchmark stages (tools/gpu/check.sh) on the emulated CUDA device, with
# the same options at small shapes: vchat-bench-attn (every kernel set, and the atomic dQ),
# vchat-bench-step (bf16, --profile, --batch-out, --micro-batches) and vchat-bench-comm (NCCL at one rank, the
# staged MPI path with two ranks, one emulated device each). Each must run and print the line check.sh reads
# its figures from; the step's batch file must hold what bench/gpu_torch_step.py reads. The
# figures themselves mean nothing here.
# Usage: emulated_benchmarks.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
BUILD=$1
SRC=$2
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
cd "$SRC" || exit 1
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export VCHAT_EMU_NCCL_DIR="$W/nccl"
bad=0
expect() {  # expect NAME REGEX CMD...: runs CMD, which must exit 0 and print a line matching REGEX
  local name=$1 re=$2; shift 2
  if "$@" > "$W/$name.log" 2>&1 && grep -qE "$re" "$W/$name.log"; then
    echo "emulated_benchmarks: $name: $(grep -E "$re" "$W/$name.log" | tail -n 1 | cut -c1-110)"
  else
    echo "emulated_benchmarks: FAIL: $name (exit or no line /$re/):"; tail -n 20 "$W/$name.log"; bad=1
  fi
}
T=$BUILD/tests
NUM='[0-9]+\.[0-9]+'
for kernel in auto wmma cuda-cores; do
  expect "attn-$kernel" "^vchat_attn_ms fwd=$NUM fwd_bwd=$NUM$" "$T/vchat-bench-attn-emulated" --kernel $kernel \
    --seq-len 96 --batch 1 --heads 2 --kv-heads 1 --head-dim 128 --image-frac 0.3 --image-tokens 17 --iters 1
done
expect "attn-atomic-dq" "^vchat_attn_ms fwd=$NUM fwd_bwd=$NUM$" "$T/vchat-bench-attn-emulated" --backward atomic-dq \
  --seq-len 96 --batch 1 --heads 2 --kv-heads 1 --head-dim 128 --image-frac 0.3 --image-tokens 17 --iters 1
expect step "^vchat_step_ms median=$NUM .*model_flops=[0-9.e+]+ mfu=$NUM peak_tflops=$NUM$" \
  "$T/vchat-bench-step-emulated" --device cuda --precision bf16 --model inputs/models/tiny.json --train full --batch 2 \
  --seq-len 128 --images 2 --warmup 1 --iters 1 --threads 1 --profile --batch-out "$W/batch.safetensors"
# The step with the atomic dQ (--attention-backward atomic-dq), as the device check may run it,
# accumulating two micro-batches (--micro-batches): twice the model FLOPs of the same batch.
expect step-atomic-dq "^# model=tiny .* attention_backward=atomic-dq micro_batches=2 peak_gpu_mem_gib=0\.[0-9]{2}$" \
  "$T/vchat-bench-step-emulated" \
  --device cuda --precision bf16 --model inputs/models/tiny.json --train full --batch 2 --seq-len 128 --images 2 \
  --warmup 1 --iters 1 --threads 1 --attention-backward atomic-dq --micro-batches 2
flops() { sed -n 's/.*model_flops=\([0-9.e+]*\).*/\1/p' "$W/$1.log"; }
python3 -c 'import sys; a, b = map(float, sys.argv[1:]); sys.exit(0 if abs(b - 2 * a) <= 1e-6 * b else 1)' \
  "$(flops step)" "$(flops step-atomic-dq)" ||
  { echo "emulated_benchmarks: FAIL: two micro-batches count $(flops step-atomic-dq) model FLOPs, one $(flops step)"; bad=1; }
# The host's side of the step (check.sh's step-*-host rows): its time to enqueue the step and
# the kernels and GEMMs it enqueued, at least one per op of every layer.
grep -qE "^# host: $NUM ms to enqueue a step \(median\), [1-9][0-9]{2,} launches a step \(kernels and GEMMs\), $NUM us each$" "$W/step.log" ||
  { echo "emulated_benchmarks: FAIL: the step names no host time and launches: $(grep '^# host' "$W/step.log")"; bad=1; }
# An image in the batch (the ViT runs), and --profile's table of ops timed on their stream:
# the attention and the ViT's patchify among them.
grep -qE "^# model=tiny .* images=[1-9]" "$W/step.log" || { echo "emulated_benchmarks: FAIL: the step's batch has no image"; bad=1; }
for op in attention_bwd patchify; do
  grep -qE "^#   $op +cuda" "$W/step.log" || { echo "emulated_benchmarks: FAIL: step --profile did not time $op on the device"; bad=1; }
done
# Each op against its roofline (the MFU peak and the memory's bandwidth): a GEMM's FLOP/s
# and bytes/s, and the columns of the bound, on the device's figures.
grep -qE "roofline at $NUM TFLOP/s and [0-9]+ GB/s" "$W/step.log" ||
  { echo "emulated_benchmarks: FAIL: step --profile names no roofline"; bad=1; }
grep -qE "^#   gemm +cuda +[0-9]+ +$NUM +$NUM% +$NUM [kMGT] +$NUM [kMGT] +$NUM +$NUM%$" "$W/step.log" ||
  { echo "emulated_benchmarks: FAIL: step --profile gives the GEMMs no rates or bound"; bad=1; }
# The batch file as bench/gpu_torch_step.py reads it (its own reader, under Debian's torch):
# dtypes, shapes, and the images' rows against the modality.
/usr/bin/python3 - "$SRC/bench" "$W/batch.safetensors" <<'PY' || bad=1
import json, sys
sys.dont_write_bytecode = True
sys.path.insert(0, sys.argv[1])
import torch
from gpu_torch_step import read_batch
t, meta = read_batch(sys.argv[2])
cfg = json.loads(meta["config"])
tok, mod, tgt, px = (t[k] for k in ("input.tokens", "input.modality", "input.targets", "input.pixels"))
v = cfg["vision"]
S, P = v["image_size"], v["patch_size"]
T = (S // P) ** 2 + (1 if v["feature_select"] == "all" else 0)
bad = []
if (tok.dtype, mod.dtype, tgt.dtype, px.dtype) != (torch.int32, torch.uint8, torch.int32, torch.float32):
    bad.append(f"dtypes {tok.dtype} {mod.dtype} {tgt.dtype} {px.dtype}")
if tok.dim() != 2 or tok.shape != mod.shape or tok.shape != tgt.shape:
    bad.append(f"shapes {list(tok.shape)} {list(mod.shape)} {list(tgt.shape)}")
if px.dim() != 4 or tuple(px.shape[1:]) != (3, S, S) or int((mod == 2).sum()) != px.shape[0] * T:
    bad.append(f"pixels {list(px.shape)} for {int((mod == 2).sum())} image positions of {T} tokens each")
if bad:
    sys.exit("emulated_benchmarks: FAIL: the step's batch file as gpu_torch_step.py reads it: " + "; ".join(bad))
print(f"emulated_benchmarks: batch file read by gpu_torch_step.read_batch: {list(tok.shape)} tokens, "
      f"{px.shape[0]} image(s), config {cfg.get('name')}")
PY
expect comm-nccl-1 "^\| nccl \| device \| 1 \|" mpirun --oversubscribe -np 1 -x VCHAT_EMU_NCCL_DIR \
  "$T/vchat-bench-comm-emulated" --backend nccl --max-mib 1 --iters 2
expect comm-mpi-staged-2 "^\| mpi \| device \| 2 \| sendrecv" mpirun --oversubscribe -np 2 \
  "$T/vchat-bench-comm-emulated" --backend mpi --buffers device --max-mib 1 --iters 2
# NCCL with two ranks: over two GPUs it runs; on one (VCHAT_EMU_GPU_BUS) it is refused, as the
# trainer refuses it, naming the ranks.
expect comm-nccl-2 "^\| nccl \| device \| 2 \| sendrecv" mpirun --oversubscribe -np 2 -x VCHAT_EMU_NCCL_DIR \
  "$T/vchat-bench-comm-emulated" --backend nccl --max-mib 1 --iters 2
if VCHAT_EMU_GPU_BUS=01 mpirun --oversubscribe -np 2 -x VCHAT_EMU_GPU_BUS -x VCHAT_EMU_NCCL_DIR \
     "$T/vchat-bench-comm-emulated" --backend nccl --max-mib 1 --iters 2 > "$W/comm-nccl-shared.log" 2>&1 ||
   ! grep -qF "needs one GPU per rank, but ranks 0 and 1 share GPU" "$W/comm-nccl-shared.log"; then
  echo "emulated_benchmarks: FAIL: NCCL with two ranks on one GPU was not refused naming them:"
  tail -n 20 "$W/comm-nccl-shared.log"; bad=1
else
  echo "emulated_benchmarks: comm-nccl-shared: refused, $(grep -F "share GPU" "$W/comm-nccl-shared.log" | head -n 1)"
fi
exit $bad
