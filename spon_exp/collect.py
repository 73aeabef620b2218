"""``spon-exp-collect``: many runs -> paper-shaped tables (Markdown + CSV) and plots.

Reads every ``results.json`` under a folder (and optionally the runs of a W&B project),
and for each Hydra sweep folder (one with ``multirun.yaml``) also lists the runs the sweep
asked for that never wrote a result, so missing and failed runs show as such.

Values with a 95 % interval in the run's results show as ``30.58 ± 0.90`` (± the half-width;
the interval may be asymmetric, so the CSVs carry its exact ends as ``*_ci_low`` /
``*_ci_high`` columns); runs written before intervals existed show the plain number.

    spon-exp-collect outputs/sweeps/sparsity_curve_cpu --out outputs/tables/sparsity_curve_cpu
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

from spon_exp.tracking.intervals import format_with_interval, interval

log = logging.getLogger(__name__)

ROW_KEYS = ("model", "sparsifier", "calib_corpus", "spon_count")
VARIANTS = ("dense", "sparse", "spon")


# ----------------------------------------------------------------------- reading
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
        "sparsifier": results.get("sparsifier_label") or results.get("sparsifier"),  # a preset: its label
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
    from spon_exp.evaluation.perplexity import gap_closure

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


def mark_duplicates(rows: list[dict]) -> None:
    """A finished run of one configuration and seed found twice (a copied folder, one
    configuration in two sweeps, a local folder read with its W&B project) counts once: the
    later copy's status becomes ``duplicate``, with a one-line warning naming both places."""
    from spon_exp.evaluation.pairing import duplicates

    def identity(row: dict):
        if row["status"] != "ok":
            return None
        return row.get("config_hash") or (_group_key(row), str(row["seed"]))

    for first, again in duplicates(rows, identity):
        again.update(status="duplicate", error=f"the same configuration and seed as {first['source']}")
        print(f"spon-exp-collect: warning: seed {again['seed']} of configuration "
              f"{str(again.get('seed_group') or again.get('config_hash'))[:8]} found twice ({first['source']} and "
              f"{again['source']}); counted once", file=sys.stderr)


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


# ----------------------------------------------------------------------- tables
def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _fmt(x, digits=2) -> str:
    if _missing(x):
        return "-"
    return f"{x:.{digits}f}"


def _pm(x, ci, digits=2) -> str:
    """``30.58 ± 0.90``: the value and the half-width ``(hi - lo) / 2`` of its interval, or
    the plain value when the run has no interval (older runs)."""
    return "-" if _missing(x) else format_with_interval(x, ci, digits)


def _pct(x, ci) -> str:
    """A fraction in percent, ``55.9 % ± 4.1`` with an interval; without one the plain
    ``56 %`` these tables always showed (so tables of older runs do not change)."""
    if _missing(x):
        return "-"
    if interval(ci) is None:
        return f"{x * 100:.0f} %"
    return format_with_interval(x, ci, 1, 100, " %")


def _g(x) -> str:
    return "-" if _missing(x) else f"{x:.3g}"


def _ci_columns(*names: str) -> list[str]:
    return [c for n in names for c in (n, f"{n}_ci_low", f"{n}_ci_high")]


def _exact(x, ci) -> list:
    """Values of :func:`_ci_columns`: the numbers as stored (blank where absent), not the
    rounded text of the Markdown table."""
    if _missing(x):
        return [None, None, None]
    return [x, *(interval(ci) or (None, None))]


def _key(row: dict) -> tuple:
    return tuple(str(row.get(k)) for k in ROW_KEYS)


# ---------------------------------------------------------------- seed groups
def _group_key(row: dict) -> tuple:
    """Runs that differ only in their seed: the same ``seed_group`` (results.json records it);
    runs written before it existed group by the table's row keys and sparsity."""
    return (*_key(row), row["sparsity"], row.get("seed_group"))


