"""The tables ``spon-exp-collect`` writes: runs, perplexity per corpus and zero-shot, each as
Markdown (values ± half their 95 % interval) and as CSV (exact means, interval ends and SDs),
both rows built in one pass over the configurations; and one CSV row per seed."""

from __future__ import annotations

import csv
from pathlib import Path

from spon_exp.collect.format import (
    ROW_KEYS,
    ci_columns,
    exact,
    fmt,
    g,
    pct,
    pm,
    row_key,
    to_markdown,
)
from spon_exp.collect.groups import Configuration, configurations, stat
from spon_exp.collect.methods import method_tables
from spon_exp.collect.variance import seed_variance_tables
from spon_exp.evaluation.gap import VARIANTS

PPL_COLUMNS = ("dense", "sparse", "+SPON")
PPL_STATISTICS = (*(f"ppl/{v}" for v in VARIANTS), "gap_closure")
ZEROSHOT_STATISTICS = (*(f"average/{v}" for v in VARIANTS), "recovery")


def _csv_name(statistic: str) -> str:
    return statistic.split("/")[-1]


def _csv_stat_columns(statistics) -> list[str]:
    return [c for name in statistics for c in (_csv_name(name), f"{_csv_name(name)}_ci_low",
                                               f"{_csv_name(name)}_ci_high", f"{_csv_name(name)}_sd")]


def _csv_stat_values(summary: dict, statistics) -> list:
    values = []
    for name in statistics:
        st = stat(summary, name)
        values += [*exact(st.get("mean"), st.get("ci")), st.get("sd")]
    return values


def _not_ok(summary: dict, sep: str) -> str:
    return sep.join(f"{n} {status}" for status, n in sorted(summary["not_ok"].items()))


def _sd_points(st: dict) -> str:
    return "-" if st.get("sd") is None else f"{st['sd'] * 100:.1f}"


def _corpora(rows: list[dict]) -> list[str]:
    return sorted({c for r in rows for c in r["ppl"]}) or ["(none)"]


def ppl_tables(rows: list[dict], configs: list[Configuration] | None = None) -> tuple[dict, dict]:
    """Per evaluation corpus, one row per configuration (its seeds aggregated), as
    ``(markdown, csv)`` table dicts keyed ``ppl_<corpus>``. Markdown: ``n`` seeds, each
    variant's mean perplexity ± half its 95 % interval, the mean gap closure with its interval,
    its between-seed SD (points), measured and effective sparsity, what the interval resamples,
    runs that did not finish; CSV: the same figures exact, gap closure as a fraction."""
    configs = configurations(rows) if configs is None else configs
    md_header = [*ROW_KEYS, "sparsity", "n", *PPL_COLUMNS, "gap closure", "gap SD (pts)", "measured", "effective",
                 "interval over", "seed_group", "not ok", "settings"]
    csv_header = [*ROW_KEYS, "sparsity", "seed_group", "n", "seeds", *_csv_stat_columns(PPL_STATISTICS),
                  "measured_sparsity", "effective_sparsity", "interval_over", "not_ok", "settings"]
    md, csv_tables = {}, {}
    for corpus in _corpora(rows):
        md_body, csv_body = [], []
        for config in configs:
            summary = config.ppl(corpus)
            if not summary["n"] and not summary["not_ok"]:
                continue  # ok runs that did not evaluate this corpus
            first = config.first
            md_body.append([*row_key(first), fmt(first["sparsity"]), str(summary["n"]), *_ppl_cells(summary),
                            str(first.get("seed_group") or "-")[:8], _not_ok(summary, ", ") or "-", config.settings])
            csv_body.append([*row_key(first), first["sparsity"], first.get("seed_group"), summary["n"],
                             " ".join(str(r["seed"]) for r in summary["rows"]),
                             *_csv_stat_values(summary, PPL_STATISTICS), summary.get("measured_sparsity"),
                             summary.get("effective_sparsity"), summary.get("covers"), _not_ok(summary, " "),
                             config.settings])
        md[f"ppl_{corpus}"] = [md_header, *md_body]
        csv_tables[f"ppl_{corpus}"] = [csv_header, *csv_body]
    return md, csv_tables


def _ppl_cells(summary: dict) -> list[str]:
    """The Markdown cells from ``dense`` to ``interval over`` of a configuration's row."""
    if not summary["n"]:
        status = sorted(summary["not_ok"])[0].upper()
        return [status, status, status, "-", "-", "-", "-", "-"]
    cells = [pm(stat(summary, f"ppl/{v}").get("mean"), stat(summary, f"ppl/{v}").get("ci")) for v in VARIANTS]
    gap = stat(summary, "gap_closure")
    return [*cells, pct(gap.get("mean"), gap.get("ci")), _sd_points(gap), fmt(summary["measured_sparsity"], 3),
            fmt(summary["effective_sparsity"], 3), summary["covers"]]


