#!/usr/bin/env bash
# A one-node SLURM for the tests (Debian's slurmctld, slurmd and munge; no systemd):
#
#   bash tests/slurm/cluster.sh up DIR     installs the packages if missing (root, apt-get),
#                                          writes DIR/slurm.conf, starts munged, slurmctld and
#                                          slurmd, waits until the node is idle; prints
#                                          "SLURM_CONF=DIR/slurm.conf" (export it for sbatch)
#   bash tests/slurm/cluster.sh down DIR   stops the daemons by their pid files
#   bash tests/slurm/cluster.sh install DIR  only the packages (DIR holds apt-get's log)
#
# Jobs run as the submitting user on this machine's CPUs; KillWait is 30 s, SLURM's default; a
# requeued job may start again after 10 s (cred_expire; 120 s by default on a real cluster), and
# the scheduler looks at pending jobs every 2 s (60 s / 30 s by default).
set -euo pipefail
ACTION="${1:?usage: cluster.sh up|down|install DIR}"
DIR="$(mkdir -p "${2:?usage: cluster.sh up|down|install DIR}" && cd "$2" && pwd)"

stop() {
  for name in slurmd slurmctld munged; do
    if [[ -f "$DIR/$name.pid" ]]; then
      kill "$(cat "$DIR/$name.pid")" 2>/dev/null || true
    fi
  done
  for name in slurmd slurmctld munged; do
    for _ in $(seq 50); do
      [[ -f "$DIR/$name.pid" ]] && kill -0 "$(cat "$DIR/$name.pid")" 2>/dev/null || break
      sleep 0.1
    done
    rm -f "$DIR/$name.pid"
  done
}

installed() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null
}

install() {
  # One installer at a time (two test processes may start a cluster each).
  exec 9>"${TMPDIR:-/tmp}/nvembed-slurm-install.lock"
  flock 9
  installed && return 0
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "error: SLURM is not installed and this is not a root Debian machine: install slurmctld slurmd slurm-client munge" >&2
    return 1
  fi
  echo "installing slurmctld slurmd slurm-client munge (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  local pkgs=(slurmctld slurmd slurm-client munge)
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$DIR/apt.log" 2>&1 \
    || { apt-get update -q >>"$DIR/apt.log" 2>&1 \
         && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$DIR/apt.log" 2>&1; } \
    || { tail -n 20 "$DIR/apt.log" >&2; echo "error: apt-get install failed, see $DIR/apt.log" >&2; return 1; }
}

case "$ACTION" in
  down) stop; exit 0 ;;
  install) install; exit $? ;;
  up) install ;;
  *) echo "error: unknown action '$ACTION' (up, down or install)" >&2; exit 2 ;;
esac

stop  # a cluster left by an earlier run in this folder
USER_NAME="$(id -un)"
HOST="$(hostname -s)"
CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge" "$DIR/log"

# munge: its own key and socket in DIR, so nothing of the machine's is used or changed.
if [[ ! -f "$DIR/munge/munge.key" ]]; then
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 700 "$DIR/munge"
chmod 400 "$DIR/munge/munge.key"
MUNGE_SOCKET="$DIR/munge/munge.socket"
munged --force --key-file "$DIR/munge/munge.key" --socket "$MUNGE_SOCKET" \
  --pid-file "$DIR/munged.pid" --log-file "$DIR/log/munged.log" --seed-file "$DIR/munge/seed"

cat >"$DIR/slurm.conf" <<CONF
ClusterName=nvembedci
SlurmctldHost=$HOST
SlurmUser=$USER_NAME
SlurmdUser=$USER_NAME
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge
SlurmctldPort=$((6817 + RANDOM % 1000 * 2))
SlurmdPort=$((7817 + RANDOM % 1000 * 2))
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
# Job ids start at a random point: jobs of two test clusters on one machine rarely share a
# port (examples/slurm_train.sh's is 20000 + job id % 40000). A requeued job starts again
# after cred_expire (10 s instead of 120 s) and the next scheduling pass (every 2 s).
FirstJobId=$((1000 + RANDOM % 39000))
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=30
MinJobAge=600
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=ci Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
export SLURM_CONF="$DIR/slurm.conf"

slurmctld -i -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 300); do
  state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)"
  if [[ "$state" == idle* ]]; then
    echo "SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.2
done
echo "error: the SLURM node did not become idle in 60 s (state '${state:-none}'); logs in $DIR/log" >&2
tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
stop
exit 1
