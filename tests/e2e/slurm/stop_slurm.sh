#!/usr/bin/env bash
# Stops the test cluster that start_slurm.sh STATE_DIR started: cancels every job, waits for
# the jobs' processes to end, stops slurmd and slurmctld by their pid files in STATE_DIR, and
# stops munged only when start_slurm.sh started it (STATE_DIR/munged.started). Removes
# nothing; the logs stay in STATE_DIR. Idempotent, never fails: fit for `trap ... EXIT`.
# Usage: stop_slurm.sh STATE_DIR
set -u

STATE_DIR=${1:?usage: stop_slurm.sh STATE_DIR}
[ -d "$STATE_DIR" ] || exit 0
STATE_DIR=$(cd "$STATE_DIR" && pwd)
export SLURM_CONF=$STATE_DIR/slurm.conf
say() { echo "stop_slurm.sh: $*" >&2; }

pid_of() {  # pid_of PIDFILE NAME: the pid in PIDFILE when it is a live process called NAME
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2> /dev/null)
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2> /dev/null)" = "$2" ] \
    && echo "$pid"
}

# slurmstepd processes of this cluster: they keep its SlurmdLogFile, STATE_DIR/slurmd.log, open.
stepds() {
  local p f
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2> /dev/null)" = slurmstepd ] || continue
    for f in "$p"/fd/*; do
      if [ "$(readlink "$f" 2> /dev/null)" = "$STATE_DIR/slurmd.log" ]; then
        echo "${p#/proc/}"
        break
      fi
    done
  done
  return 0
}

stop_pid() {  # stop_pid PID NAME: SIGTERM, up to 15 s, then SIGKILL
  local pid=$1 name=$2
  kill -TERM "$pid" 2> /dev/null || return 0
  for _ in $(seq 1 150); do
    [ "$(cat "/proc/$pid/comm" 2> /dev/null)" = "$name" ] || return 0
    sleep 0.1
  done
  say "$name (pid $pid) ignored SIGTERM for 15 s: SIGKILL"
  kill -KILL "$pid" 2> /dev/null
  sleep 0.2
}

ctld=$(pid_of "$STATE_DIR/slurmctld.pid" slurmctld || true)
slurmd=$(pid_of "$STATE_DIR/slurmd.pid" slurmd || true)

# descendants PID: the processes below PID (from /proc: no ps on a minimal system).
descendants() {
  local p st ppid
  declare -A kids=()
  for p in /proc/[0-9]*; do
    st=$(cat "$p/stat" 2> /dev/null) || continue
    st=${st##*) }            # after "pid (comm) ": state ppid ...
    ppid=${st#* }; ppid=${ppid%% *}
    kids[$ppid]+=" ${p#/proc/}"
  done
  local todo=("$1") c
  while [ ${#todo[@]} -gt 0 ]; do
    c=${todo[0]}; todo=("${todo[@]:1}")
    for p in ${kids[$c]:-}; do echo "$p"; todo+=("$p"); done
  done
}

# 1. Cancel every job, and wait (KillWait=5 s + margin, 30 s at most) until none is left and no
#    step daemon runs. Without a controller, step daemons and their tasks are killed at once.
if [ -n "$ctld" ] && [ -f "$SLURM_CONF" ]; then
  jobs=$(timeout 20 squeue -h -o %A 2> /dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    # shellcheck disable=SC2086
    timeout 20 scancel $jobs > /dev/null 2>&1 || say "scancel $jobs failed"
    deadline=$((SECONDS + 30))
    while [ $SECONDS -lt $deadline ]; do
      left=$(timeout 10 squeue -h -o %A 2> /dev/null)
      [ -z "$left" ] && [ -z "$(stepds)" ] && break
      sleep 0.5
    done
  fi
fi
for p in $(stepds); do
  say "slurmstepd $p (and its tasks) still there: SIGKILL"
  # shellcheck disable=SC2046
  kill -KILL "$p" $(descendants "$p") 2> /dev/null
done

# 2. slurmd, then slurmctld.
[ -z "$slurmd" ] || stop_pid "$slurmd" slurmd
[ -z "$ctld" ] || stop_pid "$ctld" slurmctld

# 3. munged, only if start_slurm.sh started it.
if [ -s "$STATE_DIR/munged.started" ]; then
  m=$(pid_of "$STATE_DIR/munged.started" munged || true)
  [ -z "$m" ] || stop_pid "$m" munged
  rm -f "$STATE_DIR/munged.started"
fi
exit 0
