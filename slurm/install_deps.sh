#!/usr/bin/env bash
# Install the Debian packages needed by slurm/start_local_cluster.sh.
# Run only when asked: `./install.sh --with-slurm` (as .ci/run does), by hand, or by the tests'
# slurm_cluster fixture when SPON_EXP_REQUIRE_SLURM is set (CI). Plain ./install.sh never runs it.
#
# Idempotent and fast on a second call: apt is only touched when one of the
# daemons/clients is missing. Needs root (or sudo) and a Debian/Ubuntu apt.
set -euo pipefail

# Binaries we need, one per package we install. If all are present, do nothing.
need=(munged slurmctld slurmd slurmdbd sbatch sacct mariadbd mariadb-install-db)
missing=()
for b in "${need[@]}"; do
  command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || missing+=("$b")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "slurm deps already installed" >&2
  exit 0
fi
echo "missing: ${missing[*]} -> installing slurm deps with apt" >&2

if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: apt-get not found; install slurm/munge/mariadb by hand" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Packages' postinst scripts try to start services; in a container without
# systemd/init that fails or hangs. policy-rc.d exit 101 tells invoke-rc.d
# "not allowed", so packages install without starting anything (we start the
# daemons ourselves). Only created if absent, and removed again afterwards.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  made_policy=1
fi
trap '[ "$made_policy" = 1 ] && $SUDO rm -f "$policy"' EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# slurm-client: sbatch/srun/sinfo/sacct/sacctmgr; mariadb-server brings
# mariadbd and mariadb-install-db (needed for slurmdbd accounting, which
# submitit needs to see FAILED/CANCELLED states).
$SUDO apt-get install -y -qq --no-install-recommends \
  munge slurmctld slurmd slurm-client slurmdbd mariadb-server >&2
echo "slurm deps installed" >&2
