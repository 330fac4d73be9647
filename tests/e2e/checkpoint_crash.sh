#!/usr/bin/env bash
# kill -9 of one rank at every moment of a save, and at random moments of a run that saves
# every step: afterwards `latest` must name a complete checkpoint (vchat-ckpt verify), or
# not exist when the first save never finished, and resuming (--resume auto) must finish the
# run with exactly the losses of an uninterrupted one. The moments come from the saver's test
# hook (VCHAT_CKPT_CRASH_AT, src/checkpoint/saver.cpp): the rank SIGKILLs itself there, as
# `kill -9` would. Usage: checkpoint_crash.sh BUILD_DIR
set -euo pipefail
BUILD=$1
SRC=$(cd "$(dirname "$0")/../.." && pwd)
W=$(mktemp -d /tmp/vchat_crash_XXXXXX)
trap 'rm -rf "$W"' EXIT
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
MPIRUN=(mpirun -np 2 --bind-to none)
[ "$(id -u)" -ne 0 ] || MPIRUN+=(--allow-run-as-root)
cd "$SRC"
# Common options; each run adds its own --steps and --save-every.
ARGS=(--model inputs/models/tiny.json --seq-len 128 --micro-batch-size 2 --keep-last 1 --zero 1 --lr 1e-3
      --comm-timeout 60)
fail() { echo "FAIL: $*"; exit 1; }

# same_losses REF.jsonl RUN.jsonl: every step RUN logged has REF's loss, bit for bit, and RUN
# reached REF's last step.
same_losses() {
  python3 -c '
import json, sys
ref = {j["step"]: j["loss"] for j in map(json.loads, open(sys.argv[1])) if "loss" in j}
run = [j for j in map(json.loads, open(sys.argv[2])) if "loss" in j]
assert run, "the resumed run logged no step"
for j in run:
    s, l = j["step"], j["loss"]
    assert l == ref[s], "step %d: loss %r, uninterrupted %r" % (s, l, ref[s])
assert run[-1]["step"] == max(ref), "the resumed run ended at step %d" % run[-1]["step"]
' "$1" "$2"
}

train() {  # train STEPS SAVE_EVERY [options...]
  local steps=$1 every=$2
  shift 2
  "${MPIRUN[@]}" "$BUILD"/vchat-train "${ARGS[@]}" --steps "$steps" --save-every "$every" "$@" < /dev/null  # mpirun reads stdin
}

# check_and_resume DIR LABEL EXPECTED_LATEST (- = none may exist) STEPS SAVE_EVERY REF.jsonl
check_and_resume() {
  local dir=$1 label=$2 want=$3 steps=$4 every=$5 ref=$6
  if [ "$want" = "-" ]; then
    [ ! -e "$dir/latest" ] || fail "$label: 'latest' exists after a crash in the first save"
  else
    [ "$(cat "$dir/latest")" = "$want" ] || fail "$label: latest is '$(cat "$dir/latest" 2> /dev/null)', expected $want"
    "$BUILD"/vchat-ckpt verify "$dir" > "$W/verify.log" 2>&1 || { cat "$W/verify.log"; fail "$label: latest is not sound"; }
  fi
  rm -f "$W/resumed.jsonl"
  train "$steps" "$every" --save-dir "$dir" --resume auto --metrics "$W/resumed.jsonl" > "$W/resume.log" 2>&1 \
    || { cat "$W/resume.log"; fail "$label: resuming failed"; }
  "$BUILD"/vchat-ckpt verify "$dir" > "$W/verify.log" 2>&1 || { cat "$W/verify.log"; fail "$label: final checkpoint unsound"; }
  same_losses "$ref" "$W/resumed.jsonl" || fail "$label: the resumed run differs from the uninterrupted one"
  echo "ok: $label (latest was '$want')"
}

train 6 2 --save-dir "$W/ref6" --metrics "$W/ref6.jsonl" > "$W/ref.log" 2>&1 || { cat "$W/ref.log"; fail "reference run"; }

# Every moment of a save, by the test hook: point, rank, step of the save, expected latest.
while read -r point rank step want; do
  dir="$W/ck_${point}_${rank}_${step}"
  set +e
  VCHAT_CKPT_CRASH_AT=$point VCHAT_CKPT_CRASH_RANK=$rank VCHAT_CKPT_CRASH_STEP=$step \
    train 6 2 --save-dir "$dir" > "$W/crash.log" 2>&1
  rc=$?
  set -e
  [ $rc -ne 0 ] || { cat "$W/crash.log"; fail "$point: the job survived its rank's SIGKILL"; }
  grep -q "killed at '$point'" "$W/crash.log" || { cat "$W/crash.log"; fail "$point: the hook did not fire"; }
  check_and_resume "$dir" "kill -9 of rank $rank at '$point' of the save of step $step" "$want" 6 2 "$W/ref6.jsonl"
done <<'TABLE'
frozen-file-written 1 2 -
step-file-written 0 2 -
frozen-complete 0 2 -
frozen-published 0 2 -
manifest-written 0 2 -
step-file-written 1 4 step_00000002
manifest-written 0 4 step_00000002
complete-written 0 4 step_00000002
renamed 0 4 step_00000002
latest-written 0 4 step_00000004
pruning 0 4 step_00000004
TABLE

# And at moments nobody chose: a run that saves every step, one rank killed after a delay.
train 100 1 --save-dir "$W/ref100" --metrics "$W/ref100.jsonl" > "$W/ref.log" 2>&1 || { cat "$W/ref.log"; fail "reference run"; }
for delay in 0.5 0.9 1.3; do
  dir="$W/ck_random_$delay"
  train 100 1 --save-dir "$dir" > "$W/random.log" 2>&1 &
  job=$!
  sleep "$delay"
  victim=$(pgrep -f "^$BUILD/vchat-train .*--save-dir $dir\$" | tail -n 1 || true)
  [ -n "$victim" ] || { wait $job || true; cat "$W/random.log"; fail "no rank left to kill after ${delay}s"; }
  kill -9 "$victim"
  set +e
  wait $job
  rc=$?
  set -e
  [ $rc -ne 0 ] || fail "random kill at ${delay}s: the job exited 0"
  want=-
  [ ! -e "$dir/latest" ] || want=$(cat "$dir/latest")
  check_and_resume "$dir" "kill -9 of one rank ${delay}s into a run saving every step" "$want" 100 1 "$W/ref100.jsonl"
done
echo "PASS: every kill left a complete latest checkpoint (or none before the first), and every resume finished like the uninterrupted run"
