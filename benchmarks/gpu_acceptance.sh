#!/usr/bin/env bash
# GPU acceptance in one command: the CUDA tests and the four GPU benchmarks, each within its
# own time budget and all within one overall budget, then one JSON summary.
#
#   bash benchmarks/gpu_acceptance.sh                      # on a CUDA machine (default budget 600 s)
#   bash benchmarks/gpu_acceptance.sh --budget 900 --out /some/folder
#   bash benchmarks/gpu_acceptance.sh --dry-run --out /tmp/acc   # the same steps on the CPU, tiny shapes
#
# Steps, in order (each under `timeout`; once the overall budget is spent the rest are skipped,
# and the summary and the last lines printed say which and why):
#   pytest         python -m pytest -m gpu on the test files that carry the gpu mark
#   scale          benchmarks/scale.py (Llama-3-8B's shape cut to SCALE_LAYERS layers)
#   topk           benchmarks/perf/topk.py (the Triton top-k against torch and the matmul)
#   sparse_matvec  benchmarks/perf/sparse_matvec.py --device cuda (Triton GEMV against cuBLAS)
#   sparse_decode  benchmarks/perf/sparse_decode.py --device cuda (greedy decoding, dense vs sparse)
#
# None of them needs Hydra, OmegaConf, W&B, lm-eval or datasets: torch, transformers, triton,
# safetensors, tqdm and (for the first step) pytest are enough, as on a bare GPU node.
# --dry-run checks exactly that: it hides those packages from every step (SPON_EXP_ACCEPTANCE_HIDE
# lists them; set it empty to hide none) and runs each step on the CPU at a tiny shape (the gpu
# tests are collected and skip).
#
# The summary: <out>/<UTC date>-<commit>.json (default out: benchmarks/results/gpu_acceptance)
# with, per step, its command, budget, rc, seconds, status (ok / failed / timeout / skipped) and
# reason, the last lines of its log, and the JSON the benchmark wrote (pytest: its counts). Full
# logs: <out>/<UTC date>-<commit>-logs/. Exit status 0 when no step failed or timed out.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BUDGET=600
OUT=""
DRY_RUN=0
ONLY=""

usage() { sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --budget=*) BUDGET="${1#*=}" ;;
    --out) OUT="${2:?--out needs a folder}"; shift ;;
    --out=*) OUT="${1#*=}" ;;
    --only) ONLY="${2:?--only needs step names, comma-separated}"; shift ;;
    --only=*) ONLY="${1#*=}" ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_acceptance.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_acceptance.sh: --budget takes whole seconds, got $BUDGET" >&2; exit 2 ;; esac

cd "$ROOT" || exit 2
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ "$COMMIT" != unknown ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  COMMIT="$COMMIT-dirty"
fi
STAMP="$(date -u +%Y%m%dT%H%M%SZ)-$COMMIT"
OUT="${OUT:-$ROOT/benchmarks/results/gpu_acceptance}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/$STAMP.json"
LOGS="$OUT/$STAMP-logs"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_acceptance.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$LOGS" "$WORK/results"
RECORDS="$WORK/steps.jsonl"
: >"$RECORDS"

if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then CUDA=1; else CUDA=0; fi
if [ "$DRY_RUN" = 0 ] && [ "$CUDA" = 0 ]; then
  echo "gpu_acceptance.sh: no CUDA device here (torch.cuda.is_available() is False); use --dry-run for the CPU check" >&2
  exit 2
fi

# --------------------------------------------------------------------------- the steps
# per-step budgets (seconds) on the GPU; each also stops at what is left of --budget
declare -A STEP_BUDGET=([pytest]=150 [scale]=180 [topk]=45 [sparse_matvec]=75 [sparse_decode]=150)
STEPS=(pytest scale topk sparse_matvec sparse_decode)
MIN_START=5  # a step with fewer seconds than this left is skipped rather than started
SCALE_LAYERS=8  # scale.py and sparse_decode.py at Llama-3-8B's layer shape, this many layers: costs scale with it

