"""benchmarks/perf/topk.py runs on a tiny case on the CPU (its --device cuda path times the Triton
kernel the same way), so the measurement script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "perf" / "topk.py"


def test_topk_benchmark_runs_small(tmp_path):
    from spon_exp.kernels import select

    if not select.available():
        pytest.skip("no C compiler: the CPU kernel it times is unavailable")
    out = tmp_path / "topk.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--widths", "64", "96", "--rows", "32", "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(c["rows"], c["width"]) for c in report["cases"]] == [(32, 64), (32, 96)]
    for case in report["cases"]:
        assert case["matmul_s"] > 0 and case["torch_s"] > 0 and case["kernel_s"] > 0
        assert case["kernel_speedup_over_torch"] == case["torch_s"] / case["kernel_s"]
