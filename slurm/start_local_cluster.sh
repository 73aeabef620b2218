#!/usr/bin/env bash
# Start a real single-node SLURM cluster (munge, MariaDB, slurmdbd, slurmctld,
# slurmd) on this machine, by hand, without systemd. Needs root and the
# packages from slurm/install_deps.sh.
#
#   eval "$(slurm/start_local_cluster.sh [STATE_DIR])"   # exports SLURM_CONF
#
# STATE_DIR (default ${SPON_EXP_SLURM_DIR:-/tmp/spon-exp-slurm}) holds the
# configs, Slurm state, spool, MariaDB datadir, logs and the PIDs of the daemons
# we started (pid/*.pid), which slurm/stop_local_cluster.sh stops.
# Idempotent: daemons whose recorded PID is alive are left alone, so a second
# call just verifies the cluster. Only the `export SLURM_CONF=...` line goes to
# stdout; everything else goes to stderr.
#
# Env: SPON_EXP_SLURM_TIMEOUT (s, default 90) bounds every readiness wait;
# SPON_EXP_SLURM_PORT (default 6817) is the first of four consecutive TCP ports
# (slurmctld, slurmd, slurmdbd, mariadb), all bound to loopback use only.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

D="${1:-${SPON_EXP_SLURM_DIR:-/tmp/spon-exp-slurm}}"
mkdir -p "$D" && D="$(cd "$D" && pwd)"   # absolute: it goes into slurm.conf
TIMEOUT="${SPON_EXP_SLURM_TIMEOUT:-90}"
PORT="${SPON_EXP_SLURM_PORT:-6817}"
CLUSTER=sponexp
NODE="$(hostname -s)"
export SLURM_CONF="$D/slurm.conf"   # every client and slurmdbd (for slurmdbd.conf) reads this