def seed_groups(rows: list[dict]) -> list[list[dict]]:
    """The rows of each configuration, seeds together, in table order. A run the sweep expected
    but never wrote (no seed group known) joins the one configuration of its row keys and
    sparsity where there is exactly one. Unreadable results.json files name no configuration:
    they are in the runs table only."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["status"] == "unreadable":
            continue
        groups[_group_key(r)].append(r)
    for key in [k for k in groups if k[-1] is None]:
        homes = [k for k in groups if k[:-1] == key[:-1] and k[-1] is not None]
        if len(homes) == 1:
            groups[homes[0]] += groups.pop(key)
    return [sorted(groups[k], key=lambda r: str(r["seed"]))
            for k in sorted(groups, key=lambda k: (*k[:-2], k[-2] if k[-2] is not None else -1, str(k[-1])))]


#: config keys the tables show in columns of their own, or that never name a configuration
SHOWN_OR_NOT_A_SETTING = ("seed", "sparsity", "model.name", "sparsifier.name", "sparsifier.label", "sparsifier.sparsity",
                          "calib.corpus", "spon.count", "spon.checkpoint_every")


def _flat_settings(row: dict) -> dict | None:
    """The run's identity settings (``config.yaml`` in its folder, minus logging, launcher and
    path keys) as ``{dotted.key: value}``; None where the folder has no readable config."""
    from omegaconf import OmegaConf

    from spon_exp.tracking.identity import NON_IDENTITY_KEYS

    cfg = _run_config(row)
    if cfg is None:
        return None
    out: dict = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    container = OmegaConf.to_container(cfg, resolve=False)
    walk({k: v for k, v in container.items() if k not in NON_IDENTITY_KEYS and k != "hydra"}, "")
    return {k: v for k, v in out.items() if k not in SHOWN_OR_NOT_A_SETTING}


def _setting_text(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_setting_text(v) for v in value) + "]"
    text = str(value)
    return text.replace("\\", "/").rsplit("/", 1)[-1] if "/" in text or "\\" in text else text


def group_settings(groups: list[list[dict]]) -> list[str]:
    """Per configuration, the settings that tell it apart from the table's other configurations
    of the same model, sparsifier, calibration corpus and SPON count (``spon.lr=0.0003
    spon.average=none``): the keys whose values differ between their ``config.yaml`` files;
    ``-`` where none differ or the runs have no config (W&B rows)."""
    flats = [_flat_settings(g[0]) for g in groups]
    differing: dict[tuple, list[str]] = {}
    for key in {_key(g[0]) for g in groups}:
        known = [f for g, f in zip(groups, flats) if f is not None and _key(g[0]) == key]
        names = sorted({k for f in known for k in f})
        differing[key] = [k for k in names if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in known}) > 1]
    return [" ".join(f"{k}={_setting_text(f.get(k))}" for k in differing[_key(g[0])]) or "-" if f is not None else "-"
            for g, f in zip(groups, flats)]


def _units(row: dict) -> dict | None:
    """The run's per-block NLLs and per-document scores (``eval_units.safetensors`` in its
    folder), read once; None where there are none (older runs, W&B rows)."""
    if "_units" not in row:
        from spon_exp.runner import UNITS_FILE

        path = Path(row["source"]) / UNITS_FILE
        row["_units"] = None
        if path.is_file():
            from safetensors.torch import load_file

            try:
                row["_units"] = load_file(str(path))
            except Exception as e:  # noqa: BLE001 - a damaged file only loses the two-level interval
                log.warning("%s: unreadable (%s); its seeds are resampled without their blocks", path, e)
    return row["_units"]


def _seed_run(row: dict, corpus: str):
    from spon_exp.evaluation.perplexity import BlockNLL
    from spon_exp.evaluation.seeds import SeedRun

    ppl = {v: x for v, x in row["ppl"].get(corpus, {}).items() if v in VARIANTS and not _missing(x)}
    units = _units(row)
    blocks = None
    if units is not None and all(f"{corpus}.{v}.nll" in units for v in ppl):
        blocks = {v: BlockNLL.from_state(units, f"{corpus}.{v}") for v in ppl}
    return SeedRun(row["seed"], ppl, blocks, row.get("ppl_protocol"))


def _bootstrap():
    from spon_exp.evaluation.uncertainty import Bootstrap

    return Bootstrap()


def group_summary(group: list[dict], corpus: str) -> dict:
    """One configuration on one corpus: its ok runs aggregated over seeds
    (:func:`spon_exp.evaluation.seeds.aggregate`). A single run keeps the interval it stored
    (over its evaluation blocks), so the table agrees with the run's own summary."""
    from spon_exp.evaluation.seeds import aggregate

    def stored_ci(row: dict, name: str):
        if name == "gap_closure":
            return row["gap_closure_ci"].get(corpus)
        return (row["ppl_ci"].get(corpus) or {}).get(name.split("/", 1)[1])

    ok = [r for r in group if r["status"] == "ok" and corpus in r["ppl"]]
    out = _over_seeds(group, ok, lambda runs: aggregate([_seed_run(r, corpus) for r in runs], _bootstrap()),
                      stored_ci, "blocks")
    if not ok:
        return out
    for key in ("measured_sparsity", "effective_sparsity"):
        values = [r[key] for r in ok if not _missing(r[key])]
        out[key] = sum(values) / len(values) if values else None
    return out


def _over_seeds(group: list[dict], ok: list[dict], aggregate_runs, stored_ci, units: str) -> dict:
    """What :func:`group_summary` and :func:`zeroshot_summary` share: the group's runs that
    did not finish, counted by status, and ``aggregate_runs(ok)`` of the finished ones. A single
    run keeps the intervals it stored (``stored_ci(row, statistic)``, over its ``units``), so
    the table agrees with the run's own summary."""
    not_ok = Counter(r["status"] for r in group if r["status"] != "ok")
    out = {"rows": ok, "not_ok": dict(not_ok), "n": len(ok)}
    if not ok:
        return out
    agg = aggregate_runs(ok)
    if len(ok) == 1:
        for name, stat in agg["statistics"].items():
            stored = interval(stored_ci(ok[0], name))
            stat["ci"] = list(stored) if stored else None
        agg["covers"] = units if any(s["ci"] for s in agg["statistics"].values()) else "none"
    out.update(agg)
    return out


