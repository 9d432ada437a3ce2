#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests/test_slurm.py and CI (run as root):
#   sudo bash tools/local_slurm.sh
# Installs Debian's slurm-wlm and munge if missing, writes the munge key and /etc/slurm/slurm.conf for
# this host, starts munged, slurmctld and slurmd, and waits until the node is idle. Idempotent: when the
# cluster answers with this configuration it does nothing; a changed configuration restarts the daemons.
# Logs: /var/log/slurm/.
set -euo pipefail

fail() { echo "local_slurm: $*" >&2; exit 1; }

# sinfo's state of the only node, or nothing when no controller answers.
node_state() { sinfo --noheader --format=%T 2>/dev/null | head -n1 || true; }

[[ $EUID -eq 0 ]] || fail "must run as root (it installs packages and starts the daemons); try: sudo bash $0"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null \
        || fail "apt-get install slurm-wlm munge failed"
fi

host="$(hostname -s)"
cpus="$(nproc)"
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # leave the OS a tenth

# Slurm. Daemons run as root so that the tests (root) may requeue and signal jobs. No cgroups
# (containers rarely allow them): processes are tracked by parent pid. Accounting is off, so job
# states come from scontrol/squeue. A short KillWait, and a short cred_expire (also how long a
# requeued job waits before it may start again: 120 s by default), keep the tests quick.
conf="# Written by tools/local_slurm.sh: a one-node cluster for tests.
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
JobRequeue=1
KillWait=5
MinJobAge=600
SchedulerParameters=sched_interval=2,bf_interval=2,sched_min_interval=100000
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP"

if [[ -f /etc/slurm/slurm.conf && "$(cat /etc/slurm/slurm.conf)" == "$conf" ]]; then
    case "$(node_state)" in idle|mixed|allocated|completing) exit 0 ;; esac  # "idle*": slurmd is not answering
else
    mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
    echo "$conf" > /etc/slurm/slurm.conf
    for daemon in slurmctld slurmd; do  # running with another configuration: stop them, started below
        if [[ -s /run/$daemon.pid ]] && kill "$(cat "/run/$daemon.pid")" 2>/dev/null; then sleep 2; fi
    done
fi

# munge: a key only munge can read (a real cluster has the same key on every node).
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge && chown munge:munge /run/munge /var/lib/munge /var/log/munge
if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- munged || fail "munged did not start (see /var/log/munge/munged.log)"
fi

pgrep -x slurmctld >/dev/null || slurmctld || fail "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd || fail "slurmd did not start (see /var/log/slurm/slurmd.log)"

for _ in $(seq 60); do
    case "$(node_state)" in
        idle|mixed|allocated|completing) echo "local_slurm: node $host is up ($cpus CPUs, $mem_mb MB)"; exit 0 ;;
        down*|drain*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
done
fail "the node did not become idle within 60 s (sinfo: '$(node_state)'; see /var/log/slurm/)"
