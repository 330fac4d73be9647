#!/usr/bin/env bash
# tools/gpu/launch_resources.py can fail: a launch of the CUDA-core flash_dkv<float> (its
# real symbol in the emulated test binary) with 512 threads, against a ptxas report of its
# 217 registers, needs 114688 of an SM's 65536 registers; with 256 threads it fits. And a
# launched kernel with no ptxas report fails too. Usage: launch_resources_selftest.sh BUILD_DIR SOURCE_DIR
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
check() {  # check THREADS: the checker's exit code
  echo "$exe $mtime $offset $1 67328" > "$W/log"
  python3 "$SRC/tools/gpu/launch_resources.py" "$W/log" "$W/cuda" > "$W/out" 2>&1 && return 0 || return 1
}
check 256 || { cat "$W/out"; echo "FAIL: 256 threads x 217 registers fits an SM"; exit 1; }
grep -q "0 do not fit, 0 without a ptxas report" "$W/out" || { cat "$W/out"; exit 1; }
if check 512; then cat "$W/out"; echo "FAIL: 512 threads x 217 registers passed"; exit 1; fi
grep -q "does not fit an SM" "$W/out" || { cat "$W/out"; exit 1; }
: > "$W/cuda/attention.cu.o.resources"
if check 256; then cat "$W/out"; echo "FAIL: a kernel without a ptxas report passed"; exit 1; fi
grep -q "no ptxas report for: .*flash_dkv<float>" "$W/out" || { cat "$W/out"; exit 1; }
echo "launch_resources.py: fails an oversized block and an unreported kernel, passes a fitting one"