def _stat(summary: dict, name: str) -> dict:
    return (summary.get("statistics") or {}).get(name) or {}


PPL_COLUMNS = ("dense", "sparse", "+SPON")


def ppl_tables(rows: list[dict]) -> dict[str, list[list[str]]]:
    """One table per evaluation corpus, one row per configuration (its seeds aggregated):
    ``n`` seeds, each variant's mean perplexity ± half its 95 % interval, the mean gap closure
    with its interval, the between-seed SD of the gap closure (in points), measured and
    effective sparsity, what the interval resamples, and runs that did not finish."""
    corpora = sorted({c for r in rows for c in r["ppl"]}) or ["(none)"]
    header = [*ROW_KEYS, "sparsity", "n", *PPL_COLUMNS, "gap closure", "gap SD (pts)", "measured", "effective",
              "interval over", "seed_group", "not ok", "settings"]
    tables = {}
    groups = seed_groups(rows)
    settings = group_settings(groups)
    for corpus in corpora:
        body = []
        for group, differs in zip(groups, settings):
            summary = group_summary(group, corpus)
            if not summary["n"] and not summary["not_ok"]:
                continue  # ok runs that did not evaluate this corpus
            first = group[0]
            not_ok = ", ".join(f"{n} {status}" for status, n in sorted(summary["not_ok"].items()))
            if summary["n"]:
                cells = [_pm(_stat(summary, f"ppl/{v}").get("mean"), _stat(summary, f"ppl/{v}").get("ci"))
                         for v in VARIANTS]
                gap = _stat(summary, "gap_closure")
                cells += [_pct(gap.get("mean"), gap.get("ci")),
                          "-" if gap.get("sd") is None else f"{gap['sd'] * 100:.1f}",
                          _fmt(summary["measured_sparsity"], 3), _fmt(summary["effective_sparsity"], 3),
                          summary["covers"]]
            else:
                status = sorted(summary["not_ok"])[0].upper()
                cells = [status, status, status, "-", "-", "-", "-", "-"]
            body.append([*_key(first), _fmt(first["sparsity"]), str(summary["n"]), *cells,
                         str(first.get("seed_group") or "-")[:8], not_ok or "-", differs])
        tables[f"ppl_{corpus}"] = [header, *body]
    return tables


def ppl_csv_tables(rows: list[dict]) -> dict[str, list[list]]:
    """The CSV twin of :func:`ppl_tables`: per configuration the exact mean, interval ends and
    between-seed SD of each perplexity and the gap closure (a fraction), blank where absent."""
    corpora = sorted({c for r in rows for c in r["ppl"]}) or ["(none)"]
    stats = [*(f"ppl/{v}" for v in VARIANTS), "gap_closure"]
    columns = [c for name in stats for c in (_csv_name(name), f"{_csv_name(name)}_ci_low",
                                             f"{_csv_name(name)}_ci_high", f"{_csv_name(name)}_sd")]
    header = [*ROW_KEYS, "sparsity", "seed_group", "n", "seeds", *columns, "measured_sparsity", "effective_sparsity",
              "interval_over", "not_ok", "settings"]
    tables = {}
    groups = seed_groups(rows)
    settings = group_settings(groups)
    for corpus in corpora:
        body = []
        for group, differs in zip(groups, settings):
            summary = group_summary(group, corpus)
            if not summary["n"] and not summary["not_ok"]:
                continue
            values = []
            for name in stats:
                st = _stat(summary, name)
                values += [*_exact(st.get("mean"), st.get("ci")), st.get("sd")]
            first = group[0]
            body.append([*_key(first), first["sparsity"], first.get("seed_group"), summary["n"],
                         " ".join(str(r["seed"]) for r in summary["rows"]), *values,
                         summary.get("measured_sparsity"), summary.get("effective_sparsity"), summary.get("covers"),
                         " ".join(f"{n} {s}" for s, n in sorted(summary["not_ok"].items())), differs])
        tables[f"ppl_{corpus}"] = [header, *body]
    return tables


def _csv_name(statistic: str) -> str:
    return statistic.split("/", 1)[1] if statistic.startswith("ppl/") else statistic


