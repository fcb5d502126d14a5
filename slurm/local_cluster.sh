#!/usr/bin/env bash
# A throw-away Slurm cluster on localhost: 4 logical nodes n1..n4, each with 2 fake GPUs.
#
# It exists so the launcher's hetjob, requeue and signal paths can be exercised for real (tests, demos)
# on a machine with no cluster and no GPU. Debian's Slurm 22.05 is built with MULTIPLE_SLURMD, so one
# host can run one slurmd per logical node. Everything (config, state, logs, pid files, the munge key
# and socket) lives under one state directory, so the host's /etc/slurm and any system munged are
# never used or disturbed.
#
#   bash slurm/local_cluster.sh up       install if needed, start (or verify) the cluster; prints the export line
#   bash slurm/local_cluster.sh down     cancel jobs and stop the daemons this script started
#   bash slurm/local_cluster.sh restart  down, then up
#   bash slurm/local_cluster.sh status   sinfo + squeue; exit 0 if up, 1 if not
#   bash slurm/local_cluster.sh env      print the export line
#
#   eval "$(bash slurm/local_cluster.sh up)"   # then sbatch / srun / squeue talk to this cluster
#
# Environment: RLHF_SLURM_DIR (state dir, default /tmp/rlhf-slurm), RLHF_SLURM_PORT (slurmctld port,
# default 16817), RLHF_SLURM_TIMEOUT (seconds to wait for idle nodes, default 60).
# Must run as root: slurmd launches jobs as the submitting user and the daemons run as root here.
set -euo pipefail

STATE_DIR=${RLHF_SLURM_DIR:-/tmp/rlhf-slurm}
# Not 6817: a packaged slurmctld (or a real cluster's config) may own the default port.
CTLD_PORT=${RLHF_SLURM_PORT:-16817}
TIMEOUT=${RLHF_SLURM_TIMEOUT:-60}
FIRST_NODE_PORT=17001 # slurmd of n1; n2.. use the next ports

NODES=(n1 n2 n3 n4)
GPUS_PER_NODE=2
ETC=$STATE_DIR/etc
CONF=$ETC/slurm.conf
RUN=$STATE_DIR/run
LOG=$STATE_DIR/log
MUNGE_DIR=$STATE_DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
MUNGE_PID=$MUNGE_DIR/munged.pid
CTLD_PID=$RUN/slurmctld.pid
SAVE=$STATE_DIR/state

# Every Slurm client below must read our config, never /etc/slurm/slurm.conf (which may not exist).
export SLURM_CONF=$CONF

say() { echo "local_cluster: $*" >&2; }
die() { say "$*"; exit 1; }

# ---------------------------------------------------------------------------------------------- processes

# A pid counts as running only if it is not a zombie and is the daemon we expect: PID 1 on some
# container/VM kinds never reaps orphans, so `kill -0` on a dead daemon's zombie still succeeds, and
# stale pid files can point at a recycled pid.
pid_alive() { # pid expected-comm
    local pid=$1 comm=$2 stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    # Field 3 of /proc/PID/stat, after the parenthesised comm, is the state letter.
    [[ ${stat##*) } != Z* ]]
}

pidfile_alive() { # pidfile expected-comm
    [[ -s $1 ]] && pid_alive "$(cat "$1")" "$2"
}

slurmd_pidfile() { echo "$RUN/slurmd-$1.pid"; }

# Daemons of *this* cluster, found by their command line naming our config or munge socket: catches
# ones whose pid file was lost (crash mid-start, state dir partly wiped) without touching anything else.
our_daemon_pids() {
    local p cmd comm
    for p in /proc/[0-9]*; do
        comm=$(cat "$p/comm" 2>/dev/null) || continue
        case $comm in munged | slurmctld | slurmd) ;; *) continue ;; esac
        cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) || continue
        case $cmd in *"$CONF"* | *"$MUNGE_SOCKET"*) pid_alive "${p#/proc/}" "$comm" && echo "${p#/proc/}" ;; esac
    done
    return 0
}

all_daemons_alive() {
    pidfile_alive "$MUNGE_PID" munged || return 1
    pidfile_alive "$CTLD_PID" slurmctld || return 1
    local n
    for n in "${NODES[@]}"; do pidfile_alive "$(slurmd_pidfile "$n")" slurmd || return 1; done
}

# TERM, wait up to $2 seconds, then KILL: slurmctld saves its state on TERM, which takes a moment.
stop_pids() { # "pids" seconds
    local pids=$1 deadline=$((SECONDS + $2)) p left
    [[ -n $pids ]] || return 0
    for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
    while ((SECONDS < deadline)); do
        left=""
        for p in $pids; do [[ -d /proc/$p ]] && [[ $(awk '{print $3}' "/proc/$p/stat" 2>/dev/null) != Z ]] && left+=" $p"; done
        [[ -z $left ]] && return 0
        sleep 0.2
    done
    for p in $left; do kill -KILL "$p" 2>/dev/null || true; done
}

