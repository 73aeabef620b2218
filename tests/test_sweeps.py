"""Sweep files, experiment and launcher configs compose; re-launch skips finished runs;
collect turns run folders into tables that show failed and missing runs."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from spon_exp.cli import CONFIG_DIR
from spon_exp.collect import main as collect_main
from spon_exp.collect import read_runs
from spon_exp.config import register_configs

REPO = Path(CONFIG_DIR).parent
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


def compose_sweep(name: str, overrides=()):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "sweeps"), version_base="1.3"):
        return compose(name, overrides=[f"hydra.searchpath=[file://{CONFIG_DIR}]", *overrides],
                       return_hydra_config=True)


def _values(override) -> list:
    """A swept override's values; an Optuna ``interval`` gives its two ends."""
    from hydra.core.override_parser.types import IntervalSweep

    value = override.value()
    if isinstance(value, IntervalSweep):
        return [value.start, value.end]
    return list(override.sweep_string_iterator())


def sweep_combinations(cfg) -> list[list[str]]:
    """Every grid point of a grid sweep; for a search (Optuna sweeper, whose space is too large
    to enumerate) every value of each parameter once, the others at their first value."""
    params = cfg.hydra.sweeper.params or {}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in _values(o)] for o in parsed]
    if "optuna" not in str(cfg.hydra.sweeper.get("_target_", "")).lower():
        return [list(c) for c in itertools.product(*axes)]
    first = [axis[0] for axis in axes]
    return [first[:i] + [value] + first[i + 1:] for i, axis in enumerate(axes) for value in axis]


@pytest.mark.parametrize("sweep", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_sweep_composes_with_every_combination(sweep):
    first = sweep.read_text().splitlines()[:3]
    assert any(line.startswith("#") and f"-cn {sweep.stem}" in line for line in first), "header command missing"
    cfg = compose_sweep(sweep.stem)
    assert cfg.sweep_name == sweep.stem and cfg.skip_if_done
    combos = sweep_combinations(cfg)
    assert len(combos) >= 2
    for combo in combos:
        compose_sweep(sweep.stem, combo)


def header(sweep: Path) -> str:
    """The comment block a sweep file starts with."""
    lines = sweep.read_text().splitlines()
    return "\n".join(line for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])


@pytest.mark.parametrize("sweep", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_sweep_header_counts_its_runs_from_the_sweep_and_times_nothing(sweep):
    import re

    text = header(sweep)
    stated = re.search(r"= (\d+) runs", text)
    assert stated, f"{sweep.name}: the header says what the sweep runs: '... = N runs'"
    cfg = compose_sweep(sweep.stem)
    params = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()])
    if "optuna" in str(cfg.hydra.sweeper.get("_target_", "")).lower():
        runs = cfg.hydra.sweeper.n_trials * len(cfg.search.seeds)  # every trial runs each seed
    else:
        runs = 1
        for override in params:
            runs *= len(_values(override))
    assert int(stated.group(1)) == runs, f"{sweep.name}: the header says {stated.group(1)} runs, the sweep has {runs}"
    timed = re.search(r"\b(\d+(\.\d+)? ?(s|min|minutes?|h|hours?)|an hour|seconds)\b", text)
    assert not timed, f"{sweep.name}: the header says how long it took ({timed.group(0)!r}); timings go to RESULTS.md"


def test_every_sweep_has_a_cpu_variant():
    names = {p.stem for p in SWEEPS}
    for name in names - {n for n in names if n.endswith("_cpu")}:
        assert f"{name}_cpu" in names
        cpu = compose_sweep(f"{name}_cpu")
        assert cpu.model.path.startswith("packaged:") and cpu.model.device == "cpu"


