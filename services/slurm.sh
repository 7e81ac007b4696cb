#!/usr/bin/env bash
# A throw-away single-node Slurm cluster (Debian's slurmctld, slurmd, munge) for tests and trials,
# all of its state in one folder: its own slurm.conf, munge key, spool, logs and pid files. Clients
# find it through SLURM_CONF, and through /etc/slurm/slurm.conf, a link to the folder's config made
# while the cluster runs (Snakemake's job step clears SLURM_* from the environment of the srun it
# starts inside each job, so that srun reads the standard place). A real slurm.conf already there
# is never replaced: start then refuses.
#
#   services/slurm.sh start DIR    # install the packages if missing, start munged, slurmctld, slurmd
#   services/slurm.sh status DIR   # exit 0 when all three daemons run and the node is usable
#   services/slurm.sh stop DIR     # cancel the cluster's jobs, stop the daemons by their pids
#
# After `start`, `source DIR/env` (or export SLURM_CONF=DIR/etc/slurm.conf) and use sbatch, squeue,
# srun as on any cluster. The node declares every core and most of the memory of this machine and
# one GPU (GRES gpu:1; File=/dev/null on a machine without one, so `--gpus=1` jobs see
# CUDA_VISIBLE_DEVICES=0). There is no accounting database (sacct refuses, as on many clusters);
# MinJobAge keeps finished jobs visible to squeue for 12 h. Memory is enforced: a step that exceeds
# its --mem is killed (jobacct_gather/linux + OverMemoryKill, sampled every second). Needs root.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
CMD="$1"
mkdir -p "$2"
DIR="$(cd "$2" && pwd)"
CONF="$DIR/etc/slurm.conf"
SYSTEM_CONF=/etc/slurm/slurm.conf
PIDS=("$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid" "$DIR/run/munged.pid")

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_config() {
  local socket_dir="$1" cpus mem_mb ctld_port d_port
  cpus="$(nproc)"
  mem_mb="$(awk '/MemTotal/ {m = int($2 / 1024) - 2048; print (m > 1024 ? m : 1024)}' /proc/meminfo)"
  ctld_port="$(free_port)"
  d_port="$(free_port)"
  mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
  cat >"$CONF" <<EOF
# Written by services/slurm.sh: a single-node test cluster, all state under $DIR.
ClusterName=allfuse
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket_dir/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
MinJobAge=43200
ReturnToService=2
GresTypes=gpu
SlurmdParameters=config_overrides
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=localhost NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:1 State=UNKNOWN
PartitionName=main Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  # A GPU GRES needs a File=; /dev/null stands in for the card on a machine without one.
  echo "NodeName=localhost Name=gpu File=/dev/null" >"$DIR/etc/gres.conf"
  echo "export SLURM_CONF=$CONF" >"$DIR/env"
}

start_munge() {
  # munged wants every folder above its socket searchable by all, which a private temporary
  # folder is not: the socket lives in a folder of its own under /tmp, named in DIR/run/munge.dir.
  local socket_dir
  mkdir -p "$DIR/run"
  socket_dir="$(mktemp -d /tmp/allfuse-munge.XXXXXX)"
  chmod 0755 "$socket_dir"
  echo "$socket_dir" >"$DIR/run/munge.dir"
  write_config "$socket_dir"
  install -d -m 0700 "$DIR/munge"
  [ -s "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key"
  munged --socket="$socket_dir/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
}

node_state() { SLURM_CONF="$CONF" sinfo --noheader --format=%T 2>/dev/null | head -n 1; }

wait_for_node() {
  local state=""
  for _ in $(seq 1 60); do
    state="$(node_state)"
    case "$state" in idle | mixed | allocated) return 0 ;; esac
    sleep 0.5
  done
  echo "services/slurm.sh: the node did not become usable (state '${state:-no answer}'):" >&2
  SLURM_CONF="$CONF" sinfo --list-reasons >&2 || true
  tail -n 20 "$DIR"/log/*.log >&2 || true
  return 1
}

link_system_conf() {
  if [ -e "$SYSTEM_CONF" ] && [ ! -L "$SYSTEM_CONF" ]; then
    echo "services/slurm.sh: $SYSTEM_CONF exists and is not a test cluster's link: this machine has a" \
      "Slurm of its own; not touching it" >&2
    return 1
  fi
  mkdir -p "$(dirname "$SYSTEM_CONF")"
  ln -sfn "$CONF" "$SYSTEM_CONF"
}

unlink_system_conf() {
  if [ -L "$SYSTEM_CONF" ] && [ "$(readlink "$SYSTEM_CONF")" = "$CONF" ]; then rm -f "$SYSTEM_CONF"; fi
}

do_start() {
  if do_status >/dev/null 2>&1; then
    echo "slurm already running in $DIR"
    return 0
  fi
  do_stop >/dev/null 2>&1 || true
  "$HERE/install.sh" slurm
  link_system_conf
  start_munge
  slurmctld -f "$CONF"
  slurmd -f "$CONF" -N localhost
  wait_for_node
  echo "slurm running in $DIR (source $DIR/env)"
}

do_status() {
  local down=0
  for pid in "${PIDS[@]}"; do alive "$pid" || { echo "$(basename "$pid" .pid) not running"; down=1; }; done
  [ "$down" -eq 0 ] || return 1
  echo "node: $(node_state)"
}

do_stop() {
  if [ -f "$CONF" ] && alive "$DIR/run/slurmctld.pid"; then
    # Jobs of this cluster first, so no job step outlives its daemons.
    SLURM_CONF="$CONF" squeue --noheader --format=%i | xargs -r env SLURM_CONF="$CONF" scancel || true
  fi
  for pid in "${PIDS[@]}"; do
    alive "$pid" && kill -TERM "$(cat "$pid")"
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 40); do alive "$pid" || break; sleep 0.25; done
    alive "$pid" && kill -KILL "$(cat "$pid")"
    rm -f "$pid"
  done
  unlink_system_conf
  if [ -s "$DIR/run/munge.dir" ]; then
    rm -rf "$(cat "$DIR/run/munge.dir")"
    rm -f "$DIR/run/munge.dir"
  fi
  echo "slurm stopped in $DIR"
}

case "$CMD" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) usage ;;
esac