mapfile -t GPU_TESTS < <(grep -l 'mark\.gpu' tests/test_*.py 2>/dev/null)
R="$WORK/results"
declare -A CMD
CMD[pytest]="$PYTHON -m pytest -q -m gpu -p no:cacheprovider --junitxml=$R/pytest.xml ${GPU_TESTS[*]}"  # collected and skipped without CUDA
if [ "$DRY_RUN" = 1 ]; then
  MODE=dry-run
  CMD[scale]="$PYTHON benchmarks/scale.py --small --methods teal --skip throughput --out $R/scale.json"
  CMD[topk]="$PYTHON benchmarks/perf/topk.py --device cpu --widths 64 --rows 8 --repeats 1 --out $R/topk.json"
  CMD[sparse_matvec]="$PYTHON benchmarks/perf/sparse_matvec.py --device cpu --shapes 64x48 --sparsities 0.5 --repeats 2 --warmup 1 --threads 1 --out $R/sparse_matvec.json"
  CMD[sparse_decode]="$PYTHON benchmarks/perf/sparse_decode.py --device cpu --shape small --layers 1 --new-tokens 3 --prompt-tokens 8 --repeats 1 --calib-sequences 1 --calib-len 16 --sparsity 0.5 --out $R/sparse_decode.json"
  HIDE="${SPON_EXP_ACCEPTANCE_HIDE-hydra omegaconf wandb lm_eval datasets}"
  export OMP_NUM_THREADS=1 TRITON_INTERPRET=1
else
  MODE=gpu
  CMD[scale]="$PYTHON benchmarks/scale.py --device cuda --dtype bfloat16 --shape llama3_8b --layers $SCALE_LAYERS --out $R/scale.json"
  CMD[topk]="$PYTHON benchmarks/perf/topk.py --device cuda --dtype bfloat16 --widths 4096 14336 --rows 1 8 2048 --out $R/topk.json"
  CMD[sparse_matvec]="$PYTHON benchmarks/perf/sparse_matvec.py --device cuda --out $R/sparse_matvec.json"
  CMD[sparse_decode]="$PYTHON benchmarks/perf/sparse_decode.py --device cuda --shape llama3_8b --layers $SCALE_LAYERS --new-tokens 32 --out $R/sparse_decode.json"
  HIDE="${SPON_EXP_ACCEPTANCE_HIDE-}"
fi

# hidden packages: a sitecustomize on PYTHONPATH marks them absent (sys.modules[name] = None),
# so `import hydra` fails and importlib.util.find_spec("hydra") says "not installed"
PYPATH="$ROOT"
if [ -n "$HIDE" ]; then
  mkdir -p "$WORK/hide"
  cat >"$WORK/hide/sitecustomize.py" <<'EOF'
import os
import sys

for _name in os.environ.get("SPON_EXP_ACCEPTANCE_HIDE", "").split():
    sys.modules[_name] = None
EOF
  PYPATH="$WORK/hide:$ROOT"
fi
export SPON_EXP_ACCEPTANCE_HIDE="$HIDE"
export PYTHONPATH="$PYPATH${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

record() {  # name command budget timeout rc seconds status reason
  "$PYTHON" - "$RECORDS" "$@" <<'EOF'
import json
import sys

path, name, command, budget, timeout, rc, seconds, status, reason = sys.argv[1:]
record = {"name": name, "command": command, "budget_s": int(budget), "timeout_s": int(timeout) if timeout else None,
          "rc": int(rc) if rc else None, "seconds": round(float(seconds), 1) if seconds else None,
          "status": status, "reason": reason or None}
with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")
EOF
}

