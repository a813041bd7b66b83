#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (slurmctld + slurmd + munged), for the suite and for trying the Slurm
# launchers without a site. Needs root (SlurmUser=root) and Debian's slurm-wlm and munge packages.
#   bash scripts/slurm_one_node.sh install       # apt-get install slurm-wlm munge, unless slurmctld is there
#   bash scripts/slurm_one_node.sh start DIR     # conf, state, logs and pid files under DIR; prints SLURM_CONF=...
#   bash scripts/slurm_one_node.sh stop DIR      # stops the daemons this DIR's start began (by their pid files)
# Then: export SLURM_CONF=DIR/slurm.conf; sinfo; sbatch --wrap hostname. No slurmdbd: `sacct` reads the
# job-completion log (JobCompType=jobcomp/filetxt) with --completion; `scontrol show job` keeps a job 10 minutes.
set -euo pipefail

die() { echo "slurm_one_node: $*" >&2; exit 1; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

install() {
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
    echo "slurm-wlm and munge are installed"
    return
  fi
  [ "$(id -u)" = 0 ] || die "installing slurm-wlm and munge needs root (apt-get); run as root or install them"
  command -v apt-get >/dev/null || die "no apt-get here: install Slurm (slurmctld, slurmd) and munge yourself"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  echo "installed $(slurmctld -V) and munge"
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return  # a munged answers already (this host's own): use it
  fi
  [ -s /etc/munge/munge.key ] || {
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  }
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  munged --force --pid-file="$1/munged.pid" --log-file="$1/munged.log"
  for _ in $(seq 100); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  die "munged started but does not answer (see /var/log/munge/munged.log)"
}

start() {
  local dir=$1 host mem
  [ "$(id -u)" = 0 ] || die "a one-node cluster runs its daemons as root (SlurmUser=root); this is uid $(id -u)"
  command -v slurmctld >/dev/null || die "slurmctld is not installed (bash $0 install)"
  mkdir -p "$dir/state" "$dir/spool"
  dir=$(cd "$dir" && pwd)
  host=$(hostname -s)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat >"$dir/slurm.conf" <<EOF
ClusterName=inferlab-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=30
MinJobAge=600
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  start_munge "$dir"
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -c
  slurmd -c
  for _ in $(seq 300); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
      echo "SLURM_CONF=$SLURM_CONF"
      return
    fi
    sleep 0.2
  done
  tail -5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
  die "the node did not come up idle within 60 s (logs above, in $dir)"
}

stop() {
  local dir=$1 pid name
  for name in slurmd slurmctld munged; do
    [ -s "$dir/$name.pid" ] || continue
    pid=$(cat "$dir/$name.pid")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}

case "${1:-}" in
  install) install ;;
  start) [ $# = 2 ] || die "usage: $0 start DIR"; start "$2" ;;
  stop) [ $# = 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
  *) die "usage: $0 install | start DIR | stop DIR" ;;
esac
