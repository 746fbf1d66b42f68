#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for tests and for trying the SLURM launcher: a
# private munged, one slurmctld and two slurmd daemons (node1, node2), so multi-node jobs span
# two nodes. Everything lives in one folder of its own: config, munge key and socket, state,
# spool, pid files and logs. Nothing outside it is written, and only the daemons whose pids
# its pid files hold are ever stopped.
#
#   eval "$(sudo cluster/dev_slurm.sh up [DIR])"   # starts it; prints `export SLURM_CONF=…`
#   sudo cluster/dev_slurm.sh down DIR             # cancels its jobs, stops its daemons
#
# DIR defaults to a new folder under $TMPDIR (or /tmp); `up` prints the folder on stderr. Every
# SLURM command (sbatch, squeue, scontrol, dreamsweep) reaches this cluster through SLURM_CONF.
# It refuses to start where a SLURM it did not start is configured or running: a system-wide
# slurm.conf, a SLURM_CONF pointing elsewhere, or slurmctld/slurmd/slurmstepd processes that
# belong to no dev cluster. Installs Debian's slurm-wlm + munge if missing. Needs root (the
# daemons run as root, SlurmUser=root). Seen working with Debian 12's Slurm 22.05.
# Without accounting (no slurmdbd) `sacct` does not work: dreamsweep reads job states from
# `squeue` (queued/running) and trial outcomes from MLflow, never from sacct.
set -euo pipefail

CPUS_PER_NODE=${DREAMSWEEP_SLURM_CPUS:-1}
MARKER=.dreamsweep-dev-slurm
# Unix socket paths (munge's, and the slurmd step sockets under the spool) must fit in 108 bytes.
MAX_DIR_LENGTH=60

usage() {
    echo "usage: $0 up [DIR] | down DIR" >&2
    exit 2
}

die() {
    echo "dev_slurm.sh: $*" >&2
    exit 1
}

# The value of one variable in a process's environment (empty when unset or unreadable).
process_env() {
    local pid=$1 name=$2
    tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | sed -n "s|^$name=||p" | head -n 1
}

