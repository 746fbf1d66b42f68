#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for tests and for trying the SLURM launcher:
# munge, one slurmctld and two slurmd daemons (node1, node2), so multi-node jobs span two nodes.
#
#   sudo cluster/dev_slurm.sh up      # installs Debian's slurm-wlm + munge if missing, starts
#   sudo cluster/dev_slurm.sh down    # stops the daemons and removes their state
#
# Needs root (the daemons run as root, SlurmUser=root). Seen working with Debian 12's Slurm 22.05.
# Without accounting (no slurmdbd) `sacct` does not work: dreamsweep reads job states from
# `squeue` (queued/running) and trial outcomes from MLflow, never from sacct.
set -euo pipefail

ACTION=${1:-up}
CONF_DIR=/etc/slurm
CPUS_PER_NODE=${DREAMSWEEP_SLURM_CPUS:-1}

down() {
    for pidfile in /run/slurmd-node1.pid /run/slurmd-node2.pid /run/slurmctld.pid; do
        if [[ -f $pidfile ]]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
    done
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 50); do
        pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break
        sleep 0.1
    done
    rm -rf /var/spool/slurmctld /var/spool/slurmd /run/slurmd-node*.pid /run/slurmctld.pid
    if [[ ${1:-} == all && -f /run/dreamsweep-started-munged ]]; then
        pkill -x munged 2>/dev/null || true  # only a munged this script started
        rm -f /run/dreamsweep-started-munged
    fi
}

up() {
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        apt-get install -y -q slurm-wlm munge >/dev/null || {
            apt-get update -q && apt-get install -y -q slurm-wlm munge >/dev/null
        }
    fi
    down
    local host
    host=$(hostname)
    mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/munge /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    # Ask munged itself: a stopped munged can linger as a zombie that pgrep still lists.
    if ! munge -n </dev/null >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
        touch /run/dreamsweep-started-munged
    fi
    cat >"$CONF_DIR/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# Requeued jobs wait one credential lifetime before they start again (default 120 s).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
# Start a released job within seconds (defaults: every 30 s to 60 s).
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
MpiDefault=none
MinJobAge=30
KillWait=5
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$CPUS_PER_NODE RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
    slurmctld
    slurmd -N node1
    slurmd -N node2
    for _ in $(seq 100); do
        if [[ $(sinfo -h -o '%t' 2>/dev/null | sort -u) == "idle" ]]; then
            sinfo
            return 0
        fi
        scontrol update nodename=node[1-2] state=resume >/dev/null 2>&1 || true
        sleep 0.2
    done
    echo "SLURM did not become idle; see /var/log/slurm/" >&2
    sinfo >&2 || true
    return 1
}

case $ACTION in
    up) up ;;
    down) down all ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
