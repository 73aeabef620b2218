"""``spon-exp-collect``: the command line (see :mod:`spon_exp.collect`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

from spon_exp.collect.compare import compare_groups, comparison_table
from spon_exp.collect.format import to_markdown
from spon_exp.collect.groups import configurations, mark_duplicates
from spon_exp.collect.plots import write_plots
from spon_exp.collect.runs import read_runs, read_wandb
from spon_exp.collect.studies import read_studies, write_studies
from spon_exp.collect.tables import write_tables


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spon-exp-collect", description=DESCRIPTION)
    parser.add_argument("folders", nargs="*", default=["outputs"],
                        help="folders to scan for results.json (default: outputs)")
    parser.add_argument("--wandb-project", action="append", default=[],
                        help="also read runs of entity/project (repeat for several projects)")
    parser.add_argument("--out", default=None, help="output folder (default: <first folder>/tables)")
    parser.add_argument("--baseline", nargs="+", metavar="KEY=VALUE",
                        help="compare: the runs of one configuration (its seeds), e.g. sparsity=0.4 or spon.count=0")
    parser.add_argument("--candidate", nargs="+", metavar="KEY=VALUE",
                        help="compare: the other configuration; reports candidate − baseline with its interval")
    return parser


DESCRIPTION = "Many runs -> paper-shaped tables (Markdown + CSV) and plots, or a comparison of two configurations."


def _error(message: str) -> int:
    print(f"spon-exp-collect: error: {message}", file=sys.stderr)
    return 2


def _read(args) -> list[dict] | int:
    """Every run under the folders and W&B projects; an exit code where there is nothing to read."""
    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing and args.wandb_project:  # the W&B runs may be all there is
        for folder in missing:
            print(f"spon-exp-collect: warning: {folder} is not a folder; reading W&B runs only", file=sys.stderr)
        args.folders = [f for f in args.folders if f not in missing]
    elif missing:
        return _error(f"{missing[0]} is not a folder; give the folder of a run or a sweep (e.g. outputs/sweeps/<sweep_name>)")
    rows = [r for folder in args.folders for r in read_runs(folder)]
    for project in args.wandb_project:
        rows += read_wandb(project)
    mark_duplicates(rows)
    if not rows:
        return _error(f"no results.json under {', '.join(args.folders)}: no run has written one there yet")
    return rows


def _compare(rows: list[dict], args, out: Path) -> int:
    try:
        result = compare_groups(rows, args.baseline, args.candidate)
    except ValueError as e:
        return _error(str(e))
    out.mkdir(parents=True, exist_ok=True)
    table = to_markdown(comparison_table(result))
    (out / "comparison.md").write_text(f"baseline: {' '.join(args.baseline)}\n"
                                       f"candidate: {' '.join(args.candidate)}\n\n{table}")
    (out / "comparison.json").write_text(json.dumps({"baseline": args.baseline, "candidate": args.candidate,
                                                     "corpora": result}, indent=2))
    print(f"candidate ({' '.join(args.candidate)}) − baseline ({' '.join(args.baseline)}):\n\n{table}")
    print(f"written: {out / 'comparison.md'}, {out / 'comparison.json'}")
    return 0


def _tables(rows: list[dict], folders: list[str], out: Path) -> int:
    from spon_exp.diagnostics.plots import collect_diagnostics

    configs = configurations(rows)  # each configuration's summaries computed once, for tables and plots
    written = write_tables(rows, out, configs)
    plots = write_plots(rows, out, configs)
    studies = [s for folder in folders for s in read_studies(folder)]
    study_files = write_studies(studies, out)
    plots += collect_diagnostics(rows, out)  # drift and Figure-1 curves of runs diagnosed by spon-exp-diagnose
    counts = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    print(f"{len(rows)} runs ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})")
    for name, path in written.items():
        if name.startswith(("ppl_", "seed_variance_", "methods_")) or name == "zeroshot":
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


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # other libraries: warnings only
    logging.getLogger("spon_exp").setLevel(logging.INFO)
    if bool(args.baseline) != bool(args.candidate):
        parser.error("a comparison needs both --baseline and --candidate")
    rows = _read(args)
    if isinstance(rows, int):
        return rows
    out = Path(args.out or Path(args.folders[0] if args.folders else ".") / "tables")
    try:
        return _compare(rows, args, out) if args.baseline else _tables(rows, args.folders, out)
    except Exception as e:
        from spon_exp.tracking.disk import as_disk_full

        full = as_disk_full(e, out / "tables.md")  # a full disk or quota: one line naming the folder
        if full is None:
            raise
        print(f"spon-exp-collect: error: {full}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
