"""SIGTERM (``kill``, or SLURM before a time limit) stops a run as Ctrl-C does: one line saying
where it stopped and how to resume, exit code 143, results.json ``interrupted``; the re-run
resumes. A SIGTERM during a checkpoint write waits until the checkpoint is whole.

(Ctrl-C: tests/test_faults_inputs.py; submitit's requeue under SLURM: tests/test_slurm_cluster.py.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from spon_exp.interrupts import SIGTERM_EXIT

SMOKE = ["experiment=smoke", "logger=none"]


def started(patch: str, args: list[str], cwd: Path) -> subprocess.Popen:
    script = textwrap.dedent(patch) + textwrap.dedent(f"""
        import sys
        sys.argv = ["spon-exp", *{args!r}]
        from spon_exp.cli import main
        main()
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd)


def rerun(args: list[str], cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "spon_exp.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def last_line(err: str) -> str:
    return [line for line in err.splitlines() if line.strip()][-1].rsplit("\r", 1)[-1]


def test_sigterm_in_training_says_where_exits_143_and_the_rerun_resumes(tmp_path):
    run_dir, ready = tmp_path / "run", tmp_path / "ready"
    args = [*SMOKE, "spon.steps=60", "spon.checkpoint_every=10", f"hydra.run.dir={run_dir}",
            f"paths.outputs={tmp_path / 'out'}"]
    patch = f"""
        import pathlib, time
        from spon_exp.spon import train
        original = train._step
        def step(*args, **kwargs):
            if args[-1] == 25:  # two checkpoints written (steps 10, 20): wait here for the signal
                pathlib.Path({str(ready)!r}).touch()
                time.sleep(120)
            return original(*args, **kwargs)
        train._step = step
    """
    proc = started(patch, args, tmp_path)
    deadline = time.time() + 120
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    message = "SIGTERM: interrupted at step 25; re-run the same command to resume from step 20"
    assert proc.returncode == SIGTERM_EXIT == 143, err[-3000:]
    assert last_line(err) == f"spon-exp: {message}" and "Traceback" not in err, err[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and results["error"] == message
    rerun(args, tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "ok" and results["spon"]["resumed_from"] == 20


def test_sigterm_outside_training_names_the_stage(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMOKE, f"hydra.run.dir={run_dir}", f"paths.outputs={tmp_path / 'out'}"]
    patch = """
        import os, signal
        from spon_exp.sparsifiers.teal import TealSparsifier
        original = TealSparsifier.calibrate
        def calibrate(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return original(self, *args, **kwargs)
        TealSparsifier.calibrate = calibrate
    """
    proc = started(patch, args, tmp_path)
    _, err = proc.communicate(timeout=180)
    message = ("SIGTERM: interrupted during calibrate; re-run the same command to continue "
               "(calibration and finished stages are cached)")
    assert proc.returncode == 143 and [x for x in err.splitlines() if x.strip()] == [f"spon-exp: {message}"], err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and results["error"] == message


def test_sigterm_during_a_checkpoint_write_waits_for_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMOKE, "spon.steps=30", "spon.checkpoint_every=10", f"hydra.run.dir={run_dir}",
            f"paths.outputs={tmp_path / 'out'}"]
    patch = """
        import os, signal
        from spon_exp.spon import train
        original = train.write_entry
        def write_entry(folder, fill, **kwargs):
            def slow_fill(tmp):
                os.kill(os.getpid(), signal.SIGTERM)  # arrives halfway through the write
                fill(tmp)
            return original(folder, slow_fill, **kwargs)
        train.write_entry = write_entry
    """
    proc = started(patch, args, tmp_path)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-3000:]
    assert last_line(err) == "spon-exp: SIGTERM: interrupted at step 9; re-run the same command to resume from step 10"
    rerun(args, tmp_path)
    assert json.loads((run_dir / "results.json").read_text())["spon"]["resumed_from"] == 10
