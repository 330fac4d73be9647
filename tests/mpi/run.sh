#!/usr/bin/env bash
# Runs an MPI test program under mpirun with the flags this machine needs.
#
#   run.sh MPIEXEC NP PROGRAM [ARGS...]
#       passes iff the job exits 0.
#   run.sh --expect-abort REGEX MPIEXEC NP PROGRAM [ARGS...]
#       passes iff the job exits non-zero, its output matches the extended REGEX and does
#       not contain "probe: no timeout". (ctest alone cannot say "fails AND prints this":
#       PASS_REGULAR_EXPRESSION ignores the exit code, and WILL_FAIL inverts the regex.)
#
# Root needs --allow-run-as-root; more ranks than the 2 cores of the test machines need
# --oversubscribe; --bind-to none lets oversubscribed ranks share cores instead of being
# pinned two to one core. One OpenMP/OpenBLAS thread per rank, as in the unit tests.
set -uo pipefail

expect_regex=""
if [ "${1:-}" = "--expect-abort" ]; then
  expect_regex="$2"
  shift 2
fi
mpiexec="$1" np="$2"
shift 2

args=(-np "$np" --bind-to none)
[ "$(id -u)" -ne 0 ] || args+=(--allow-run-as-root)
[ "$np" -le 2 ] || args+=(--oversubscribe)
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
args+=(-x OMP_NUM_THREADS -x OPENBLAS_NUM_THREADS)
# Test hook of the MPI backend (comm_mpi.cpp): small slices exercise the >2^30 paths.
[ -z "${VCHAT_COMM_MPI_MAX_COUNT:-}" ] || args+=(-x VCHAT_COMM_MPI_MAX_COUNT)
# Test hook of tests/mpi_test_main.cpp: every buffer is treated as device memory, so each
# operation runs through the MPI backend's staged path for device buffers.
[ -z "${VCHAT_TEST_STAGE_EVERY_BUFFER:-}" ] || args+=(-x VCHAT_TEST_STAGE_EVERY_BUFFER)

if [ -z "$expect_regex" ]; then
  exec "$mpiexec" "${args[@]}" "$@"
fi

out=$("$mpiexec" "${args[@]}" "$@" 2>&1)
rc=$?
printf '%s\n' "$out"
if [ "$rc" -eq 0 ]; then
  echo "run.sh: expected the job to abort, but it exited 0" >&2
  exit 1
fi
if printf '%s\n' "$out" | grep -q "probe: no timeout"; then
  echo "run.sh: an operation completed that should have timed out" >&2
  exit 1
fi
if ! printf '%s\n' "$out" | grep -Eq -- "$expect_regex"; then
  echo "run.sh: the job failed (exit $rc) without the expected message: $expect_regex" >&2
  exit 1
fi
echo "run.sh: aborted as expected (exit $rc)"
