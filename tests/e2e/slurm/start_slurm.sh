#!/usr/bin/env bash
# Starts a real single-node Slurm 22.05 cluster (Debian 12 packages) for tests: munged (reused
# when one already answers), slurmctld and slurmd as root daemons whose configuration, state,
# spool, pid and log files all live under STATE_DIR. Needs root (it installs packages and
# starts daemons) and no systemd and no cgroups (proctrack/linuxproc, task/none).
#
# Usage: start_slurm.sh STATE_DIR
#   then: export SLURM_CONF=STATE_DIR/slurm.conf   (every sbatch/srun/squeue/scontrol needs it)
#   stop: stop_slurm.sh STATE_DIR                  (safe from a `trap ... EXIT`)
#
# Optional environment:
#   VCHAT_SLURM_CPUS   CPUs the node offers (default: what `slurmd -C` finds). More than the
#                      machine has is allowed (SlurmdParameters=config_overrides), so a 2-core
#                      machine can run a 4-task job without --overcommit; nothing is bound.
#   VCHAT_SLURM_PORT   slurmctld port (default 6817; slurmd uses it + 1)
#   VCHAT_SLURM_DEBUG  SlurmctldDebug/SlurmdDebug level (default: debug, which logs the
#                      warning signals; `info` is quieter)
#   VCHAT_SLURM_KEEP_STATE=1  restart slurmctld on the saved state (default: a clean state)
#
# Timing, fixed by Slurm (PERIODIC_TIMEOUT = 30 s, compiled in, no setting changes it):
# slurmctld checks time limits and --signal warnings every 30 s. A job is ended at the first
# check at or after its limit (0-30 s late; OverTimeLimit=0), then SIGTERM, KillWait=5 s, SIGKILL.
# A `--signal=SIG@W` warning goes out at the first check at or after limit - W - 30 s, i.e.
# between W+30 and W seconds before the limit: early, never late. (`--time=1 --signal=USR1@30`
# gets USR1 at the first check after the start: 0-30 s into the job.) Without `B:` the warning
# goes to every process of every step (not to the batch shell), children such as a `sleep`
# included; `--signal=B:SIG@W` sends it to the batch shell only.
# A requeued job (`scontrol requeue`, JobRequeue=1) may run again 11 s later (cred_expire=10
# below; Slurm's default is 121 s), at the scheduler's next pass: about 17 s in practice.
# OpenMPI 4.1 (Debian) under `srun --mpi=pmix`, as root, needs no OMPI_MCA_* setting, and
# 2 tasks on 2 cores need neither --overcommit nor --oversubscribe.
set -euo pipefail

STATE_DIR=${1:?usage: start_slurm.sh STATE_DIR}
# slurmctld, slurmd and the clients; munge; the basic plugins ship mpi_pmix(_v4).so, which
# dlopens /usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so, a file only libpmix-dev ships
# (the plugin package does not depend on it: without it `srun --mpi=pmix` fails).
PACKAGES=(slurmctld slurmd slurm-client slurm-wlm-basic-plugins munge libpmix2 libpmix-dev)
DEADLINE_S=60
started=0

munge_ok() { munge -n < /dev/null 2> /dev/null | unmunge > /dev/null 2>&1; }
die() {
  echo "start_slurm.sh: ERROR: $*" >&2
  local f
  local logs=("$STATE_DIR"/slurmctld.log "$STATE_DIR"/slurmd.log)
  munge_ok || logs+=(/var/log/munge/munged.log)
  for f in "${logs[@]}"; do
    [ -s "$f" ] || continue
    echo "---- last lines of $f ----" >&2
    tail -n 40 "$f" >&2
  done
  # Leave nothing half started: stop what this run started (and munged, if it started it).
  [ "$started" = 0 ] || "$(dirname "$0")"/stop_slurm.sh "$STATE_DIR" || true
  exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages, starts munged/slurmctld/slurmd)"

# ---- packages --------------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
  st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$st" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "start_slurm.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q > /dev/null || die "apt-get update failed"
  apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" > /dev/null \
    || die "apt-get install ${PACKAGES[*]} failed"
fi
PLUGDIR=$(dirname "$(dpkg -L slurm-wlm-basic-plugins | grep '/mpi_pmix.so$' | head -n 1)")
[ -e "$PLUGDIR/mpi_pmix.so" ] || die "no mpi_pmix.so in slurm-wlm-basic-plugins"
compgen -G '/usr/lib/*/pmix2/lib/libpmix.so' > /dev/null \
  || die "pmix2/lib/libpmix.so (libpmix-dev) missing: srun --mpi=pmix would fail"

mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
CONF=$STATE_DIR/slurm.conf

# ---- refuse to start twice on one STATE_DIR --------------------------------------------------
alive() {  # alive PIDFILE NAME: the pid in PIDFILE is a live process called NAME
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}
if alive "$STATE_DIR/slurmctld.pid" slurmctld || alive "$STATE_DIR/slurmd.pid" slurmd; then
  die "a cluster from $STATE_DIR is already running; run stop_slurm.sh $STATE_DIR first"