START=$(date +%s)
echo "gpu acceptance ($MODE): ${STEPS[*]}; budget ${BUDGET} s; summary -> $SUMMARY"
[ -n "$HIDE" ] && echo "hidden from every step (as on a bare GPU node): $HIDE"
for name in "${STEPS[@]}"; do
  budget=${STEP_BUDGET[$name]}
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    record "$name" "${CMD[$name]}" "$budget" "" "" "" skipped "not in --only $ONLY"
    echo "[skip] $name: not in --only"
    continue
  fi
  left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt "$MIN_START" ]; then
    record "$name" "${CMD[$name]}" "$budget" "" "" "" skipped "overall budget spent: ${left} s of ${BUDGET} s left"
    echo "[skip] $name: overall budget spent (${left} s of ${BUDGET} s left)"
    continue
  fi
  limit=$(( budget < left ? budget : left ))
  echo "[run ] $name (limit ${limit} s): ${CMD[$name]}"
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086  # the command is a word list on purpose
  # PYTEST_DISABLE_PLUGIN_AUTOLOAD: the gpu tests need no plugin, and a plugin of a hidden package would not load
  PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout --kill-after=10 "$limit" ${CMD[$name]} >"$LOGS/$name.log" 2>&1
  rc=$?
  seconds=$("$PYTHON" -c "import sys, time; print(time.time() - float(sys.argv[1]))" "$t0")
  case $rc in
    0) status=ok; reason="" ;;
    124|137) status=timeout; reason="stopped at its limit of ${limit} s" ;;
    *) status=failed; reason="exit status $rc" ;;
  esac
  record "$name" "${CMD[$name]}" "$budget" "$limit" "$rc" "$seconds" "$status" "$reason"
  printf '[%-4s] %s: %.0f s%s\n' "$status" "$name" "$seconds" "${reason:+ ($reason)}"
  [ "$status" = ok ] || tail -n 15 "$LOGS/$name.log" | sed 's/^/    /'
done

"$PYTHON" - "$RECORDS" "$SUMMARY" "$LOGS" "$R" "$MODE" "$BUDGET" "$START" "$COMMIT" "$HIDE" <<'EOF'
import json
import platform
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

records, summary, logs, results, mode, budget, start, commit, hide = sys.argv[1:]
steps = [json.loads(line) for line in Path(records).read_text().splitlines() if line.strip()]
for step in steps:
    log = Path(logs) / f"{step['name']}.log"
    if log.exists():
        step["log"] = str(log)
        lines = [line.rsplit("\r", 1)[-1] for line in log.read_text(errors="replace").split("\n")]  # progress bars: their last state
        step["log_tail"] = [line for line in lines if line.strip()][-40:]
    if step["name"] == "pytest":
        xml = Path(results) / "pytest.xml"
        if xml.exists():
            suites = ET.parse(xml).getroot()
            suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
            step["result"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    else:
        out = Path(results) / f"{step['name']}.json"
        if out.exists():
            try:
                step["result"] = json.loads(out.read_text())
            except ValueError as e:
                step["result"] = {"unreadable": str(e)}
device = {"cuda": False}
try:
    import torch

    device = {"cuda": torch.cuda.is_available(), "torch": torch.__version__,
              "name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()}
except ImportError:
    pass
counts = {s: sum(step["status"] == s for step in steps) for s in ("ok", "failed", "timeout", "skipped")}
report = {"script": "benchmarks/gpu_acceptance.sh", "mode": mode, "commit": commit,
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(start))),
          "elapsed_s": round(time.time() - int(start), 1), "budget_s": int(budget),
          "machine": {"host": platform.node(), "python": platform.python_version(), **device},
          "hidden_packages": hide.split(), "counts": counts,
          "passed": counts["failed"] == 0 and counts["timeout"] == 0, "steps": steps}
Path(summary).write_text(json.dumps(report, indent=2) + "\n")
skipped = [s["name"] for s in steps if s["status"] == "skipped"]
print(f"{counts['ok']} ok, {counts['failed']} failed, {counts['timeout']} timed out, {counts['skipped']} skipped"
      + (f" ({', '.join(skipped)})" if skipped else "") + f" in {report['elapsed_s']:.0f} s; wrote {summary}")
sys.exit(0 if report["passed"] else 1)
EOF
