#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the cluster tests (tests/test_slurm.py) and for
# trying profiles/slurm by hand: munge, MariaDB with slurmdbd (the executor plugin reads job
# states through sacct, so accounting must be on), slurmctld and slurmd. The node has the
# machine's real CPUs and memory (`slurmd -C`) and two `gpu` gres backed by device files, so
# GPU rules get gres/gpu and CPU rules none, as on a cluster. Partition `kava`, account `kava`.
#
# Needs root and Debian/Ubuntu (it installs slurm-wlm, slurmdbd, mariadb-server, munge when
# missing). Idempotent: on a running cluster it returns as soon as the node answers. Daemons run
# under `nice -n 19`, and so do the jobs they start. Daemon logs: /var/log/kava-slurm/.
# Exits non-zero with one line naming what did not start.
set -euo pipefail

CLUSTER=kava
PARTITION=kava
ACCOUNT=kava
LOGS=/var/log/kava-slurm
CONF=/etc/slurm
# Two gpus backed by device files (GPU jobs cannot otherwise share the node: on a two-core test
# machine, one at a time would make the test run take twice as long).
GPUS=2

fail() { echo "start-local-slurm: $*" >&2; exit 1; }
# Starts a daemon niced, detached from this shell so it outlives the caller.
start() { setsid nice -n 19 "$@" < /dev/null >> "$LOGS/start.log" 2>&1 & }
wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local seconds=$1 what=$2; shift 2
    for _ in $(seq "$seconds"); do "$@" > /dev/null 2>&1 && return 0; sleep 1; done
    fail "$what did not come up within ${seconds}s (logs: $LOGS)"
}
node_ready() { sinfo -h -N -p "$PARTITION" -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; }

[ "$(id -u)" = 0 ] || fail "must run as root (it installs packages and starts system daemons)"

if ! command -v slurmctld > /dev/null || ! command -v slurmdbd > /dev/null \
        || ! command -v mariadbd > /dev/null || ! command -v munged > /dev/null; then
    command -v apt-get > /dev/null || fail "slurm is not installed and there is no apt-get to install it"
    apt-get update -q > /dev/null || fail "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm slurmdbd mariadb-server munge \
        > /dev/null || fail "apt-get install slurm-wlm slurmdbd mariadb-server munge failed"
fi
mkdir -p "$LOGS" /var/spool/slurmctld /var/spool/slurmd /run/munge /run/mysqld /run/slurm "$CONF"
HOST=$(hostname -s)

# munge: every daemon and client authenticates through it.
if ! munge -n < /dev/null > /dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || mungekey --create > /dev/null 2>&1 \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2> /dev/null
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2> /dev/null || true
    chmod 0400 /etc/munge/munge.key
    start runuser -u munge -- munged
    wait_for 20 munged munge -n
fi

# MariaDB and the accounting database.
if ! mysqladmin ping > /dev/null 2>&1; then
    chown mysql:mysql /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql > "$LOGS/mariadb-install.log" 2>&1 \
        || fail "mariadb-install-db failed (see $LOGS/mariadb-install.log)"
    start mariadbd --user=mysql --log-error="$LOGS/mariadb.log"
    wait_for 60 MariaDB mysqladmin ping
fi
mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
          CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'kava';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;" \
    || fail "could not create the slurm accounting database in MariaDB"

# The node as slurmd sees it: real CPU topology and memory.
NODE=$(slurmd -C | head -1) || fail "slurmd -C could not describe this machine"
for i in $(seq 0 $((GPUS - 1))); do
    [ -e "/dev/kava-gpu$i" ] || mknod "/dev/kava-gpu$i" c 1 3 \
        || fail "could not create /dev/kava-gpu$i for the gpu gres"
done

cat > "$CONF/slurm.conf.new" <<EOF
# Written by tests/slurm/start-local-slurm.sh: one node, real CPUs and memory, gpu gres.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# No cgroups in containers: plain process tracking, which still signals every process of a step.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=10
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
# sacct shows the executor plugin's comment, rule_<rule>_wildcards_<...>: which rule a job ran.
AccountingStoreFlags=job_comment
JobRequeue=1
# Killed jobs leave quickly; the tests interrupt jobs on purpose.
KillWait=10
MinJobAge=60
SchedulerParameters=sched_interval=2
ReturnToService=2
$NODE Gres=gpu:$GPUS NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
echo "NodeName=$HOST Name=gpu File=/dev/kava-gpu[0-$((GPUS - 1))]" > "$CONF/gres.conf.new"
cat > "$CONF/slurmdbd.conf.new" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=/run/slurm/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=kava
StorageLoc=slurm_acct_db
EOF
chmod 600 "$CONF/slurmdbd.conf.new"
changed=
for name in slurm.conf gres.conf slurmdbd.conf; do
    cmp -s "$CONF/$name.new" "$CONF/$name" || changed=yes
    mv "$CONF/$name.new" "$CONF/$name"
done
if [ -z "$changed" ] && node_ready && sacct -n -X -S now > /dev/null 2>&1; then
    exit 0  # already running, as configured
fi
if [ -n "$changed" ]; then
    # A new node definition (its gres) takes a restart of both daemons; running jobs survive it.
    for daemon in slurmctld slurmd; do
        [ -s "/run/slurm/$daemon.pid" ] && kill "$(cat "/run/slurm/$daemon.pid")" 2> /dev/null || true
    done
    wait_for 30 "the old slurmctld and slurmd to stop" bash -c '! pgrep -x slurmctld && ! pgrep -x slurmd'
fi
if ! sacctmgr -n show cluster > /dev/null 2>&1; then
    start slurmdbd
    wait_for 60 slurmdbd sacctmgr -n show cluster
fi
sacctmgr -i -Q add cluster "$CLUSTER" > /dev/null 2>&1 || true
sacctmgr -i -Q add account "$ACCOUNT" Cluster="$CLUSTER" Description=kava Organization=kava > /dev/null 2>&1 || true
sacctmgr -i -Q add user root Account="$ACCOUNT" Cluster="$CLUSTER" > /dev/null 2>&1 || true
sacctmgr -n -P show assoc user=root account="$ACCOUNT" | grep -q . \
    || fail "sacctmgr did not register user root in account $ACCOUNT"

if ! scontrol ping 2> /dev/null | grep -q UP; then
    start slurmctld
    wait_for 60 slurmctld bash -c 'scontrol ping | grep -q UP'
fi
if ! pgrep -x slurmd > /dev/null; then
    start slurmd
fi
# A node that was down when slurmctld last ran comes back drained or down: return it to service.
resume_node() {
    sinfo -h -N -o %T | grep -Eq '^(down|drain)' && scontrol update NodeName="$HOST" State=RESUME
    node_ready
}
wait_for 90 "node $HOST (slurmd)" resume_node
wait_for 30 "accounting (sacct)" sacct -n -X -S now
