"""The recipe search's study survives kills, races and bad settings (spon_exp/sweeping).

A bad ``hydra.sweeper.storage`` is one line before any trial runs; two launches starting a new
SQLite study at once both finish; a re-launch after kill -9 records the killed launch's trial as
failed (it does not stay RUNNING); a trial's config error is one line and its trial.json says why.

(The study's normal course -- re-launch continues it, collect's tables: tests/test_tune.py.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from spon_exp.collect import read_studies
from tests.test_sweeps import REPO

TRIAL = ["experiment=smoke", "sparsity=0.9", "search.seeds=[0]", "hydra.sweeper.n_trials=1"]


def tune_args(tmp_path: Path, *args: str) -> list[str]:
    return ["--multirun", "-cd", str(REPO / "sweeps"), "-cn", "tune_spon_cpu", f"paths.outputs={tmp_path}", *args]


def launch(tmp_path: Path, args: list[str], patch: str = "") -> subprocess.Popen:
    script = textwrap.dedent(patch) + textwrap.dedent(f"""
        import sys
        sys.argv = ["spon-exp", *{args!r}]
        from spon_exp.cli import main
        main()
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)


def finished(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, list[str]]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, [line for line in err.splitlines() if line.strip()]


def study(tmp_path: Path, name: str = "tune_spon_cpu"):
    db = tmp_path / "sweeps" / name / "optuna.db"
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


@pytest.mark.parametrize("storage,line", [
    ("foo://host/db", "hydra.sweeper.storage=foo://host/db: unknown database 'foo'"),
    ("sqlite:///{tmp}/missing/optuna.db", "hydra.sweeper.storage=sqlite:///{tmp}/missing/optuna.db: the folder "
                                          "{tmp}/missing does not exist"),
    ("postgresql://user:secret@localhost/db", "hydra.sweeper.storage=postgresql://user:***@localhost/db needs the "
                                              "Python driver psycopg2, which is not installed"),
])
def test_a_bad_storage_is_one_line_before_any_trial_runs(storage, line, tmp_path):
    code, err = finished(launch(tmp_path, tune_args(tmp_path, *TRIAL, f"hydra.sweeper.storage={storage.format(tmp=tmp_path)}")))
    assert code == 2 and len(err) == 1 and err[0].startswith(f"spon-exp: error: {line.format(tmp=tmp_path)}"), err
    assert not list((tmp_path / "sweeps").glob("*/trial-*"))  # no trial ran
    assert "secret" not in err[0]


def test_a_trials_config_error_is_one_line_and_its_trial_json_says_why(tmp_path):
    code, err = finished(launch(tmp_path, tune_args(tmp_path, *TRIAL[:-1], "hydra.sweeper.n_trials=1", "sparsity=1.5")))
    reason = "sparsity must be a number in [0, 1), got 1.5 (e.g. sparsity=0.5 for 50 %)"
    (folder,) = (tmp_path / "sweeps" / "tune_spon_cpu").glob("trial-*")
    assert code == 2 and err == [
        f"spon-exp: error: trial 0 ({folder.name}; its trial.json says why): {reason}",
        f"spon-exp: error: no trial of the study completed; each trial folder's trial.json under "
        f"{tmp_path / 'sweeps' / 'tune_spon_cpu'} says why: fix that and re-launch (the study continues)"], err
    record = json.loads((folder / "trial.json").read_text())
    assert record["status"] == "failed" and record["error"] == reason and "sparsity=1.5" in record["overrides"]
    assert [t.state.name for t in study(tmp_path).trials] == ["FAIL"]


#: both launches reach the creation of the new study's tables together, unless one waits for the other
AT_ONCE = """
    import optuna, pathlib, time
    create = optuna.create_study
    def together(*args, **kwargs):
        here = pathlib.Path({here!r}); here.touch()
        deadline = time.time() + 15
        while not pathlib.Path({other!r}).exists() and time.time() < deadline:
            time.sleep(0.05)
        return create(*args, **kwargs)
    optuna.create_study = together
"""


def test_two_launches_at_once_on_a_new_sqlite_study_both_finish(tmp_path):
    arrived = [tmp_path / "a.arrived", tmp_path / "b.arrived"]
    procs = [launch(tmp_path, tune_args(tmp_path, *TRIAL), AT_ONCE.format(here=str(me), other=str(other)))
             for me, other in (arrived, arrived[::-1])]
    for proc in procs:
        code, err = finished(proc)
        assert code == 0, "\n".join(err[-30:])
    trials = study(tmp_path).trials
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)


def test_a_relaunch_after_kill_9_records_the_killed_trial_as_failed(tmp_path):
    ready = tmp_path / "ready"
    patch = f"""
        import pathlib, time
        from spon_exp.spon import train
        def hang(*args, **kwargs):
            pathlib.Path({str(ready)!r}).touch()
            time.sleep(300)
        train._step = hang
    """
    killed = launch(tmp_path, tune_args(tmp_path, *TRIAL), patch)
    deadline = time.time() + 180
    while not ready.exists():
        assert killed.poll() is None and time.time() < deadline, killed.communicate()[1][-3000:]
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    (running,) = study(tmp_path).trials
    assert running.state.name == "RUNNING"
    code, err = finished(launch(tmp_path, tune_args(tmp_path, *TRIAL)))
    assert code == 0, "\n".join(err[-30:])
    first, second = study(tmp_path).trials
    assert first.state.name == "FAIL" and second.state.name == "COMPLETE"
    folders = {json.loads(p.read_text())["status"]: json.loads(p.read_text())
               for p in (tmp_path / "sweeps" / "tune_spon_cpu").glob("*/trial.json")}
    assert folders["failed"]["error"] == "its launch ended (killed?) before the trial finished"
    (summary,) = read_studies(tmp_path / "sweeps")  # collect's trials table: not RUNNING for good
    assert sorted(t["state"] for t in summary["trials"]) == ["COMPLETE", "FAIL"]