def ppl_seed_csv_tables(rows: list[dict]) -> dict[str, list[list]]:
    """Every run's own values (one row per seed): the exact numbers behind the aggregated
    table, each with the interval over its evaluation blocks."""
    corpora = sorted({c for r in rows for c in r["ppl"]}) or ["(none)"]
    header = [*ROW_KEYS, "sparsity", "seed_group", "seed", "status", *_ci_columns(*VARIANTS, "gap_closure"),
              "measured_sparsity", "effective_sparsity", "source"]
    tables = {}
    for corpus in corpora:
        body = []
        for r in sorted(rows, key=lambda r: (_key(r), r["sparsity"] or 0, str(r.get("seed_group")), str(r["seed"]))):
            if r["status"] == "ok" and corpus not in r["ppl"]:
                continue
            p, ci = r["ppl"].get(corpus, {}), r["ppl_ci"].get(corpus) or {}
            values = [x for v in VARIANTS for x in _exact(p.get(v), ci.get(v))]
            values += _exact(r["gap_closure"].get(corpus), r["gap_closure_ci"].get(corpus))
            body.append([*_key(r), r["sparsity"], r.get("seed_group"), r["seed"], r["status"], *values,
                         r["measured_sparsity"], r["effective_sparsity"], r["source"]])
        tables[f"ppl_{corpus}_seeds"] = [header, *body]
    return tables


def _zeroshot_seed_run(row: dict):
    from spon_exp.evaluation.seeds import ZeroshotSeedRun

    average = {v: x for v, x in row["zeroshot_avg"].items() if v in VARIANTS and not _missing(x)}
    units = _units(row)
    items = None
    if units is not None:
        found = {v: {k.split(".", 2)[2]: t for k, t in units.items() if k.startswith(f"zeroshot.{v}.")} for v in average}
        if all(found.values()):
            items = found
    return ZeroshotSeedRun(row["seed"], average, items)


def zeroshot_summary(group: list[dict]) -> dict:
    """One configuration's zero-shot figures over its seeds (as :func:`group_summary`)."""
    from spon_exp.evaluation.seeds import aggregate_zeroshot

    def stored_ci(row: dict, name: str):
        return row["zeroshot_recovery_ci"] if name == "recovery" else row["zeroshot_avg_ci"].get(name.split("/", 1)[1])

    ok = [r for r in group if r["status"] == "ok" and r["zeroshot_avg"]]
    return _over_seeds(group, ok, lambda runs: aggregate_zeroshot([_zeroshot_seed_run(r) for r in runs], _bootstrap()),
                       stored_ci, "documents")


def _zeroshot_groups(rows: list[dict]) -> list[tuple[list[dict], dict]]:
    groups = [(g, zeroshot_summary(g)) for g in seed_groups(rows)]
    return [(g, z) for g, z in groups if z["n"] or (z["not_ok"] and any(not r["zeroshot_avg"] for r in g))]


def zeroshot_table(rows: list[dict]) -> list[list[str]]:
    """One row per configuration: ``n`` seeds, the mean task average of each variant and the
    mean recovery, each ± half its interval over seeds and documents, the recovery's
    between-seed SD (points)."""
    header = [*ROW_KEYS, "sparsity", "n", "dense", "sparse", "+SPON", "recovery", "recovery SD (pts)",
              "interval over", "not ok"]
    body = []
    for group, z in _zeroshot_groups(rows):
        st = z.get("statistics") or {}
        rec = st.get("recovery") or {}
        cells = [_pm((st.get(f"average/{v}") or {}).get("mean"), (st.get(f"average/{v}") or {}).get("ci"), 4)
                 for v in VARIANTS]
        body.append([*_key(group[0]), _fmt(group[0]["sparsity"]), str(z["n"]), *cells,
                     _pct(rec.get("mean"), rec.get("ci")), "-" if rec.get("sd") is None else f"{rec['sd'] * 100:.1f}",
                     z.get("covers", "-"), ", ".join(f"{n} {s}" for s, n in sorted(z["not_ok"].items())) or "-"])
    return [header, *body]


def zeroshot_csv_table(rows: list[dict]) -> list[list]:
    """The CSV twin of :func:`zeroshot_table`: exact means, interval ends and SDs; recovery as a
    fraction."""
    names = [*(f"average/{v}" for v in VARIANTS), "recovery"]
    cols = [c for n in names for c in (n.split("/")[-1], f"{n.split('/')[-1]}_ci_low", f"{n.split('/')[-1]}_ci_high",
                                       f"{n.split('/')[-1]}_sd")]
    header = [*ROW_KEYS, "sparsity", "seed_group", "n", "seeds", *cols, "interval_over"]
    body = []
    for group, z in _zeroshot_groups(rows):
        st = z.get("statistics") or {}
        values = []
        for n in names:
            x = st.get(n) or {}
            values += [*_exact(x.get("mean"), x.get("ci")), x.get("sd")]
        body.append([*_key(group[0]), group[0]["sparsity"], group[0].get("seed_group"), z["n"],
                     " ".join(str(r["seed"]) for r in z["rows"]), *values, z.get("covers")])
    return [header, *body]


