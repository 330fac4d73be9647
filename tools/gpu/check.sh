#!/usr/bin/env bash
# The one device check, run on a lent GPU machine from the repository root:
#   bash tools/gpu/check.sh            (or: make gpu-check)
# with .gpu-pack/ carried (tools/gpu/pack.sh made it here). Unpacks, shows the machine, runs
# the GPU suite (ops, then the model and training step), compute-sanitizer memcheck and
# racecheck on the ops, the attention and step benchmarks against PyTorch on the same GPU,
# and ends with one summary table. Logs go to $OUT (the device tool brings them back) or
# .gpu-pack/out. The whole check stops starting stages after DEADLINE_S (default 450 s):
# later stages show as skipped, so the table always comes back.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUTDIR=${OUT:-$ROOT/.gpu-pack/out}
DEADLINE_S=${DEADLINE_S:-450}
mkdir -p "$OUTDIR"
WORK=$(mktemp -d)
tar -C "$WORK" -xJf "$ROOT/.gpu-pack/pack.tar.xz" || { echo "gpu-check: no .gpu-pack/pack.tar.xz (run make gpu-pack here first and carry .gpu-pack)"; exit 1; }
source "$WORK/pack/tools/env.sh"
vchat_gpu_env "$WORK/pack"
BIN=$PACK/bin
export VCHAT_SOURCE_DIR=$ROOT  # model configs (inputs/models) for the model tests
cd "$ROOT"
declare -a NAMES RESULTS DETAILS

record() { NAMES+=("$1"); RESULTS+=("$2"); DETAILS+=("$3"); }
stage() {  # stage NAME TIMEOUT_S CMD...: runs, logs to $OUTDIR/NAME.log, records pass/fail
  local name=$1 limit=$2; shift 2
  if (( SECONDS > DEADLINE_S )); then record "$name" skipped "over the ${DEADLINE_S} s budget"; return; fi
  local t0=$SECONDS rc
  timeout "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  rc=$?
  record "$name" "$([[ $rc == 0 ]] && echo pass || echo "FAIL($rc)")" \
         "$((SECONDS - t0)) s; $(grep -E 'FAILED TESTS|PASSED|ERROR SUMMARY|_ms ' "$OUTDIR/$name.log" | tail -n 1 | cut -c1-100)"
  echo "== $name: rc $rc in $((SECONDS - t0)) s"; tail -n 25 "$OUTDIR/$name.log"
}
value() { sed -n "s/.*$2=\([0-9.e+-]*\).*/\1/p" "$OUTDIR/$1.log" 2>/dev/null | tail -n 1; }

echo "== pack $(cat "$PACK/COMMIT"); LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUTDIR/gpu.txt" || true
ldd "$BIN/vchat_cuda_tests" | grep -E "not found|cublas|cudart|nccl" | tee "$OUTDIR/ldd.log"

stage ops 150 "$BIN/vchat_cuda_tests" --gtest_color=no --gtest_filter='CudaOps.*'
stage comm 60 "$BIN/vchat_cuda_tests" --gtest_color=no --gtest_filter='CudaComm.*'
stage model 200 "$BIN/vchat_cuda_tests" --gtest_color=no --gtest_filter='CudaModel.*'
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
# The sanitizers slow kernels 10-100x: the small op cases (no 32000-wide vocabulary, no 600-token run).
SMALL='CudaOps.*:-CudaOps.CrossEntropyForwardBackwardAndArgmax:CudaOps.GemmAllTransposesStridesAndScales:CudaOps.FlashMmcaAgainstTheCpuOnRandomLayouts'
if [[ -n $SAN ]]; then
  stage memcheck 90 "$SAN" --tool memcheck --error-exitcode 9 "$BIN/vchat_cuda_tests" --gtest_filter="$SMALL"
  stage racecheck 90 "$SAN" --tool racecheck --error-exitcode 9 "$BIN/vchat_cuda_tests" --gtest_filter="$SMALL"
else
  record sanitizers FAIL "compute-sanitizer not found"
fi

# Every layout on this one GPU through the staged MPI path against one rank (fp32).
stage layouts-staged 150 bash tools/gpu/layouts.sh "$OUTDIR"

# Benchmarks: vchat and PyTorch side by side on this GPU (bench/RESULTS.md takes the figures).
for L in 2048 4096; do
  stage "attn-vchat-$L" 60 "$BIN/vchat-bench-attn" --seq-len $L --batch 4 --heads 16 --kv-heads 16 --head-dim 128 --image-frac 0.3
  stage "attn-vchat-cc-$L" 60 "$BIN/vchat-bench-attn" --kernel cuda-cores --seq-len $L --batch 4 --heads 16 --kv-heads 16 --head-dim 128 --image-frac 0.3
  stage "attn-torch-$L" 60 python3 bench/gpu_torch_attn.py --seq-len $L --batch 4 --heads 16 --head-dim 128
done
M=inputs/models/llama-1b-clip-l14-224.json
stage step-vchat 120 "$BIN/vchat-bench-step" --device cuda --precision bf16 --model $M --train full --batch 2 \
      --seq-len 2048 --images 4 --warmup 1 --iters 3 --batch-out "$OUTDIR/batch.safetensors"
FLOPS=$(value step-vchat model_flops); PEAK=$(python3 -c "print(989.4)")
if [[ -n $FLOPS ]]; then
  stage step-torch-eager 120 python3 bench/gpu_torch_step.py --batch-file "$OUTDIR/batch.safetensors" --flops "$FLOPS" \
        --peak-tflops "$PEAK" --mode eager --train full --attention mmca
  stage step-torch-compile 200 python3 bench/gpu_torch_step.py --batch-file "$OUTDIR/batch.safetensors" --flops "$FLOPS" \
        --peak-tflops "$PEAK" --mode compile --train full --attention mmca
fi
rm -f "$OUTDIR/batch.safetensors"

record figures "-" "attn L2048 fwd+bwd: vchat $(value attn-vchat-2048 fwd_bwd) ms, torch flash $(value attn-torch-2048 fwd_bwd) ms; L4096: vchat $(value attn-vchat-4096 fwd_bwd) ms, torch $(value attn-torch-4096 fwd_bwd) ms; 1B step MFU: vchat $(value step-vchat mfu), torch eager $(value step-torch-eager mfu), compile $(value step-torch-compile mfu)"
echo
echo "| check | result | detail |"
echo "| --- | --- | --- |"
fail=0
for i in "${!NAMES[@]}"; do
  echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${DETAILS[$i]} |"
  [[ ${RESULTS[$i]} == pass || ${RESULTS[$i]} == - || ${NAMES[$i]} == *-torch-* ]] || fail=1
done
exit $fail