# ------------------------------------------------------------------------------------------------ install

install_packages() {
    local missing=0 c
    for c in slurmctld slurmd sinfo sbatch scontrol munged munge mungekey; do
        command -v "$c" >/dev/null 2>&1 || missing=1
    done
    ((missing)) || return 0
    [[ $(id -u) == 0 ]] || die "Slurm is not installed and installing it needs root"
    command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed and there is no apt-get to install it"
    say "installing slurmctld slurmd slurm-client munge (apt)"
    local start=$SECONDS
    local pkgs=(slurmctld slurmd slurm-client munge)
    # Try without `apt-get update` first: the package lists are often fresh enough and updating is slow.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >"$STATE_DIR/apt.log" 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update >>"$STATE_DIR/apt.log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$STATE_DIR/apt.log" 2>&1 ||
            { tail -n 20 "$STATE_DIR/apt.log" >&2; die "apt-get install failed (log: $STATE_DIR/apt.log)"; }
    fi
    say "installed in $((SECONDS - start)) s"
}

# ------------------------------------------------------------------------------------------------- config

# Writes slurm.conf and gres.conf; sets CONFIG_CHANGED=1 if either differs from what is on disk, so a
# running cluster with an outdated config gets restarted rather than silently kept.
CONFIG_CHANGED=0
write_file_if_changed() { # path (content on stdin)
    local tmp
    tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"
    if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$1"
        chmod 644 "$1"
        CONFIG_CHANGED=1
    fi
}

