"""End-to-end checks against a real local SLURM cluster (slurm/start_local_cluster.sh).

The cluster comes from the module-scoped ``slurm_cluster`` fixture in conftest.py;
these tests skip when the Slurm packages are missing unless SPON_EXP_REQUIRE_SLURM
is set (then they fail). Run: ``pytest -m slurm``.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")
from submitit.core.utils import FailedJobError  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]


def _wait(job, timeout: float = 120.0):
    """Wait for a submitit job without trusting it to ever finish."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout}s (state {job.state})")
        time.sleep(0.3)
    return job


def _executor(folder: Path):
    # Its own folder per run: job ids restart at 1 when the cluster state is
    # wiped, and submitit would read back a stale result from a reused folder.
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=1, slurm_job_name="spon-exp-test")
    return ex


def test_sinfo_with_exported_conf(slurm_cluster):
    assert os.environ["SLURM_CONF"] == str(slurm_cluster.conf)
    out = subprocess.run(
        ["sinfo", "-h", "-o", "%P %a %t %D"], check=True, capture_output=True, text=True
    ).stdout.split()
    assert out[:2] == ["debug*", "up"] and out[3] == "1", out
    assert out[2] in {"idle", "mix", "alloc"}, out


def test_start_is_idempotent(slurm_cluster):
    """A second start while running only verifies and prints the same export line."""
    res = subprocess.run(
        ["bash", str(REPO / "slurm/start_local_cluster.sh"), str(slurm_cluster.state_dir)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"export SLURM_CONF={slurm_cluster.conf}\n"
    assert "already running" in res.stderr


def test_submitit_returns_value(slurm_cluster, tmp_path):
    def add(a, b):  # nested: pickled by value, the job needn't import this module
        return a + b, os.environ.get("SLURM_JOB_ID")

    job = _executor(tmp_path / "ok").submit(add, 2, 40)
    value, job_id = _wait(job).result()
    assert value == 42
    assert job_id == str(job.job_id)
    # The result file appears before accounting catches up; sacct must get there
    # (submitit relies on it to notice cancelled/timed-out jobs).
    deadline = time.monotonic() + 60
    while job.state != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(1)
    assert job.state == "COMPLETED"


def test_submitit_failure_is_failedjoberror(slurm_cluster, tmp_path):
    def boom():
        raise ValueError("spon-exp boom")

    job = _wait(_executor(tmp_path / "fail").submit(boom))
    with pytest.raises(FailedJobError, match="spon-exp boom"):
        job.result()
