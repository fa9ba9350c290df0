#!/usr/bin/env bash
# tools/slurm/start.sh - a single-node SLURM cluster on this Debian host, for instill's sweep tests
# (tests/test_sweep_slurm.py submits a sweep to it as a job array; .ci/run calls this script before `make test`).
#
#   munged -> [private mariadbd -> slurmdbd] -> slurmctld -> slurmd
#
# Written after the tried example in the team's shared notes (start-slurm.sh); changes: the system users the
# daemons run as are created when a package did not create them (mariadb-server-core creates no `mysql`), and
# messages name this script.
# Idempotent: a daemon that is already running is left alone; when all are up
# the script only prints the status line. Installs the Debian packages if they
# are missing. Must run as root. Every daemon it starts is recorded under
# $STATE_DIR so that tools/slurm/stop.sh stops exactly those and nothing else.
#
# Environment knobs:
#   SLURM_ACCOUNTING=1     slurmdbd + a private MariaDB so that `sacct` works
#                          (submitit polls sacct for job states). 0 = lighter,
#                          no accounting: sacct fails, submitit only warns.
#   SLURM_START_TIMEOUT=90 seconds to wait for each daemon / the node to be idle
set -euo pipefail

ACCOUNTING="${SLURM_ACCOUNTING:-1}"
TIMEOUT="${SLURM_START_TIMEOUT:-90}"
CLUSTER=local
PARTITION=debug
STATE_DIR=/run/local-slurm            # markers: daemons started by this script
DATA_DIR=/var/lib/local-slurm         # private MariaDB datadir lives here
SQL_SOCK=/run/local-slurm-mysql/mysqld.sock
SQL_PORT=6830                         # loopback only; avoids a system MariaDB on 3306
DB_PASS=slurmlocal                    # loopback-only test database
LOG_DIR=/var/log/slurm
T0=$(date +%s.%N)
STARTED=()

die() { echo "tools/slurm/start.sh: ERROR: $*" >&2; exit 1; }
log() { echo "tools/slurm/start.sh: $*" >&2; }
[ "$(id -u)" = 0 ] || die "must run as root"