@pytest.mark.parametrize("launcher", sorted(p.stem for p in (REPO / "conf" / "launcher").glob("*.yaml")))
def test_launchers_compose_with_their_hydra_launcher(launcher):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.spon_exp_launchers.")


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "spon_exp.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_relaunched_sweep_skips_finished_runs_and_reruns_failed(tmp_path):
    args = ["--multirun", "experiment=smoke", "sparsity=0.4,0.6", f"paths.outputs={tmp_path}", "sweep_name=t"]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    sweep = tmp_path / "sweeps" / "t"
    done = {p.parent.name: p.read_text() for p in sweep.glob("*/results.json")}
    assert set(done) == {"sparsity=0.4", "sparsity=0.6"}
    assert all(json.loads(t)["status"] == "ok" for t in done.values())
    # the dense baseline is evaluated once, by the first run, and read back by the second
    low, high = (json.loads(done[f"sparsity={s}"]) for s in ("0.4", "0.6"))
    assert (low["cache"]["dense"], high["cache"]["dense"]) == ("miss", "hit")
    assert low["ppl"]["wikipedia"]["dense"] == high["ppl"]["wikipedia"]["dense"]
    assert low["ppl_ci"]["wikipedia"]["dense"] == high["ppl_ci"]["wikipedia"]["dense"]
    assert "eval_ppl_dense" not in high["timings"]
    # mark one run failed: a re-launch must redo exactly that one
    failed = sweep / "sparsity=0.6" / "results.json"
    failed.write_text(json.dumps({**json.loads(done["sparsity=0.6"]), "status": "failed"}))
    second = run_cli(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    log = second.stdout + second.stderr
    assert "Skipping 1 of 2 runs" in log and "#0 : experiment=smoke sparsity=0.6" in log
    assert (sweep / "sparsity=0.4" / "results.json").read_text() == done["sparsity=0.4"]
    assert json.loads(failed.read_text())["status"] == "ok"
    third = run_cli(*args, cwd=tmp_path)
    assert "Skipping 2 of 2 runs" in third.stdout + third.stderr
    assert "Launching" not in third.stdout + third.stderr


def test_collect_marks_failed_and_missing_runs(tmp_path, capsys):
    args = ["--multirun", "experiment=smoke", "sparsity=0.4,0.5,1.5", f"paths.outputs={tmp_path}", "sweep_name=c"]
    proc = run_cli(*args, cwd=tmp_path)  # sparsity=1.5 fails its validation
    assert proc.returncode != 0
    sweep = tmp_path / "sweeps" / "c"
    (sweep / "sparsity=0.5" / "results.json").unlink()  # a run lost on the way
    rows = {r["source"].rsplit("/", 1)[-1]: r for r in read_runs(tmp_path / "sweeps")}
    assert rows["sparsity=0.4"]["status"] == "ok"
    assert rows["sparsity=1.5"]["status"] == "failed" and "sparsity must be" in rows["sparsity=1.5"]["error"]
    assert rows["sparsity=0.5"]["status"] == "missing" and rows["sparsity=0.5"]["model"] == "tiny-random-llama"
    out = tmp_path / "tables"
    assert collect_main([str(tmp_path / "sweeps"), "--out", str(out)]) == 0
    table = (out / "ppl_wikipedia.md").read_text()
    assert "FAILED" in table and "MISSING" in table
    lines = table.splitlines()
    assert "| sparsity | n |" in lines[0] and len(lines) == 5  # one row per configuration: 0.4, 0.5, 1.5
    ok, missing, failed = lines[2:]
    assert "| 0.40 | 1 |" in ok and "| 0.50 | 0 | MISSING |" in missing and "1 missing" in missing
    assert "| 1.50 | 0 | FAILED |" in failed and "1 failed" in failed
    assert "failed" in (out / "runs.csv").read_text()
    assert (out / "ppl_vs_sparsity_wikipedia.png").stat().st_size > 1000


def test_expected_runs_when_the_command_line_overrides_a_swept_key(tmp_path):
    # sweep file sweeps sparsity=0.25,0.5; the command line narrows it: only two runs are expected
    from omegaconf import OmegaConf

    from spon_exp.collect.runs import _sweep_expected

    cfg = {"model": {"name": "m"}, "sparsifier": {"name": "teal"}, "calib": {"corpus": "wikipedia"},
           "spon": {"count": 1}, "sparsity": 0.5,
           "hydra": {"sweeper": {"params": {"sparsity": "0.25,0.5"}},
                     "overrides": {"task": ["sparsifier=teal,wina", "sparsity=0.6", "paths.outputs=/x"]},
                     "job": {"config": {"override_dirname": {"kv_sep": "=", "item_sep": ",",
                                                             "exclude_keys": ["paths.outputs"]}}}}}
    OmegaConf.save(OmegaConf.create(cfg), tmp_path / "multirun.yaml")
    expected, base = _sweep_expected(tmp_path)
    assert sorted(expected) == ["sparsifier=teal,sparsity=0.6", "sparsifier=wina,sparsity=0.6"]
    assert base["model"] == "m"


def test_a_sweep_over_paths_gives_one_flat_folder_per_run(tmp_path):
    corpora = []
    for name in ("a", "b"):  # two corpora with the same file name in different folders
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        (folder / "corpus.txt").write_text("\n\n".join(
            f"Passage {i} of corpus {name} is about topic {i % 7} and goes on for a while." for i in range(400)))
        corpora.append(str(folder / "corpus.txt"))
    args = ["--multirun", "experiment=smoke", f"calib.corpus={','.join(corpora)}", f"paths.outputs={tmp_path}",
            "sweep_name=paths"]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = tmp_path / "sweeps" / "paths"
    runs = sorted(p.parent for p in sweep.rglob("results.json"))
    assert len(runs) == 2 and all(r.parent == sweep for r in runs)  # no nested folders
    names = sorted(r.name for r in runs)
    assert names[0] != names[1] and all(n.startswith("calib.corpus=corpus.txt~") for n in names)
    assert all(json.loads((r / "results.json").read_text())["status"] == "ok" for r in runs)
    # collect maps the sweep's expected runs onto those folders: nothing reported missing
    rows = read_runs(sweep)
    assert sorted(r["status"] for r in rows) == ["ok", "ok"]


@pytest.mark.parametrize("name", ["pruning_compare", "pruning_compare_cpu"])
def test_the_pruning_comparison_validates_on_every_grid_point(name):
    """Each point is one method: pruner=none is TEAL + SPON, a pruner runs alone (sparsifier=dense,
    no SPON); the pruner's own checks pass (the rest of validate() needs the hub for Llama-3-8B)."""
    from omegaconf import open_dict

    from spon_exp.pruning import check_pruner, pruner_of

    combos = sweep_combinations(compose_sweep(name))
    assert len(combos) == 15
    methods = set()
    for combo in combos:
        cfg = compose_sweep(name, combo)
        with open_dict(cfg):
            del cfg["hydra"]
        check_pruner(cfg)
        pruner = pruner_of(cfg)
        methods.add(pruner.label if pruner else f"{cfg.sparsifier.name} + SPON")
        assert cfg.sparsity == 0.5
        assert (cfg.sparsifier.name, cfg.spon.count) == (("dense", 0) if pruner else ("teal", 1))
        if name == "pruning_compare":  # the references' calibration: 128 x 2048 tokens of C4
            assert (cfg.model.name, cfg.calib.corpus, cfg.pruner.calib_sequences, cfg.pruner.seq_len) == \
                ("llama3-8b", "c4", 128, 2048)
    assert methods == {"teal + SPON", "sparsegpt", "sparsegpt 2:4", "wanda", "wanda 2:4"}


def test_the_paper_scale_pruning_sweep_prints_its_job_config(tmp_path):
    proc = run_cli("-cd", str(REPO / "sweeps"), "-cn", "pruning_compare", "pruner=sparsegpt_2of4", "seed=2",
                   "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: sparsegpt" in proc.stdout and "prune_n: 2" in proc.stdout and "corpus: c4" in proc.stdout