write_config() {
    mkdir -p "$ETC" "$RUN" "$LOG" "$SAVE" "$STATE_DIR/spool" "$STATE_DIR/dev"
    local last=${#NODES[@]}
    # The requeue hold (cred_expire below) is also what makes a relaunch's credential newer than the
    # revocation the requeue sent to the nodes: slurmd refuses one from the same second and the job ends
    # FAILED. Whoever shortens the hold (`scontrol update StartTime=`) must use now+1, not now.
    write_file_if_changed "$CONF" <<EOF
# Generated by slurm/local_cluster.sh: edit the script, not this file.
ClusterName=rlhf-local
# "localhost" is accepted as the controller's name whatever this host calls itself.
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root

# Our own munged (own key and socket), so a system munged is neither needed nor disturbed.
# cred_expire=10: a requeued job is held cred_expire+1 s before it may start again (default 120).
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10,socket=$MUNGE_SOCKET

StateSaveLocation=$SAVE
# %n: with several slurmd's on one host each node needs its own spool, log and pid file.
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups: 22.05 fails on CgroupPlugin=disabled, and a cgroup.conf must therefore not exist.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true

SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
# Heterogeneous jobs are only ever started by the backfill scheduler: run it every second.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2

JobRequeue=1
# DOWN nodes (e.g. after a restart) return to service as soon as their slurmd registers.
ReturnToService=2
# Finished jobs stay visible to scontrol for 5 min: there is no sacct here.
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmdTimeout=60

# Oversubscribes the real cores on purpose: ranks in tests are tiny. config_overrides makes each slurmd
# report these numbers instead of the host's, which would otherwise mark the nodes INVAL ("Low CPUs").
SlurmdParameters=config_overrides
NodeName=n[1-$last] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$FIRST_NODE_PORT-$((FIRST_NODE_PORT + last - 1)) CPUs=4 RealMemory=4000 Gres=gpu:$GPUS_PER_NODE State=UNKNOWN
PartitionName=debug Nodes=n[1-$last] Default=YES MaxTime=INFINITE State=UP
EOF

    # GPU GRES need device files: count-only GRES drains the node and regular files are refused, so use
    # character devices (clones of /dev/null). Jobs then get CUDA_VISIBLE_DEVICES like on a real node.
    local i dev
    for ((i = 0; i < GPUS_PER_NODE; i++)); do
        dev=$STATE_DIR/dev/gpu$i
        [[ -c $dev ]] || { rm -f "$dev"; mknod "$dev" c 1 3; }
    done
    write_file_if_changed "$ETC/gres.conf" <<EOF
# Generated by slurm/local_cluster.sh.
NodeName=n[1-$last] Name=gpu File=$STATE_DIR/dev/gpu[0-$((GPUS_PER_NODE - 1))]
EOF
    # 22.05 trap: a cgroup.conf next to slurm.conf would be read and break startup.
    rm -f "$ETC/cgroup.conf"
}

# Code that uses node names as MASTER_ADDR needs them to resolve.
ensure_hosts() {
    local n missing=()
    for n in "${NODES[@]}"; do getent hosts "$n" >/dev/null 2>&1 || missing+=("$n"); done
    ((${#missing[@]})) || return 0
    # Append, never rewrite: /etc/hosts is often a bind mount that cannot be replaced.
    [[ -z $(tail -c 1 /etc/hosts 2>/dev/null) ]] || echo >>/etc/hosts
    echo "127.0.0.1 ${missing[*]}  # rlhf-launch local Slurm cluster" >>/etc/hosts ||
        say "warning: could not add ${missing[*]} to /etc/hosts"
}

# ------------------------------------------------------------------------------------------------ daemons

start_munge() {
    # munged insists: key readable only by its user, socket dir searchable by everyone.
    mkdir -p "$MUNGE_DIR"
    chmod a+x "$STATE_DIR"
    chmod 711 "$MUNGE_DIR"
    chown root:root "$MUNGE_DIR"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_DIR/munge.key"
        elif command -v create-munge-key >/dev/null 2>&1; then
            create-munge-key -f "$MUNGE_DIR/munge.key" >/dev/null 2>&1 ||
                dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1 count=1024 status=none
        else
            dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1 count=1024 status=none
        fi
    fi
    chown root:root "$MUNGE_DIR/munge.key"
    chmod 600 "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$MUNGE_PID"
    # 9>&-: a daemon must not inherit our lock fd, or it holds the lock for its whole life.
    munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" --pid-file="$MUNGE_PID" \
        --log-file="$LOG/munged.log" --seed-file="$MUNGE_DIR/munged.seed" 9>&- ||
        { tail -n 5 "$LOG/munged.log" >&2 || true; die "munged did not start"; }
    local deadline=$((SECONDS + 10))
    until munge -n --socket="$MUNGE_SOCKET" 2>/dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { tail -n 5 "$LOG/munged.log" >&2 || true; die "munged does not answer on $MUNGE_SOCKET"; }
        sleep 0.2
    done
}

start_slurmctld() {
    local args=(-f "$CONF")
    # A fresh state dir has nothing to recover: -c says so instead of logging recovery errors.
    # (Job ids restart at 1 after -c: keep per-job output paths unique.)
    [[ -e $SAVE/node_state ]] || args+=(-c)
    slurmctld "${args[@]}" 9>&- || { log_tails; die "slurmctld did not start"; }
    local deadline=$((SECONDS + 20))
    until scontrol ping 2>/dev/null | grep -q 'is UP'; do
        ((SECONDS < deadline)) || { log_tails; die "slurmctld does not answer"; }
        sleep 0.3
    done
}

start_slurmds() {
    local n
    for n in "${NODES[@]}"; do
        mkdir -p "$STATE_DIR/spool/$n"
        slurmd -N "$n" -f "$CONF" 9>&- || { log_tails; die "slurmd -N $n did not start"; }
    done
}

# Prints "node state" lines, one per node (sinfo -N lists a node once per partition; we have one).
node_states() { sinfo -h -N -o '%N %t' 2>/dev/null; }

# All nodes usable: idle, or busy with or planned for jobs (an `up` while another session's jobs run
# must not restart anything). A trailing "*" (not responding) or a down/drain/inval state is not usable;
# other trailing flag characters (e.g. "mix-") are.
nodes_usable() {
    local states
    states=$(node_states) || return 1
    [[ $(awk '{ s = $2; sub(/[-~#!%$@^]+$/, "", s) } s ~ /^(idle|mix|alloc|comp|plnd|resv)$/' <<<"$states" | wc -l) -eq ${#NODES[@]} ]]
}

wait_idle() {
    local deadline=$((SECONDS + TIMEOUT)) states resumed=0
    while ((SECONDS < deadline)); do
        states=$(node_states || true)
        [[ $(awk '$2 == "idle"' <<<"$states" | wc -l) -eq ${#NODES[@]} ]] && return 0
        # INVAL means node config and slurmd disagree: it never heals by waiting.
        grep -q ' inval' <<<"$states" && break
        # Nodes drained by an earlier run (e.g. a kill that timed out) stay drained across restarts.
        if ((!resumed)) && grep -Eq ' (drain|drng|drained)' <<<"$states"; then
            scontrol update nodename="n[1-${#NODES[@]}]" state=resume 2>/dev/null || true
            resumed=1
        fi
        sleep 0.5
    done
    say "nodes not idle after $((SECONDS - deadline + TIMEOUT))s:"
    sinfo -N -o '%N %t %G %E' >&2 || true
    log_tails
    return 1
}

log_tails() {
    local f
    for f in "$LOG/munged.log" "$LOG/slurmctld.log" "$LOG"/slurmd-*.log; do
        [[ -f $f ]] || continue
        echo "----- tail $f" >&2
        tail -n 15 "$f" >&2
    done
}

# True if something listens on TCP port $1 (read from /proc: ss/netstat may not be installed).
port_in_use() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v h="$hex" '$4 == "0A" && $2 ~ (":" h "$") { found = 1 } END { exit !found }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# Two local clusters (another RLHF_SLURM_DIR) cannot share the node ports; say so instead of failing obscurely.
check_ports_free() {
    local port
    for port in "$CTLD_PORT" $(seq "$FIRST_NODE_PORT" $((FIRST_NODE_PORT + ${#NODES[@]} - 1))); do
        port_in_use "$port" && die "TCP port $port is in use (another local cluster with a different RLHF_SLURM_DIR?)"
    done
    return 0
}

print_env() { printf 'export SLURM_CONF=%q\n' "$CONF"; }

# ----------------------------------------------------------------------------------------------- commands

stop_cluster() {
    # Jobs first, while slurmctld can still cancel them: their slurmstepd's would outlive the slurmd's.
    if pidfile_alive "$CTLD_PID" slurmctld && scontrol ping 2>/dev/null | grep -q 'is UP'; then
        if [[ -n $(squeue -h -o %A 2>/dev/null) ]]; then
            scancel --full $(squeue -h -o %A 2>/dev/null) 2>/dev/null || true
            local deadline=$((SECONDS + 15))
            while [[ -n $(squeue -h -o %A 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.5; done
        fi
    fi
    local n pids=""
    for n in "${NODES[@]}"; do [[ -s $(slurmd_pidfile "$n") ]] && pids+=" $(cat "$(slurmd_pidfile "$n")")"; done
    # Only pids that really are our slurmd's (stale pid files may point elsewhere), plus strays.
    local p keep=""
    for p in $pids $(our_daemon_pids); do pid_alive "$p" slurmd && keep+=" $p"; done
    stop_pids "$keep" 10
    keep=""
    for p in $( [[ -s $CTLD_PID ]] && cat "$CTLD_PID") $(our_daemon_pids); do pid_alive "$p" slurmctld && keep+=" $p"; done
    stop_pids "$keep" 15
    keep=""
    for p in $( [[ -s $MUNGE_PID ]] && cat "$MUNGE_PID") $(our_daemon_pids); do pid_alive "$p" munged && keep+=" $p"; done
    stop_pids "$keep" 5
    rm -f "$CTLD_PID" "$RUN"/slurmd-*.pid "$MUNGE_PID" "$MUNGE_SOCKET"
}

cmd_up() {
    local t0=$SECONDS
    [[ $(id -u) == 0 ]] || die "run as root (the local cluster's daemons run as root)"
    mkdir -p "$STATE_DIR"
    # Serialise concurrent `up`/`down` (e.g. parallel test sessions) on one state dir.
    exec 9>"$STATE_DIR/.lock"
    flock 9
    install_packages
    write_config
    ensure_hosts

    if all_daemons_alive && ((!CONFIG_CHANGED)); then
        # Already up: verify only. A few tries, since nodes may be just registering.
        local deadline=$((SECONDS + 5))
        until nodes_usable; do
            ((SECONDS < deadline)) || break
            sleep 0.5
        done
        if nodes_usable; then
            say "already up"
            print_env
            return 0
        fi
        say "daemons run but nodes are not usable: restarting"
    elif [[ -n $(our_daemon_pids) ]]; then
        ((CONFIG_CHANGED)) && say "config changed: restarting" || say "cluster half up: restarting"
    fi
    stop_cluster
    check_ports_free

    start_munge
    start_slurmctld
    start_slurmds
    wait_idle || die "cluster did not come up (state dir $STATE_DIR)"
    say "up in $((SECONDS - t0)) s: ${#NODES[@]} nodes x $GPUS_PER_NODE GPUs, partition debug"
    print_env
}

cmd_down() {
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/.lock"
    flock 9
    if [[ -z $(our_daemon_pids) ]] && ! pidfile_alive "$MUNGE_PID" munged && ! pidfile_alive "$CTLD_PID" slurmctld; then
        say "already down"
        return 0
    fi
    stop_cluster
    say "down (packages and $STATE_DIR kept)"
}

cmd_status() {
    if all_daemons_alive && command -v sinfo >/dev/null 2>&1 && sinfo >/dev/null 2>&1; then
        sinfo -N -o '%N %P %t %c %m %G'
        echo
        squeue
        return 0
    fi
    echo "local Slurm cluster is down (state dir $STATE_DIR)"
    [[ -z $(our_daemon_pids) ]] || echo "some of its daemons still run: 'up' restarts them cleanly, 'down' stops them"
    return 1
}

case ${1:-} in
up) cmd_up ;;
down) cmd_down ;;
restart) cmd_down && cmd_up ;;
status) cmd_status ;;
env) print_env ;;
*)
    echo "usage: $0 up|down|restart|status|env" >&2
    exit 2
    ;;
esac
