#!/usr/bin/env bash
# Run the Hydra multirun *launcher* itself as a small CPU job:
#
#   sbatch slurm/sbatch_launcher.sh hydra/launcher=submitit_slurm <spon-exp overrides...>
#
# This job runs `spon-exp --multirun "$@"`. With the submitit_slurm launcher,
# Hydra (through submitit) submits the sweep as a job array with the GPU/CPU
# resources from the launcher config and then *blocks*, polling until every
# array task is done and collecting results/failures. Running that blocking
# process here instead of on a login node keeps it alive for days and out of
# login-node limits; it needs little: 1 task, 2 CPUs, 4G. Its --time must
# outlast the whole sweep (queueing included), hence 2 days. Override any
# #SBATCH default on the command line, e.g. `sbatch -c 1 --time=1:00:00 ...`
# (on the 2-core local test cluster use -c 1, or the launcher holds every core
# and the array tasks it submits can never start).
#
# sbatch copies this script to the spool dir, so paths are resolved from
# $SLURM_SUBMIT_DIR (submit from the repo root), not from $0. The submit-time
# environment (SLURM_CONF, an activated venv, WANDB_*...) is exported to the job
# by default and is inherited by the array jobs submitit submits from here.
#SBATCH --job-name=spon-exp-launcher
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
#SBATCH --time=2-00:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
# Prefer $SPON_EXP_BIN, then spon-exp on PATH, then the repo's venv.
bin="${SPON_EXP_BIN:-$(command -v spon-exp || echo .venv/bin/spon-exp)}"
echo "[sbatch_launcher] job ${SLURM_JOB_ID:-?} on $(hostname -s): $bin --multirun $*" >&2
# exec: Slurm's signals (scancel, time limit) reach the launcher directly.
exec "$bin" --multirun "$@"
