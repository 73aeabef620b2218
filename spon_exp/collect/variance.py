"""``seed_variance_<corpus>``: where a configuration's spread between seeds comes from, for the
configurations whose runs cross ``calib.seed`` with ``spon.seed``."""

from __future__ import annotations

from spon_exp.collect.format import ROW_KEYS, fmt, row_key
from spon_exp.collect.groups import Configuration
from spon_exp.evaluation.variance import crossed_seed_components

#: the statistics split, with their scale in the table and how a run's row gives them
STATISTICS = (("gap closure (pts)", 100, lambda row, corpus: row["gap_closure"].get(corpus)),
              ("+SPON perplexity", 1, lambda row, corpus: row["ppl"].get(corpus, {}).get("spon")))
SDS = ("calibration", "training", "interaction and rest", "one run")


def seed_variance_tables(configs: list[Configuration]) -> dict[str, list[list[str]]]:
    """Per corpus, one row per crossed configuration (a complete grid of at least 2 × 2
    calibration × training seeds) and statistic: the between-seed SD split into calibration,
    α training and the rest (:func:`spon_exp.evaluation.variance.crossed_seed_components`)."""
    header = [*ROW_KEYS, "sparsity", "statistic", "seeds (calib × spon)", "mean", "SD calibration", "SD α training",
              "SD interaction and rest", "SD one run", "seed_group"]
    tables: dict[str, list[list[str]]] = {}
    for config in configs:
        ok = [r for r in config.rows if r["status"] == "ok" and r["seeds"]]
        for corpus in sorted({c for r in ok for c in r["ppl"]}):
            for name, scale, value in STATISTICS:
                values = {(r["seeds"]["calib"], r["seeds"]["spon"]): value(r, corpus) for r in ok}
                parts = None if None in values.values() else crossed_seed_components(values)
                if parts is None:
                    continue
                tables.setdefault(f"seed_variance_{corpus}", [header]).append(
                    [*row_key(config.first), fmt(config.first["sparsity"]), name, "{} × {}".format(*parts["levels"]),
                     fmt(parts["mean"] * scale), *(fmt(parts["sd"][k] * scale) for k in SDS),
                     str(config.first.get("seed_group") or "-")[:8]])
    return tables
