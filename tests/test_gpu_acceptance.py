"""benchmarks/gpu_acceptance.sh --dry-run: every step of the GPU acceptance runs on the CPU at
a tiny shape, without the packages a bare GPU node lacks (Hydra, OmegaConf, W&B, lm-eval,
datasets), and the one JSON summary lists each with its status; a spent budget skips the
rest and says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.sh"
STEPS = ["pytest", "scale", "topk", "sparse_matvec", "sparse_decode"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def dry_run(out: Path, *args: str, timeout: int) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    summaries = sorted(out.glob("*.json"))
    assert len(summaries) == 1, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc, json.loads(summaries[0].read_text())


def test_dry_run_runs_every_step_and_writes_one_summary(tmp_path):
    proc, summary = dry_run(tmp_path, "--budget", "300", timeout=400)
    steps = {s["name"]: s for s in summary["steps"]}
    assert proc.returncode == 0, (proc.stdout[-3000:], {n: s.get("log_tail", [])[-10:] for n, s in steps.items()})
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert summary["mode"] == "dry-run" and summary["passed"] and summary["counts"]["ok"] == len(STEPS)
    assert {"hydra", "omegaconf", "wandb", "lm_eval", "datasets"} <= set(summary["hidden_packages"])
    for name, step in steps.items():
        assert step["status"] == "ok" and step["rc"] == 0 and step["seconds"] >= 0, name
        assert step["command"] and step["timeout_s"] <= step["budget_s"], name
        assert Path(step["log"]).is_file(), name
    assert steps["pytest"]["result"]["tests"] > 0  # collected (and skipped: no CUDA)
    assert steps["scale"]["result"]["training"]["fold"]["max_abs_logit_diff"] == 0
    assert steps["topk"]["result"]["cases"] and steps["sparse_matvec"]["result"]["rows"]
    assert steps["sparse_decode"]["result"]["runs"][0]["sparse_identical_to_no_skip"] is True
    assert "5 ok" in proc.stdout


def test_a_spent_budget_skips_the_rest_and_says_so(tmp_path):
    proc, summary = dry_run(tmp_path, "--budget", "2", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [s["name"] for s in summary["steps"]] == STEPS
    for step in summary["steps"]:
        assert step["status"] == "skipped" and "budget" in step["reason"] and step["rc"] is None, step
    assert summary["counts"]["skipped"] == len(STEPS)
    assert "skipped (pytest, scale, topk, sparse_matvec, sparse_decode)" in proc.stdout
