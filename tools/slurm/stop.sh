#!/usr/bin/env bash
# tools/slurm/stop.sh - stop the daemons that tools/slurm/start.sh started, and only those.
# Each marker in $STATE_DIR names a daemon's pid file and process name; a pid
# is signalled only while /proc/PID/comm still has that name (no pkill, no
# killall). Jobs still queued or running are cancelled first (set
# SLURM_STOP_CANCEL_JOBS=0 to keep them) so no job processes outlive slurmd.
set -uo pipefail
STATE_DIR=/run/local-slurm
export PATH="$PATH:/usr/sbin:/sbin"
[ "$(id -u)" = 0 ] || { echo "tools/slurm/stop.sh: must run as root" >&2; exit 1; }

pid_of() {   # pid_of NAME -> pid, if the daemon we started is still alive
  local f c p
  [ -f "$STATE_DIR/$1" ] && read -r f c <"$STATE_DIR/$1" && [ -r "$f" ] || return 1
  p=$(tr -dc 0-9 <"$f")
  [ -n "$p" ] && [ -r "/proc/$p/comm" ] && [ "$(cat "/proc/$p/comm")" = "$c" ] && echo "$p"
}

if [ "${SLURM_STOP_CANCEL_JOBS:-1}" = 1 ] && pid_of slurmctld >/dev/null; then
  if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
    squeue -h -o %F | sort -u | xargs -r scancel 2>/dev/null
    for _ in $(seq 1 40); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi

stopped=()
stop_wave() {   # SIGTERM the named daemons together, wait up to 30 s, then SIGKILL
  local n p f pids=() names=() i
  for n in "$@"; do
    if p=$(pid_of "$n"); then kill -TERM "$p" 2>/dev/null; pids+=("$p"); names+=("$n"); fi
  done
  for _ in $(seq 1 120); do
    i=0; for p in "${pids[@]}"; do [ -d "/proc/$p" ] && i=1; done
    [ "$i" = 0 ] && break; sleep 0.25
  done
  for n in "${names[@]}"; do
    if p=$(pid_of "$n"); then
      echo "tools/slurm/stop.sh: $n ($p) ignored SIGTERM, sending SIGKILL" >&2
      kill -KILL "$p" 2>/dev/null; sleep 0.5
    fi
    stopped+=("$n")
  done
  for n in "$@"; do
    if [ -f "$STATE_DIR/$n" ]; then
      # slurmctld leaves /run/slurmctld.pid behind; a stale one breaks the
      # slurmctld package's prerm (it runs scancel and fails) on apt-get remove
      read -r f _ <"$STATE_DIR/$n" && ! pid_of "$n" >/dev/null && rm -f "$f"
      rm -f "$STATE_DIR/$n"
    fi
  done
}
# reverse start order; slurmctld flushes job records to slurmdbd before it goes
stop_wave slurmd slurmctld
stop_wave slurmdbd
stop_wave mariadbd munged
echo "slurm: stopped=[${stopped[*]:-none}]"
