"""Fault injection: a run killed at any stage, or interrupted in training, finishes `ok` on
the next attempt with nothing lost and each training step recorded once.

(Damaged caches, a full disk and shared caches: tests/test_faults_cache.py; bad inputs and
Ctrl-C messages: tests/test_faults_inputs.py.)"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from spon_exp.runner import run
from tests.test_app import SMALL, compose_cfg, strip_hydra

SMOKE = ["experiment=smoke", "logger=none"]


def killed_at(function: str, run_dir: Path, outputs: Path, nth: int = 1, when: str = "True",
              extra=()) -> subprocess.CompletedProcess:
    """Run the CLI with ``function`` (``module:qualname``) replaced by one that signals and
    hangs at its ``nth`` call for which ``when`` (a Python expression of ``args``) holds;
    SIGKILL the process once it hangs there."""
    module, qualname = function.split(":")
    ready = run_dir.parent / f"{run_dir.name}.ready"
    script = textwrap.dedent(f"""
        import importlib, pathlib, sys, time
        target = importlib.import_module({module!r})
        owner_name, _, attr = {qualname!r}.rpartition(".")
        owner = target
        for part in filter(None, owner_name.split(".")):
            owner = getattr(owner, part)
        original = getattr(owner, attr)
        calls = [0]
        def hang(*args, **kwargs):
            calls[0] += bool({when})
            if calls[0] == {nth} and ({when}):
                pathlib.Path({str(ready)!r}).touch()
                time.sleep(120)
            return original(*args, **kwargs)
        setattr(owner, attr, hang)
        sys.argv = ["spon-exp", *{[*SMOKE, f"hydra.run.dir={run_dir}", f"paths.outputs={outputs}", *extra]!r}]
        from spon_exp.cli import main
        main()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not ready.exists():  # a run that never reaches the fault point ends: poll() says so
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def rerun(run_dir: Path, outputs: Path, extra=()) -> dict:
    """The CLI run to its end; the results it wrote (results.json, or an attempt's beside a finished run)."""
    proc = subprocess.run([sys.executable, "-m", "spon_exp.cli", *SMOKE, f"hydra.run.dir={run_dir}",
                           f"paths.outputs={outputs}", *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(proc.stdout.strip().splitlines()[-1].removeprefix("results: ")).read_text())


FINAL_RESULTS = "str(args[1]).endswith('results.json') and '\"ok\"' in open(args[0]).read()"


@pytest.mark.parametrize("stage,nth,when", [
    ("spon_exp.sparsifiers.teal:TealSparsifier.calibrate", 1, "True"),  # during calibration
    ("spon_exp.spon:save_sparse_state", 2, "True"),  # during export (call 1: the calibration cache)
    ("spon_exp.tracking.store:os.replace", 1, FINAL_RESULTS),  # the final results.json written, not yet renamed
])
def test_kill_9_at_any_stage_then_the_next_attempt_finishes_ok(stage, nth, when, tmp_path):
    run_dir, outputs = tmp_path / "run", tmp_path / "outputs"
    killed = killed_at(stage, run_dir, outputs, nth, when)
    assert killed.returncode == -signal.SIGKILL
    left = json.loads((run_dir / "results.json").read_text())  # the file is whole, never torn
    assert left["status"] == "running"
    results = rerun(run_dir, outputs)
    assert results["status"] == "ok" and results["fold"]["max_abs_logit_diff"] == 0.0
    reference = rerun(tmp_path / "reference", tmp_path / "outputs_reference")  # never interrupted
    assert results["ppl"] == reference["ppl"]


def test_an_interrupted_training_resumes_and_logs_each_step_once(tmp_path, monkeypatch):
    overrides = SMALL + ["logger=none", "spon.steps=6", "spon.checkpoint_every=2"]
    run_dir = tmp_path / "run"
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # steps 0-3 done, checkpoint at step 4
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(strip_hydra(compose_cfg(overrides, tmp_path)), run_dir)
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    results = run(strip_hydra(compose_cfg(overrides, tmp_path)), run_dir)
    assert results["status"] == "ok" and results["spon"]["resumed_from"] == 4
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["event"] == "train"]
    assert steps == [0, 1, 2, 3, 4, 5]  # the interrupted attempt's step 4 is not kept twice
    fresh = run(strip_hydra(compose_cfg(overrides + ["paths.cache=" + str(tmp_path / "other_cache")], tmp_path)),
                tmp_path / "fresh")
    assert fresh["spon"]["final_kl"] == pytest.approx(results["spon"]["final_kl"], rel=1e-6)


def test_a_config_refused_by_the_folder_guard_leaves_the_folder_as_it_was(tmp_path):
    run_dir, outputs = tmp_path / "run", tmp_path / "outputs"
    first = rerun(run_dir, outputs)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*")
              if p.is_file() and p.name != "cli.log"}
    assert (run_dir / ".hydra" / "config.yaml").exists() and "seed: 0" in (run_dir / ".hydra" / "config.yaml").read_text()
    proc = subprocess.run([sys.executable, "-m", "spon_exp.cli", *SMOKE, "seed=5", f"hydra.run.dir={run_dir}",
                           f"paths.outputs={outputs}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "of a different config" in proc.stderr
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "cli.log"}
    assert after == before  # .hydra/, results.json and everything else untouched
    assert json.loads((run_dir / "results.json").read_text())["config_hash"] == first["config_hash"]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_killed_reattempt_leaves_every_file_of_the_finished_run_byte_identical(tmp_path):
    """A second attempt into a finished run's folder (same config, skip_if_done=false), killed
    with SIGKILL while training (its α cache is elsewhere, so it trains): results, metrics,
    config, env and .hydra of the finished run are unchanged, byte for byte; the attempt's own
    files sit beside them. A later attempt that finishes ok stays beside it too."""
    run_dir = tmp_path / "run"
    again = ["spon.steps=30", "skip_if_done=false"]
    first = rerun(run_dir, tmp_path / "outputs", extra=["spon.steps=30"])
    before = digests(run_dir)
    assert {"results.json", "metrics.jsonl", "config.yaml", "env.json", ".hydra/config.yaml",
            ".hydra/hydra.yaml", ".hydra/overrides.yaml"} <= set(before)
    killed = killed_at("spon_exp.spon.train:_step", run_dir, tmp_path / "other_outputs", nth=12, extra=again)
    assert killed.returncode == -signal.SIGKILL
    after = digests(run_dir)
    assert {k: after.get(k) for k in before} == before  # nothing of the finished run changed
    attempt = sorted(set(after) - set(before))
    assert "metrics.attempt-1.jsonl" in attempt and "results.attempt-1.json" in attempt
    assert ".hydra.attempt-1/overrides.yaml" in attempt
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.attempt-1.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert steps == list(range(11))  # the killed attempt's own log
    assert json.loads((run_dir / "results.json").read_text()) == first
    # a later attempt that finishes ok is recorded beside the run, which stays as it was
    second = rerun(run_dir, tmp_path / "third_outputs", extra=again)
    assert second["status"] == "ok" and second["started_at"] != first["started_at"]
    assert json.loads((run_dir / "results.attempt-2.json").read_text())["status"] == "ok"
    final = digests(run_dir)
    assert {k: final.get(k) for k in before} == before
    train = [json.loads(line) for line in (run_dir / "metrics.attempt-2.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert [r["step"] for r in train] == list(range(30))
