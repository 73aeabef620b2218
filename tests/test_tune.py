"""The SPON recipe search (sweeps/tune_spon*.yaml): Hydra's Optuna sweeper on a study kept
beside the sweep, trials scored on the validation split, a re-launch continuing the study,
failed trials recorded as failed, and spon-exp-collect's trials table."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest

from spon_exp.collect import main as collect_main
from spon_exp.collect import read_studies
from tests.test_sweeps import REPO, compose_sweep

TRIAL = ["experiment=smoke", "sparsity=0.9", "search.seeds=[0,1]"]  # 90 %: the tiny model has a gap to close


def tune(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "spon_exp.cli", "--multirun", "-cd", str(REPO / "sweeps"),
                           "-cn", "tune_spon_cpu", f"paths.outputs={tmp_path}", *args],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)


def study_trials(tmp_path, name="tune_spon_cpu"):
    db = tmp_path / "sweeps" / name / "optuna.db"
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials


def test_tune_sweeps_compose_search_the_recipe_on_the_validation_split():
    recipe = {"spon.lr", "spon.schedule", "spon.warmup_steps", "spon.steps", "spon.weight_decay", "spon.init",
              "spon.average", "spon.ema_decay"}
    for name in ("tune_spon_cpu", "tune_spon"):
        cfg = compose_sweep(name)
        assert cfg.eval.ppl.split == "validation" and cfg.search.seeds
        assert cfg.hydra.sweeper.direction == "maximize" and cfg.hydra.sweeper.study_name == cfg.sweep_name
        assert recipe <= set(cfg.hydra.sweeper.params)
    # the full sweep searches batch size and longer training too, over several seeds; the CPU
    # twin, sized for 2 cores, keeps batch 1 and one seed
    full = compose_sweep("tune_spon")
    assert "spon.batch_size" in full.hydra.sweeper.params and len(full.search.seeds) >= 2
    assert "250" in full.hydra.sweeper.params["spon.steps"]


def test_a_relaunch_continues_the_study_without_recomputing_a_trial(tmp_path):
    first = tune(tmp_path, "hydra.sweeper.n_trials=2", *TRIAL)
    assert first.returncode == 0, first.stderr[-3000:]
    trials = study_trials(tmp_path)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    sweep = tmp_path / "sweeps" / "tune_spon_cpu"
    (study,) = read_studies(sweep)
    assert len(study["trials"]) == 2
    for trial in study["trials"]:  # the objective is the mean validation gap closure of the trial's seeds
        folder = sweep / trial["folder"]
        record = json.loads((folder / "trial.json").read_text())
        assert record["split"] == "validation" and set(trial["seeds"]) == {"0", "1"}
        closures = []
        for seed in ("0", "1"):
            results = json.loads((folder / f"seed={seed}" / "results.json").read_text())
            assert results["ppl_protocol"]["split"] == "validation" and results["seed"] == int(seed)
            closures.append(results["gap_closure"]["wikipedia"])
        assert trial["objective"] == pytest.approx(sum(closures) / 2)
    mtimes = {p: p.stat().st_mtime_ns for p in sweep.glob("*/seed=*/results.json")}

    second = tune(tmp_path, "hydra.sweeper.n_trials=2", *TRIAL)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = study_trials(tmp_path)
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())  # the first trials were not run again
    assert len(list(sweep.glob("*/trial.json"))) == 4

    out = tmp_path / "tables"
    assert collect_main([str(sweep), "--out", str(out)]) == 0
    table = (out / "trials_tune_spon_cpu.md").read_text().splitlines()
    objectives = [float(line.split("|")[4]) for line in table[2:]]
    assert objectives == sorted(objectives, reverse=True) and len(objectives) == 4
    best = json.loads((out / "best_params_tune_spon_cpu.json").read_text())["best"]
    assert best["objective"] == pytest.approx(max(t.value for t in trials)) and best["folder"]
    assert set(best["seeds"]) == {"0", "1"}


def test_a_failed_trial_is_recorded_as_failed_not_as_zero(tmp_path):
    # at 50 % the tiny model's sparse perplexity is within 1 % of dense: no gap closure, the trial fails
    # (with no trial complete, the sweep ends in one line and exit 2, not the plugin's traceback)
    proc = tune(tmp_path, "hydra.sweeper.n_trials=1", "experiment=smoke", "sparsity=0.5", "search.seeds=[0]")
    assert proc.returncode == 2 and "no trial of the study completed" in proc.stderr
    assert "Traceback" not in proc.stderr
    (trial,) = study_trials(tmp_path)
    assert trial.state.name == "FAIL" and trial.value is None
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "sweeps" / "tune_spon_cpu").glob("*/trial.json")]
    assert record["status"] == "failed"
    (study,) = read_studies(tmp_path / "sweeps")
    assert study["failed"] == 1 and study["best"] is None


def test_a_trial_must_not_score_the_test_split(tmp_path):
    proc = tune(tmp_path, "hydra.sweeper.n_trials=1", *TRIAL, "eval.ppl.split=evaluation")
    (trial,) = study_trials(tmp_path)
    assert trial.state.name == "FAIL"
    assert "must score the validation split" in proc.stdout + proc.stderr
