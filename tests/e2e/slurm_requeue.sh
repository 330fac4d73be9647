#!/usr/bin/env bash
# A real one-node Slurm (Debian's slurmctld, slurmd, munge; started and stopped here) runs
# jobs/slurm/train_dp.sbatch as a 2-task job whose time limit expires mid-run:
#   1. Slurm's warning (--signal=USR1@30 with --time=1) reaches both ranks; vchat-train saves
#      a checkpoint after the current step and exits 0, saying so;
#   2. the job script asks the checkpoint (vchat-ckpt status), finds the run unfinished and
#      requeues itself (scontrol requeue); while it waits to run again, this test lifts its
#      time limit, so the second run cannot be warned again;
#   3. the requeued job resumes (--resume auto) and finishes the run.
# The losses of the two runs together must equal an uninterrupted run's, step for step, bit
# for bit (same layout). Slurm checks limits and warnings every 30 s, so the warning comes
# 0-30 s into the job: the run is made long enough (~60 s at this machine's measured rate) to be
# interrupted whenever it comes.
# Usage: slurm_requeue.sh BUILD_DIR
set -euo pipefail
BUILD=$1
SRC=$(cd "$(dirname "$0")/../.." && pwd)
W=$(mktemp -d /tmp/vchat_slurm_XXXXXX)
cleanup() {
  [ -z "${ref_pid:-}" ] || kill "$ref_pid" 2> /dev/null || true
  bash "$SRC/tests/e2e/slurm/stop_slurm.sh" "$W/slurm" || true
  rm -rf "$W"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  for f in "$W"/job.out "$W/slurm/slurmctld.log"; do
    [ -s "$f" ] && { echo "---- tail of $f"; tail -n 40 "$f"; }
  done
  exit 1
}
[ "$(realpath "$BUILD")" = "$SRC/build" ] || fail "the job scripts run build/ of the repository; got BUILD=$BUILD"

cd "$SRC"

MPIRUN=(mpirun -np 2 --bind-to none)
[ "$(id -u)" -ne 0 ] || MPIRUN+=(--allow-run-as-root)

# The run: tiny model, synthetic data, 2 ranks (dp 2, ZeRO 1 from the job's INI). Its length
# is measured, not fixed: the warning may come as late as 30 s into the job, so the run must
# outlast that on any machine. (A fixed 3000 steps is ~17 s alone at 88k tok/s; it passed
# while the warning came early and failed in CI when it came late.) A short run of the same
# layout gives this machine's rate, and the run is made ~60 s long at that rate, twice the
# latest warning; the job, sharing the cores with the reference below, is slower still.
RUN_BASE=(--model inputs/models/tiny.json --seq-len 128 --micro-batch-size 2 --global-batch 4
          --val-fraction 0 --val-every 0 --lr 1e-3 --comm-timeout 120)
TOKENS_PER_STEP=$((4 * 128))
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "${MPIRUN[@]}" "$BUILD"/vchat-train --config inputs/train/dp_small.ini \
  "${RUN_BASE[@]}" --steps 1000 --log-every 1000 --threads 1 < /dev/null > "$W/rate.log" 2>&1 ||
  { cat "$W/rate.log"; fail "the rate-measuring run failed"; }
tok_s=$(sed -n 's/^step  *1000\/1000 .*| \([0-9][0-9]*\) tok\/s .*/\1/p' "$W/rate.log")
[ -n "$tok_s" ] || { cat "$W/rate.log"; fail "no tok/s in the rate-measuring run's step line"; }
STEPS=$(( (tok_s * 60 / TOKENS_PER_STEP + 999) / 1000 * 1000 ))
[ "$STEPS" -ge 3000 ] || STEPS=3000
echo "this machine: $tok_s tok/s at 2 ranks; the run is $STEPS steps"
RUN=("${RUN_BASE[@]}" --steps "$STEPS" --log-every $((STEPS / 6)))

# The reference: the same run uninterrupted, under mpirun. It runs in the background while
# Slurm starts and the job runs (most of this test is waiting on Slurm's timers); sharing
# the cores only makes the job slower, so its warning comes even earlier in the run.
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "${MPIRUN[@]}" "$BUILD"/vchat-train --config inputs/train/dp_small.ini \
  "${RUN[@]}" --threads 1 --metrics "$W/ref.jsonl" < /dev/null > "$W/ref.log" 2>&1 &
