#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying the SLURM profile and for tests/test_slurm.py.
#
#   workflow/cluster/local-slurm.sh up [DIR]      install (Debian packages) when missing, configure, start
#   workflow/cluster/local-slurm.sh down [DIR]    stop every daemon this script started
#   workflow/cluster/local-slurm.sh env [DIR]     the environment a client needs (eval "$(... env)")
#
# Everything lives under DIR (default /tmp/fac-slurm): slurm.conf, gres.conf and slurmdbd.conf (linked from
# /etc/slurm, where jobs look; a config there that this script did not write stops it), the daemons' state, logs
# and pid files, and a private MariaDB data folder on 127.0.0.1:$FAC_SLURM_DB_PORT (default 33061), which slurmdbd
# uses for accounting: Snakemake's SLURM executor plugin reads job states with `sacct`. munged uses the package's
# key (/etc/munge/munge.key). The node advertises $FAC_SLURM_GPUS (default 2) GPUs backed by stand-in device files,
# so a job's `--gpus N` is accepted and accounted (ReqTRES gres/gpu=N) although the machine has none.
# Needs root (it installs packages and runs the daemons). `up` is idempotent; `down` then `up` starts afresh with
# the accounting kept.
set -euo pipefail

ACTION=${1:-up}
DIR=$(realpath -m "${2:-${FAC_SLURM_DIR:-/tmp/fac-slurm}}")
DB_PORT=${FAC_SLURM_DB_PORT:-33061}
GPUS=${FAC_SLURM_GPUS:-2}
NODE=$(hostname -s)
CLUSTER=fac
PACKAGES=(slurmctld slurmd slurmdbd slurm-client munge mariadb-server)

say() { echo "local-slurm: $*" >&2; }
die() { say "error: $*"; exit 1; }

install() {
  local missing=()
  for tool in slurmctld slurmd slurmdbd sbatch sacct munged mariadbd; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] && return
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}; run as root to install ${PACKAGES[*]}"
  say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
  apt-get update -qq
  # policy-rc.d keeps the packages' own services from starting: this script runs its own.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
}

write_config() {
  mkdir -p "$DIR"/{ctld,spool,log,run,db}
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 3 / 4 ))
  cat > "$DIR/slurm.conf" <<EOF
# Written by workflow/cluster/local-slurm.sh: a one-node cluster for fac's SLURM profile.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
MinJobAge=30
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MpiDefault=none
NodeName=$NODE CPUs=$cpus RealMemory=$mem Gres=gpu:$GPUS State=UNKNOWN
PartitionName=$CLUSTER Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  # Slurm drops a GPU without device files: stand-ins (character devices like /dev/null; a job finds no CUDA).
  mkdir -p "$DIR/dev"
  echo "# Written by workflow/cluster/local-slurm.sh" > "$DIR/gres.conf"
  for i in $(seq 0 $((GPUS - 1))); do
    [ -e "$DIR/dev/nvidia$i" ] || mknod "$DIR/dev/nvidia$i" c 1 3 2>/dev/null || touch "$DIR/dev/nvidia$i"
    echo "NodeName=$NODE Name=gpu File=$DIR/dev/nvidia$i" >> "$DIR/gres.conf"
  done
  cat > "$DIR/slurmdbd.conf" <<EOF
# Written by workflow/cluster/local-slurm.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/slurmdbd.conf"
}

link_config() {
  # Jobs find the config at Slurm's default path: Snakemake's job step drops SLURM_* variables (SLURM_CONF too)
  # before its nested srun. A config there that this script did not write is never replaced.
  mkdir -p /etc/slurm
  for name in slurm.conf gres.conf slurmdbd.conf; do
    local target=/etc/slurm/$name
    if [ -e "$target" ] && ! [ -L "$target" ] && ! grep -q "local-slurm.sh" "$target"; then
      die "$target exists and was not written by this script (a real cluster's?); not replacing it"
    fi
    ln -sfn "$DIR/$name" "$target"
  done
}

running() {  # a pid file's process is alive
  [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq "$((seconds * 2))"); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  die "$what did not come up in ${seconds}s (logs: $DIR/log)"
}

start_munge() {
  if munge -n </dev/null >/dev/null 2>&1; then return; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -f /etc/munge/munge.key ] || { /usr/sbin/mungekey --create --keyfile /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 munged munge -n
}

db() { mariadb --protocol=tcp -h 127.0.0.1 -P "$DB_PORT" -u root "$@"; }

start_database() {
  if ! [ -d "$DIR/db/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$DIR/db" --user=root --auth-root-authentication-method=normal \
      >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed ($DIR/log/mariadb-install.log)"
  fi
  if ! running "$DIR/run/mariadb.pid"; then
    mariadbd --no-defaults --datadir="$DIR/db" --user=root --bind-address=127.0.0.1 --port="$DB_PORT" \
      --socket="$DIR/run/mariadb.sock" --pid-file="$DIR/run/mariadb.pid" --log-error="$DIR/log/mariadb.log" \
      --innodb-buffer-pool-size=64M --skip-name-resolve &
    disown
  fi
  wait_for 30 MariaDB db -e "select 1"
}

start_slurm() {
  export SLURM_CONF="$DIR/slurm.conf"
  running "$DIR/run/slurmdbd.pid" || /usr/sbin/slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
  if ! sacctmgr -n -P list account format=account | grep -qx "$CLUSTER"; then
    sacctmgr -i add account "$CLUSTER" Description=fac Organization=fac >/dev/null
  fi
  if ! sacctmgr -n -P list assoc user="$(id -un)" account="$CLUSTER" format=account | grep -qx "$CLUSTER"; then
    sacctmgr -i add user "$(id -un)" Account="$CLUSTER" >/dev/null
  fi
  running "$DIR/run/slurmctld.pid" || /usr/sbin/slurmctld
  wait_for 30 slurmctld scontrol ping
  running "$DIR/run/slurmd.pid" || /usr/sbin/slurmd
  wait_for 30 "slurmd (node $NODE registered)" node_registered
  # A node drained by an earlier start (a config since fixed, a killed slurmd) goes back to service.
  if sinfo -h -N -n "$NODE" -o %t | grep -Eq "^(drain|drng|down)"; then
    scontrol update NodeName="$NODE" State=RESUME || true
  fi
  wait_for 30 "node $NODE (idle; scontrol show node $NODE gives the reason)" node_idle
}

node_registered() {
  scontrol show node "$NODE" | grep -q "State=" && ! scontrol show node "$NODE" | grep -q "NOT_RESPONDING\|UNKNOWN"
}

node_idle() {
  sinfo -h -N -n "$NODE" -o %t | grep -Eq "^(idle|mix|alloc)"
}

stop() {
  for name in slurmd slurmctld slurmdbd mariadb; do
    if running "$DIR/run/$name.pid"; then
      kill "$(cat "$DIR/run/$name.pid")" 2>/dev/null || true
      for _ in $(seq 40); do running "$DIR/run/$name.pid" || break; sleep 0.25; done
    fi
  done
}

case "$ACTION" in
  up)
    install
    write_config
    link_config
    start_munge
    start_database
    start_slurm
    say "up: partition $CLUSTER on $NODE ($(nproc) CPUs, $GPUS GPUs as a count); export SLURM_CONF=$DIR/slurm.conf"
    ;;
  down)
    stop
    say "down ($DIR kept)"
    ;;
  env)
    echo "export SLURM_CONF=$DIR/slurm.conf"
    ;;
  *)
    die "unknown action '$ACTION' (up, down or env)"
    ;;
esac
