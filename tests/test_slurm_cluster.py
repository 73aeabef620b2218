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


def _wait(job):
    """Wait for a submitit job; a job that never finishes is caught by the module's
    ``pytest.mark.timeout``, not by a clock in the test."""
    while not job.done():
        time.sleep(0.3)
    return job


#: SLURM's final job states other than COMPLETED: accounting will not turn them into COMPLETED
ENDED_OTHERWISE = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                   "DEADLINE"}


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
    while job.state != "COMPLETED" and job.state.split()[0] not in ENDED_OTHERWISE:
        time.sleep(1)
    assert job.state == "COMPLETED"


def test_submitit_failure_is_failedjoberror(slurm_cluster, tmp_path):
    def boom():
        raise ValueError("spon-exp boom")

    job = _wait(_executor(tmp_path / "fail").submit(boom))
    with pytest.raises(FailedJobError, match="spon-exp boom"):
        job.result()


# ---------------------------------------------------------------- spon-exp sweeps on SLURM
SLURM_SWEEP = ["--multirun", "hydra/launcher=submitit_slurm", "experiment=smoke", "hydra.launcher.cpus_per_task=1",
               "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]


def _spon_exp(*args, cwd, background=False):
    import sys

    cmd = [sys.executable, "-m", "spon_exp.cli", *args]
    if background:
        return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def _job_dirs(sweep: Path) -> set[str]:
    return {p.name for p in (sweep / ".submitit").iterdir()} if (sweep / ".submitit").exists() else set()


def test_sweep_through_submitit_slurm_and_relaunch_submits_nothing(slurm_cluster, tmp_path):
    import json

    args = [*SLURM_SWEEP, "sparsity=0.4,0.6", f"paths.outputs={tmp_path}", "sweep_name=slurm2"]
    first = _spon_exp(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = tmp_path / "sweeps" / "slurm2"
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert set(results) == {"sparsity=0.4", "sparsity=0.6"}
    for name, r in results.items():
        assert r["status"] == "ok" and r["sparsity"]["target"] == float(name.split("=")[1])
        assert r["ppl"]["wikipedia"]["spon"] > 1
        env = json.loads((sweep / name / "env.json").read_text())
        assert env["slurm"]["SLURM_JOB_ID"]  # it really ran as a SLURM job
    jobs = _job_dirs(sweep)
    second = _spon_exp(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Skipping 2 of 2 runs" in second.stdout + second.stderr
    assert _job_dirs(sweep) == jobs  # nothing was submitted


def _running_job_ids() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True).stdout.split("\n")
    return [line.split()[0] for line in out if line.strip()]


def test_preempted_training_job_is_requeued_and_resumes_to_the_same_alpha(slurm_cluster, tmp_path):
    """... and its offline W&B run resumes into the first attempt's folder, with every step once."""
    from datetime import datetime

    from safetensors.torch import load_file

    from tests.wandb_offline import read_offline_run

    common = [*SLURM_SWEEP, "spon.steps=400", "spon.checkpoint_every=2",  # ~4 s of training: time to see a checkpoint
              "logger=wandb_offline"]
    # two sweep names: the W&B id is one per (sweep, config), and two live runs may not share one
    reference = _spon_exp(*common, "sweep_name=resume_reference", f"paths.outputs={tmp_path / 'reference'}",
                          cwd=tmp_path, background=True)
    interrupted = _spon_exp(*common, "sweep_name=resume", f"paths.outputs={tmp_path / 'interrupted'}", cwd=tmp_path,
                            background=True)
    ckpts = tmp_path / "interrupted" / "cache" / "alpha"
    while not list(ckpts.glob("*/train.ckpt")):
        assert interrupted.poll() is None, interrupted.stdout.read()[-3000:]
        time.sleep(0.5)
    submitit_dir = tmp_path / "interrupted" / "sweeps" / "resume" / ".submitit"
    job_id = next(p.name.split("_")[0] for p in submitit_dir.iterdir() if p.is_dir() and p.name[0].isdigit())
    # what SLURM does on preemption: signal the job; submitit checkpoints and requeues it
    signalled_at = time.time()
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    while True:  # a requeued job waits for a begin time; start it now rather than in ~2 min
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True).stdout
        if "PENDING" in state:
            subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=False)
            break
        assert state.strip(), f"job {job_id} left the queue instead of being requeued"
        time.sleep(0.5)
    for proc in (reference, interrupted):
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    runs = {name: next((tmp_path / name / "sweeps" / sweep).glob("*/results.json")).parent
            for name, sweep in (("reference", "resume_reference"), ("interrupted", "resume"))}
    import json

    resumed = json.loads((runs["interrupted"] / "results.json").read_text())
    assert resumed["status"] == "ok" and resumed["spon"]["resumed_from"] > 0
    assert not (runs["interrupted"] / "error.txt").exists()
    a, b = load_file(str(runs["reference"] / "alpha.safetensors")), load_file(str(runs["interrupted"] / "alpha.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
    # W&B: one offline folder, the first attempt's (named by its start, before the signal), holding
    # the whole run: every training step once, as the uninterrupted reference logged them
    reference = json.loads((runs["reference"] / "results.json").read_text())
    assert resumed["config_hash"] == reference["config_hash"]  # the same run, under another sweep name
    assert resumed["wandb_run_id"] != reference["wandb_run_id"]  # the W&B id is one per (sweep, config)
    folders = sorted((runs["interrupted"] / "wandb").glob("offline-run-*"))
    assert [f.name.rsplit("-", 1)[1] for f in folders] == [resumed["wandb_run_id"]], folders
    started = datetime.strptime(folders[0].name.split("-")[2], "%Y%m%d_%H%M%S").timestamp()
    assert started < signalled_at
    logged = read_offline_run(next(folders[0].glob("*.wandb")))
    expected = read_offline_run(next((runs["reference"] / "wandb").glob("offline-run-*/*.wandb")))
    assert len(logged["history"]["train/kl"]) == len(expected["history"]["train/kl"]) == 400
    assert logged["history"]["train/kl"] == pytest.approx(expected["history"]["train/kl"], rel=1e-4, abs=1e-9)
    assert logged["summary"]["status"] == "ok" and logged["config"]["config_hash"] == resumed["config_hash"]
