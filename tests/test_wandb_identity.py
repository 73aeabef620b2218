"""W&B run identity: one id per (sweep, config), and a later attempt of an offline run
resumes into the earlier attempt's folder with the whole training history (the SLURM
requeue of this is tests/test_slurm_cluster.py)."""

from __future__ import annotations

import glob
import json

import pytest

from spon_exp.runner import run
from spon_exp.tracking.identity import RunIdentity, wandb_run_id
from tests.test_app import SMALL, compose_cfg, strip_hydra
from tests.wandb_offline import read_offline_run


def test_run_id_is_unique_per_sweep_and_stable():
    a = RunIdentity.of(compose_cfg(SMALL + ["sweep_name=first"]))
    b = RunIdentity.of(compose_cfg(SMALL + ["sweep_name=second"]))
    assert a.config_hash == b.config_hash  # sweep_name is not part of the config hash ...
    assert a.wandb_run_id != b.wandb_run_id  # ... but it is part of the W&B run id
    assert RunIdentity.of(compose_cfg(SMALL + ["sweep_name=first"])).wandb_run_id == a.wandb_run_id
    assert a.wandb_run_id == wandb_run_id("first", a.config_hash)
    assert RunIdentity.of(compose_cfg(SMALL + ["sweep_name=first", "seed=1"])).wandb_run_id != a.wandb_run_id


def test_later_attempt_resumes_the_offline_run_in_the_same_folder(tmp_path):
    """Attempt 1 is interrupted during α training (after a checkpoint); attempt 2 resumes
    training. One offline folder remains, named as attempt 1's, holding every training step
    once and the final summary."""
    import spon_exp.spon as spon_package
    from spon_exp.spon import train as train_module

    cfg = strip_hydra(compose_cfg(SMALL + ["logger=wandb_offline", "spon.steps=6", "spon.checkpoint_every=2",
                                           "sweep_name=resume"], tmp_path))
    run_dir = tmp_path / "run"
    calls = {"n": 0}

    def interrupting_on_step(original):
        def on_step(step, loss, lr):
            original(step, loss, lr)
            if step == 3:
                raise KeyboardInterrupt
        return on_step

    original_train = train_module.train_alpha

    def train_alpha(*args, on_step=None, **kwargs):
        calls["n"] += 1
        return original_train(*args, on_step=interrupting_on_step(on_step) if calls["n"] == 1 else on_step, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spon_package, "train_alpha", train_alpha)
        with pytest.raises(KeyboardInterrupt):
            run(cfg, run_dir)
        first = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
        assert len(first) == 1
        results = run(cfg, run_dir)
    assert results["status"] == "ok" and results["spon"]["resumed_from"] == 2  # the checkpoint after step 1
    folders = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert folders == first  # the same folder, now holding the resumed run
    logged = read_offline_run(glob.glob(f"{folders[0]}/*.wandb")[0])
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == list(range(6))  # metrics.jsonl: each step once
    assert len(logged["history"]["train/kl"]) == 6  # W&B: each step once, earlier attempt's steps re-logged
    assert logged["history"]["_step"][:6] == list(range(6))
    assert logged["summary"]["status"] == "ok" and logged["summary"]["ppl/wikipedia/spon"] == pytest.approx(
        results["ppl"]["wikipedia"]["spon"])
    assert logged["config"]["config_hash"] == results["config_hash"]


def test_a_lost_wandb_service_does_not_end_the_run(tmp_path, monkeypatch, caplog):
    """On preemption SLURM sends SIGTERM to every process of the job, wandb's service among
    them: logging and finishing then raise ConnectionResetError, which must neither fail the
    run nor hide the exception it is ending with."""
    from wandb.sdk.wandb_run import Run

    def lost(*args, **kwargs):
        raise ConnectionResetError("Connection lost")

    monkeypatch.setattr(Run, "log", lost)
    monkeypatch.setattr(Run, "finish", lost)
    cfg = strip_hydra(compose_cfg(SMALL + ["logger=wandb_offline"], tmp_path))
    results = run(cfg, tmp_path / "run")
    assert results["status"] == "ok"
    assert "W&B log failed (ConnectionResetError: Connection lost)" in caplog.text
    monkeypatch.setattr("spon_exp.runner._run_stages", lambda ctx: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # the run's own exception, not the tracker's
        run(cfg, tmp_path / "run2")
    assert json.loads((tmp_path / "run2" / "results.json").read_text())["status"] == "interrupted"  # Ctrl-C
    # the runs this test left unfinished would take over the next wandb.init in this process
    monkeypatch.undo()
    import wandb

    while wandb.run is not None:
        wandb.run.finish()
