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
from collections import defaultdict
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
        "model": model.get("name") if isinstance(model, dict) else model,
        "sparsifier": results.get("sparsifier_label") or results.get("sparsifier"),  # a preset: its label
        "calib_corpus": results.get("calib_corpus"),
        "spon_count": results.get("spon_count"),
        "seed": results.get("seed"),
        "sparsity": sparsity.get("target"),
        "measured_sparsity": sparsity.get("measured"),
        "ppl": results.get("ppl") or {},
        "ppl_ci": results.get("ppl_ci") or {},
        "gap_closure": _gap_closures(results),
        "gap_closure_ci": results.get("gap_closure_ci") or {},
        "zeroshot_avg": zs.get("average") or {},
        "zeroshot_avg_ci": zs.get("average_ci") or {},
        "zeroshot_recovery": zs.get("recovery"),
        "zeroshot_recovery_ci": zs.get("recovery_ci"),
        "fold_max_abs_logit_diff": (results.get("fold") or {}).get("max_abs_logit_diff"),
        "sensitivity_relative_spread": (results.get("sensitivity") or {}).get("relative_spread"),
    }


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
        except json.JSONDecodeError as e:
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


def _cell(row: dict, corpus: str) -> str:
    if row["status"] != "ok":
        return row["status"].upper()
    p, ci = row["ppl"].get(corpus, {}), row["ppl_ci"].get(corpus) or {}
    parts = [_pm(p.get(v), ci.get(v)) for v in VARIANTS if v in p]
    g = row["gap_closure"].get(corpus)
    return " / ".join(parts) + (f" ({_pct(g, row['gap_closure_ci'].get(corpus))})" if g is not None else "")


def _key(row: dict) -> tuple:
    return tuple(str(row.get(k)) for k in ROW_KEYS)


def ppl_tables(rows: list[dict]) -> dict[str, list[list[str]]]:
    """One table per evaluation corpus: rows model x sparsifier (x calib, spon count),
    columns target sparsity, cells ``dense / sparse / +SPON (gap closure)``."""
    corpora = sorted({c for r in rows for c in r["ppl"]}) or ["(none)"]
    sparsities = sorted({r["sparsity"] for r in rows if r["sparsity"] is not None})
    tables = {}
    for corpus in corpora:
        grid: dict = defaultdict(dict)
        for r in rows:
            if r["status"] == "ok" and corpus not in r["ppl"]:
                continue
            cell = _cell(r, corpus)
            previous = grid[_key(r)].get(r["sparsity"])
            grid[_key(r)][r["sparsity"]] = cell if previous is None else f"{previous}; {cell}"  # e.g. seeds
        header = [*ROW_KEYS, *[f"{s:g}" for s in sparsities]]
        body = [[*k, *[grid[k].get(s, "-") for s in sparsities]] for k in sorted(grid)]
        tables[f"ppl_{corpus}"] = [header, *body]
    return tables


def ppl_csv_tables(rows: list[dict]) -> dict[str, list[list]]:
    """The CSV twin of :func:`ppl_tables`: one row per run (not a pivot: a pivot cell cannot
    hold three values and six interval ends as columns), exact numbers, gap closure as a
    fraction, blank where a run has no value or no interval."""
    corpora = sorted({c for r in rows for c in r["ppl"]}) or ["(none)"]
    header = [*ROW_KEYS, "sparsity", "seed", "status", *_ci_columns(*VARIANTS, "gap_closure"), "source"]
    tables = {}
    for corpus in corpora:
        body = []
        for r in sorted(rows, key=lambda r: (_key(r), r["sparsity"] or 0, str(r["seed"]))):
            if r["status"] == "ok" and corpus not in r["ppl"]:
                continue
            p, ci = r["ppl"].get(corpus, {}), r["ppl_ci"].get(corpus) or {}
            values = [x for v in VARIANTS for x in _exact(p.get(v), ci.get(v))]
            values += _exact(r["gap_closure"].get(corpus), r["gap_closure_ci"].get(corpus))
            body.append([*_key(r), r["sparsity"], r["seed"], r["status"], *values, r["source"]])
        tables[f"ppl_{corpus}"] = [header, *body]
    return tables


def _zeroshot_rows(rows: list[dict]) -> list[dict]:
    return [r for r in sorted(rows, key=lambda r: (_key(r), r["sparsity"] or 0))
            if r["zeroshot_avg"] or r["status"] != "ok"]


def zeroshot_table(rows: list[dict]) -> list[list[str]]:
    header = [*ROW_KEYS, "sparsity", "dense", "sparse", "+SPON", "recovery", "status"]
    body = []
    for r in _zeroshot_rows(rows):
        z, ci = r["zeroshot_avg"], r["zeroshot_avg_ci"]
        body.append([*_key(r), _fmt(r["sparsity"]), *[_pm(z.get(v), ci.get(v), 4) for v in VARIANTS],
                     _pct(r["zeroshot_recovery"], r["zeroshot_recovery_ci"]), r["status"]])
    return [header, *body]


def zeroshot_csv_table(rows: list[dict]) -> list[list]:
    """The CSV twin of :func:`zeroshot_table`: exact averages, recovery as a fraction, each
    with its interval ends."""
    header = [*ROW_KEYS, "sparsity", *_ci_columns(*VARIANTS, "recovery"), "status"]
    body = []
    for r in _zeroshot_rows(rows):
        z, ci = r["zeroshot_avg"], r["zeroshot_avg_ci"]
        values = [x for v in VARIANTS for x in _exact(z.get(v), ci.get(v))]
        values += _exact(r["zeroshot_recovery"], r["zeroshot_recovery_ci"])
        body.append([*_key(r), r["sparsity"], *values, r["status"]])
    return [header, *body]