def runs_table(rows: list[dict]) -> list[list[str]]:
    header = ["status", *ROW_KEYS, "seed", "sparsity", "measured", "effective", "fold_max_abs_logit_diff",
              "sensitivity_relative_spread", "config_hash", "seed_group", "error", "source"]
    return [header, *[[r["status"], *_key(r), str(r["seed"]), _fmt(r["sparsity"]), _fmt(r["measured_sparsity"], 3),
                       _fmt(r["effective_sparsity"], 3), _g(r["fold_max_abs_logit_diff"]),
                       _g(r["sensitivity_relative_spread"]), str(r["config_hash"]), str(r.get("seed_group") or "-"),
                       (r["error"] or "")[:120], r["source"]] for r in rows]]


def to_markdown(table: list[list[str]]) -> str:
    header, *body = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    runs = runs_table(rows)
    tables = {"runs": runs, **ppl_tables(rows), **seed_variance_tables(rows)}
    csv_tables = {"runs": runs, **ppl_csv_tables(rows)}
    if any(r["zeroshot_avg"] for r in rows):
        tables["zeroshot"] = zeroshot_table(rows)
        csv_tables["zeroshot"] = zeroshot_csv_table(rows)
    written = {}
    for name, table in tables.items():
        (out / f"{name}.md").write_text(to_markdown(table))
        written[name] = out / f"{name}.md"
    for name, table in {**csv_tables, **ppl_seed_csv_tables(rows)}.items():
        with (out / f"{name}.csv").open("w", newline="") as f:
            csv.writer(f).writerows(table)
    return written


def seed_variance_tables(rows: list[dict]) -> dict[str, list[list[str]]]:
    """``seed_variance_<corpus>``: for each configuration whose runs cross ``calib.seed`` with
    ``spon.seed`` (a complete grid of at least 2 × 2), the between-seed SD of the gap closure and
    of +SPON's perplexity split into calibration, α training and the rest
    (:func:`spon_exp.evaluation.variance.crossed_seed_components`)."""
    from spon_exp.evaluation.variance import crossed_seed_components

    header = [*ROW_KEYS, "sparsity", "statistic", "seeds (calib × spon)", "mean", "SD calibration", "SD α training",
              "SD interaction and rest", "SD one run", "seed_group"]
    tables: dict[str, list[list[str]]] = {}
    for group in seed_groups(rows):
        ok = [r for r in group if r["status"] == "ok" and r["seeds"]]
        for corpus in sorted({c for r in ok for c in r["ppl"]}):
            for name, scale, get in (("gap closure (pts)", 100, lambda r: r["gap_closure"].get(corpus)),
                                     ("+SPON perplexity", 1, lambda r: r["ppl"].get(corpus, {}).get("spon"))):
                values = {(r["seeds"]["calib"], r["seeds"]["spon"]): get(r) for r in ok}
                parts = None if None in values.values() else crossed_seed_components(values)
                if parts is None:
                    continue
                sd = parts["sd"]
                tables.setdefault(f"seed_variance_{corpus}", [header]).append(
                    [*_key(group[0]), _fmt(group[0]["sparsity"]), name, "{} × {}".format(*parts["levels"]),
                     _fmt(parts["mean"] * scale), *(_fmt(sd[k] * scale) for k in ("calibration", "training",
                                                                                  "interaction and rest", "one run")),
                     str(group[0].get("seed_group") or "-")[:8]])
    return tables


