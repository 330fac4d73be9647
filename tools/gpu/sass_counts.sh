#!/usr/bin/env bash
# Static instruction counts of the register attention kernels' main loops (docs/GPU.md,
# "Instruction budget"), on a machine with no GPU: compiles src/cuda/attention_tc.cu for
# sm_90 as the CUDA build does (-O3), disassembles it with cuobjdump and nvdisasm (NVIDIA's
# PyPI wheels, fetched once into build/sass-tools: the toolkit here ships neither), and
# prints tools/gpu/sass_loops.py's per-path counts for one head dim, with ptxas's registers
# and spills.
#   tools/gpu/sass_counts.sh [HEAD_DIM]     (default 128)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HD=${1:-128}
TOOLS=${SASS_TOOLS:-$ROOT/build/sass-tools}
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
if [ ! -x "$TOOLS/bin/cuobjdump" ] || [ ! -x "$TOOLS/bin/nvdisasm" ]; then
  mkdir -p "$TOOLS/wheels" "$TOOLS/bin"
  python3 -m pip download --quiet --no-deps -d "$TOOLS/wheels" \
    nvidia-cuda-cuobjdump==13.2.51 nvidia-cuda-nvdisasm==13.5.37
  for w in "$TOOLS"/wheels/*.whl; do
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$TOOLS/x"
  done
  cp "$(find "$TOOLS/x" -name cuobjdump -type f | head -1)" "$(find "$TOOLS/x" -name nvdisasm -type f | head -1)" \
    "$TOOLS/bin/"
  chmod +x "$TOOLS/bin/cuobjdump" "$TOOLS/bin/nvdisasm"
fi
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
"$NVCC" -std=c++17 -arch=sm_90 -O3 -I"$ROOT/src" -c "$ROOT/src/cuda/attention_tc.cu" --resource-usage \
  -o "$W/attention_tc.o" > "$W/ptxas.txt" 2>&1
PATH="$TOOLS/bin:$PATH" cuobjdump -sass "$W/attention_tc.o" > "$W/attention_tc.sass"
# ptxas's line per kernel: registers and spill stores.
python3 - "$W/ptxas.txt" "$HD" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
for i, l in enumerate(lines):
    m = re.search(r"Compiling entry function '\S*?(flash_\w+?_mma)ILi(\d+)E(Lb(\d))?", l)
    if m and m.group(2) == sys.argv[2]:
        info = " ".join(lines[i:i + 5])
        regs = re.search(r"Used (\d+) registers", info).group(1)
        spill = re.search(r"(\d+) bytes spill stores", info).group(1)
        print(f"{m.group(1)}<{m.group(2)}{', ' + ('true' if m.group(4) == '1' else 'false') if m.group(3) else ''}>: "
              f"{regs} registers, {spill} bytes spilled")
PY
python3 "$ROOT/tools/gpu/sass_loops.py" "$W/attention_tc.sass" "flash_\\w+_mmaILi${HD}E" |
  sed -E -e 's/^_ZN\S*(flash_[a-z_]+_mma)ILi([0-9]+)ELb0E\S*/\1<\2, false>:/' \
    -e 's/^_ZN\S*(flash_[a-z_]+_mma)ILi([0-9]+)ELb1E\S*/\1<\2, true>:/' -e 's/^_ZN\S*(flash_[a-z_]+_mma)ILi([0-9]+)EE\S*/\1<\2>:/'