def ppl_seed_csv_tables(rows: list[dict]) -> dict[str, list[list]]:
    """Every run's own values (one row per seed): the exact numbers behind the aggregated
    table, each with the interval over its evaluation blocks."""
    header = [*ROW_KEYS, "sparsity", "seed_group", "seed", "status", *ci_columns(*VARIANTS, "gap_closure"),
              "measured_sparsity", "effective_sparsity", "source"]
    tables = {}
    for corpus in _corpora(rows):
        body = []
        for r in sorted(rows, key=lambda r: (row_key(r), r["sparsity"] or 0, str(r.get("seed_group")), str(r["seed"]))):
            if r["status"] == "ok" and corpus not in r["ppl"]:
                continue
            p, ci = r["ppl"].get(corpus, {}), r["ppl_ci"].get(corpus) or {}
            values = [x for v in VARIANTS for x in exact(p.get(v), ci.get(v))]
            values += exact(r["gap_closure"].get(corpus), r["gap_closure_ci"].get(corpus))
            body.append([*row_key(r), r["sparsity"], r.get("seed_group"), r["seed"], r["status"], *values,
                         r["measured_sparsity"], r["effective_sparsity"], r["source"]])
        tables[f"ppl_{corpus}_seeds"] = [header, *body]
    return tables


def zeroshot_tables(rows: list[dict], configs: list[Configuration] | None = None) -> tuple[list, list]:
    """``(markdown, csv)``: one row per configuration with ``n`` seeds, the mean task average of
    each variant and the mean recovery, each with its interval over seeds and documents, and the
    recovery's between-seed SD (Markdown: points; CSV: exact, recovery as a fraction)."""
    configs = configurations(rows) if configs is None else configs
    md_header = [*ROW_KEYS, "sparsity", "n", "dense", "sparse", "+SPON", "recovery", "recovery SD (pts)",
                 "interval over", "not ok"]
    csv_header = [*ROW_KEYS, "sparsity", "seed_group", "n", "seeds", *_csv_stat_columns(ZEROSHOT_STATISTICS),
                  "interval_over"]
    md_body, csv_body = [], []
    for config in configs:
        z = config.zeroshot()
        if not (z["n"] or (z["not_ok"] and any(not r["zeroshot_avg"] for r in config.rows))):
            continue
        first, rec = config.first, stat(z, "recovery")
        cells = [pm(stat(z, f"average/{v}").get("mean"), stat(z, f"average/{v}").get("ci"), 4) for v in VARIANTS]
        md_body.append([*row_key(first), fmt(first["sparsity"]), str(z["n"]), *cells, pct(rec.get("mean"), rec.get("ci")),
                        _sd_points(rec), z.get("covers", "-"), _not_ok(z, ", ") or "-"])
        csv_body.append([*row_key(first), first["sparsity"], first.get("seed_group"), z["n"],
                         " ".join(str(r["seed"]) for r in z["rows"]), *_csv_stat_values(z, ZEROSHOT_STATISTICS),
                         z.get("covers")])
    return [md_header, *md_body], [csv_header, *csv_body]


def runs_table(rows: list[dict]) -> list[list[str]]:
    header = ["status", *ROW_KEYS, "seed", "sparsity", "measured", "effective", "fold_max_abs_logit_diff",
              "sensitivity_relative_spread", "config_hash", "seed_group", "error", "source"]
    return [header, *[[r["status"], *row_key(r), str(r["seed"]), fmt(r["sparsity"]), fmt(r["measured_sparsity"], 3),
                       fmt(r["effective_sparsity"], 3), g(r["fold_max_abs_logit_diff"]),
                       g(r["sensitivity_relative_spread"]), str(r["config_hash"]), str(r.get("seed_group") or "-"),
                       (r["error"] or "")[:120], r["source"]] for r in rows]]


def write_tables(rows: list[dict], out: Path, configs: list[Configuration] | None = None) -> dict[str, Path]:
    """Every table into ``out`` (``<name>.md`` and ``<name>.csv``); returns the Markdown files."""
    configs = configurations(rows) if configs is None else configs
    out.mkdir(parents=True, exist_ok=True)
    runs = runs_table(rows)
    ppl_md, ppl_csv = ppl_tables(rows, configs)
    tables, csv_tables = {"runs": runs, **ppl_md, **seed_variance_tables(configs)}, {"runs": runs, **ppl_csv}
    tables.update(method_tables(rows, configs))  # methods_<corpus>: the pruning comparison, where runs pruned
    if any(r["zeroshot_avg"] for r in rows):
        tables["zeroshot"], csv_tables["zeroshot"] = zeroshot_tables(rows, configs)
    written = {}
    for name, table in tables.items():
        (out / f"{name}.md").write_text(to_markdown(table))
        written[name] = out / f"{name}.md"
    for name, table in {**csv_tables, **ppl_seed_csv_tables(rows)}.items():
        with (out / f"{name}.csv").open("w", newline="") as f:
            csv.writer(f).writerows(table)
    return written
