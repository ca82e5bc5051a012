#!/usr/bin/env bash
# A two-node SLURM cluster on this machine (Debian's slurm 22.05 + munge), for the CI cluster stage.
#   source .ci/cluster/slurm.sh; slurm_start <state dir>; ...; slurm_stop
# Both nodes (n1, n2) are slurmd daemons on 127.0.0.1 with different ports; no cgroups, no accounting.
# slurm_start exports SLURM_CONF (clients and daemons read it) and records every daemon's PID for slurm_stop.
# Recipe: ../shared/notes/cluster.md (what ran on these 2-core Debian bookworm machines).

slurm_install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

slurm_start() {
    local state="$1" host cpus
    host="$(hostname -s)"
    cpus="$(nproc)"
    mkdir -p "$state"/{spool,ctld,log}
    state="$(cd "$state" && pwd)"
    export DPMOT_SLURM_STATE="$state"

    # munge: a key (created once), the socket directory, the daemon as the munge user.
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge
    if ! pgrep -x munged >/dev/null; then
        # munged runs as munge, which may not traverse $state (mktemp -d is mode 700): pid file in /run/munge
        runuser -u munge -- munged --pid-file=/run/munge/dpmot-munged.pid
        ln -sf /run/munge/dpmot-munged.pid "$state/munged.pid"
        echo munged >> "$state/started"
    fi

    cat > "$state/slurm.conf" <<CONF
ClusterName=dpmot-ci
SlurmctldHost=${host}(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool/%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=30
SchedulerParameters=defer
NodeName=n1 NodeHostname=${host} NodeAddr=127.0.0.1 Port=6818 CPUs=${cpus} RealMemory=4000
NodeName=n2 NodeHostname=${host} NodeAddr=127.0.0.1 Port=6819 CPUs=${cpus} RealMemory=4000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    export SLURM_CONF="$state/slurm.conf"
    mkdir -p "$state/spool/n1" "$state/spool/n2"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N n1
    slurmd -f "$SLURM_CONF" -N n2
    echo slurmctld slurmd-n1 slurmd-n2 >> "$state/started"
    local i
    for i in $(seq 60); do
        if [ "$(sinfo -h -o '%T' 2>/dev/null | grep -c idle)" -ge 1 ] && \
           [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c idle)" -eq 2 ]; then
            sinfo -N
            return 0
        fi
        sleep 1
    done
    echo "slurm_start: the two nodes did not become idle in 60 s; logs in $state/log" >&2
    sinfo -N >&2 || true
    tail -n 20 "$state"/log/*.log >&2 || true
    return 1
}

slurm_stop() {
    local state="${DPMOT_SLURM_STATE:-}" pidfile pid
    [ -n "$state" ] && [ -d "$state" ] || return 0
    scancel --quiet --full --user=root 2>/dev/null || true
    for pidfile in "$state"/slurmd-n1.pid "$state"/slurmd-n2.pid "$state"/slurmctld.pid "$state"/munged.pid; do
        [ -s "$pidfile" ] || continue
        pid="$(cat "$pidfile")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile" "$(readlink -f "$pidfile" 2>/dev/null)"
    done
}
