#!/usr/bin/env bash
# The CUDA build's compiler launcher (CMakeLists.txt): runs nvcc as given, with
# --resource-usage, and keeps ptxas's per-kernel lines (registers, static shared memory,
# spills, stack) in OBJECT.resources beside the object instead of on the console.
# tools/gpu/launch_resources.py reads them against the launches the emulated GPU suite made.
#   nvcc_resources.sh NVCC ARGS...
set -uo pipefail
out=""
prev=""
for a in "$@"; do
  [ "$prev" = "-o" ] && out=$a
  prev=$a
done
case "$out" in
  *.o) ;;
  *) exec "$@" ;;  # not a compile to an object (a link, a dependency scan): as it is
esac
err=$(mktemp)
"$@" --resource-usage 2> "$err"
rc=$?
grep -E '^(ptxas info|    [0-9]+ bytes stack frame)' "$err" > "$out.resources" || true
grep -vE '^(ptxas info|    [0-9]+ bytes stack frame)' "$err" >&2 || true
rm -f "$err"
exit $rc
