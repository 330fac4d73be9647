#!/usr/bin/env bash
# The one device check, run on a lent GPU machine from the repository root:
#   bash tools/gpu/check.sh            (or: make gpu-check)
# with .gpu-pack/ carried (tools/gpu/pack.sh made it here). Unpacks, shows the machine, runs
# the GPU suite (ops, comm, then the model and training step), every layout through the
# staged path, the attention and step benchmarks against PyTorch on the same GPU, then
# compute-sanitizer memcheck and racecheck on the ops, the paper-setting step of tiny and
# small and the collectives (bench-comm), and ends with one summary table.
#
# Time: the whole check ends by HARD_S (default 460 s, under the 8 minutes asked): each
# stage's timeout is cut to what is left, and stages that would start too late show as
# skipped. ONLY (an extended regex of stage names) runs a subset, for a rerun of what failed.
# What comes back: a device call returns at most 8 files from $OUT, so $OUT holds only
# summary.md (the table, appended row by row as stages finish, so even a killed run leaves
# the rows so far) and logs.tar.gz (every stage's log, packed at exit). Without $OUT (a
# local run) both go to .gpu-pack/out.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUTDIR=${OUT:-$ROOT/.gpu-pack/out}
HARD_S=${HARD_S:-460}
ONLY=${ONLY:-.}
ORIG_LD=${LD_LIBRARY_PATH-}  # the machine's own: PyTorch runs with it, not with the pack's
mkdir -p "$OUTDIR"
WORK=$(mktemp -d)
LOGS=$WORK/logs
mkdir -p "$LOGS"
SUMMARY=$OUTDIR/summary.md
declare -a NAMES=() RESULTS=() DETAILS=()
printf '| check | result | detail |\n| --- | --- | --- |\n' > "$SUMMARY"

record() {  # record NAME RESULT DETAIL: kept for the table, and appended to summary.md now
  NAMES+=("$1"); RESULTS+=("$2"); DETAILS+=("$3")
  echo "| $1 | $2 | $3 |" >> "$SUMMARY"
}
finish() {  # at any exit: the logs packed into $OUT, the table printed last
  local rc=$? i fail=0
  tar -C "$LOGS" -czf "$OUTDIR/logs.tar.gz" . 2>/dev/null || true
  echo
  echo "| check | result | detail |"
  echo "| --- | --- | --- |"
  for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${DETAILS[$i]} |"
    # PyTorch's references (*-torch-*) and stages not run do not fail the check; everything
    # else must pass, torch-parity included: without it the PyTorch figures compare nothing.
    case ${RESULTS[$i]} in pass|-|skipped|"not selected"|unavailable*) ;; *) [[ ${NAMES[$i]} == *-torch-* ]] || fail=1 ;; esac
  done
  (( rc != 0 )) && fail=1
  rm -rf "$WORK"
  exit $fail
}
trap finish EXIT
trap 'record check interrupted "signal at ${SECONDS} s"; exit 1' TERM INT

selected() {  # selected NAME: whether ONLY picks the stage; if not, its row says so
  [[ $1 =~ $ONLY ]] && return 0
  record "$1" "not selected" "not matched by ONLY"
  return 1
}
stage() {  # stage NAME TIMEOUT_S CMD...: runs, logs to $LOGS/NAME.log, records pass/fail
  local name=$1 limit=$2; shift 2
  selected "$name" || return 0
  local left=$((HARD_S - SECONDS - 10))
  if (( left < 15 )); then record "$name" skipped "over the ${HARD_S} s budget"; return 0; fi
  local cut=0
  (( limit > left )) && limit=$left && cut=1
  local t0=$SECONDS rc
  timeout -k 5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  local result detail
  result=$([[ $rc == 0 ]] && echo pass || echo "FAIL($rc)")
  # Out of time: its own limit, or the check's budget cutting it short (then it is not a
  # finding about the stage, only that the earlier ones took the time: rerun with ONLY).
  (( rc == 124 || rc == 137 )) && result="FAIL(timeout ${limit} s)"
  (( (rc == 124 || rc == 137) && cut )) && result="FAIL(cut at ${limit} s by the ${HARD_S} s budget)"
  # The log's last summary line (gtest's " N FAILED TEST(S)", a figure, ...), and the first
  # failed test's name.
  local first
  first=$(sed -n '/^\[  FAILED  \] .* listed below:$/{n;s/^\[  FAILED  \] //p;q}' "$LOGS/$name.log")
  detail="$((SECONDS - t0)) s; $(grep -E 'FAILED TESTS?$|PASSED|ERROR SUMMARY|_ms |torch_parity: ' "$LOGS/$name.log" | tail -n 1 | cut -c1-100)${first:+ (first: ${first:0:80})}"
  echo "== $name: rc $rc in $((SECONDS - t0)) s"; tail -n 25 "$LOGS/$name.log"
  record "$name" "$result" "$detail"
}
# A PyTorch reference with no vchat batch and FLOP count to run on: its row says why.
no_ref() { selected "$1" && record "$1" skipped "no batch or model_flops from $2 (see its row)"; }
# A step benchmark's host line (vchat-bench-step: the time to enqueue a step, its launches)
# as a row of its own: near the step's time, the GPU waited for the host.
host_line() {
  local h
  h=$(sed -n 's/^# host: //p' "$LOGS/$1.log" 2>/dev/null | tail -n 1)
  [[ -n $h ]] && record "$1-host" - "$h"
  return 0
}
value() { sed -n "s/.*$2=\([0-9.e+-]*\).*/\1/p" "$LOGS/$1.log" 2>/dev/null | tail -n 1; }