fi

# ---- munge -----------------------------------------------------------------------------------
if munge_ok; then
  echo "start_slurm.sh: reusing the running munged"
  rm -f "$STATE_DIR/munged.started"
else
  if [ ! -s /etc/munge/munge.key ]; then
    install -d -o munge -g munge -m 0700 /etc/munge
    if command -v mungekey > /dev/null; then
      mungekey --create --keyfile=/etc/munge/munge.key --force > /dev/null || die "mungekey failed"
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  # --force: a socket or lock file left by a munged that died is no reason to refuse.
  runuser -u munge -- /usr/sbin/munged --force || die "munged did not start"
  started=1
  cat /run/munge/munged.pid > "$STATE_DIR/munged.started" 2> /dev/null || true
  for _ in $(seq 1 100); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged started but munge -n | unmunge fails"
  echo "start_slurm.sh: started munged (pid $(cat "$STATE_DIR/munged.started"))"
fi

# ---- slurm.conf ------------------------------------------------------------------------------
HOST=$(hostname -s)
PORT=${VCHAT_SLURM_PORT:-6817}
DEBUG=${VCHAT_SLURM_DEBUG:-debug}
# `slurmd -C`: NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
hw=$(slurmd -C | head -n 1) || die "slurmd -C failed"
field() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<< "$hw"; }
cpus=$(field CPUs) boards=$(field Boards) sockets=$(field SocketsPerBoard)
cores=$(field CoresPerSocket) threads=$(field ThreadsPerCore) mem=$(field RealMemory)
{ [ -n "$cpus" ] && [ -n "$mem" ]; } || die "cannot read the machine from slurmd -C: $hw"
node="CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads"
if [ -n "${VCHAT_SLURM_CPUS:-}" ] && [ "$VCHAT_SLURM_CPUS" != "$cpus" ]; then
  node="CPUs=$VCHAT_SLURM_CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$VCHAT_SLURM_CPUS ThreadsPerCore=1"
fi
# A little under the real memory, so a few MiB less one day does not drain the node.
node+=" RealMemory=$((mem * 9 / 10))"

mkdir -p "$STATE_DIR/state" "$STATE_DIR/spool"
cat > "$CONF" <<EOF
# Written by tests/e2e/slurm/start_slurm.sh: a single-node test cluster.
ClusterName=vchattest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job (scontrol requeue, JobRequeue=1) waits cred_expire + 1 s before it may run
# again (default 120 s); 10 s keeps requeue tests short.
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
# No cgroups here: processes are tracked by parentage, nothing is bound or confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
SlurmctldDebug=$DEBUG
SlurmdDebug=$DEBUG
ReturnToService=2
JobRequeue=1
# Time limits: no grace past the limit; 5 s between SIGTERM and SIGKILL; ended jobs leave
# squeue after 10 s. (Limits and --signal warnings are checked every 30 s: see the top.)
OverTimeLimit=0
KillWait=5
MinJobAge=10
InactiveLimit=0
Waittime=0
MessageTimeout=10
SlurmdTimeout=120
SlurmctldTimeout=120
NodeName=$HOST NodeAddr=127.0.0.1 $node State=UNKNOWN
# FORCE:4: jobs share cores (up to 4 jobs a core) without asking, so several small jobs run at once.
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
export SLURM_CONF=$CONF

# ---- daemons ---------------------------------------------------------------------------------
: > "$STATE_DIR/slurmctld.log"
: > "$STATE_DIR/slurmd.log"
ctld_args=(-f "$CONF")
[ "${VCHAT_SLURM_KEEP_STATE:-0}" = 1 ] || ctld_args+=(-c)
started=1
slurmctld "${ctld_args[@]}" || die "slurmctld failed to start"
slurmd -f "$CONF" || die "slurmd failed to start"

deadline=$((SECONDS + DEADLINE_S))
state=
while [ $SECONDS -lt $deadline ]; do
  alive "$STATE_DIR/slurmctld.pid" slurmctld || { sleep 0.5; alive "$STATE_DIR/slurmctld.pid" slurmctld \
    || die "slurmctld exited"; }
  state=$(timeout 5 sinfo -h -N -n "$HOST" -o %t 2> /dev/null | head -n 1 || true)
  case "$state" in
    idle|mix|alloc) break ;;
    down*|drain*|fail*)
      # A node that was down in a kept state: bring it back.
      scontrol update NodeName="$HOST" State=RESUME > /dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
case "$state" in
  idle|mix|alloc) ;;
  *) die "node $HOST not idle within ${DEADLINE_S}s (sinfo state: '${state:-none}')" ;;
esac
alive "$STATE_DIR/slurmd.pid" slurmd || die "slurmd is not running"

echo "start_slurm.sh: cluster vchattest up: node $HOST ($node), partition debug"
echo "start_slurm.sh: now run:  export SLURM_CONF=$CONF"
