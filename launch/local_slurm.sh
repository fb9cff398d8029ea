#!/usr/bin/env bash
# A throwaway two-node Slurm cluster on this machine (node1 and node2, both slurmd's on 127.0.0.1),
# to run launch/slurm.sbatch without a cluster. Needs root; installs slurm-wlm and munge with
# apt-get if they are missing. Everything else (config, keys, state, logs, pid files) lives in DIR.
#
#   launch/local_slurm.sh up DIR     start munged, slurmctld and two slurmd's (if not running yet)
#   launch/local_slurm.sh down DIR   stop them
#   export SLURM_CONF=DIR/slurm.conf   then sbatch, squeue, scontrol ... talk to it
#
# Ports: SLURM_LOCAL_PORT [6817] for slurmctld and the two next ones for the slurmd's.
set -euo pipefail
if [ $# -ne 2 ] || { [ "$1" != up ] && [ "$1" != down ]; }; then
  sed -n '2,10p' "$0"; exit 2
fi
mkdir -p "$2"
dir=$(cd "$2" && pwd)
daemons=(munged slurmctld slurmd.node1 slurmd.node2)

running() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

if [ "$1" = down ]; then
  for d in "${daemons[@]}"; do
    if running "$d"; then kill "$(cat "$dir/$d.pid")"; fi
    rm -f "$dir/$d.pid"
  done
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
port=${SLURM_LOCAL_PORT:-6817}
cpus=$(nproc)
mkdir -p "$dir/state" "$dir/spool"
cat > "$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=node1 NodeAddr=127.0.0.1 Port=$((port + 1)) CPUs=$cpus State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.1 Port=$((port + 2)) CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$dir/slurm.conf

if ! running munged; then
  [ -f "$dir/munge.key" ] || { dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 2>/dev/null; chmod 600 "$dir/munge.key"; }
  munged --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
    --log-file="$dir/munged.log" --seed-file="$dir/munge.seed"
fi
if ! running slurmctld; then
  slurmctld -i
fi
for node in node1 node2; do
  if ! running "slurmd.$node"; then
    slurmd -N "$node"
  fi
done
# Up when both nodes take jobs.
for _ in $(seq 60); do
  if [ "$(sinfo -h -N -t idle,mix,alloc -o %N 2>/dev/null | sort -u | wc -l)" = 2 ]; then
    echo "local Slurm cluster up: export SLURM_CONF=$dir/slurm.conf"; exit 0
  fi
  sleep 1
done
echo "local Slurm cluster in $dir did not come up; see $dir/*.log" >&2
sinfo -N >&2 || true
exit 1