# Unpack: tar's xz filter needs the xz program, which a minimal image may lack; Python's
# tarfile reads xz itself.
PACK_TAR=${VCHAT_GPU_PACK:-$ROOT/.gpu-pack/pack.tar.xz}  # (another pack: tests/e2e/gpu_check_plumbing.sh)
[[ -f $PACK_TAR ]] || { record unpack FAIL "no $PACK_TAR (run make gpu-pack here first and carry .gpu-pack)"; exit 1; }
if ! tar -C "$WORK" -xJf "$PACK_TAR" 2> "$LOGS/unpack.log"; then
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$PACK_TAR" "$WORK" >> "$LOGS/unpack.log" 2>&1 ||
    { record unpack FAIL "neither tar -xJ nor Python could unpack the pack: $(tail -n 1 "$LOGS/unpack.log")"; exit 1; }
fi
source "$WORK/pack/tools/env.sh"
vchat_gpu_env "$WORK/pack"
BIN=$PACK/bin
export VCHAT_SOURCE_DIR=$ROOT  # model configs (inputs/models) for the model tests
cd "$ROOT"

echo "== pack $(cat "$PACK/COMMIT"); LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
gpu=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)
echo "$gpu" | tee "$LOGS/gpu.txt"
glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')
record machine - "$gpu; glibc ${glibc:-?}; pack $(cut -c1-10 "$PACK/COMMIT")"
# The pack against this tree: binaries built from other sources test other code.
if [[ ! -f $PACK/SOURCES.sha256 ]]; then
  record pack-sources FAIL "the pack lists no sources (made by an older pack.sh): run make gpu-pack again"
else
  differ=$(sha256sum --quiet -c "$PACK/SOURCES.sha256" 2>/dev/null | grep FAILED | cut -d: -f1)
  if [[ -z $differ ]]; then record pack-sources pass "built from this tree ($(wc -l < "$PACK/SOURCES.sha256") files)"
  else record pack-sources FAIL "the pack is older than the tree: $(wc -l <<< "$differ") source files differ, e.g. $(head -n 3 <<< "$differ" | tr '\n' ' ')(run make gpu-pack again)"
  fi
fi
need=$(cat "$PACK/GLIBC_NEEDED" 2>/dev/null)
if [[ -n $glibc && -n $need && $(printf '%s\n%s\n' "$need" "$glibc" | sort -V | head -n 1) != "$need" ]]; then
  record glibc FAIL "the pack needs glibc >= $need, this machine has $glibc: packed libraries will not load"
fi
# NCCL (not part of the toolkit) and cuBLAS come from the nvidia-* Python wheels when the
# toolkit lacks them (env.sh); a Python elsewhere than on PATH hides those: search for them.
# (ldd's output is read whole: `ldd | grep -q` under pipefail fails when grep's early exit
# cuts ldd off, and the search would be skipped.)
for lib in libnccl.so.2 libcublasLt.so.13 libcublas.so.13 libcudart.so.13; do
  [[ $(ldd "$BIN/vchat_cuda_tests" 2>/dev/null) == *"$lib => not found"* ]] || continue
  found=$(find /opt /usr /root /home -name "$lib" -path '*nvidia*' 2>/dev/null | head -n 1)
  [[ -n $found ]] && LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$(dirname "$found") && echo "== found $found"
