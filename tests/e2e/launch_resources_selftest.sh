#!/usr/bin/env bash
# tools/gpu/launch_resources.py can fail: a launch of the CUDA-core flash_dkv<float> (its
# real symbol in the emulated test binary) with 512 threads, against a ptxas report of its
# 217 registers, needs 114688 of an SM's 65536 registers; with 256 threads it fits. A
# launched kernel with no ptxas report fails too. Per architecture: 180000 bytes of shared
# memory fit an emulated H100's 227 KiB but not an emulated A100's 163 KiB, and a build for
# sm_80 with no launch on an emulated sm_80 fails. Usage: launch_resources_selftest.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
BUILD=$1
SRC=$2
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
exe=$(readlink -f "$BUILD/tests/vchat_cuda_emulated_tests")
mtime=$(stat -c %Y "$exe")
sym=$(nm --defined-only "$exe" | awk '{print $3}' | c++filt | grep -n "flash_dkv<float>" | head -1 | cut -d: -f1)
[ -n "$sym" ] || { echo "no flash_dkv<float> in $exe"; exit 1; }
mangled=$(nm --defined-only "$exe" | awk '{print $3}' | sed -n "${sym}p")
offset=$(nm --defined-only "$exe" | awk -v m="$mangled" '$3 == m {print $1}' | sed 's/^0*//')
mkdir -p "$W/cuda"
# The report as nvcc writes it: its per-file anonymous namespace in place of g++'s.
nvcc_name=$(echo "$mangled" | sed 's/12_GLOBAL__N_1/45_GLOBAL__N__854200b7_12_attention_cu_65f37e7f/')
cat > "$W/cuda/attention.cu.o.resources" <<EOR
ptxas info    : Compiling entry function '$nvcc_name' for 'sm_90'
ptxas info    : Function properties for $nvcc_name
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 217 registers, used 1 barriers
EOR
check() {  # check THREADS [SMEM CC]...: the checker's exit code, for launches on emulated GPUs of CC
  local threads=$1; shift
  if [ $# -eq 0 ]; then
    echo "$exe $mtime $offset $threads 67328" > "$W/log"  # the log's older form: an H100
  else
    : > "$W/log"
    while [ $# -gt 0 ]; do echo "$exe $mtime $offset $threads $1 $2" >> "$W/log"; shift 2; done
  fi
  python3 "$SRC/tools/gpu/launch_resources.py" "$W/log" "$W/cuda" > "$W/out" 2>&1 && return 0 || return 1
}
check 256 || { cat "$W/out"; echo "FAIL: 256 threads x 217 registers fits an SM"; exit 1; }
grep -q "0 do not fit, 0 without a ptxas report" "$W/out" || { cat "$W/out"; exit 1; }
if check 512; then cat "$W/out"; echo "FAIL: 512 threads x 217 registers passed"; exit 1; fi
grep -q "does not fit an SM" "$W/out" || { cat "$W/out"; exit 1; }
# The same kernel built for sm_80 and sm_90.
sed "s/'sm_90'/'sm_80'/" "$W/cuda/attention.cu.o.resources" > "$W/cuda/attention80.cu.o.resources"
check 256 180000 90 100000 80 || { cat "$W/out"; echo "FAIL: fitting launches on both GPUs"; exit 1; }
grep -q "sm_80: 1 kernels' registers checked" "$W/out" || { cat "$W/out"; exit 1; }
if check 256 180000 90 180000 80; then cat "$W/out"; echo "FAIL: 180000 bytes passed on an A100"; exit 1; fi
grep -q "sm_80 .*180000 .*does not fit an SM" "$W/out" || { cat "$W/out"; exit 1; }
if check 256 180000 90; then cat "$W/out"; echo "FAIL: sm_80 built but never launched on, passed"; exit 1; fi
grep -q "no launch on an emulated sm_80 GPU" "$W/out" || { cat "$W/out"; exit 1; }
rm "$W/cuda/attention80.cu.o.resources"
: > "$W/cuda/attention.cu.o.resources"
if check 256; then cat "$W/out"; echo "FAIL: a kernel without a ptxas report passed"; exit 1; fi
grep -q "no ptxas report for: .*flash_dkv<float>" "$W/out" || { cat "$W/out"; exit 1; }
echo "launch_resources.py: fails an oversized block, shared memory past an architecture's limit, an architecture" \
     "never launched on, and an unreported kernel; passes fitting ones"
