#!/usr/bin/env bash
# A Slurm cluster of NODES nodes (default 1) on this machine, for tests/test_slurm*.py and CI (as root;
# prefix `sudo` where you are not root):
#   bash tools/local_slurm.sh                   # one node
#   NODES=2 bash tools/local_slurm.sh           # two nodes: multi-node jobs (.ci/run starts this one)
#   STOP=1 bash tools/local_slurm.sh            # stop it: the node daemons and the controller (not munged)
# Installs Debian's slurm-wlm and munge if missing, writes the munge key and /etc/slurm/slurm.conf, starts
# munged, slurmctld and one slurmd per node, and waits until every node is idle. Idempotent: when the
# cluster answers with this configuration it only starts a node daemon that is not running; a changed
# configuration (another NODES) restarts the daemons, and is refused while jobs are on the cluster.
#
# Node i is `node<i>`: its slurmd runs in its own UTS namespace (`unshare --uts`: hostname node<i>, which
# its jobs see too), listens on port 6817+i, keeps its spool in /var/lib/slurm/slurmd/node<i>, and is
# reached at the loopback address 127.0.0.<10+i> (/etc/hosts). Only loopback addresses are used. The nodes
# share the file system, as cluster nodes share a parallel file system, and the network namespace, so
# two jobs on different nodes cannot listen on the same port (the job scripts take a port per job).
# Each node declares all of this machine's CPUs and most of its memory: the nodes overcommit them, so
# that a 2-node job of 1-2 processes per node can start on a 2-core machine. Logs: /var/log/slurm/.
set -euo pipefail

fail() { echo "local_slurm: $*" >&2; exit 1; }

NODES=${NODES:-1}
[[ $NODES =~ ^[1-9]$ ]] || fail "NODES=$NODES: give a number of nodes from 1 to 9"
[[ $EUID -eq 0 ]] || fail "must run as root (it installs packages and starts the daemons); try: sudo NODES=$NODES bash $0"

