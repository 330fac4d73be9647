#!/usr/bin/env bash
# The device check's layouts stage (tools/gpu/layouts.sh) on the emulated CUDA device:
# vchat-train-emulated is the trainer built against tests/emu/sdk/ (an emulated CUDA
# runtime, cuBLASLt and NCCL), so each rank holds its parameters, gradients, optimizer
# state and ZeRO buffers in emulated device memory, as on one shared GPU. Every layout
# through the staged MPI path against one rank in fp32 (within 1e-5), then the bf16 ZeRO
# pairs and resumes bit for bit: what the GPU stage asks, before a GPU is lent. With
# COMM=nccl, the same over the emulated NCCL, one process and emulated GPU per rank.
# Usage: emulated_layouts.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
BUILD=$1
SRC=$2
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
# layouts.sh runs from a pack (tools/gpu/pack.sh): here one made of this build's binaries,
# with the system's mpirun in place of the packed one.
mkdir -p "$W/pack/bin" "$W/pack/tools" "$W/out"
ln -s "$BUILD/tests/vchat-train-emulated" "$W/pack/bin/vchat-train"
ln -s "$BUILD/vchat-ckpt" "$W/pack/bin/vchat-ckpt"
cat > "$W/pack/tools/env.sh" <<'EOF'
vchat_gpu_env() {
  PACK=$1
  MPIRUN=(mpirun --oversubscribe --bind-to none -x OMP_NUM_THREADS -x OPENBLAS_NUM_THREADS)
  export PACK OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
}
EOF
cd "$SRC"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
# COMM=nccl: the emulated NCCL's ranks meet through files; here, not in /dev/shm, so that a
# failed run leaves nothing behind.
export VCHAT_EMU_NCCL_DIR="$W/nccl"
if ! DEVICE=cuda LAYOUT_TIMEOUT_S=${LAYOUT_TIMEOUT_S:-600} PACK="$W/pack" bash tools/gpu/layouts.sh "$W/out"; then
  for f in "$W"/out/layout-*.log; do echo "== $f"; tail -n 15 "$f"; done
  exit 1
fi