log() { echo "[start_local_cluster] $*" >&2; }
die() {
  log "ERROR: $*"
  log "logs: $D/log/ (slurmctld.log slurmd.log slurmdbd.log mariadb.log munged.out, *.out)"
  # *.out holds what the daemons print before their log file is open.
  for f in "$D"/log/{munged.out,mariadb.log,slurmdbd.log,slurmctld.log,slurmd.log}; do
    if [ -s "$f" ]; then echo "--- tail $f" >&2; tail -n 8 "$f" >&2; fi
  done
  exit 1
}
SPAWNED=()   # daemons this cluster needs, checked while waiting
# wait_for DESC CMD...: poll CMD until it succeeds or $TIMEOUT seconds pass.
wait_for() {
  local desc="$1" end=$((SECONDS + TIMEOUT)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$end" ] || die "timed out after ${TIMEOUT}s waiting for: $desc"
    # Fail fast when a daemon we rely on died (port in use, bad config...).
    for n in "${SPAWNED[@]}"; do exited "$n" && die "$n exited while waiting for: $desc"; done
    sleep 0.2
  done
}
# alive NAME: the recorded PID runs (not a zombie) and is still that program
# (PIDs get reused).
alive() {
  local p; p="$(cat "$D/pid/$1.pid" 2>/dev/null)" || return 1
  [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$1" ] \
    && ! grep -q '^State:.*zombie' "/proc/$p/status" 2>/dev/null
}
# exited NAME: the recorded PID is gone or a zombie. Unlike alive it does not
# look at the program name: a daemon we just spawned is `setsid`, then
# `setpriv`, for a moment before it execs (on a busy machine, long enough for
# the first readiness poll to fail), and our own unreaped child cannot have had
# its PID reused.
exited() {
  local p; p="$(cat "$D/pid/$1.pid" 2>/dev/null)" || return 0
  [ -z "$p" ] || ! kill -0 "$p" 2>/dev/null || grep -q '^State:.*zombie' "/proc/$p/status" 2>/dev/null
}
# spawn NAME PORT CMD...: run CMD in its own session in the foreground mode of
# the daemon, so $! is the daemon itself (setsid execs in a non-leader child)
# and stop can kill exactly it. Redirecting fds 1/2 and closing 9 keeps the
# daemon from holding our stdout pipe (which would hang `$(...)` / subprocess
# callers) or our lock. PORT (or -) must be free: otherwise the readiness checks
# would happily pass against another cluster's daemon while ours dies.
spawn() {
  local name="$1" port="$2"; shift 2
  SPAWNED+=("$name")
  if alive "$name"; then log "$name already running (pid $(cat "$D/pid/$name.pid"))"; return; fi
  if [ "$port" != - ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port (for $name) is in use: another cluster running? stop it or set SPON_EXP_SLURM_PORT"
  fi
  log "starting $name"
  setsid "$@" </dev/null >>"$D/log/$name.out" 2>&1 9>&- &
  echo $! >"$D/pid/$name.pid"
}

main() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (SlurmUser=root, munge socket in /run)"
  for b in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sacctmgr sbatch; do
    command -v "$b" >/dev/null || die "$b not found: run 'bash slurm/install_deps.sh' first"
  done
  mkdir -p "$D"/{pid,run,log,state,spool,mysql}
  # Serialise concurrent start/stop calls on the same state dir.
  exec 9>"$D/.lock"; flock 9

  # --- munge: must use its default socket, the Slurm clients/plugins hardcode it.
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    if alive munged; then log "munged already running (pid $(cat "$D/pid/munged.pid"))"
    else log "munge already answering on its default socket (not ours, left alone)"; fi
  else
    install -d -o munge -g munge -m 0755 /run/munge   # normally made by systemd-tmpfiles
    # munged refuses to run as root without --force; drop to the munge user.
    spawn munged - setpriv --reuid=munge --regid=munge --init-groups munged -F
    wait_for "munged (munge -n | unmunge)" bash -c 'munge -n </dev/null | unmunge'
  fi

  # --- MariaDB: private datadir, loopback TCP port, durability off (it's a test DB).
  local dbport=$((PORT + 3))
  if [ ! -d "$D/mysql/mysql" ]; then
    log "initialising MariaDB datadir"
    # 'normal' auth gives root an empty password, usable over TCP by slurmdbd.
    mariadb-install-db --no-defaults --user=root --datadir="$D/mysql" \
      --auth-root-authentication-method=normal --skip-test-db >"$D/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed (see $D/log/mariadb-install.log)"
  fi
  spawn mariadbd "$dbport" mariadbd --no-defaults --user=root --datadir="$D/mysql" \
    --socket="$D/run/mysqld.sock" --pid-file="$D/run/mariadbd.pid" --log-error="$D/log/mariadb.log" \
    --bind-address=127.0.0.1 --port="$dbport" --skip-name-resolve --skip-log-bin \
    --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 --sync-binlog=0 \
    --innodb-lock-wait-timeout=900
  # (slurmdbd still logs "innodb_buffer_pool_size not recommended": harmless at this scale.)
  wait_for "mariadbd on 127.0.0.1:$dbport" mariadb-admin --no-defaults -h127.0.0.1 -P"$dbport" -uroot ping

  # --- Configs (rewritten on each start: hostname/hardware may differ on a new machine).
  local hw; hw="$(slurmd -C | head -n1 | sed 's/^NodeName=[^ ]* //')"
  cat >"$D/slurm.conf" <<EOF
# Generated by slurm/start_local_cluster.sh
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
# No cgroups in containers: track processes by PID, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default a job without --mem takes the whole node's memory.
DefMemPerCPU=1024
# Default batch_sched_delay makes each array task wait ~3 s.
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
# Accounting (sacct) is needed by submitit to see FAILED/CANCELLED/TIMEOUT.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((PORT + 2))
NodeName=$NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF; it holds the
  # DB credentials so slurmdbd insists on mode 600.
  (umask 077; cat >"$D/slurmdbd.conf" <<EOF
# Generated by slurm/start_local_cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=$((PORT + 2))
SlurmUser=root
PidFile=$D/run/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$dbport
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  )
  chmod 600 "$D/slurmdbd.conf"

  # --- slurmdbd, then register the cluster before slurmctld connects to it.
  spawn slurmdbd $((PORT + 2)) slurmdbd -D
  wait_for "slurmdbd (sacctmgr show cluster)" sacctmgr -n show cluster
  if [ -z "$(sacctmgr -n -P show cluster "$CLUSTER" format=cluster)" ]; then
    sacctmgr -i add cluster "$CLUSTER" >&2 || die "sacctmgr add cluster failed"
  fi

  # --- slurmctld (-i: tolerate unreadable old state) and slurmd.
  spawn slurmctld "$PORT" slurmctld -D -i
  wait_for "slurmctld (scontrol ping)" bash -c 'scontrol ping | grep -q UP'
  spawn slurmd $((PORT + 1)) slurmd -D -N "$NODE"
  wait_for "node $NODE idle" bash -c "sinfo -h -n '$NODE' -o %t | grep -qx 'idle\|mix\|alloc'"

  # --- End-to-end readiness: interactive step, then a batch job seen by sacct.
  timeout "$TIMEOUT" srun -t 1 true >&2 || die "'srun true' failed"
  local jid; jid="$(sbatch --parsable -t 1 -o /dev/null --wrap true)" || die "sbatch failed"
  wait_for "job $jid COMPLETED in sacct" bash -c "sacct -n -X -P -j '$jid' -o State | grep -qx COMPLETED"
  log "cluster '$CLUSTER' ready (node $NODE, state dir $D)"
}

main "$@"
echo "export SLURM_CONF=$SLURM_CONF"
