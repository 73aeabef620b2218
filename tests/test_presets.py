"""The reference presets (conf/sparsifier/*_ref.yaml): each composes what differs from its
method's default and runs the smoke experiment. The behaviour each changes has its own
hand-computed test in tests/test_sparsifiers.py (floor(T/2) tokens, the share file's plain
magnitude, WINA's transform keeping the dense logits, LaRoSA's attention rotation and ties)."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

import pytest

from spon_exp.runner import run
from tests.test_app import compose_cfg, strip_hydra

PRESETS = {
    "teal_ref": {"name": "teal", "threshold_mode": "histogram", "calibration_context": "dense", "allocation": "greedy",
                 "greedy_step": 0.025, "token_policy": "last_half", "token_rounding": "floor"},
    "wina_ref": {"name": "wina", "transform": True, "allocation": "greedy", "greedy_step": 0.025,
                 "greedy_sequences": 20, "dense_first_fraction": 0.01, "mode": "topk"},
    "rsparse_ref": {"name": "rsparse", "sparse_share": 1.0, "budget": "reference", "token_policy": "last_fraction", "token_fraction": 0.1,
                    "calibration_context": "dense"},
    "larosa_ref": {"name": "larosa", "split": "reference", "mlp_rotation": "attention", "rotation": "runtime",
                   "rotation_dtype": "float64", "ties": "keep"},
}


def test_presets_state_only_what_differs_from_the_method():
    default = {name: compose_cfg([f"sparsifier={fields['name']}"]).sparsifier for name, fields in PRESETS.items()}
    for name, fields in PRESETS.items():
        cfg = compose_cfg([f"sparsifier={name}"])
        for key, value in fields.items():
            assert cfg.sparsifier[key] == value, (name, key)
        changed = {k for k in cfg.sparsifier if cfg.sparsifier[k] != default[name][k]}
        assert changed <= set(fields) | {"label"}, (name, changed - set(fields))
        assert cfg.sparsifier.label == name
    assert compose_cfg(["sparsifier=teal_ref"]).calib.threshold_sequences == 80  # 10 x 2048 tokens at 256
    assert compose_cfg(["sparsifier=rsparse_ref"]).calib.threshold_sequences == 2  # 1 x 512 tokens at 256
    assert compose_cfg(["sparsifier=wina_ref"]).calib.threshold_sequences == 20  # the search's 20 samples
    assert compose_cfg(["sparsifier=larosa_ref"]).calib.threshold_sequences == 80
    # a command-line override still wins over the preset
    assert compose_cfg(["sparsifier=teal_ref", "sparsifier.allocation=uniform"]).sparsifier.allocation == "uniform"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_runs_the_smoke_experiment(preset, tmp_path):
    cfg = compose_cfg(["experiment=smoke", f"sparsifier={preset}", "spon.steps=2"], tmp_path)
    results = run(strip_hydra(cfg), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "ok" and saved["sparsifier"] == PRESETS[preset]["name"]
    assert saved["sparsifier_label"] == preset
    recorded = OmegaConf.load(tmp_path / "run" / "config.yaml").sparsifier
    for key, value in PRESETS[preset].items():  # the run's recorded config is the preset's
        assert recorded[key] == value, key
    ppl = results["ppl"]["wikipedia"]
    assert all(ppl[v] > 1 for v in ("dense", "sparse", "spon")), ppl
    assert results["fold"]["max_abs_logit_diff"] == 0