def runs_table(rows: list[dict]) -> list[list[str]]:
    header = ["status", *ROW_KEYS, "seed", "sparsity", "measured", "fold_max_abs_logit_diff",
              "sensitivity_relative_spread", "config_hash", "error", "source"]
    return [header, *[[r["status"], *_key(r), str(r["seed"]), _fmt(r["sparsity"]), _fmt(r["measured_sparsity"], 3),
                       _g(r["fold_max_abs_logit_diff"]), _g(r["sensitivity_relative_spread"]),
                       str(r["config_hash"]), (r["error"] or "")[:120], r["source"]] for r in rows]]


def to_markdown(table: list[list[str]]) -> str:
    header, *body = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    runs = runs_table(rows)
    tables = {"runs": runs, **ppl_tables(rows)}
    csv_tables = {"runs": runs, **ppl_csv_tables(rows)}
    if any(r["zeroshot_avg"] for r in rows):
        tables["zeroshot"] = zeroshot_table(rows)
        csv_tables["zeroshot"] = zeroshot_csv_table(rows)
    written = {}
    for name, table in tables.items():
        (out / f"{name}.md").write_text(to_markdown(table))
        with (out / f"{name}.csv").open("w", newline="") as f:
            csv.writer(f).writerows(csv_tables[name])
        written[name] = out / f"{name}.md"
    return written


# ------------------------------------------------------------------------ plots
def write_plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["sparsity"] is not None]
    corpora = sorted({c for r in ok for c in r["ppl"]})
    paths = []
    for corpus in corpora:
        series: dict = defaultdict(list)
        for r in ok:
            if corpus in r["ppl"]:
                series[(r["model"], r["sparsifier"], r["calib_corpus"], r["spon_count"])].append(r)
        if not series:
            continue
        fig, (ax_ppl, ax_gap) = plt.subplots(1, 2, figsize=(11, 4))
        for (model, sparsifier, calib, count), rs in sorted(series.items(), key=lambda kv: str(kv[0])):
            rs = sorted(rs, key=lambda r: r["sparsity"])
            xs = [r["sparsity"] * 100 for r in rs]
            label = f"{model} {sparsifier} (calib {calib})"
            sparse = [r["ppl"][corpus].get("sparse") for r in rs]
            spon = [r["ppl"][corpus].get("spon") for r in rs]
            ppl_ci = [(r["ppl_ci"].get(corpus) or {}) for r in rs]
            line = ax_ppl.plot(xs, sparse, "o--", label=f"{label}")[0]
            color = line.get_color()
            _error_bars(ax_ppl, xs, sparse, [ci.get("sparse") for ci in ppl_ci], color)
            if any(v is not None for v in spon):
                ax_ppl.plot(xs, spon, "o-", color=color, label=f"{label} + SPON x{count}")
                _error_bars(ax_ppl, xs, spon, [ci.get("spon") for ci in ppl_ci], color)
                gaps = [r["gap_closure"].get(corpus) for r in rs]
                ax_gap.plot(xs, [g * 100 if g is not None else None for g in gaps], "o-", color=color,
                            label=f"{label} x{count}")
                _error_bars(ax_gap, xs, gaps, [r["gap_closure_ci"].get(corpus) for r in rs], color, scale=100)
            dense = [(r["ppl"][corpus]["dense"], ci.get("dense")) for r, ci in zip(rs, ppl_ci)
                     if r["ppl"][corpus].get("dense") is not None]
            if dense:
                ax_ppl.axhline(dense[0][0], color=color, linewidth=0.8, linestyle=":")
                if interval(dense[0][1]) is not None:
                    ax_ppl.axhspan(*interval(dense[0][1]), color=color, alpha=0.1, linewidth=0)
        ax_ppl.set(xlabel="target sparsity (%)", ylabel=f"perplexity ({corpus})", yscale="log",
                   title="perplexity: sparse (dashed), +SPON (solid), dense (dotted)\n"
                         "bars, band: 95 % interval where the run has one")
        ax_gap.set(xlabel="target sparsity (%)", ylabel="gap closure (%)", title="SPON gap closure")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spon-exp-collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", default=["outputs"], help="folders to scan for results.json")
    parser.add_argument("--wandb-project", action="append", default=[], help="also read runs of entity/project")
    parser.add_argument("--out", default=None, help="output folder (default: <first folder>/tables)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = [r for folder in args.folders for r in read_runs(folder)]
    for project in args.wandb_project:
        rows += read_wandb(project)
    if not rows:
        print(f"spon-exp-collect: error: no results.json under {', '.join(args.folders)}")
        return 2
    out = Path(args.out or Path(args.folders[0]) / "tables")
    written = write_tables(rows, out)
    plots = write_plots(rows, out)
    from spon_exp.diagnostics.plots import collect_diagnostics

    plots += collect_diagnostics(rows, out)  # drift and Figure-1 curves of runs diagnosed by spon-exp-diagnose
    counts = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    print(f"{len(rows)} runs ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})")
    for name, path in written.items():
        if name.startswith("ppl_") or name == "zeroshot":
            print(f"\n## {name}\n\n{path.read_text()}")
    print("written: " + ", ".join(str(p) for p in [*written.values(), *plots]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