# ---------------------------------------------------------------- helpers
# pid_alive PIDFILE COMM : pid file exists, process alive and has that name
pid_alive() {
  local f=$1 comm=$2 p
  [ -r "$f" ] || return 1
  p=$(tr -dc 0-9 <"$f")
  [ -n "$p" ] && [ -r "/proc/$p/comm" ] && [ "$(cat "/proc/$p/comm")" = "$comm" ]
}
# wait_for SECONDS CMD... : poll CMD until it succeeds
wait_for() {
  local t=$1 end; shift
  end=$(( $(date +%s) + t ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || return 1
    sleep 0.5
  done
}
# mark NAME PIDFILE COMM : remember that we started this daemon
mark() { mkdir -p "$STATE_DIR"; printf '%s %s\n' "$2" "$3" >"$STATE_DIR/$1"; STARTED+=("$1"); }
# write_if_changed FILE OWNER MODE  (content on stdin); returns 0 if changed
write_if_changed() {
  local f=$1 tmp; tmp=$(mktemp)
  cat >"$tmp"
  if [ -f "$f" ] && cmp -s "$tmp" "$f"; then rm -f "$tmp"; return 1; fi
  install -o "${2%%:*}" -g "${2##*:}" -m "$3" "$tmp" "$f"; rm -f "$tmp"; return 0
}
# stop_ours NAME : stop a daemon that this script started (config changed)
stop_ours() {
  local m="$STATE_DIR/$1" f c p i
  [ -f "$m" ] || return 0
  read -r f c <"$m"
  if pid_alive "$f" "$c"; then
    p=$(tr -dc 0-9 <"$f"); kill -TERM "$p"
    for i in $(seq 1 40); do [ -d "/proc/$p" ] || break; sleep 0.25; done
  fi
  rm -f "$m"
}

# ---------------------------------------------------------------- packages
PKGS=(munge slurm-client slurmctld slurmd)
NEED=(munged sinfo slurmctld slurmd)
if [ "$ACCOUNTING" = 1 ]; then
  PKGS+=(slurmdbd mariadb-server-core mariadb-client-core)
  NEED+=(slurmdbd mariadbd mariadb mariadb-install-db)
fi
missing=0
for b in "${NEED[@]}"; do command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$b" >/dev/null 2>&1 || missing=1; done
if [ "$missing" = 1 ]; then
  log "installing ${PKGS[*]}"
  # keep package scripts from starting services with their default configs
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -q --no-install-recommends "${PKGS[@]}" >"${TMPDIR:-/var/tmp}/instill-slurm-apt.log" 2>&1 ||
    { apt-get update -q >>"${TMPDIR:-/var/tmp}/instill-slurm-apt.log" 2>&1 &&
      apt-get install -y -q --no-install-recommends "${PKGS[@]}" >>"${TMPDIR:-/var/tmp}/instill-slurm-apt.log" 2>&1; }; } ||
    { [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d; tail -20 "${TMPDIR:-/var/tmp}/instill-slurm-apt.log" >&2; die "apt-get install failed"; }
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi
export PATH="$PATH:/usr/sbin:/sbin"

# ---------------------------------------------------------------- users
# The daemons drop to these users; the -core packages do not always create them.
for u in munge slurm $([ "$ACCOUNTING" = 1 ] && echo mysql); do
  id -u "$u" >/dev/null 2>&1 || useradd --system --user-group --no-create-home --shell /usr/sbin/nologin "$u"
done

# ---------------------------------------------------------------- host
H=$(hostname -s)
# slurm looks its own name up; make sure it resolves (no DNS in sandboxes)
if ! getent hosts "$H" >/dev/null 2>&1; then
  echo "127.0.0.1 $H  # added by instill tools/slurm/start.sh" >>/etc/hosts
fi
# node size from slurmd itself; RealMemory at 90% so the node never drains
# for "Low RealMemory"
HW=$(slurmd -C | head -1)
get() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$HW"; }
CPUS=$(get CPUs); BOARDS=$(get Boards); SPB=$(get SocketsPerBoard)
CPS=$(get CoresPerSocket); TPC=$(get ThreadsPerCore); MEM=$(get RealMemory)
MEM=$(( MEM * 9 / 10 ))

# ---------------------------------------------------------------- dirs
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR" /run/munge "$STATE_DIR"
chown slurm:slurm /var/spool/slurmctld "$LOG_DIR"
chmod 755 /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
# munged refuses to start unless these are owned by munge and not group/other-writable
mkdir -p /etc/munge /var/lib/munge /var/log/munge
chown munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 700 /etc/munge /var/log/munge; chmod 711 /var/lib/munge; chmod 755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
# a state dir left by another ClusterName makes slurmctld exit fatally
if [ -f /var/spool/slurmctld/clustername ] && [ "$(cat /var/spool/slurmctld/clustername)" != "$CLUSTER" ]; then
  mv /var/spool/slurmctld "/var/spool/slurmctld.old.$(date +%s)"
  mkdir -p /var/spool/slurmctld; chown slurm:slurm /var/spool/slurmctld
fi

# ---------------------------------------------------------------- config
if [ "$ACCOUNTING" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819"
else
  ACCT="AccountingStorageType=accounting_storage/none"
fi
conf_changed=0
write_if_changed /etc/slurm/slurm.conf root:root 644 <<EOF && conf_changed=1 || true
# written by instill tools/slurm/start.sh - single-node test cluster
ClusterName=$CLUSTER
SlurmctldHost=$H(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$ACCT
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$H NodeAddr=127.0.0.1 CPUs=$CPUS Boards=$BOARDS SocketsPerBoard=$SPB CoresPerSocket=$CPS ThreadsPerCore=$TPC RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
if [ "$ACCOUNTING" = 1 ]; then
  # slurmdbd insists on mode 600, owned by SlurmUser
  write_if_changed /etc/slurm/slurmdbd.conf slurm:slurm 600 <<EOF && conf_changed=1 || true
# written by instill tools/slurm/start.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
PidFile=/run/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$SQL_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
fi
if [ "$conf_changed" = 1 ]; then   # restart what we run so the new config applies
  stop_ours slurmd; stop_ours slurmctld; stop_ours slurmdbd
fi

# ---------------------------------------------------------------- munge
if ! pid_alive /run/munge/munged.pid munged && ! (munge -n | unmunge) >/dev/null 2>&1; then
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*   # stale: no daemon answers
  runuser -u munge -- /usr/sbin/munged >"$LOG_DIR/munged.start.log" 2>&1 </dev/null ||
    { cat "$LOG_DIR/munged.start.log" >&2; die "munged failed (see /var/log/munge/munged.log)"; }
  mark munged /run/munge/munged.pid munged
fi
wait_for "$TIMEOUT" sh -c 'munge -n | unmunge' || die "munge does not work"

# ---------------------------------------------------------------- accounting
if [ "$ACCOUNTING" = 1 ]; then
  SQL="mariadb --protocol=socket --socket=$SQL_SOCK -uroot"
  mkdir -p "$(dirname "$SQL_SOCK")" "$DATA_DIR"
  chown mysql:mysql "$(dirname "$SQL_SOCK")"
  [ -d "$DATA_DIR/mysql" ] && chown -R mysql:mysql "$DATA_DIR/mysql"   # uid may differ after a reinstall
  if [ ! -d "$DATA_DIR/mysql/mysql" ]; then
    rm -rf "$DATA_DIR/mysql"; install -d -o mysql -g mysql "$DATA_DIR/mysql"
    mariadb-install-db --no-defaults --user=mysql --datadir="$DATA_DIR/mysql" \
      --auth-root-authentication-method=socket --skip-test-db >"$LOG_DIR/mariadb-install.log" 2>&1 ||
      { tail -20 "$LOG_DIR/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  fi
  if ! pid_alive /run/local-slurm-mysql/mysqld.pid mariadbd; then
    # --no-defaults: ignore /etc/mysql so a system MariaDB is neither used nor disturbed
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DATA_DIR/mysql" \
      --socket="$SQL_SOCK" --pid-file=/run/local-slurm-mysql/mysqld.pid \
      --bind-address=127.0.0.1 --port="$SQL_PORT" \
      --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
      --log-error="$DATA_DIR/mysql/mariadb.err" </dev/null >/dev/null 2>&1 &
    wait_for "$TIMEOUT" test -s /run/local-slurm-mysql/mysqld.pid || die "mariadbd did not start (see $DATA_DIR/mysql/mariadb.err)"
    mark mariadbd /run/local-slurm-mysql/mysqld.pid mariadbd
  fi
  wait_for "$TIMEOUT" $SQL -e 'SELECT 1' || die "mariadbd not answering (see $DATA_DIR/mysql/mariadb.err)"
  $SQL -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
           CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  if ! pid_alive /run/slurmdbd.pid slurmdbd; then
    slurmdbd >"$LOG_DIR/slurmdbd.start.log" 2>&1 </dev/null ||
      { cat "$LOG_DIR/slurmdbd.start.log" >&2; die "slurmdbd failed (see $LOG_DIR/slurmdbd.log)"; }
    mark slurmdbd /run/slurmdbd.pid slurmdbd
  fi
  # port 6819 answers once slurmdbd has set up its tables
  wait_for "$TIMEOUT" bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819' || die "slurmdbd not listening (see $LOG_DIR/slurmdbd.log)"
fi

# ---------------------------------------------------------------- slurmctld / slurmd
if ! pid_alive /run/slurmctld.pid slurmctld; then
  slurmctld >"$LOG_DIR/slurmctld.start.log" 2>&1 </dev/null ||
    { cat "$LOG_DIR/slurmctld.start.log" >&2; die "slurmctld failed (see $LOG_DIR/slurmctld.log)"; }
  mark slurmctld /run/slurmctld.pid slurmctld
fi
wait_for "$TIMEOUT" sh -c 'scontrol ping | grep -q UP' || die "slurmctld not answering (see $LOG_DIR/slurmctld.log)"
# config changed under a slurmctld that is not ours: ask it to re-read
if [ "$conf_changed" = 1 ] && [ ! -f "$STATE_DIR/slurmctld" ]; then scontrol reconfigure || true; fi
if ! pid_alive /run/slurmd.pid slurmd; then
  slurmd >"$LOG_DIR/slurmd.start.log" 2>&1 </dev/null ||
    { cat "$LOG_DIR/slurmd.start.log" >&2; die "slurmd failed (see $LOG_DIR/slurmd.log)"; }
  mark slurmd /run/slurmd.pid slurmd
fi

# ---------------------------------------------------------------- node ready?
node_state() { sinfo -h -n "$H" -o %T 2>/dev/null | head -1; }
node_ready() { case "$(node_state)" in idle|mixed|allocated|completing) return 0;; *) return 1;; esac; }
if ! wait_for "$TIMEOUT" node_ready; then
  case "$(node_state)" in   # left down/drained by an earlier run: resume it once
    down*|drain*|fail*) scontrol update NodeName="$H" State=RESUME >/dev/null 2>&1 || true
                        wait_for 20 node_ready || true ;;
  esac
fi
node_ready || die "node $H is '$(node_state)', not idle (see $LOG_DIR/slurmd.log, 'scontrol show node')"
if [ "$ACCOUNTING" = 1 ]; then   # sacct must answer before submitit polls it
  wait_for "$TIMEOUT" sacct -n -X -S now -o JobID || die "sacct does not answer (see $LOG_DIR/slurmdbd.log)"
fi

secs=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
echo "slurm: up cluster=$CLUSTER node=$H state=$(node_state) cpus=$CPUS partition=$PARTITION accounting=$([ "$ACCOUNTING" = 1 ] && echo on || echo off) started=[${STARTED[*]:-none}] ${secs}s"
