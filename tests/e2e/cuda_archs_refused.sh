#!/usr/bin/env bash
# Configuring the CUDA variant refuses, naming it, a VCHAT_CUDA_ARCHS entry below sm_80 (the
# kernels need bf16 tensor cores) or one that is not an architecture, before any compiler
# is looked for. Usage: cuda_archs_refused.sh SOURCE_DIR
set -uo pipefail
SRC=$1
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
fail=0
refused() {  # refused ARCHS BAD: configuring fails, naming BAD and the list
  rm -rf "$W/b"
  if cmake -S "$SRC" -B "$W/b" -DVCHAT_CUDA=ON "-DVCHAT_CUDA_ARCHS=$1" > "$W/out" 2>&1; then
    echo "FAIL: VCHAT_CUDA_ARCHS=$1 configured"; fail=1; return
  fi
  # (CMake wraps a message's lines)
  local text
  text=$(tr '\n' ' ' < "$W/out" | tr -s ' ')
  for w in "VCHAT_CUDA_ARCHS: '$2' in '$1'" "sm_80 or newer"; do
    [[ $text == *"$w"* ]] || { echo "FAIL: VCHAT_CUDA_ARCHS=$1: no \"$w\" in:"; cat "$W/out"; fail=1; }
  done
}
refused "75;90" 75
refused "80;sm90" sm90
refused "all" all
[ $fail -eq 0 ] && echo "cmake refuses VCHAT_CUDA_ARCHS 75, sm90 and all, naming each"
exit $fail
