"""benchmarks/scale.py runs (its --small mode), so the GPU measurement script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

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
    assert report["methods"]["rsparse"]["svd_setup_s"] >= 0
    training = report["training"]
    assert {"batch1_no_checkpointing", "batch4_no_checkpointing", "batch1_checkpointing",
            "batch4_checkpointing"} <= training.keys()
    assert training["fold"]["max_abs_logit_diff"] == 0.0
    assert report["throughput"]["dense_tokens_per_s"] > 0
    projected = report["projected_paper_run"]
    assert projected["total_s"] == sum(v for k, v in projected.items() if k != "total_s")
