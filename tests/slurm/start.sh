#!/usr/bin/env bash
# A real one-node Slurm for the test suite and for developers: `tests/slurm/start.sh DIR` writes DIR/slurm.conf,
# starts munged, slurmctld and slurmd (as root, without systemd) and waits until the node takes jobs;
# `tests/slurm/start.sh DIR stop` stops the daemons it started (by their pid files). Then
#   export SLURM_CONF=DIR/slurm.conf
# and sbatch, squeue, scancel and submitit talk to it. Needs Debian's slurm-wlm and munge (.ci/run installs them).
# What worked on these machines is in ../shared/docs/toolchain-notes.md: linuxproc process tracking, no task
# plugin, no accounting, cons_tres selection on cores.
set -euo pipefail
dir=$(realpath -m "${1:?usage: start.sh DIR [stop]}")
if [[ "${2:-}" == stop ]]; then
    for name in slurmd slurmctld; do
        [[ -f "$dir/$name.pid" ]] && kill "$(cat "$dir/$name.pid")" 2>/dev/null || true
    done
    [[ -f "$dir/munged.pid" ]] && kill "$(cat "$dir/munged.pid")" 2>/dev/null || true
    exit 0
fi
for tool in munged slurmctld slurmd sbatch; do
    command -v "$tool" >/dev/null || { echo "start.sh: $tool not found: apt-get install slurm-wlm munge" >&2; exit 3; }
done
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
chown munge:munge "$dir/munge"
chmod 700 "$dir/munge"
host=$(hostname -s)
cpus=$(nproc)
mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512))
cat > "$dir/slurm.conf" <<EOF
ClusterName=kcdtest
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
MinJobAge=600
SchedulerParameters=defer_batch=0
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
# munge: its own key (1 KiB, owned by munge, mode 400) and socket in DIR, so a system munged is left alone.
if [[ ! -f "$dir/munge/munge.key" ]]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
fi
runuser -u munge -- munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"
cp "$dir/munge/munged.pid" "$dir/munged.pid"
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        echo "slurm up: export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "start.sh: the node did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
