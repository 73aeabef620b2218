"""Every file of a finished run is immutable (spon_exp/tracking/run_folder.py).

Case 1 of issue 33: a run finished on a local model folder; the folder's weights re-saved (another
random init); the same config re-run into the same run folder with a fresh cache, killed with
SIGKILL while it evaluates the +SPON model. Every file of the finished run keeps its bytes and its
mtime, although the killed attempt trained another α. Also: the same command twice skips the
finished run; two processes cannot write one folder at once; a folder holding files spon-exp did
not write is refused.

(Kills in every stage and the attempt files: tests/test_faults.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spon_exp.models.loading import _load_tiny_random
from tests.test_faults import SMOKE, killed_at

KILLED_IN_SPON_EVAL = ("spon_exp.evaluation.session:Evaluation.run", "args[1] == 'spon'")


def save_model(folder: Path, seed: int) -> None:
    tiny = _load_tiny_random("tiny-random:llama", torch.float32, seed=seed)
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)


def state(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: its sha256 and its mtime (ns)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spon_exp.cli", *SMOKE, *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_a_killed_reattempt_on_resaved_weights_leaves_the_finished_run_untouched(tmp_path):
    model, run_dir = tmp_path / "model", tmp_path / "run"
    save_model(model, seed=0)
    first = cli([f"model.path={model}", f"hydra.run.dir={run_dir}", f"paths.outputs={tmp_path / 'out'}"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    finished = state(run_dir)
    assert {"alpha.safetensors", "eval_units.safetensors", "export/sparse_state.safetensors", "results.json"} <= \
        set(finished)
    save_model(model, seed=1)  # the same path, other weights: the same config
    function, when = KILLED_IN_SPON_EVAL
    killed = killed_at(function, run_dir, tmp_path / "fresh", when=when,
                       extra=[f"model.path={model}", "skip_if_done=false"])
    assert killed.returncode == -signal.SIGKILL
    now = state(run_dir)
    assert {name: now.get(name) for name in finished} == finished  # bytes and mtimes
    attempt = json.loads((run_dir / "results.attempt-1.json").read_text())
    assert attempt["status"] == "running" and attempt["attempt"] == 1
    # the killed attempt did train another α: the finished run's would have changed
    assert now["alpha.attempt-1.safetensors"][0] != finished["alpha.safetensors"][0]


def test_the_same_command_twice_skips_the_finished_run_and_says_so(tmp_path):
    args = [f"hydra.run.dir={tmp_path / 'run'}", f"paths.outputs={tmp_path / 'out'}"]
    assert cli(args, tmp_path).returncode == 0
    finished = state(tmp_path / "run")
    again = cli(args, tmp_path)
    assert again.returncode == 0 and again.stdout.startswith(f"spon-exp: {tmp_path / 'run'} holds a finished run "
                                                             f"of this config: skipped")
    assert state(tmp_path / "run") == finished  # cli.log included


HANG_IN_TRAINING = """
    import pathlib, time
    from spon_exp.spon import train
    original = train._step
    def step(*args, **kwargs):
        if args[-1] == 2:
            pathlib.Path({ready!r}).touch()
            time.sleep(300)
        return original(*args, **kwargs)
    train._step = step
"""


def test_a_second_process_refuses_a_folder_being_written_in_one_line(tmp_path):
    from tests.test_faults_inputs import in_subprocess

    run_dir, ready = tmp_path / "run", tmp_path / "ready"
    args = [*SMOKE, f"hydra.run.dir={run_dir}", f"paths.outputs={tmp_path / 'out'}"]
    writer = in_subprocess(HANG_IN_TRAINING.format(ready=str(ready)), args, tmp_path)
    try:
        import time

        deadline = time.time() + 180
        while not ready.exists():
            assert writer.poll() is None and time.time() < deadline, writer.communicate()[1][-3000:]
            time.sleep(0.1)
        during = state(run_dir)
        second = cli(args[len(SMOKE):], tmp_path)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
        assert lines[0].startswith(f"spon-exp: error: {run_dir} is being written by another spon-exp run "
                                   f"(pid {writer.pid} on ")
        assert state(run_dir) == during  # the second process wrote nothing
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.communicate(timeout=60)
    third = cli(args[len(SMOKE):], tmp_path)  # kill -9 released the lock
    assert third.returncode == 0, third.stderr[-3000:]


@pytest.mark.parametrize("files,named", [
    ({"results.json": '{"accuracy": 0.91}', "config.yaml": "lr: 0.1\n"}, "results.json and 1 more"),
    ({"config.yaml": "lr: 0.1\n"}, "config.yaml"),
    ({"notes.txt": "mine"}, "notes.txt"),
])
def test_a_folder_holding_files_spon_exp_did_not_write_is_refused(files, named, tmp_path):
    run_dir = tmp_path / "theirs"
    run_dir.mkdir()
    for name, text in files.items():
        (run_dir / name).write_text(text)
    before = state(run_dir)
    proc = cli([f"hydra.run.dir={run_dir}", f"paths.outputs={tmp_path / 'out'}"], tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == [f"spon-exp: error: {run_dir} holds {named}, which spon-exp did not "
                                              f"write: choose another hydra.run.dir (or empty that folder)"], lines
    assert {k: v for k, v in state(run_dir).items() if not k.endswith(".log")} == before
    assert not os.path.exists(run_dir / ".hydra")
