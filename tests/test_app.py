"""The Hydra app: every config composes, the end-to-end run writes a complete run folder."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from spon_exp.cli import CONFIG_DIR
from spon_exp.config import ConfigError, register_configs, validate
from spon_exp.runner import run
from spon_exp.tracking.identity import alpha_key, config_hash, sparsifier_key
from spon_exp.tracking.wandb_logger import summary_from_results
from tests.wandb_offline import read_offline_run

CONF = Path(CONFIG_DIR)
GROUPS = ["model", "sparsifier", "pruner", "calib", "spon", "eval", "logger", "launcher", "experiment"]
SMALL = ["model=tiny_random", "calib.num_sequences=8", "calib.seq_len=64", "calib.threshold_sequences=4",
         "spon.steps=3", "spon.lr=0.01", "spon.batch_size=2", "eval.ppl.seq_len=64", "eval.ppl.max_sequences=4"]


def compose_cfg(overrides, tmp_path=None):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):  # what Hydra's app would fill in at launch
        cfg.hydra.runtime.cwd = str(Path.cwd())
        cfg.hydra.runtime.output_dir = str(tmp_path or Path.cwd())
        if tmp_path is not None:
            cfg.paths.outputs = str(tmp_path / "outputs")
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} interpolations
    return cfg


def strip_hydra(cfg):
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_config_file_composes(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)
    first_line = (CONF / group / f"{option}.yaml").read_text().splitlines()
    comment = [line for line in first_line[:4] if line.startswith("#") and "spon-exp" in line]
    assert comment, f"{group}/{option}.yaml must start with a comment showing a command that uses it"


def test_root_config_starts_with_a_command():
    assert "spon-exp" in (CONF / "config.yaml").read_text().splitlines()[1]


@pytest.mark.parametrize("bad", ["sparsifier=teel", "spon.cont=1", "sparsity=abc", "calib.seq_len=long"])
def test_typos_and_wrong_types_fail_at_compose_time(bad):
    with pytest.raises(ConfigCompositionException):
        compose_cfg([bad])


@pytest.mark.parametrize("override,message", [
    ("sparsity=1.5", "sparsity must be a number in"),
    ("model.path=/no/such/model", "does not exist"),
    ("calib.corpus=/no/such.txt", "does not exist"),
    ("eval.ppl.corpora=[wikipedia,nonsense]", "Unknown corpus 'nonsense'"),
    ("spon.count=-1", "spon.count must be >= 0"),
    ("eval.zeroshot.tasks=[pica]", "piqa"),
    ("eval.zeroshot.batch_size=big", "batch_size must be a positive integer, auto or auto:N"),
])
def test_validate_rejects_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg([override]))


def test_hash_ignores_logging_and_keys_follow_dependencies():
    base = compose_cfg([])
    assert config_hash(base) == config_hash(compose_cfg(["logger=none"]))
    assert config_hash(base) != config_hash(compose_cfg(["seed=1"]))
    evaluation = compose_cfg(["eval.ppl.max_sequences=8"])
    assert config_hash(base) != config_hash(evaluation)
    assert sparsifier_key(base) == sparsifier_key(evaluation) and alpha_key(base) == alpha_key(evaluation)
    lr = compose_cfg(["spon.lr=0.01"])
    assert sparsifier_key(base) == sparsifier_key(lr) and alpha_key(base) != alpha_key(lr)


def test_calibration_and_training_seeds_follow_seed_unless_set():
    from spon_exp.runner import sparsifier_kwargs
    from spon_exp.tracking.identity import RunIdentity, training_seed

    def ident(overrides):
        return RunIdentity.of(compose_cfg(overrides))

    # the default config's names from before calib.seed / spon.seed existed
    default = ident([])
    assert (default.config_hash, default.seed_group, default.sparsifier_key, default.alpha_key) == \
        ("1c2d74c8d7eebf21", "8dd731cf48f4fea2", "9b06fbece4699c65", "d9b3503ee5a3de92")
    assert ident(["seed=3", "calib.seed=3", "spon.seed=3"]) == ident(["seed=3"])  # spelled out: the same run
    seed1, crossed = ident(["seed=1"]), ident(["calib.seed=1", "spon.seed=2"])
    assert crossed.sparsifier_key == seed1.sparsifier_key  # calibrated with seed 1 either way
    assert crossed.alpha_key not in (seed1.alpha_key, default.alpha_key, ident(["seed=2"]).alpha_key)
    assert ident(["calib.seed=1", "spon.seed=1"]).alpha_key == seed1.alpha_key
    assert ident(["calib.seed=1"]).alpha_key != seed1.alpha_key  # trained with seed 0
    assert len({default.config_hash, seed1.config_hash, crossed.config_hash}) == 3
    assert crossed.seed_group == seed1.seed_group == default.seed_group  # one configuration, other seeds
    cfg = compose_cfg(["calib.seed=1", "spon.seed=2"])
    assert sparsifier_kwargs(cfg)["seed"] == 1 and training_seed(cfg) == 2


RESULT_KEYS = {"status", "error", "config_hash", "ppl", "gap_closure", "sparsity", "timings", "cache", "model",
               "sparsifier", "spon_count", "started_at", "finished_at"}


def check_results_schema(results):
    assert RESULT_KEYS <= results.keys()
    assert results["status"] == "ok" and results["error"] is None
    for corpus, values in results["ppl"].items():
        assert set(values) == {"dense", "sparse", "spon"}
        assert all(isinstance(v, float) and v > 1 for v in values.values())
        assert isinstance(results["gap_closure"][corpus], float)
    assert results["sparsity"]["target"] == 0.5
    assert abs(results["sparsity"]["measured"] - 0.5) < 0.05
    assert {"load_model", "calibrate", "train_alpha", "fold", "total"} <= results["timings"].keys()
    # folding is exact, and was checked on the first evaluation batch
    assert results["fold"]["max_abs_logit_diff"] == 0.0 and "tokens of" in results["fold"]["checked_on"]
    # every figure has its 95 % interval, around the figure
    assert results["uncertainty"]["confidence"] == 0.95
    for corpus, values in results["ppl"].items():
        for variant, value in values.items():
            lo, hi = results["ppl_ci"][corpus][variant]
            assert lo < hi and lo <= value * 1.02 and value <= hi * 1.02
        assert corpus in results["gap_closure_ci"]


def test_end_to_end_run_folder_and_offline_wandb(tmp_path):
    cfg = compose_cfg(SMALL + ["logger=wandb_offline", "eval.ppl.corpora=[wikipedia,lambada]",
                               "eval.zeroshot.tasks=[piqa]", "eval.zeroshot.limit=2"], tmp_path)
    run_dir = tmp_path / "run"
    results = run(strip_hydra(cfg), run_dir)
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results, default=str))
    check_results_schema(on_disk)
    assert set(on_disk["ppl"]) == {"wikipedia", "lambada"}
    zs = on_disk["zeroshot"]
    assert set(zs["variants"]) == {"dense", "sparse", "spon"} and zs["source"] == {"piqa": "offline"}
    assert all(0 <= zs["average"][v] <= 1 for v in zs["variants"]) and zs["lm_eval_version"]
    assert set(zs["ci"]) == {"dense", "sparse", "spon"} and set(zs["ci"]["spon"]) == {"piqa"}
    assert set(zs["average_ci"]) == {"dense", "sparse", "spon"}
    assert (run_dir / "eval_units.safetensors").exists()
    for name in ("config.yaml", "env.json", "metrics.jsonl", "alpha.safetensors", "export/sparse_state.safetensors"):
        assert (run_dir / name).exists(), name
    env = json.loads((run_dir / "env.json").read_text())
    assert env["packages"]["torch"] and "host" in env and "slurm" in env
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == [0, 1, 2]
    # the offline W&B run carries the same numbers in its summary
    run_file = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(run_file) == 1 and on_disk["wandb_run_id"] in run_file[0]
    offline = read_offline_run(run_file[0])
    assert offline["config"]["config_hash"] == on_disk["config_hash"]
    for key, value in summary_from_results(on_disk).items():
        assert offline["summary"][key] == pytest.approx(value) if isinstance(value, float) else offline["summary"][key] == value
    assert offline["config"]["sparsifier_name"] == "teal" and offline["config"]["spon_count"] == 1
    assert "zeroshot/spon/piqa" in offline["summary"] and "zeroshot/dense/avg" in offline["summary"]


def test_second_run_reuses_cached_thresholds_and_alpha(tmp_path):
    first = run(strip_hydra(compose_cfg(SMALL + ["logger=none"], tmp_path)), tmp_path / "a")
    second = run(strip_hydra(compose_cfg(SMALL + ["logger=none"], tmp_path)), tmp_path / "b")
    assert first["cache"]["sparsifier"] == "miss" and first["cache"]["alpha"] == "miss"
    assert second["cache"]["sparsifier"] == "hit" and second["cache"]["alpha"] == "hit"
    assert second["ppl"] == first["ppl"] and second["gap_closure"] == first["gap_closure"]
    # a run differing only in evaluation settings re-uses them too
    third = run(strip_hydra(compose_cfg(SMALL + ["logger=none", "eval.ppl.max_sequences=2"], tmp_path)), tmp_path / "c")
    assert third["cache"]["sparsifier"] == "hit" and third["cache"]["alpha"] == "hit"
    assert third["config_hash"] != first["config_hash"]


def test_sensitivity_check_and_a_damaged_dense_cache_is_recomputed(tmp_path):
    first = run(strip_hydra(compose_cfg(SMALL + ["logger=none", "eval.sensitivity=true"], tmp_path)), tmp_path / "a")
    sens = first["sensitivity"]
    assert sens["relative_perturbation"] == 1e-6 and set(sens["perturbed"]) == {"+1e-06", "-1e-06"}
    values = [sens["sparse"], *sens["perturbed"].values()]
    assert sens["spread"] == pytest.approx(max(values) - min(values))
    assert sens["sparse"] == first["ppl"]["wikipedia"]["sparse"]
    assert "sensitivity" in first["timings"]
    dense_dir = Path(first["cache"]["dense_key"]).name
    blocks = tmp_path / "outputs" / "cache" / "dense" / dense_dir / "blocks.safetensors"
    blocks.write_bytes(blocks.read_bytes()[:20])  # truncated
    second = run(strip_hydra(compose_cfg(SMALL + ["logger=none", "seed=1"], tmp_path)), tmp_path / "b")
    assert second["cache"]["dense"] == "miss"  # recomputed, not an error
    assert second["ppl"]["wikipedia"]["dense"] == first["ppl"]["wikipedia"]["dense"]
    third = run(strip_hydra(compose_cfg(SMALL + ["logger=none", "seed=2"], tmp_path)), tmp_path / "c")
    assert third["cache"]["dense"] == "hit"


def test_failed_run_leaves_failed_results_and_never_overwrites_another_run(tmp_path):
    cfg = strip_hydra(compose_cfg(SMALL + ["logger=none", "sparsity=1.5"], tmp_path))
    with pytest.raises(ConfigError):
        run(cfg, tmp_path / "bad")
    failed = json.loads((tmp_path / "bad" / "results.json").read_text())
    assert failed["status"] == "failed" and "sparsity must be" in failed["error"]
    ok = run(strip_hydra(compose_cfg(SMALL + ["logger=none"], tmp_path)), tmp_path / "ok")
    other = strip_hydra(compose_cfg(SMALL + ["logger=none", "seed=3"], tmp_path))
    with pytest.raises(FileExistsError, match="different config"):
        run(other, tmp_path / "ok")
    assert json.loads((tmp_path / "ok" / "results.json").read_text()) == json.loads(json.dumps(ok, default=str))


def test_dense_and_spon_off_variants(tmp_path):
    dense = run(strip_hydra(compose_cfg(SMALL + ["logger=none", "sparsifier=dense"], tmp_path)), tmp_path / "d")
    assert set(dense["ppl"]["wikipedia"]) == {"dense"} and dense["gap_closure"] == {}
    off = run(strip_hydra(compose_cfg(SMALL + ["logger=none", "spon=off"], tmp_path)), tmp_path / "o")
    assert set(off["ppl"]["wikipedia"]) == {"dense", "sparse"} and "train_alpha" not in off["timings"]


@pytest.mark.parametrize("override,message", [
    ("sparsity=1.5", "sparsity must be a number in [0, 1)"),
    ("model.path=/no/such/model", "does not exist"),
    ("sparsifier=teel", "sparsifier=teel is not a sparsifier config; choose one of: dense,"),
])
def test_cli_bad_input_exits_nonzero_with_one_clear_line(override, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spon_exp.cli", "experiment=smoke", override,
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_run_seed_seeds_the_calibration_sample(tmp_path):
    from spon_exp.runner import sparsifier_kwargs
    from spon_exp.sparsifiers import build_sparsifier
    from spon_exp.spon.fold import read_sparse_state

    cfg = strip_hydra(compose_cfg(SMALL + ["seed=3"], tmp_path))
    assert build_sparsifier(cfg.sparsifier.name, **sparsifier_kwargs(cfg)).seed == 3
    thresholds = {}
    for seed in (0, 1, 1):  # a sample of 500 values per site: the seed decides which
        overrides = SMALL + ["logger=none", f"seed={seed}", "sparsifier.max_calibration_values=500", "spon=off"]
        results = run(strip_hydra(compose_cfg(overrides, tmp_path)), tmp_path / f"run{seed}-{len(thresholds)}")
        state = read_sparse_state(tmp_path / "outputs" / "cache" / "sparsifier" / results["cache"]["sparsifier_key"])[1]
        thresholds.setdefault(seed, []).append({k: float(v) for k, v in state.items() if k.startswith("threshold.")})
    assert thresholds[1][0] == thresholds[1][1]
    assert thresholds[0][0] != thresholds[1][0]


def test_a_list_of_projections_from_the_command_line_trains_alpha_on_those_only(tmp_path):
    from safetensors.torch import load_file

    results = run(strip_hydra(compose_cfg([*SMALL, "logger=none", "spon.projections=[q_proj,up_proj]"], tmp_path)),
                  tmp_path / "run")
    assert results["status"] == "ok" and results["spon"]["projections"] == ["q_proj", "up_proj"]
    names = {key.rsplit(".", 1)[-1] for key in load_file(str(tmp_path / "run" / "alpha.safetensors"))}
    assert names == {"q_proj", "up_proj"}


def test_hydra_exclude_keys_spell_the_non_identity_keys():
    """One list: conf/config.yaml's override_dirname.exclude_keys is NON_IDENTITY_KEYS as a
    command line writes them (a group's leaves for the keys that are nodes), nothing more."""
    from spon_exp.tracking.identity import NON_IDENTITY_KEYS

    cfg = compose_cfg([])
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    expected = set()
    for key in NON_IDENTITY_KEYS:
        node = OmegaConf.select(cfg, key, throw_on_missing=False)
        schema_node = OmegaConf.is_dict(node) and key not in GROUPS and key != "local"
        expected |= {f"{key}.{leaf}" for leaf in node} if schema_node else {key}
    assert excluded == expected


def test_spon_tuned_shows_the_library_defaults():
    """conf/spon/tuned.yaml spells out the recipe, and it is the library's TrainOptions (and
    SponConfig) defaults: the README's library example trains the α spon-exp trains."""
    import dataclasses

    from spon_exp.config import SponConfig
    from spon_exp.spon.train import TrainConfig

    shown = OmegaConf.load(CONF / "spon" / "tuned.yaml")
    defaults = SponConfig()
    library = TrainConfig()
    for key, value in shown.items():
        if key == "defaults":
            continue
        assert getattr(defaults, key) == value, key
        if key in {f.name for f in dataclasses.fields(TrainConfig)}:
            assert getattr(library, key) == value, key
    assert compose_cfg([]).spon == compose_cfg(["spon=tuned"]).spon  # the CLI's default is that recipe
    earlier = compose_cfg(["spon=default"]).spon
    assert (earlier.lr, earlier.init, earlier.average, earlier.warmup_steps) == (3e-4, "zero", "none", 0)


#: The default α recipe (``spon=tuned``, the Optuna study's best: benchmarks/RESULTS.md, "SPON recipe
#: search"). ``experiment=smoke`` pins ``spon=default``, so only this test runs the default recipe.
TUNED_RECIPE = {"lr": 0.0006466422717414558, "schedule": "constant", "warmup_steps": 10, "weight_decay": 0.01,
                "init": "mean_dropped", "average": "ema", "ema_decay": 0.98, "batch_size": 1}
#: The tiny model and small sizes, and nothing of the recipe: 12 steps get past its 10 warm-up steps
DEFAULT_RECIPE_SMALL = ["model=tiny_random", "calib.num_sequences=8", "calib.seq_len=64",
                        "calib.threshold_sequences=4", "spon.steps=12", "eval.ppl.seq_len=64",
                        "eval.ppl.max_sequences=4", "logger=none"]


def test_the_default_recipe_end_to_end_trains_an_ema_of_the_iterates(tmp_path, monkeypatch):
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from spon_exp.spon import train as train_module

    iterates = []  # α after every optimiser step, as training averages it
    update = train_module.IterateAverage.update

    def recording(self, step, alpha_state):
        iterates.append({k: v.detach().clone() for k, v in alpha_state().items()})
        return update(self, step, alpha_state)

    monkeypatch.setattr(train_module.IterateAverage, "update", recording)
    cfg = compose_cfg(DEFAULT_RECIPE_SMALL, tmp_path)
    assert cfg.hydra.runtime.choices.spon == "tuned"  # the default config group, not a test override
    results = run(strip_hydra(cfg), tmp_path / "run")
    check_results_schema(results)
    assert results["spon"]["trained"] and results["spon"]["steps"] == 12 and results["spon"]["init"] == "mean_dropped"
    recorded = OmegaConf.load(tmp_path / "run" / "config.yaml").spon
    assert {k: recorded[k] for k in TUNED_RECIPE} == TUNED_RECIPE
    # constant schedule after 10 linear warm-up steps
    lrs = [e["lr"] for e in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if e["event"] == "train"]
    expected = [TUNED_RECIPE["lr"] * min(1.0, (step + 1) / 10) for step in range(12)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    # mean-dropped init: the first iterate is far from zero, where one warm-up step from a zero init would leave it
    assert len(iterates) == 12
    assert max(v.abs().max().item() for v in iterates[0].values()) > 10 * TUNED_RECIPE["lr"]
    # the α the run saved is the EMA (decay 0.98, from the first iterate on), not the last iterate
    ema = {k: v.clone() for k, v in iterates[0].items()}
    for alpha in iterates[1:]:
        for k in ema:
            ema[k] += (1 - TUNED_RECIPE["ema_decay"]) * (alpha[k] - ema[k])
    saved = load_file(str(tmp_path / "run" / "alpha.safetensors"))
    assert saved.keys() == ema.keys()
    for k in saved:
        assert torch_allclose(saved[k], ema[k])
    assert any(not torch_allclose(saved[k], iterates[-1][k]) for k in saved)


def torch_allclose(a, b) -> bool:
    import torch

    return torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-7)
