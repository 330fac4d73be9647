#!/usr/bin/env bash
# A stop request on any one rank, mid-run: every rank agrees after the current step, the
# run saves, says so and exits 0; resuming from it finishes with exactly the losses of an
# uninterrupted run. SIGUSR1 (Slurm's warning) to the last rank, SIGTERM (preemption) to the
# first. (A second signal exiting at once: Signals.SecondSignalExitsAtOnce, in-process.)
# Usage: checkpoint_signal.sh BUILD_DIR
set -euo pipefail
BUILD=$1
SRC=$(cd "$(dirname "$0")/../.." && pwd)
W=$(mktemp -d /tmp/vchat_signal_XXXXXX)
trap 'rm -rf "$W"' EXIT
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
MPIRUN=(mpirun -np 2 --bind-to none)
[ "$(id -u)" -ne 0 ] || MPIRUN+=(--allow-run-as-root)
cd "$SRC"
ARGS=(--model inputs/models/tiny.json --seq-len 128 --micro-batch-size 2 --zero 1 --lr 1e-3 --steps 400 --comm-timeout 60)
fail() { echo "FAIL: $*"; exit 1; }
train() { "${MPIRUN[@]}" "$BUILD"/vchat-train "${ARGS[@]}" "$@" < /dev/null; }
steps_in() { [ -e "$1" ] && wc -l < "$1" || echo 0; }
ranks_of() { pgrep -f "^$BUILD/vchat-train .*--save-dir $1( |\$)" || true; }

train --save-dir "$W/ref" --metrics "$W/ref.jsonl" > "$W/ref.log" 2>&1 || { cat "$W/ref.log"; fail "reference run"; }

# wait_steps FILE N: until FILE has N step lines (60 s at most).
wait_steps() {
  local deadline=$((SECONDS + 60))
  while [ "$(steps_in "$1")" -lt "$2" ] && [ $SECONDS -lt $deadline ]; do sleep 0.05; done
  [ "$(steps_in "$1")" -ge "$2" ] || fail "no step $2 within 60 s"
}

for case in "USR1 tail" "TERM head"; do
  read -r sig pick <<< "$case"
  dir="$W/ck_$sig"
  train --save-dir "$dir" --metrics "$dir.jsonl" > "$W/run.log" 2>&1 &
  job=$!
  wait_steps "$dir.jsonl" 5
  victim=$(ranks_of "$dir" | "$pick" -n 1)
  kill -"$sig" "$victim"
  set +e
  wait $job
  rc=$?
  set -e
  [ $rc -eq 0 ] || { cat "$W/run.log"; fail "SIG$sig: the job exited $rc, expected 0"; }
  grep -Eq "stopped after step [0-9]+/400 by SIG$sig: saved; continue with --resume auto" "$W/run.log" \
    || { cat "$W/run.log"; fail "SIG$sig: no 'stopped ... saved' line"; }
  stopped=$(sed -n "s/.*stopped after step \([0-9]*\)\/400 by SIG$sig.*/\1/p" "$W/run.log")
  [ "$(cat "$dir/latest")" = "$(printf 'step_%08d' "$stopped")" ] || fail "SIG$sig: latest does not name step $stopped"
  [ "$stopped" -lt 400 ] || fail "SIG$sig: the run was not stopped mid-way"
  "$BUILD"/vchat-ckpt verify "$dir" > /dev/null || fail "SIG$sig: the saved checkpoint is unsound"
  train --save-dir "$dir" --resume auto --metrics "$dir.resumed.jsonl" > "$W/resume.log" 2>&1 \
    || { cat "$W/resume.log"; fail "SIG$sig: resume failed"; }
  python3 -c '
import json, sys
ref = {j["step"]: j["loss"] for j in map(json.loads, open(sys.argv[1])) if "loss" in j}
runs = [j for f in sys.argv[2:] for j in map(json.loads, open(f)) if "loss" in j]
assert [j["step"] for j in runs] == sorted(ref), "the two jobs together do not cover every step once"
for j in runs:
    assert j["loss"] == ref[j["step"]], "step %d: loss %r, uninterrupted %r" % (j["step"], j["loss"], ref[j["step"]])
' "$W/ref.jsonl" "$dir.jsonl" "$dir.resumed.jsonl" || fail "SIG$sig: stopped + resumed differs from the uninterrupted run"
  echo "ok: SIG$sig to one rank stopped the run after step $stopped, saved; the resumed run equals the uninterrupted one"
done

echo "PASS"
