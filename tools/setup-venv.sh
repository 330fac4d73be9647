#!/usr/bin/env bash
# The project's Python virtual environment (.venv at the repository root, not in git), for
# the test oracles Debian does not package: tensorboard (reads our event files back),
# transformers 4.47.1 (the last release for Debian's torch 1.13: the Hugging Face oracle of
# import/export and generation) and peft (loads the LoRA adapters export writes).
# Built on Debian's /usr/bin/python3 with --system-site-packages, so Debian's torch, numpy,
# h5py and matplotlib stay visible. Idempotent: does nothing when every package imports.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/.venv"
# package==version import-name
PACKAGES=("tensorboard==2.18.0 tensorboard" "transformers==4.47.1 transformers" "accelerate==0.34.2 accelerate" "safetensors==0.4.5 safetensors" "sentencepiece==0.2.0 sentencepiece" "protobuf==5.29.3 google.protobuf")

missing=()
for p in "${PACKAGES[@]}"; do
  read -r spec module <<< "$p"
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import $module" 2> /dev/null || missing+=("$spec")
done
have_peft() { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import peft" 2> /dev/null; }
if [ ${#missing[@]} -eq 0 ] && have_peft; then
  echo "[venv] $VENV: all Python packages present"
  exit 0
fi
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$VENV"
echo "[venv] installing into $VENV: ${missing[*]}$(have_peft || echo " peft==0.13.2 (without dependencies)")"
[ ${#missing[@]} -eq 0 ] || "$VENV/bin/pip" install --quiet --disable-pip-version-check "${missing[@]}"
# peft asks for torch>=1.13.0, which Debian's 1.13.0a0 (a pre-release) does not satisfy, so
# pip would pull a second multi-GB torch: install it without dependencies (the ones it needs
# came with transformers and accelerate above).
have_peft || "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "peft==0.13.2"
