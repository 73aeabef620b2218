"""The intervals over seeds of real runs, the earlier percentile bootstrap beside the t interval
``spon-exp-collect`` now prints, per configuration and corpus (and, with ``--baseline`` /
``--candidate``, for the comparison of two configurations):

    python benchmarks/quality/intervals_old_new.py outputs/sweeps/default_seeds
    python benchmarks/quality/intervals_old_new.py outputs/sweeps/spon_on_off --baseline spon.count=0 --candidate spon.count=1

Reads runs with the collect package (duplicates counted once) and aggregates them with
``spon_exp.evaluation.seeds`` under both methods; prints a Markdown table.
"""

from __future__ import annotations

import argparse

from spon_exp.collect.compare import select_group
from spon_exp.collect.groups import _bootstrap, _seed_run, mark_duplicates, seed_groups
from spon_exp.collect.runs import read_runs
from spon_exp.evaluation.seeds import aggregate, compare

STATISTICS = ("gap_closure", "ppl/dense", "ppl/sparse", "ppl/spon")


def _cell(value, ci, scale: float, digits: int) -> str:
    if value is None or ci is None:
        return "-"
    return f"{value * scale:.{digits}f} [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def _line(label: str, name: str, old: dict, new: dict, value_key: str) -> str:
    scale, digits = (100, 1) if name == "gap_closure" else (1, 2)
    df = new.get("df")
    return (f"| {label} | {name} | {_cell(old[value_key], old['ci'], scale, digits)} | "
            f"{_cell(new[value_key], new['ci'], scale, digits)} | {'∞' if df is None else f'{df:.1f}'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--baseline", nargs="+")
    parser.add_argument("--candidate", nargs="+")
    args = parser.parse_args()
    rows = [r for folder in args.folders for r in read_runs(folder)]
    mark_duplicates(rows)
    print("| configuration / corpus | statistic | percentile (earlier) | t interval (now) | df |\n|---|---|---|---|---|")
    if args.baseline:
        base, cand = select_group(rows, args.baseline, "baseline"), select_group(rows, args.candidate, "candidate")
        for corpus in sorted(set.intersection(*[set(r["ppl"]) for r in [*base, *cand]])):
            a, b = [_seed_run(r, corpus) for r in base], [_seed_run(r, corpus) for r in cand]
            old, new = compare(a, b, _bootstrap(), "percentile"), compare(a, b, _bootstrap(), "t")
            label = f"candidate − baseline, {corpus}, {'paired' if new['paired'] else 'unpaired'} n={new['n_baseline']}"
            for name in [s for s in STATISTICS if s in new["statistics"]]:
                print(_line(label, name, old["statistics"][name], new["statistics"][name], "difference"))
        return
    for group in seed_groups(rows):
        ok = [r for r in group if r["status"] == "ok"]
        for corpus in sorted({c for r in ok for c in r["ppl"]}):
            runs = [_seed_run(r, corpus) for r in ok if corpus in r["ppl"]]
            old, new = aggregate(runs, _bootstrap(), "percentile"), aggregate(runs, _bootstrap(), "t")
            label = f"{ok[0]['model']} {ok[0]['sparsifier']} {ok[0]['sparsity']}, {corpus}, n={new['n']}"
            for name in [s for s in STATISTICS if s in new["statistics"]]:
                print(_line(label, name, old["statistics"][name], new["statistics"][name], "mean"))


if __name__ == "__main__":
    main()