done
export LD_LIBRARY_PATH
missing=$(ldd "$BIN/vchat_cuda_tests" 2>&1 | tee "$LOGS/ldd.log" | grep "not found" | awk '{print $1}' | tr '\n' ' ')
# A library the loader cannot find fails every stage alike: say which, once, and stop.
[[ -z $missing ]] || { record libraries FAIL "not found: $missing(see ldd.log)"; exit 1; }

# 1. Correctness: the GPU suite, then every layout on this one GPU through the staged MPI
#    path against one rank (fp32).
stage ops 150 "$BIN/vchat_cuda_tests" --gtest_color=no --gtest_filter='CudaOps.*'
stage comm 60 "$BIN/vchat_cuda_tests" --gtest_color=no --gtest_filter='CudaComm.*'
stage model 200 "$BIN/vchat_cuda_tests" --gtest_color=no --gtest_filter='CudaModel.*'
# The loss curves' margins (bf16 on the GPU against fp32 on the CPU; the test allows 2%).
curves=$(sed -n 's/^\[ curve    \] //p' "$LOGS/model.log" 2>/dev/null | paste -sd ';' -)
[[ -n $curves ]] && record curves - "$curves"
stage layouts-staged 180 bash tools/gpu/layouts.sh "$LOGS"

# 2. Benchmarks: vchat and PyTorch side by side on this GPU (bench/RESULTS.md takes the
#    figures). PyTorch runs with the machine's own library path, not the pack's.
TORCH=(env LD_LIBRARY_PATH="$ORIG_LD" python3)
# The PyTorch model computes vchat's (loss and gradients against the oracle, float64 on the
# CPU, this machine's PyTorch): seconds, and the ratios below compare the same model.
stage torch-parity 60 "${TORCH[@]}" tools/gpu/torch_parity.py
for L in 2048 4096; do
  stage "attn-vchat-$L" 60 "$BIN/vchat-bench-attn" --seq-len $L --batch 4 --heads 16 --kv-heads 16 --head-dim 128 --image-frac 0.3
  stage "attn-vchat-atomic-$L" 60 "$BIN/vchat-bench-attn" --backward atomic-dq --seq-len $L --batch 4 --heads 16 --kv-heads 16 --head-dim 128 --image-frac 0.3
  stage "attn-vchat-wmma-$L" 60 "$BIN/vchat-bench-attn" --kernel wmma --seq-len $L --batch 4 --heads 16 --kv-heads 16 --head-dim 128 --image-frac 0.3
  stage "attn-vchat-cc-$L" 60 "$BIN/vchat-bench-attn" --kernel cuda-cores --seq-len $L --batch 4 --heads 16 --kv-heads 16 --head-dim 128 --image-frac 0.3
  stage "attn-torch-$L" 60 "${TORCH[@]}" bench/gpu_torch_attn.py --seq-len $L --batch 4 --heads 16 --head-dim 128
done
M=inputs/models/llama-1b-clip-l14-224.json
BATCH=$WORK/batch.safetensors
# Four micro-batches of 2 x 2048 tokens a step (16 K tokens an update), both sides: at one,
# AdamW's and the gradient norm's memory traffic (~34 bytes a weight, 1.1 B weights) would be
# about a quarter of the step's roofline (docs/GPU.md, "Roofline of the 1B step"), a cost any
# framework pays once per update, which training spreads over its accumulated micro-batches.
# The profiled step's table shows the update's ms beside the micro-batches' ops.
MB=4
stage step-vchat 120 "$BIN/vchat-bench-step" --device cuda --precision bf16 --model $M --train full --batch 2 \
      --seq-len 2048 --images 4 --warmup 1 --iters 3 --micro-batches $MB --profile --batch-out "$BATCH"
host_line "step-vchat"
# The PyTorch MFU over the same peak vchat's used (gpu_peak_flops_of: the data sheet's dense
# bf16 figure per SM of this GPU's generation, A100's or H100/H200's, times its SMs).
FLOPS=$(value step-vchat model_flops); PEAK=$(value step-vchat peak_tflops); PEAK=${PEAK:-989.4}
if [[ -n $FLOPS && -f $BATCH ]]; then
  stage step-torch-eager 120 "${TORCH[@]}" bench/gpu_torch_step.py --batch-file "$BATCH" --flops "$FLOPS" \
        --peak-tflops "$PEAK" --mode eager --train full --attention mmca --micro-batches $MB
  stage step-torch-compile 150 "${TORCH[@]}" bench/gpu_torch_step.py --batch-file "$BATCH" --flops "$FLOPS" \
        --peak-tflops "$PEAK" --mode compile --train full --attention mmca --micro-batches $MB
