#!/usr/bin/env bash
# The project's Python virtual environment (.venv at the repository root, not in git), for
# the test oracles Debian does not package: tensorboard (reads our event files back).
# Built on Debian's /usr/bin/python3 with --system-site-packages, so Debian's torch, numpy,
# h5py and matplotlib stay visible. Idempotent: does nothing when every package imports.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/.venv"
# package==version import-name
PACKAGES=("tensorboard==2.18.0 tensorboard")

missing=()
for p in "${PACKAGES[@]}"; do
  read -r spec module <<< "$p"
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import $module" 2> /dev/null || missing+=("$spec")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "[venv] $VENV: all Python packages present"
  exit 0
fi
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$VENV"
echo "[venv] installing into $VENV: ${missing[*]}"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "${missing[@]}"
