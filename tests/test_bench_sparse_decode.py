"""benchmarks/perf/sparse_decode.py's random-model path (the one --device cuda runs) on a tiny
shape on the CPU, so the GPU measurement script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "perf" / "sparse_decode.py"


def test_random_model_decode_benchmark_runs_small(tmp_path):
    out = tmp_path / "decode.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "small", "--new-tokens", "4", "--repeats", "1",
                           "--prompt-tokens", "6", "--calib-sequences", "2", "--calib-len", "64", "--batch", "1", "3",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["batch"], r["execution"]) for r in report["runs"]] == [(1, "eager"), (3, "eager")]
    for row in report["runs"]:
        assert set(row["tokens_per_s"]) == {"dense", "masked", "sparse", "sparse_no_skip"}
        assert all(v > 0 for v in row["tokens_per_s"].values())
        assert row["sparse_identical_to_no_skip"] is True
        assert abs(row["measured_sparsity_decode"] - 0.5) < 0.1
        assert row["sparse_vs_masked_first_step_max_abs_logit_diff"] < 1e-4