ref_pid=$!

bash "$SRC/tests/e2e/slurm/start_slurm.sh" "$W/slurm" > "$W/start.log" 2>&1 || { cat "$W/start.log"; fail "Slurm did not start"; }
export SLURM_CONF=$W/slurm/slurm.conf

# The job, as a user submits it (sbatch options override the script's #SBATCH lines).
# OMPI_MCA_* : Open MPI under srun as root needs nothing else on one node.
job=$(VCHAT_SAVE_DIR="$W/ck" VCHAT_SAVE_EVERY=$((STEPS / 3)) sbatch --parsable --nodes=1 --ntasks=2 --ntasks-per-node=2 \
      --cpus-per-task=1 --time=1 --signal=USR1@30 --output="$W/job.out" --job-name=vchat-requeue-test \
      jobs/slurm/train_dp.sbatch "${RUN[@]}") || fail "sbatch refused the job"
echo "submitted job $job"

state() { scontrol show job "$job" 2> /dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | head -n 1; }
restarts() { scontrol show job "$job" 2> /dev/null | sed -n 's/.*Restarts=\([0-9]*\).*/\1/p' | head -n 1; }

# Until the job has requeued itself once (the first run was warned, saved and stopped).
deadline=$((SECONDS + 240))
while [ "$(restarts)" != 1 ] && [ $SECONDS -lt $deadline ]; do
  case "$(state)" in FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) fail "job $job ended $(state) before requeueing" ;; COMPLETED) fail "job $job completed without being interrupted: make the run longer" ;; esac
  sleep 1
done
[ "$(restarts)" = 1 ] || fail "job $job did not requeue itself within 240 s (state $(state))"
# It waits out the credential expiry before running again: lift its time limit meanwhile.
scontrol update JobId="$job" TimeLimit=10 || fail "scontrol update TimeLimit failed"
echo "job $job requeued itself; time limit lifted for its second run"

deadline=$((SECONDS + 300))
while [ "$(state)" != COMPLETED ] && [ $SECONDS -lt $deadline ]; do
  case "$(state)" in FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) fail "job $job ended $(state)" ;; esac
  sleep 1
done
[ "$(state)" = COMPLETED ] || fail "job $job did not complete within 300 s of its requeue (state $(state))"
[ "$(restarts)" = 1 ] || fail "job $job ran $(( $(restarts) + 1 )) times; expected 2"

grep -Eq "stopped after step [0-9]+/$STEPS by SIGUSR1: saved" "$W/job.out" || fail "the first run did not stop on SIGUSR1 with a checkpoint"
grep -q "stopped before the end; requeueing" "$W/job.out" || fail "the job script did not requeue"
grep -q "resumed from $W/ck/step_" "$W/job.out" || fail "the second run did not resume"
grep -q "the run is finished" "$W/job.out" || fail "the second run did not finish"
stopped=$(sed -n "s/.*stopped after step \([0-9]*\)\/$STEPS by SIGUSR1.*/\1/p" "$W/job.out" | head -n 1)
"$BUILD"/vchat-ckpt verify "$W/ck" > /dev/null || fail "the final checkpoint is unsound"

wait "$ref_pid" || { cat "$W/ref.log"; fail "reference run"; }
python3 -c '
import json, sys
ref = {j["step"]: j["loss"] for j in map(json.loads, open(sys.argv[1])) if "loss" in j}
run = [j for j in map(json.loads, open(sys.argv[2])) if "loss" in j]
assert [j["step"] for j in run] == sorted(ref), "the two runs together do not cover every step exactly once"
for j in run:
    assert j["loss"] == ref[j["step"]], "step %d: loss %r, uninterrupted %r" % (j["step"], j["loss"], ref[j["step"]])
' "$W/ref.jsonl" "$W/ck/metrics.jsonl" || fail "the two runs differ from the uninterrupted one"
echo "PASS: job $job was warned at step $stopped of $STEPS, saved, requeued itself, resumed and finished;" \
     "its losses equal the uninterrupted run's at every step"
