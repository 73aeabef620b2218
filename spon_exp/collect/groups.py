"""Configurations: runs that differ only in their seed, grouped once, with the settings that
tell each apart and its summaries over seeds (each computed once, then shared by the Markdown
tables, the CSVs and the plots)."""

from __future__ import annotations

import functools
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from spon_exp.collect.format import missing, row_key
from spon_exp.collect.runs import run_config, run_units
from spon_exp.evaluation.gap import VARIANTS
from spon_exp.tracking.intervals import interval


@dataclass
class Configuration:
    """One configuration's runs (its seeds, sorted) and the settings that tell it apart from
    the other configurations of the same table; :meth:`ppl` and :meth:`zeroshot` aggregate
    its seeds once per corpus."""

    rows: list[dict]
    settings: str = "-"
    _ppl: dict = field(default_factory=dict, repr=False)
    _zeroshot: dict | None = field(default=None, repr=False)

    @property
    def first(self) -> dict:
        return self.rows[0]

    def ppl(self, corpus: str) -> dict:
        if corpus not in self._ppl:
            self._ppl[corpus] = group_summary(self.rows, corpus)
        return self._ppl[corpus]

    def zeroshot(self) -> dict:
        if self._zeroshot is None:
            self._zeroshot = zeroshot_summary(self.rows)
        return self._zeroshot


def configurations(rows: list[dict]) -> list[Configuration]:
    """The runs grouped by configuration (:func:`seed_groups`), in table order, each with its
    settings column (:func:`group_settings`)."""
    groups = seed_groups(rows)
    return [Configuration(g, s) for g, s in zip(groups, group_settings(groups))]


def _group_key(row: dict) -> tuple:
    """Runs that differ only in their seed: the same ``seed_group`` (results.json records it);
    runs written before it existed group by the table's row keys and sparsity."""
    return (*row_key(row), row["sparsity"], row.get("seed_group"))


def mark_duplicates(rows: list[dict]) -> None:
    """A finished run of one configuration and seed found twice (a copied folder, one
    configuration in two sweeps, a local folder read with its W&B project) counts once: the
    later copy's status becomes ``duplicate``, with a one-line warning naming both places."""
    import sys

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

    cfg = run_config(row)
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
    for key in {row_key(g[0]) for g in groups}:
        known = [f for g, f in zip(groups, flats) if f is not None and row_key(g[0]) == key]
        names = sorted({k for f in known for k in f})
        differing[key] = [k for k in names if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in known}) > 1]
    return [" ".join(f"{k}={_setting_text(f.get(k))}" for k in differing[row_key(g[0])]) or "-" if f is not None else "-"
            for g, f in zip(groups, flats)]


def _seed_run(row: dict, corpus: str):
    from spon_exp.evaluation.perplexity import BlockNLL
    from spon_exp.evaluation.seeds import SeedRun

    ppl = {v: x for v, x in row["ppl"].get(corpus, {}).items() if v in VARIANTS and not missing(x)}
    units = run_units(row)
    blocks = None
    if units is not None and all(f"{corpus}.{v}.nll" in units for v in ppl):
        blocks = {v: BlockNLL.from_state(units, f"{corpus}.{v}") for v in ppl}
    return SeedRun(row["seed"], ppl, blocks, row.get("ppl_protocol"))


@functools.lru_cache(maxsize=1)
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
        values = [r[key] for r in ok if not missing(r[key])]
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


def stat(summary: dict, name: str) -> dict:
    return (summary.get("statistics") or {}).get(name) or {}


def _zeroshot_seed_run(row: dict):
    from spon_exp.evaluation.seeds import ZeroshotSeedRun

    average = {v: x for v, x in row["zeroshot_avg"].items() if v in VARIANTS and not missing(x)}
    units = run_units(row)
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
