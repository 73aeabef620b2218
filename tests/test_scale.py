"""benchmarks/scale.py runs (its --small mode), so the GPU measurement script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def test_scale_small_reports_every_stage(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["methods"]) == {"teal", "wina", "rsparse", "larosa"}
    for name, m in report["methods"].items():
        assert m["calibrate_s"] >= 0 and abs(m["measured_sparsity"] - 0.5) < 0.06, name
        for batch in ("1x64", "4x64"):
            assert m[f"forward_{batch}"]["ratio"] > 0
        assert report["targets"][f"{name}_sparse_over_dense_4x64"]["verdict"] in ("met", "missed")  # 1 repeat: no interval
    assert report["methods"]["rsparse"]["svd_setup_s"] >= 0
    training = report["training"]
    assert {"batch1_no_checkpointing", "batch4_no_checkpointing", "batch1_checkpointing",
            "batch4_checkpointing"} <= training.keys()
    assert training["fold"]["max_abs_logit_diff"] == 0.0
    assert report["throughput"]["dense_tokens_per_s"] > 0
    projected = report["projected_paper_run"]
    assert projected["total_s"] == sum(v for k, v in projected.items() if k != "total_s")


def _scale_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratio_interval_is_paired_and_verdicts_follow_it():
    scale = _scale_module()
    dense = [1.0, 1.2, 0.9, 1.1, 1.0, 1.3, 0.95]
    # each sparse forward 5 % slower than the dense one timed just before it: pairing removes the spread
    assert scale.ratio_interval(dense, [1.05 * d for d in dense]) == pytest.approx([1.05, 1.05])
    noisy = scale.ratio_interval(dense, [1.05, 1.2, 1.02, 1.3, 1.1, 1.25, 1.0])
    assert noisy[0] < 1.1 < noisy[1]
    assert scale.ratio_interval(dense[:2], dense[:2]) is None
    assert scale.verdict(1.05, [1.04, 1.06], 1.10) == "met"
    assert scale.verdict(1.12, [1.11, 1.13], 1.10) == "missed"
    assert scale.verdict(1.09, [1.07, 1.12], 1.10) == "at the target within noise"
    assert scale.verdict(31.0, None, 3.0) == "missed"
