#!/bin/bash
# Called by the jobs in jobs/slurm/ after their `srun … vchat-train … --resume auto`:
# vchat-train exits 0 both when the run finished and when Slurm's warning signal
# (#SBATCH --signal=USR1@N) stopped it after a checkpoint. This asks the checkpoint which
# (vchat-ckpt status) and requeues the job when the run is unfinished; the requeued job
# starts the same script again and resumes from the latest checkpoint.
# Usage: jobs/slurm/requeue_unless_finished.sh SAVE_DIR
set -euo pipefail
save_dir=$1
status=0
build/vchat-ckpt status "$save_dir" || status=$?
case $status in
  0) echo "vchat job $SLURM_JOB_ID: the run is finished" ;;
  3) echo "vchat job $SLURM_JOB_ID: stopped before the end; requeueing (restart ${SLURM_RESTART_COUNT:-0} -> $(( ${SLURM_RESTART_COUNT:-0} + 1 )))"
     scontrol requeue "$SLURM_JOB_ID" ;;
  *) echo "vchat job $SLURM_JOB_ID: no readable checkpoint in $save_dir; not requeueing" >&2
     exit 1 ;;
esac