# ------------------------------------------------------------------------ plots
def write_plots(rows: list[dict], out: Path) -> list[Path]:
    """Perplexity and gap closure against target sparsity, one line per (model, sparsifier,
    calibration corpus, SPON count); each point a configuration's mean over its seeds, its bar
    the 95 % interval of the table (over seeds and text; one run: over its text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["sparsity"] is not None]
    corpora = sorted({c for r in ok for c in r["ppl"]})
    paths = []
    for corpus in corpora:
        series: dict = defaultdict(list)
        for group in seed_groups(ok):
            summary = group_summary(group, corpus)
            if summary["n"]:
                series[_key(group[0])].append((group[0]["sparsity"], summary))
        if not series:
            continue
        fig, (ax_ppl, ax_gap) = plt.subplots(1, 2, figsize=(11, 4))
        for (model, sparsifier, calib, count), points in sorted(series.items(), key=lambda kv: str(kv[0])):
            points = sorted(points, key=lambda p: p[0])
            xs = [x * 100 for x, _ in points]
            seeds = sorted({s["n"] for _, s in points})
            label = f"{model} {sparsifier} (calib {calib}; n={'/'.join(map(str, seeds))})"
            stats = {name: [_stat(s, name) for _, s in points] for name in ("ppl/dense", "ppl/sparse", "ppl/spon",
                                                                           "gap_closure")}
            sparse = [st.get("mean") for st in stats["ppl/sparse"]]
            line = ax_ppl.plot(xs, sparse, "o--", label=f"{label}")[0]
            color = line.get_color()
            _error_bars(ax_ppl, xs, sparse, [st.get("ci") for st in stats["ppl/sparse"]], color)
            spon = [st.get("mean") for st in stats["ppl/spon"]]
            if any(v is not None for v in spon):
                ax_ppl.plot(xs, spon, "o-", color=color, label=f"{label} + SPON x{count}")
                _error_bars(ax_ppl, xs, spon, [st.get("ci") for st in stats["ppl/spon"]], color)
                gaps = [st.get("mean") for st in stats["gap_closure"]]
                ax_gap.plot(xs, [g * 100 if g is not None else None for g in gaps], "o-", color=color,
                            label=f"{label} x{count}")
                _error_bars(ax_gap, xs, gaps, [st.get("ci") for st in stats["gap_closure"]], color, scale=100)
            dense = [st for st in stats["ppl/dense"] if st.get("mean") is not None]
            if dense:
                ax_ppl.axhline(dense[0]["mean"], color=color, linewidth=0.8, linestyle=":")
                if interval(dense[0].get("ci")) is not None:
                    ax_ppl.axhspan(*interval(dense[0]["ci"]), color=color, alpha=0.1, linewidth=0)
        ax_ppl.set(xlabel="target sparsity (%)", ylabel=f"perplexity ({corpus})", yscale="log",
                   title="perplexity: sparse (dashed), +SPON (solid), dense (dotted)\n"
                         "mean over n seeds; bars, band: 95 % interval over seeds and text")
        ax_gap.set(xlabel="target sparsity (%)", ylabel="gap closure (%)", title="SPON gap closure (mean over seeds)")
        for ax in (ax_ppl, ax_gap):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"ppl_vs_sparsity_{corpus}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _error_bars(ax, xs, ys, cis, color, scale=1.0) -> None:
    """Error bars at the points that have an interval (none for older runs). Drawn from the
    interval's ends, which need not be symmetric about the point; an end on the wrong side
    of the point (possible for a bootstrap interval) draws as zero length, not an error."""
    pts = [(x, y, interval(ci)) for x, y, ci in zip(xs, ys, cis) if not _missing(y) and interval(ci) is not None]
    if not pts:
        return
    ax.errorbar([x for x, _, _ in pts], [y * scale for _, y, _ in pts], fmt="none", ecolor=color, capsize=3,
                elinewidth=0.8, yerr=[[max(0.0, (y - lo) * scale) for _, y, (lo, _) in pts],
                                      [max(0.0, (hi - y) * scale) for _, y, (_, hi) in pts]])


# -------------------------------------------------------------- recipe searches
def read_studies(folder: str | Path) -> list[dict]:
    """Every Optuna study kept beside a sweep (``<sweep>/optuna.db``, sweeps/tune_spon*.yaml):
    its trials, best first, each with the recipe, the objective (mean validation gap
    closure), every seed's value and its folder (from the trial's ``trial.json``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies = []
    for db in sorted(Path(folder).rglob("optuna.db")):
        storage = f"sqlite:///{db.resolve()}"
        trial_files = {}
        for path in db.parent.glob("*/trial.json"):
            try:
                trial_files[path.parent] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
        for summary in optuna.get_all_study_summaries(storage):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
            trials = []
            for t in study.trials:
                folder_, record = _trial_folder(t.params, trial_files)
                trials.append({"number": t.number, "state": t.state.name, "objective": t.value,
                               "params": dict(t.params), "folder": str(folder_) if folder_ else None,
                               "seeds": {s: v.get("gap_closure") for s, v in (record or {}).get("seeds", {}).items()},
                               "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                               if t.datetime_complete and t.datetime_start else None})
            done = [t for t in trials if t["state"] == "COMPLETE" and t["objective"] is not None]
            done.sort(key=lambda t: t["objective"], reverse=maximize)
            rest = [t for t in trials if t not in done]
            best = done[0] if done else None
            studies.append({"study": summary.study_name, "storage": storage, "sweep": str(db.parent),
                            "direction": "maximize" if maximize else "minimize", "trials": done + rest,
                            "complete": len(done), "failed": sum(t["state"] == "FAIL" for t in trials),
                            "best": best})
    return studies


def _trial_folder(params: dict, trial_files: dict) -> tuple[Path | None, dict | None]:
    """The trial folder whose recorded overrides set every one of ``params``."""
    wanted = {k: v for k, v in params.items()}
    for folder, record in trial_files.items():
        given = dict(o.split("=", 1) for o in record.get("overrides") or [] if "=" in o)
        if all(k in given and _same_value(v, given[k]) for k, v in wanted.items()):
            return folder, record
    return None, None


def trials_table(study: dict) -> list[list[str]]:
    keys = sorted({k for t in study["trials"] for k in t["params"]})
    seeds = sorted({s for t in study["trials"] for s in t["seeds"]}, key=str)
    header = ["rank", "trial", "state", "objective (gap closure %)", *[f"seed {s}" for s in seeds], *keys, "folder"]
    body = []
    for rank, t in enumerate(study["trials"], 1):
        cells = [str(rank) if t["state"] == "COMPLETE" else "-", str(t["number"]), t["state"],
                 _fmt(None if t["objective"] is None else t["objective"] * 100, 1),
                 *[_fmt(None if t["seeds"].get(s) is None else t["seeds"][s] * 100, 1) for s in seeds],
                 *[_g(t["params"][k]) if isinstance(t["params"].get(k), float) else str(t["params"].get(k, "-"))
                   for k in keys], Path(t["folder"]).name if t["folder"] else "-"]
        body.append(cells)
    return [header, *body]


def write_studies(studies: list[dict], out: Path) -> list[Path]:
    written = []
    for study in studies:
        name = study["study"]
        table = trials_table(study)
        (out / f"trials_{name}.md").write_text(to_markdown(table))
        with (out / f"trials_{name}.csv").open("w", newline="") as f:
            csv.writer(f).writerows(table)
        best = {k: study[k] for k in ("study", "storage", "direction", "complete", "failed")}
        best["best"] = study["best"]
        (out / f"best_params_{name}.json").write_text(json.dumps(best, indent=2))
        written += [out / f"trials_{name}.md", out / f"best_params_{name}.json"]
    return written


# ------------------------------------------------------------------- comparison
#: ``key=value`` names a run's field in :func:`_row` under these spellings too
FIELD_ALIASES = {"model": "model", "model.name": "model", "sparsifier": "sparsifier", "sparsity": "sparsity",
                 "sparsifier.sparsity": "sparsity", "spon.count": "spon_count", "spon_count": "spon_count",
                 "calib": "calib_corpus", "calib.corpus": "calib_corpus", "calib_corpus": "calib_corpus",
                 "seed": "seed", "seed_group": "seed_group", "config_hash": "config_hash"}


def _same_value(actual, wanted: str) -> bool:
    if actual is None:
        return wanted.lower() in ("null", "none")
    try:
        return math.isclose(float(actual), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return str(actual).lower() == wanted.lower()


def _run_config(row: dict):
    """The run's resolved config (``config.yaml`` in its folder), read once; None without one."""
    if "_config" not in row:
        from omegaconf import OmegaConf

        path = Path(row["source"]) / "config.yaml"
        try:
            row["_config"] = OmegaConf.load(path) if path.is_file() else None
        except Exception:  # noqa: BLE001 - an unreadable config only fails this filter
            row["_config"] = None
    return row["_config"]


def _config_value(row: dict, key: str):
    """A dotted key of the run's resolved config (``config.yaml`` in its folder)."""
    from omegaconf import OmegaConf

    cfg = _run_config(row)
    return None if cfg is None else OmegaConf.select(cfg, key, default=None)


def _matches(row: dict, condition: str) -> bool:
    key, sep, wanted = condition.partition("=")
    if not sep:
        raise ValueError(f"{condition!r} is not key=value (e.g. sparsity=0.4 or spon.lr=0.001)")
    if key in ("seed_group", "config_hash"):  # hashes: a prefix is enough, as the tables print 8 characters
        return str(row.get(key) or "").startswith(wanted) and bool(wanted)
    if key in FIELD_ALIASES:
        return _same_value(row.get(FIELD_ALIASES[key]), wanted)
    return _same_value(_config_value(row, key), wanted)


def select_group(rows: list[dict], conditions: list[str], side: str) -> list[dict]:
    """The finished runs matching every ``key=value`` condition; they must be the seeds of one
    configuration, else a one-line error says how to narrow the selection."""
    chosen = [r for r in rows if r["status"] == "ok" and all(_matches(r, c) for c in conditions)]
    if not chosen:
        raise ValueError(f"--{side} {' '.join(conditions)} matches no finished run")
    groups = sorted({str(r.get("seed_group")) for r in chosen})
    if len(groups) > 1:
        raise ValueError(f"--{side} {' '.join(conditions)} matches {len(groups)} configurations (seed groups "
                         f"{', '.join(g[:8] for g in groups)}); add key=value conditions until one is left, "
                         f"e.g. seed_group={groups[0][:8]}")
    return sorted(chosen, key=lambda r: str(r["seed"]))


def compare_groups(rows: list[dict], baseline: list[str], candidate: list[str]) -> dict:
    """``{corpus: spon_exp.evaluation.seeds.compare(...)}`` for every corpus both sides
    evaluated: candidate − baseline, with the interval over seeds and blocks."""
    from spon_exp.evaluation.seeds import compare

    base, cand = select_group(rows, baseline, "baseline"), select_group(rows, candidate, "candidate")
    if {id(r) for r in base} & {id(r) for r in cand}:
        raise ValueError("--baseline and --candidate select the same runs; make them differ")
    corpora = sorted(set.intersection(*[set(r["ppl"]) for r in [*base, *cand]]))
    if not corpora:
        raise ValueError("the two sides share no evaluation corpus")
    return {corpus: compare([_seed_run(r, corpus) for r in base], [_seed_run(r, corpus) for r in cand], _bootstrap())
            for corpus in corpora}


COMPARED = ("ppl/final", "gap_closure", "ppl/dense", "ppl/sparse", "ppl/spon")


def comparison_table(result: dict) -> list[list[str]]:
    header = ["corpus", "statistic", "baseline", "candidate", "candidate − baseline", "95 % interval", "excludes 0",
              "seeds", "interval over"]
    body = []
    from spon_exp.evaluation.pairing import describe_left_out

    for corpus, comp in result.items():
        seeds = (f"paired, n={comp['n_baseline']}" if comp["paired"]
                 else f"unpaired, n={comp['n_baseline']} / {comp['n_candidate']}")
        left_out = describe_left_out(comp.get("left_out") or {})
        seeds += f" ({left_out})" if left_out else ""
        verdicts = {True: "yes", False: "no", None: comp.get("refused") or "-"}
        for name in [n for n in COMPARED if n in comp["statistics"]]:
            st = comp["statistics"][name]
            scale, digits, unit = (100, 1, " pts") if name == "gap_closure" else (1, 3, "")
            ci = interval(st["ci"])
            body.append([corpus, name, _fmt(None if st["baseline"] is None else st["baseline"] * scale, digits),
                         _fmt(None if st["candidate"] is None else st["candidate"] * scale, digits),
                         "-" if st["difference"] is None else f"{st['difference'] * scale:+.{digits}f}{unit}",
                         "-" if ci is None else f"[{ci[0] * scale:+.{digits}f}, {ci[1] * scale:+.{digits}f}]",
                         verdicts[st["excludes_zero"]], seeds, comp["covers"]])
    return [header, *body]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spon-exp-collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", default=["outputs"], help="folders to scan for results.json")
    parser.add_argument("--wandb-project", action="append", default=[], help="also read runs of entity/project")
    parser.add_argument("--out", default=None, help="output folder (default: <first folder>/tables)")
    parser.add_argument("--baseline", nargs="+", metavar="KEY=VALUE",
                        help="compare: the runs of one configuration (its seeds), e.g. sparsity=0.4 or spon.count=0")
    parser.add_argument("--candidate", nargs="+", metavar="KEY=VALUE",
                        help="compare: the other configuration; reports candidate − baseline with its interval")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # other libraries: warnings only
    logging.getLogger("spon_exp").setLevel(logging.INFO)
    if bool(args.baseline) != bool(args.candidate):
        parser.error("a comparison needs both --baseline and --candidate")
    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing and args.wandb_project:  # the W&B runs may be all there is
        for folder in missing:
            print(f"spon-exp-collect: warning: {folder} is not a folder; reading W&B runs only", file=sys.stderr)
        args.folders = [f for f in args.folders if f not in missing]
    elif missing:
        print(f"spon-exp-collect: error: {missing[0]} is not a folder; give the folder of a run or a sweep "
              f"(e.g. outputs/sweeps/<sweep_name>)", file=sys.stderr)
        return 2
    rows = [r for folder in args.folders for r in read_runs(folder)]
    for project in args.wandb_project:
        rows += read_wandb(project)
    mark_duplicates(rows)
    if not rows:
        print(f"spon-exp-collect: error: no results.json under {', '.join(args.folders)}: no run has written one "
              f"there yet", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.folders[0] if args.folders else ".") / "tables")
    if args.baseline:
        try:
            result = compare_groups(rows, args.baseline, args.candidate)
        except ValueError as e:
            print(f"spon-exp-collect: error: {e}", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        table = to_markdown(comparison_table(result))
        (out / "comparison.md").write_text(f"baseline: {' '.join(args.baseline)}\n"
                                           f"candidate: {' '.join(args.candidate)}\n\n{table}")
        (out / "comparison.json").write_text(json.dumps({"baseline": args.baseline, "candidate": args.candidate,
                                                         "corpora": result}, indent=2))
        print(f"candidate ({' '.join(args.candidate)}) − baseline ({' '.join(args.baseline)}):\n\n{table}")
        print(f"written: {out / 'comparison.md'}, {out / 'comparison.json'}")
        return 0
    written = write_tables(rows, out)
    plots = write_plots(rows, out)
    studies = [s for folder in args.folders for s in read_studies(folder)]
    study_files = write_studies(studies, out)
    from spon_exp.diagnostics.plots import collect_diagnostics

    plots += collect_diagnostics(rows, out)  # drift and Figure-1 curves of runs diagnosed by spon-exp-diagnose
    counts = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    print(f"{len(rows)} runs ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})")
    for name, path in written.items():
        if name.startswith(("ppl_", "seed_variance_")) or name == "zeroshot":
            print(f"\n## {name}\n\n{path.read_text()}")
    for study in studies:
        name = study["study"]
        print(f"\n## study {name}: {study['complete']} trials complete, {study['failed']} failed "
              f"({study['storage']})\n\n{(out / f'trials_{name}.md').read_text()}")
        if study["best"]:
            print(f"best: trial {study['best']['number']}, objective {study['best']['objective']:.4f}, "
                  f"params {study['best']['params']}")
    print("written: " + ", ".join(str(p) for p in [*written.values(), *plots, *study_files]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
