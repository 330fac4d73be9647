#!/usr/bin/env bash
# Installs every Debian package vchat needs, idempotently: packages already present are
# skipped, so `make test` can call this on every run at the cost of one dpkg query.
# The CUDA toolkit (nvcc, cuBLAS, NCCL) is not a Debian package at the version we need
# (CUDA 13); it is expected under /usr/local/cuda and only checked for here.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config git
  libopenblas-openmp-dev              # CPU GEMM (cblas_sgemm) on OpenMP threads, shared with our loops
  libopenmpi-dev openmpi-bin          # MPI launcher and the CPU communicator backend
  libhdf5-dev                         # shards and checkpoints
  hdf5-tools python3-h5py             # h5dump and h5py read checkpoints back (tests)
  libssl-dev                          # SHA-256 (OpenSSL libcrypto) for shard and tokenizer hashes
  libboost-program-options-dev        # command line + INI configs
  libboost-context-dev                # the CUDA emulator's threads as fibers (tests/emu/cuda_emu.h)
  nlohmann-json3-dev                  # manifests, model configs
  libsentencepiece-dev sentencepiece  # tokenizer
  libopencv-dev                       # image decoding in vchat-prep and vchat-chat
  libgtest-dev googletest             # unit tests
  python3 python3-torch python3-numpy # PyTorch reference for tests/ and bench/
  python3-venv python3-pip            # the project's venv (tools/setup-venv.sh)
  python3-matplotlib                  # tools/plot_metrics.py
  xz-utils                            # tar -J: the GPU pack (tools/gpu/pack.sh) and its check's test
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "[deps] installing: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "[deps] error: need root to apt-get install the packages above (or install them yourself)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "[deps] all Debian packages present"
fi

bash "$(dirname "$0")/setup-venv.sh"

if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "[deps] CUDA toolkit found: $( (command -v nvcc || echo /usr/local/cuda/bin/nvcc) )"
else
  echo "[deps] warning: CUDA toolkit (nvcc) not found; the CUDA variant will not be built" >&2
fi
