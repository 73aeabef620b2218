"""``spon-exp-collect``: many runs -> paper-shaped tables (Markdown + CSV) and plots.

Reads every ``results.json`` under a folder (and optionally the runs of a W&B project),
and for each Hydra sweep folder (one with ``multirun.yaml``) also lists the runs the sweep
asked for that never wrote a result, so missing and failed runs show as such.

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

log = logging.getLogger(__name__)

ROW_KEYS = ("model", "sparsifier", "calib_corpus", "spon_count")


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
        "sparsifier": results.get("sparsifier"),
        "calib_corpus": results.get("calib_corpus"),
        "spon_count": results.get("spon_count"),
        "seed": results.get("seed"),
        "sparsity": sparsity.get("target"),
        "measured_sparsity": sparsity.get("measured"),
        "ppl": results.get("ppl") or {},
        "gap_closure": _gap_closures(results),
        "zeroshot_avg": zs.get("average") or {},
        "zeroshot_recovery": zs.get("recovery"),
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
        base = {"model": OmegaConf.select(cfg, "model.name"), "sparsifier": OmegaConf.select(cfg, "sparsifier.name"),
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
    return dirname_cfg.item_sep.join(items)


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

    rows = []
    for run in wandb.Api().runs(project):
        summary, config = dict(run.summary), dict(run.config)
        results = {
            "status": summary.get("status", run.state), "config_hash": run.id,
            "model": {"name": config.get("model_name")}, "sparsifier": config.get("sparsifier_name"),
            "calib_corpus": config.get("calib_corpus"), "spon_count": config.get("spon_count"),
            "seed": config.get("seed"),
            "sparsity": {"target": config.get("target_sparsity"), "measured": summary.get("sparsity/measured")},
            "ppl": defaultdict(dict), "gap_closure": {}, "zeroshot": {"average": {}},
        }
        for key, value in summary.items():
            parts = key.split("/")
            if parts[0] == "ppl" and len(parts) == 3:
                results["ppl"][parts[1]][parts[2]] = value
            elif parts[0] == "gap_closure" and len(parts) == 2:
                results["gap_closure"][parts[1]] = value
            elif parts[0] == "zeroshot" and len(parts) == 3 and parts[2] == "avg":
                results["zeroshot"]["average"][parts[1]] = value
        results["ppl"] = dict(results["ppl"])
        rows.append(_row(results, f"wandb:{project}/{run.id}"))
    return rows


# ----------------------------------------------------------------------- tables
def _fmt(x, digits=2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _cell(row: dict, corpus: str) -> str:
    if row["status"] != "ok":
        return row["status"].upper()
    p = row["ppl"].get(corpus, {})
    parts = [_fmt(p.get(v)) for v in ("dense", "sparse", "spon") if v in p]
    g = row["gap_closure"].get(corpus)
    return " / ".join(parts) + (f" ({g * 100:.0f} %)" if g is not None else "")


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


def zeroshot_table(rows: list[dict]) -> list[list[str]]:
    header = [*ROW_KEYS, "sparsity", "dense", "sparse", "+SPON", "recovery", "status"]
    body = []
    for r in sorted(rows, key=lambda r: (_key(r), r["sparsity"] or 0)):
        if not r["zeroshot_avg"] and r["status"] == "ok":
            continue
        z = r["zeroshot_avg"]
        rec = r["zeroshot_recovery"]
        body.append([*_key(r), _fmt(r["sparsity"]), _fmt(z.get("dense"), 4), _fmt(z.get("sparse"), 4),
                     _fmt(z.get("spon"), 4), f"{rec * 100:.0f} %" if rec is not None else "-", r["status"]])
    return [header, *body]


def runs_table(rows: list[dict]) -> list[list[str]]:
    header = ["status", *ROW_KEYS, "seed", "sparsity", "measured", "config_hash", "error", "source"]
    return [header, *[[r["status"], *_key(r), str(r["seed"]), _fmt(r["sparsity"]), _fmt(r["measured_sparsity"], 3),
                       str(r["config_hash"]), (r["error"] or "")[:120], r["source"]] for r in rows]]


def to_markdown(table: list[list[str]]) -> str:
    header, *body = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    tables = {"runs": runs_table(rows), **ppl_tables(rows)}
    if any(r["zeroshot_avg"] for r in rows):
        tables["zeroshot"] = zeroshot_table(rows)
    written = {}
    for name, table in tables.items():
        (out / f"{name}.md").write_text(to_markdown(table))
        with (out / f"{name}.csv").open("w", newline="") as f:
            csv.writer(f).writerows(table)
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
            line = ax_ppl.plot(xs, sparse, "o--", label=f"{label}")[0]
            if any(v is not None for v in spon):
                ax_ppl.plot(xs, spon, "o-", color=line.get_color(), label=f"{label} + SPON x{count}")
                gaps = [r["gap_closure"].get(corpus) for r in rs]
                ax_gap.plot(xs, [g * 100 if g is not None else None for g in gaps], "o-", color=line.get_color(),
                            label=f"{label} x{count}")
            dense = [r["ppl"][corpus].get("dense") for r in rs if r["ppl"][corpus].get("dense") is not None]
            if dense:
                ax_ppl.axhline(dense[0], color=line.get_color(), linewidth=0.8, linestyle=":")
        ax_ppl.set(xlabel="target sparsity (%)", ylabel=f"perplexity ({corpus})", yscale="log",
                   title="perplexity: sparse (dashed), +SPON (solid), dense (dotted)")
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