# The daemons of a pid file: stopped, waiting up to 10 s for each to end.
stop_daemon() {
    local pid_file=$1 pid
    if [[ -s $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        pid="$(cat "$pid_file")"; kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$pid_file"
}
if [[ ${STOP:-0} == 1 ]]; then
    jobs="$(timeout 20 squeue --noheader --format=%i 2>/dev/null | wc -l || true)"
    [[ ${jobs:-0} -eq 0 ]] || fail "$jobs job(s) are on the cluster (squeue): wait for them, or scancel them, then stop it"
    stopped=0
    for pid_file in /run/slurmd*.pid /run/slurmctld.pid; do
        [[ -s $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null && stopped=$((stopped + 1))
        stop_daemon "$pid_file"
    done
    echo "local_slurm: stopped $stopped Slurm daemon(s); NODES=N bash $0 starts the cluster again"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null \
        || fail "apt-get install slurm-wlm munge failed"
fi
# Each node's own hostname needs a UTS namespace; one node can do without (its jobs see this host's name).
own_hostname=(unshare --uts)
if ! unshare --uts true 2>/dev/null; then
    (( NODES == 1 )) || fail "unshare --uts is not permitted here (it needs CAP_SYS_ADMIN), so the nodes cannot have their own hostnames; NODES=1 works without"
    own_hostname=()
fi

host="$(hostname -s)"
cpus="$(nproc)"
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # leave the OS a tenth
nodes=() ; for i in $(seq "$NODES"); do nodes+=("node$i"); done
address() { echo "127.0.0.$((10 + ${1#node}))"; }
pidfile() { echo "/run/slurmd-$1.pid"; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
running() {  # the controller and every node's slurmd
    alive /run/slurmctld.pid || return 1
    for node in "${nodes[@]}"; do alive "$(pidfile "$node")" || return 1; done
}

# The nodes' names resolve to their loopback addresses (our lines carry a marker; others are kept).
# Rewritten in place: in a container /etc/hosts is often a mount that cannot be replaced.
hosts="$(grep -v '# local_slurm$' /etc/hosts || true)"
for node in "${nodes[@]}"; do hosts+=$'\n'"$(address "$node") $node  # local_slurm"; done
[[ "$(cat /etc/hosts)" == "$hosts" ]] || echo "$hosts" > /etc/hosts

# Slurm. Daemons run as root so that the tests (root) may requeue and signal jobs. No cgroups
# (containers rarely allow them): processes are tracked by parent pid. Accounting is off, so job
# states come from scontrol/squeue. A short KillWait, and a short cred_expire (also how long a
# requeued job waits before it may start again: 120 s by default), keep the tests quick.
# %n in a path is the node's name: each slurmd has its own spool, pid file and log.
node_lines=""
for node in "${nodes[@]}"; do
    node_lines+="NodeName=$node NodeHostname=$node NodeAddr=$(address "$node") Port=$((6817 + ${node#node})) "
    node_lines+="CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"$'\n'
done
conf="# Written by tools/local_slurm.sh: a $NODES-node cluster on one machine, for tests.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=6817
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
SlurmdSpoolDir=/var/lib/slurm/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
${node_lines}PartitionName=local Nodes=$(IFS=,; echo "${nodes[*]}") Default=YES MaxTime=INFINITE State=UP"

# How many nodes sinfo shows up (idle, mixed, allocated, completing; "idle*" is a node not answering).
nodes_up() { sinfo --noheader --Node --format=%T 2>/dev/null | grep -cxE 'idle|mixed|allocated|completing' || true; }

clear_state=()
if [[ -f /etc/slurm/slurm.conf && "$(cat /etc/slurm/slurm.conf)" == "$conf" ]]; then
    if running && [[ $(nodes_up) -eq $NODES ]]; then
        echo "local_slurm: already up: $NODES node(s) ${nodes[*]} (sinfo shows them; STOP=1 bash $0 stops them)"
        exit 0
    fi
else
    # Another configuration: stop its daemons (jobs on them would be lost, so not while there are any).
    jobs="$(timeout 20 squeue --noheader --format=%i 2>/dev/null | wc -l || true)"
    [[ ${jobs:-0} -eq 0 ]] || fail "$jobs job(s) are on the running cluster (squeue): wait for them, or scancel them, then run this again"
    for pid_file in /run/slurmctld.pid /run/slurmd*.pid; do stop_daemon "$pid_file"; done
    mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/log/slurm
    echo "$conf" > /etc/slurm/slurm.conf
    clear_state=(-c)  # the saved jobs and nodes were the old configuration's
fi
for node in "${nodes[@]}"; do mkdir -p "/var/lib/slurm/slurmd/$node"; done

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

alive /run/slurmctld.pid || slurmctld "${clear_state[@]}" || fail "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
for node in "${nodes[@]}"; do
    if ! alive "$(pidfile "$node")"; then
        if (( ${#own_hostname[@]} )); then
            "${own_hostname[@]}" sh -c "hostname $node && exec slurmd -N $node"
        else
            slurmd -N "$node"
        fi || fail "slurmd of $node did not start (see /var/log/slurm/slurmd-$node.log)"
    fi
done

for _ in $(seq 60); do
    if [[ $(nodes_up) -eq $NODES ]]; then
        echo "local_slurm: $NODES node(s) up: ${nodes[*]} ($cpus CPUs, $mem_mb MB each, shared)"
        exit 0
    fi
    for node in $(sinfo --noheader --Node --format="%N %T" 2>/dev/null | awk '$2 ~ /^(down|drain)/ {print $1}'); do
        scontrol update nodename="$node" state=resume 2>/dev/null || true
    done
    sleep 1
done
fail "not every node became idle within 60 s (sinfo: '$(sinfo --noheader --Node --format="%N %T" 2>/dev/null | xargs)'; see /var/log/slurm/)"
