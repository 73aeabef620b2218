#!/usr/bin/env bash
# Stop the cluster started by slurm/start_local_cluster.sh [STATE_DIR]:
# cancel all jobs, then stop exactly the daemons whose PIDs were recorded in
# STATE_DIR/pid/ (never by name, so other Slurm/munge/MariaDB instances on the
# machine are untouched) and wait for them to exit. Idempotent. State, DB and
# logs are kept (job ids go on from there next start); `rm -rf STATE_DIR`
# after stopping for a clean slate.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

D="${1:-${SPON_EXP_SLURM_DIR:-/tmp/spon-exp-slurm}}"
log() { echo "[stop_local_cluster] $*" >&2; }
[ -d "$D/pid" ] || { log "nothing to stop in $D"; exit 0; }
D="$(cd "$D" && pwd)"
export SLURM_CONF="$D/slurm.conf"
exec 9>"$D/.lock"; flock 9   # don't race a concurrent start

# running PID: exists and is not a zombie (a PID 1 that doesn't reap leaves those).
running() { [ -d "/proc/$1" ] && ! grep -q '^State:.*zombie' "/proc/$1/status" 2>/dev/null; }
pid_of() {  # recorded PID, only if it still runs that program (PIDs get reused)
  local p; p="$(cat "$D/pid/$1.pid" 2>/dev/null)" || return 1
  [ -n "$p" ] && running "$p" && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$1" ] && echo "$p"
}

# Cancel jobs first so slurmd can reap their slurmstepd's while it still runs.
if pid_of slurmctld >/dev/null; then
  jobs="$(squeue -h -o %A 2>/dev/null || true)"
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"
    scancel $jobs || true
    for _ in $(seq 50); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

# Reverse start order: clients of a daemon go before it.
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  if p="$(pid_of "$name")"; then
    log "stopping $name (pid $p)"
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 150); do running "$p" || break; sleep 0.2; done   # up to 30 s
    if running "$p"; then log "$name did not exit, killing"; kill -KILL "$p" 2>/dev/null || true; fi
    for _ in $(seq 25); do running "$p" || break; sleep 0.2; done
  fi
  rm -f "$D/pid/$name.pid"
done
log "stopped (state kept in $D)"
