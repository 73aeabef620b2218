"""SPON quality on the packaged model: perplexity dense / sparse / +SPON and gap closure
per sparsifier and sparsity, on the evaluation split (disjoint from calibration).

A thin driver around the project's own machinery: it launches the sweep
``sweeps/quality_cpu.yaml`` for the chosen methods (finished runs are skipped, so the
methods can be run one invocation at a time; the last measured sweep is benchmarks/RESULTS.md,
"Quality sweep: each sparsifier at 25–70 %"), then builds the tables and plots with
``spon-exp-collect`` and writes a JSON summary (``benchmarks/results/quality/``).

    python benchmarks/quality/quality_sweep.py --methods teal --sparsities 0.25 0.5 0.6 0.7
    python benchmarks/quality/quality_sweep.py --methods teal wina rsparse larosa --jobs 2
    # each method beside its authors' settings (the reference presets, rows named by their label):
    python benchmarks/quality/quality_sweep.py --methods teal wina rsparse rsparse_ref larosa larosa_ref --sparsities 0.5
    python benchmarks/quality/quality_sweep.py --methods teal_ref wina_ref --jobs 2 --sparsities 0.5 \
        -- sparsifier.greedy_sequences=1 sparsifier.greedy_step=0.1   # the greedy search cut for a CPU ("--": overrides follow)

``--jobs N`` splits the methods between N concurrent sweeps of one thread each: on a small
CPU, single-thread training processes side by side get more done than one process using
every core (batch-1 steps parallelise poorly).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from spon_exp.collect import configurations, read_runs, write_plots, write_tables

REPO = Path(__file__).resolve().parents[2]
TARGETS = {0.5: 0.60, 0.6: 0.80}  # gap-closure targets (issue: quality sweep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["teal"],
                        help="sparsifier config names: teal wina rsparse larosa, presets such as teal_ref")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.5, 0.6, 0.7])
    parser.add_argument("--jobs", type=int, default=1, help="concurrent single-thread sweeps (methods split)")
    parser.add_argument("--collect-only", action="store_true", help="only rebuild the tables and plot from the runs")
    parser.add_argument("--outputs", default=str(REPO / "outputs"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality"))
    parser.add_argument("overrides", nargs="*", help="extra spon-exp overrides after --, e.g. -- spon.steps=200")
    args = parser.parse_args()
    sweep_dir = Path(args.outputs) / "sweeps" / "quality_cpu"
    groups = [] if args.collect_only else [args.methods[i::args.jobs] for i in range(min(args.jobs, len(args.methods)))]
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if len(groups) > 1 else {}))
    procs = []
    for i, methods in enumerate(groups):
        cmd = [sys.executable, "-m", "spon_exp.cli", "--multirun", "-cd", str(REPO / "sweeps"), "-cn", "quality_cpu",
               f"sparsifier={','.join(methods)}", f"sparsity={','.join(str(s) for s in args.sparsities)}",
               f"paths.outputs={args.outputs}", *args.overrides]
        print(" ".join(cmd), flush=True)
        if len(groups) == 1:
            subprocess.run(cmd, check=False, cwd=REPO)
            continue
        log_path = sweep_dir / f"driver_{'_'.join(methods)}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"  log: {log_path}", flush=True)
        with open(log_path, "a") as log:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    for proc in procs:
        proc.wait()

    rows = [r for r in read_runs(sweep_dir) if r["sparsifier"] in args.methods]
    out = Path(args.out)
    configs = configurations(rows)  # each configuration summarised once, for the tables, plots and summary
    written = write_tables(rows, out, configs)
    plots = write_plots(rows, out, configs)
    print(written["ppl_wikipedia"].read_text() if "ppl_wikipedia" in written else "no finished runs")
    summary = []  # one entry per configuration, its seeds aggregated (spon-exp-collect's table)
    for config in configs:
        group, agg = config.rows, config.ppl("wikipedia")
        if not agg["n"]:
            summary.append({"sparsifier": group[0]["sparsifier"], "sparsity": group[0]["sparsity"], "n": 0,
                            "not_ok": agg["not_ok"]})
            continue
        stats = agg["statistics"]
        gap = stats.get("gap_closure", {})
        target = TARGETS.get(group[0]["sparsity"])
        summary.append({
            "sparsifier": group[0]["sparsifier"], "sparsity": group[0]["sparsity"], "n": agg["n"],
            "seeds": agg["seeds"], "interval_over": agg["covers"], "not_ok": agg["not_ok"],
            "measured_sparsity": agg["measured_sparsity"], "effective_sparsity": agg["effective_sparsity"],
            **{v: stats[f"ppl/{v}"]["mean"] for v in ("dense", "sparse", "spon") if f"ppl/{v}" in stats},
            **{f"{v}_ci": stats[f"ppl/{v}"]["ci"] for v in ("dense", "sparse", "spon") if f"ppl/{v}" in stats},
            "gap_closure": gap.get("mean"), "gap_closure_ci": gap.get("ci"), "gap_closure_sd": gap.get("sd"),
            "gap_closure_per_seed": gap.get("values"), "target": target,
            "meets_target": None if target is None or gap.get("mean") is None else gap["mean"] >= target})
    for s in summary:
        if s.get("target") is not None and s.get("gap_closure") is not None:
            verdict = "meets" if s["meets_target"] else "MISSES"
            print(f"{s['sparsifier']} {s['sparsity']:.0%}: mean gap closure {s['gap_closure']:.1%} over {s['n']} seeds "
                  f"{verdict} target {s['target']:.0%}")
    (out / "quality.json").write_text(json.dumps(summary, indent=2))
    print("written:", ", ".join(str(p) for p in [*written.values(), *plots, out / "quality.json"]))


if __name__ == "__main__":
    main()