else
  no_ref step-torch-eager step-vchat
  no_ref step-torch-compile step-vchat
fi
record figures - "attn L2048 fwd+bwd: vchat $(value attn-vchat-2048 fwd_bwd) ms (atomic dQ $(value attn-vchat-atomic-2048 fwd_bwd); fwd $(value attn-vchat-2048 fwd), WMMA fwd $(value attn-vchat-wmma-2048 fwd)), torch flash $(value attn-torch-2048 fwd_bwd) ms; L4096: vchat $(value attn-vchat-4096 fwd_bwd) ms (atomic dQ $(value attn-vchat-atomic-4096 fwd_bwd)), torch $(value attn-torch-4096 fwd_bwd) ms; 1B step MFU: vchat $(value step-vchat mfu), torch eager $(value step-torch-eager mfu), compile $(value step-torch-compile mfu); peak GPU memory GiB: vchat $(value step-vchat peak_gpu_mem_gib), torch eager $(value step-torch-eager peak_mem_gib), compile $(value step-torch-compile peak_mem_gib)"

# 3. compute-sanitizer on the ops. It slows kernels 10-100x: the small op cases (no
#    32000-wide vocabulary, no 600-token run, no 17M-row column sum). Some runtimes (gVisor)
#    refuse it the device: that shows as unavailable, not as a finding.
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1 || true)
SMALL='CudaOps.*:-CudaOps.CrossEntropyForwardBackwardAndArgmax:CudaOps.GemmAllTransposesStridesAndScales:CudaOps.FlashMmcaAgainstTheCpuOnRandomLayouts:CudaOps.BiasGradientOverSeventeenMillionRows:CudaOps.PoolGivesBackWhatItCachesPastItsThresholdAtSynchronization'
if [[ -n $SAN ]]; then
  for tool in memcheck racecheck; do
    stage $tool 90 "$SAN" --tool $tool --error-exitcode 9 "$BIN/vchat_cuda_tests" --gtest_color=no --gtest_filter="$SMALL"
    if [[ -f $LOGS/$tool.log ]] && grep -q "Device not supported" "$LOGS/$tool.log" && [[ ${RESULTS[-1]} != pass ]]; then
      RESULTS[-1]="unavailable (compute-sanitizer: Device not supported on this runtime)"
      echo "| $tool | ${RESULTS[-1]} | (replaces the row above) |" >> "$SUMMARY"
    fi
  done
elif [[ memcheck =~ $ONLY || racecheck =~ $ONLY ]]; then
  record sanitizers FAIL "compute-sanitizer not found"
fi

# 4. The paper-setting step (projection and input embedding trained, LLM and ViT frozen) of
#    tiny and small against PyTorch eager on the same batch, and the collectives: NCCL at
#    one rank (a call's cost; its only peer is itself), MPI's staged path with two ranks
#    sharing this GPU (device -> host -> MPI -> device). Last, as the least needed: a run
#    out of time skips these first.
for m in tiny small; do
  MB=$WORK/batch-$m.safetensors
  stage "step-$m-vchat" 60 "$BIN/vchat-bench-step" --device cuda --precision bf16 --model inputs/models/$m.json \
        --train default --batch 8 --seq-len 1024 --images 4 --warmup 2 --iters 10 --batch-out "$MB"
  host_line "step-$m-vchat"
  F=$(value "step-$m-vchat" model_flops)
  if [[ -n $F && -f $MB ]]; then
    stage "step-$m-torch-eager" 90 "${TORCH[@]}" bench/gpu_torch_step.py --batch-file "$MB" --flops "$F" \
          --peak-tflops "$PEAK" --mode eager --train default --attention mmca --iters 10
  else
    no_ref "step-$m-torch-eager" "step-$m-vchat"
  fi
done
stage comm-nccl-1 60 "${MPIRUN[@]}" -np 1 "$BIN/vchat-bench-comm" --backend nccl --max-mib 64
stage comm-mpi-staged-2 60 "${MPIRUN[@]}" -np 2 "$BIN/vchat-bench-comm" --backend mpi --buffers device --max-mib 64
record figures-paper - "B8 x L1024 paper-setting step: tiny vchat $(value step-tiny-vchat median) ms, torch eager $(value step-tiny-torch-eager median) ms; small vchat $(value step-small-vchat median) ms, torch eager $(value step-small-torch-eager median) ms"
exit 0
