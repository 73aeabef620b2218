"""Reading runs: every ``results.json`` under a folder (and the runs of a W&B project) as one
row per run, plus the runs a Hydra sweep asked for that never wrote a result (``missing``).

A row is a plain dict of what results.json says; what else a run's folder holds (its
``config.yaml``, its evaluation units) is read through :func:`run_config` and :func:`run_units`,
each read once per folder."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import sys
from pathlib import Path

from spon_exp.evaluation.gap import gap_closure
from spon_exp.tracking.run_folder import CONFIG_FILE, UNITS_FILE

log = logging.getLogger(__name__)


def _row(results: dict, source: str) -> dict:
    model = results.get("model") or {}
    sparsity = results.get("sparsity") or {}
    zs = results.get("zeroshot") or {}
    return {
        "source": source,
        "status": results.get("status") or "unknown",
        "error": results.get("error"),
        "config_hash": results.get("config_hash"),
        "seed_group": results.get("seed_group"),
        "model": model.get("name") if isinstance(model, dict) else model,
        # a pruned run (pruner=wanda / sparsegpt, sparsifier=dense): its pruner's label; a preset: its label
        "sparsifier": ((results.get("pruner") or {}).get("label") or results.get("sparsifier_label")
                       or results.get("sparsifier")),
        "pruner": (results.get("pruner") or {}).get("label"),
        "calib_corpus": results.get("calib_corpus"),
        "spon_count": results.get("spon_count"),
        "seed": _seed_label(results),
        "seeds": results.get("seeds") or {},
        "sparsity": sparsity.get("target"),
        "measured_sparsity": sparsity.get("measured"),
        "effective_sparsity": sparsity.get("effective"),
        "ppl": results.get("ppl") or {},
        "ppl_ci": results.get("ppl_ci") or {},
        "ppl_protocol": results.get("ppl_protocol"),
        "gap_closure": _gap_closures(results),
        "gap_closure_ci": results.get("gap_closure_ci") or {},
        "zeroshot_avg": zs.get("average") or {},
        "zeroshot_avg_ci": zs.get("average_ci") or {},
        "zeroshot_recovery": zs.get("recovery"),
        "zeroshot_recovery_ci": zs.get("recovery_ci"),
        "fold_max_abs_logit_diff": (results.get("fold") or {}).get("max_abs_logit_diff"),
        "sensitivity_relative_spread": (results.get("sensitivity") or {}).get("relative_spread"),
    }


def _seed_label(results: dict):
    """The run's seed; ``0 (calib 1, spon 2)`` where ``calib.seed`` or ``spon.seed`` was set apart
    from it (a crossed sweep), so each run of the crossing is a seed of its own."""
    seed, seeds = results.get("seed"), results.get("seeds") or {}
    if seeds and (seeds.get("calib"), seeds.get("spon")) != (seed, seed):
        return f"{seed} (calib {seeds.get('calib')}, spon {seeds.get('spon')})"
    return seed


def _gap_closures(results: dict) -> dict:
    """Gap closure per corpus, recomputed from the stored perplexities (so every run is read
    with the current definition), else as stored."""
    out = dict(results.get("gap_closure") or {})
    for corpus, p in (results.get("ppl") or {}).items():
        if isinstance(p, dict) and {"dense", "sparse", "spon"} <= p.keys():
            out[corpus] = gap_closure(p["dense"], p["sparse"], p["spon"])
    return out


def _sweep_expected(sweep_dir: Path) -> tuple[list[str], dict]:
    """Run sub-folders a Hydra sweep asked for (from its multirun.yaml), and the fields
    its base config gives every run (model, sparsifier, ...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(sweep_dir / "multirun.yaml")
        params = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.params else {}
        task = list(cfg.hydra.overrides.task or [])
        dirname_cfg = cfg.hydra.job.config.override_dirname
        base = {"model": OmegaConf.select(cfg, "model.name"), "sparsifier": (OmegaConf.select(cfg, "sparsifier.label")
                                                                   or OmegaConf.select(cfg, "sparsifier.name")),
                "calib_corpus": OmegaConf.select(cfg, "calib.corpus"), "spon_count": OmegaConf.select(cfg, "spon.count"),
                "sparsity": OmegaConf.select(cfg, "sparsity")}
    except Exception:  # noqa: BLE001 - an unreadable sweep file only loses the "missing" rows
        return [], {}
    parser = OverridesParser.create()
    # a command-line override of a key the sweep file also sweeps replaces it (as in Hydra)
    by_key = {o.get_key_element(): o for o in parser.parse_overrides([f"{k}={v}" for k, v in params.items()])}
    by_key.update({o.get_key_element(): o for o in parser.parse_overrides(task)})
    axes = []
    for o in by_key.values():
        if o.is_sweep_override():
            axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([f"{o.get_key_element()}={o.get_value_element_as_str()}"])
    expected = []
    for combo in itertools.product(*axes):
        expected.append(_override_dirname(list(combo), dirname_cfg))
    return expected, base


def _override_dirname(overrides: list[str], dirname_cfg) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    items = sorted(
        f"{o.get_key_element()}{dirname_cfg.kv_sep}{o.get_value_element_as_str()}"
        for o in parsed if o.get_key_element() not in set(dirname_cfg.exclude_keys)
    )
    from spon_exp.tracking.identity import flat_dirname

    return flat_dirname(dirname_cfg.item_sep.join(items), dirname_cfg.item_sep, dirname_cfg.kv_sep)


def read_runs(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    rows = []
    for path in sorted(folder.rglob("results.json")):
        if "cache" in path.relative_to(folder).parts:
            continue
        try:
            results = json.loads(path.read_text())
            if not isinstance(results, dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            print(f"spon-exp-collect: warning: {path} is unreadable ({type(e).__name__}: {e}); listed in runs.md only",
                  file=sys.stderr)
            rows.append({**_row({}, str(path.parent)), "status": "unreadable", "error": str(e)})
            continue
        row = _row(results, str(path.parent))
        if row["status"] == "running":
            row["status"] = "incomplete"  # started, never finished (killed or still running)
        rows.append(row)
    for multirun in sorted(folder.rglob("multirun.yaml")):
        sweep = multirun.parent
        expected, base = _sweep_expected(sweep)
        for sub in expected:
            if not (sweep / sub / "results.json").exists():
                row = _row({}, str(sweep / sub))
                row.update(status="missing", error="no results.json: the run never started or was lost",
                           **{**base, **_fields_from_dirname(sub)})
                rows.append(row)
    return rows


def _fields_from_dirname(sub: str) -> dict:
    fields = {}
    for item in sub.split(","):
        key, _, value = item.partition("=")
        if key == "sparsity":
            try:
                fields["sparsity"] = float(value)
            except ValueError:
                pass
        elif key in ("model", "sparsifier"):
            fields[key] = value
        elif key == "spon.count":
            fields["spon_count"] = int(value) if value.isdigit() else value
        elif key in ("calib", "calib.corpus"):
            fields["calib_corpus"] = value
        elif key == "pruner" and value != "none":  # a missing pruned run: a row of its own, never TEAL's
            fields.update(sparsifier=f"pruned: {value}", pruner=f"pruned: {value}", spon_count=0)
    return fields


def read_wandb(project: str) -> list[dict]:
    """Rows from the runs of a W&B project (``entity/project``), via the public API."""
    import wandb

    from spon_exp.tracking.wandb_logger import results_from_summary

    rows = []
    for run in wandb.Api().runs(project):
        results = results_from_summary(dict(run.summary), dict(run.config), state=run.state, run_id=run.id)
        rows.append(_row(results, f"wandb:{project}/{run.id}"))
    return rows


@functools.lru_cache(maxsize=None)
def _units_of(source: str) -> dict | None:
    path = Path(source) / UNITS_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged file only loses the two-level interval
        log.warning("%s: unreadable (%s); its seeds are resampled without their blocks", path, e)
        return None


def run_units(row: dict) -> dict | None:
    """The run's per-block NLLs and per-document scores (``eval_units.safetensors`` in its
    folder), read once per folder; None where there are none (older runs, W&B rows)."""
    return _units_of(row["source"])


@functools.lru_cache(maxsize=None)
def _config_of(source: str):
    from omegaconf import OmegaConf

    path = Path(source) / CONFIG_FILE
    try:
        return OmegaConf.load(path) if path.is_file() else None
    except Exception:  # noqa: BLE001 - an unreadable config only fails the filters that need it
        return None


def run_config(row: dict):
    """The run's resolved config (``config.yaml`` in its folder), read once per folder; None
    without one."""
    return _config_of(row["source"])