# A live process (not a zombie) whose command name is `comm`.
is_process() {
    local pid=$1 comm=$2 stat name
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    read -r stat <"/proc/$pid/stat" 2>/dev/null || return 1
    read -r name <"/proc/$pid/comm" 2>/dev/null || return 1
    # The state follows the parenthesised command name; Z is a zombie, already gone.
    [[ ${stat##*) } != Z* && $name == "$comm" ]]
}

# Whether a slurm.conf path belongs to a dev cluster (this one or another folder of this script).
is_dev_conf() {
    [[ -n $1 && -f "$(dirname -- "$1")/$MARKER" ]]
}

# Refuse to run next to a SLURM this script did not start: its jobs, daemons and config are
# somebody's real cluster, which a test suite run as root must not touch.
check_no_foreign_slurm() {
    local conf=$1 etc=/etc path pid comm owner
    # The places Debian's SLURM packages read their system-wide config from.
    for path in "$etc/slurm/slurm.conf" "$etc/slurm-llnl/slurm.conf"; do
        if [[ -e $path ]]; then
            die "refusing to start: $path exists, so this host is configured for a SLURM" \
                "this script did not start. Run the dev cluster on a machine without one (an" \
                "earlier version of this script wrote ClusterName=local there: if that is what" \
                "the file holds and no SLURM runs here, remove it)."
        fi
    done
    if [[ -n ${SLURM_CONF:-} && $SLURM_CONF != "$conf" ]] && ! is_dev_conf "$SLURM_CONF"; then
        die "refusing to start: SLURM_CONF points at $SLURM_CONF, a SLURM this script did not" \
            "start. Unset SLURM_CONF to start a dev cluster."
    fi
    for path in /proc/[0-9]*; do
        pid=${path#/proc/}
        read -r comm <"$path/comm" 2>/dev/null || continue
        case $comm in
            slurmctld | slurmd | slurmstepd | slurmdbd | slurmrestd) ;;
            *) continue ;;
        esac
        is_process "$pid" "$comm" || continue
        owner=$(process_env "$pid" SLURM_CONF)
        if ! is_dev_conf "$owner"; then
            die "refusing to start: $comm (pid $pid) is running and was not started by this" \
                "script${owner:+ (SLURM_CONF=$owner)}. Run the dev cluster on a machine without" \
                "another SLURM."
        fi
    done
}

# Ports that something on this host listens on (TCP, IPv4 and IPv6).
listening_ports() {
    local _ local_address _rest state
    tail -q -n +2 /proc/net/tcp /proc/net/tcp6 2>/dev/null |
        while read -r _ local_address _ state _rest; do
            if [[ $state == 0A ]]; then echo $((16#${local_address##*:})); fi
        done
}

# Three free consecutive ports (slurmctld, node1, node2), below Linux's ephemeral range so an
# outgoing connection does not take one before the daemons bind it; several dev clusters (in
# other folders) can run side by side.
free_port_base() {
    local taken base
    taken=" $(listening_ports | tr '\n' ' ') "
    for _ in $(seq 200); do
        base=$((10000 + RANDOM % 22000))
        if [[ $taken != *" $base "* && $taken != *" $((base + 1)) "* &&
            $taken != *" $((base + 2)) "* ]]; then
            echo "$base"
            return 0
        fi
    done
    die "found no three free consecutive TCP ports"
}

# Stop the process whose pid `pidfile` holds, if it is still the `comm` it names; SIGKILL after
# 10 s. A pid reused by some other process is left alone.
stop_pidfile() {
    local pidfile=$1 comm=$2 pid
    [[ -f $pidfile ]] || return 0
    pid=$(tr -d '[:space:]' <"$pidfile")
    if is_process "$pid" "$comm"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            is_process "$pid" "$comm" || break
            sleep 0.1
        done
        if is_process "$pid" "$comm"; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pidfile"
}

# The process ids of this cluster's daemons of one kind (`comm`), recognised by this cluster's
# own SLURM_CONF in their environment (a folder no other cluster uses): the step daemons its
# slurmd started, and a slurmctld or slurmd whose pid file is gone (a start that failed before
# writing it, or a test run killed before its `down`).
own_daemons() {
    local conf=$1 comm=$2 path pid
    for path in /proc/[0-9]*; do
        pid=${path#/proc/}
        is_process "$pid" "$comm" || continue
        if [[ $(process_env "$pid" SLURM_CONF) == "$conf" ]]; then echo "$pid"; fi
    done
}

# This cluster's munged, recognised by its private socket on its command line.
own_munged() {
    local socket=$1 path pid
    for path in /proc/[0-9]*; do
        pid=${path#/proc/}
        is_process "$pid" munged || continue
        if tr '\0' '\n' <"$path/cmdline" 2>/dev/null | grep -qxF -- "--socket=$socket"; then
            echo "$pid"
        fi
    done
}

down() {
    local dir=$1 conf=$1/slurm.conf ids pids
    [[ -f $dir/$MARKER ]] || die "$dir is not a dev cluster folder (no $MARKER): nothing to stop"
    export SLURM_CONF=$conf
    # This cluster is private: every job it holds was submitted to it here. Cancel them while
    # the daemons still run, so the step daemons end their tasks.
    local controller=$dir/run/slurmctld.pid
    if [[ -f $controller ]] && is_process "$(cat "$controller")" slurmctld; then
        ids=$(squeue --noheader --format=%i 2>/dev/null || true)
        if [[ -n $ids ]]; then
            # One argument per job id, unglobbed (an array job's id reads `123_[1-3]`).
            mapfile -t job_ids <<<"$ids"
            scancel "${job_ids[@]}" 2>/dev/null || true
            for _ in $(seq 150); do
                [[ -z $(squeue --noheader --format=%i 2>/dev/null || echo busy) ]] && break
                sleep 0.1
            done
        fi
    fi
    for node in node1 node2; do stop_pidfile "$dir/run/slurmd-$node.pid" slurmd; done
    stop_pidfile "$dir/run/slurmctld.pid" slurmctld
    # Step daemons outlive a stopped slurmd; end any of this cluster's that cancelling missed,
    # and any daemon of this cluster that its pid files did not name.
    pids=$(for comm in slurmstepd slurmd slurmctld; do own_daemons "$conf" "$comm"; done)
    if [[ -n $pids ]]; then
        # shellcheck disable=SC2086  # one argument per pid
        kill -KILL $pids 2>/dev/null || true
    fi
    stop_pidfile "$dir/munge/munged.pid" munged
    pids=$(own_munged "$dir/munge/munge.socket")
    if [[ -n $pids ]]; then
        # shellcheck disable=SC2086  # one argument per pid
        kill -KILL $pids 2>/dev/null || true
    fi
    rm -rf "$dir/state" "$dir/spool" "$dir/run" "$dir/munge"
}

up() {
    local dir=$1 conf=$1/slurm.conf host base
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        apt-get install -y -q slurm-wlm munge >/dev/null || {
            apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null
        }
    fi
    if [[ -e $dir && ! -f $dir/$MARKER && -n $(ls -A "$dir") ]]; then
        die "refusing to use $dir: it is not empty and not a dev cluster folder"
    fi
    check_no_foreign_slurm "$conf"
    mkdir -p "$dir"
    # Open to every user (as a system-wide SLURM config and munge's socket folder are), so that
    # users other than root can submit too; the munge key and the controller's state stay root's.
    chmod 755 "$dir"
    touch "$dir/$MARKER"
    down "$dir"  # an earlier cluster of this folder
    # From here on, a failed start stops what it started.
    trap 'failed_start "$DIR"' EXIT  # DIR: global, still set when the script exits
    host=$(hostname)
    base=$(free_port_base)
    mkdir -p "$dir/state" "$dir/spool" "$dir/run" "$dir/log" "$dir/munge"
    chmod 700 "$dir/state"
    chmod 755 "$dir/munge"
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    # --force: munged wants every folder above its socket open to every user, and a private
    # temporary folder (pytest's, say) is root's alone; root's daemons and jobs reach it anyway.
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    for _ in $(seq 50); do
        munge -n --socket="$dir/munge/munge.socket" </dev/null 2>/dev/null |
            unmunge --socket="$dir/munge/munge.socket" >/dev/null 2>&1 && break
        sleep 0.1
    done
    cat >"$conf" <<CONF
# A dreamsweep dev cluster (cluster/dev_slurm.sh): everything it uses lies under $dir.
ClusterName=dev
SlurmctldHost=$host
SlurmctldPort=$base
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# The private munged's socket. Requeued jobs wait one credential lifetime before they start
# again (cred_expire, default 120 s).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
# Start a released job within seconds (defaults: every 30 s to 60 s).
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
PlugStackConfig=$dir/plugstack.conf
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.log
MpiDefault=none
MinJobAge=30
KillWait=5
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$((base + 1))-$((base + 2))] CPUs=$CPUS_PER_NODE RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
    : >"$dir/plugstack.conf"  # no SPANK plugins (not the system's plugstack.conf)
    export SLURM_CONF=$conf
    slurmctld
    slurmd -N node1
    slurmd -N node2
    for _ in $(seq 100); do
        if [[ $(sinfo -h -o '%t' 2>/dev/null | sort -u) == "idle" ]]; then
            trap - EXIT
            sinfo >&2
            echo "dev cluster in $dir; stop it with: $0 down $dir" >&2
            echo "export SLURM_CONF=$conf"
            return 0
        fi
        scontrol update nodename=node[1-2] state=resume >/dev/null 2>&1 || true
        sleep 0.2
    done
    echo "SLURM did not become idle" >&2
    sinfo >&2 || true
    return 1
}

failed_start() {
    local status=$?
    echo "dev_slurm.sh: the cluster did not start; logs in $1/log" >&2
    down "$1" || true
    exit "$status"
}

ACTION=${1:-}
case $ACTION in
    up)
        [[ $# -le 2 ]] || usage
        DIR=${2:-$(mktemp -d "${TMPDIR:-/tmp}/dreamsweep-slurm.XXXXXX")}
        ;;
    down)
        [[ $# -eq 2 ]] || usage
        DIR=$2
        ;;
    *) usage ;;
esac
DIR=$(realpath -m -- "$DIR")
if [[ ${#DIR} -gt $MAX_DIR_LENGTH ]]; then
    die "$DIR is too long (over $MAX_DIR_LENGTH characters) for the sockets placed under it"
fi
case $ACTION in
    up) up "$DIR" ;;
    down) down "$DIR" ;;
esac
