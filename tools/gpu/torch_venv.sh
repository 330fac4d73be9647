#!/usr/bin/env bash
# A PyTorch like the lent GPU machine's, here, so tools/gpu/rehearse.sh can run the PyTorch
# benchmark references (bench/gpu_torch_*.py) and their parity with the oracle
# (tools/gpu/torch_parity.py) on the CPU before any device minute is spent on them.
# Debian's torch 1.13 (the test oracles') lacks what they use: SDPA's enable_gqa and
# sdpa_kernel, nn.RMSNorm, torch.compile. The version is the lent image's
# (/work/.library/device/KINDS.md: torch 2.11.0+cu130); PyPI's wheel brings its CUDA
# libraries (about 5 GB, a minute to install), which it needs to import even on a CPU.
# Prints the venv's python on stdout. Idempotent; fails (no output) where pip cannot reach
# PyPI, and the rehearsal then says the references were not rehearsed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${TORCH_VENV:-$ROOT/.venv-torch}
VERSION=2.11.0
have() { [[ -x $VENV/bin/python ]] && [[ $("$VENV/bin/python" -c 'import numpy, torch; print(torch.__version__.split("+")[0])' 2>/dev/null) == "$VERSION" ]]; }
if ! have; then
  echo "[torch-venv] installing torch==$VERSION and numpy into $VENV (about 5 GB)" >&2
  [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV" >&2
  # (PyPI's wheel: download.pytorch.org's CPU wheels could not be reached from here.)
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --retries 1 --timeout 30 "torch==$VERSION" numpy >&2
  have || { echo "[torch-venv] $VENV: torch $VERSION does not import after installing" >&2; exit 1; }
fi
echo "$VENV/bin/python"
