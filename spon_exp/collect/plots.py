"""Figures with their uncertainty: perplexity and gap closure against target sparsity, each
point a configuration's mean over its seeds with its 95 % interval."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from spon_exp.collect.format import missing, row_key
from spon_exp.collect.groups import Configuration, configurations, stat
from spon_exp.tracking.intervals import interval


def write_plots(rows: list[dict], out: Path, configs: list[Configuration] | None = None) -> list[Path]:
    """Perplexity and gap closure against target sparsity, one line per (model, sparsifier,
    calibration corpus, SPON count); each point a configuration's mean over its seeds, its bar
    the 95 % interval of the table (over seeds and text; one run: over its text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = configurations(rows) if configs is None else configs
    ok = [r for r in rows if r["status"] == "ok" and r["sparsity"] is not None]
    corpora = sorted({c for r in ok for c in r["ppl"]})
    paths = []
    for corpus in corpora:
        series: dict = defaultdict(list)
        for config in configs:
            summary = config.ppl(corpus)  # the tables' summary: computed once
            if summary["n"] and config.first["sparsity"] is not None:
                series[row_key(config.first)].append((config.first["sparsity"], summary))
        if not series:
            continue
        fig, (ax_ppl, ax_gap) = plt.subplots(1, 2, figsize=(11, 4))
        for (model, sparsifier, calib, count), points in sorted(series.items(), key=lambda kv: str(kv[0])):
            points = sorted(points, key=lambda p: p[0])
            xs = [x * 100 for x, _ in points]
            seeds = sorted({s["n"] for _, s in points})
            label = f"{model} {sparsifier} (calib {calib}; n={'/'.join(map(str, seeds))})"
            stats = {name: [stat(s, name) for _, s in points] for name in ("ppl/dense", "ppl/sparse", "ppl/spon",
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
    pts = [(x, y, interval(ci)) for x, y, ci in zip(xs, ys, cis) if not missing(y) and interval(ci) is not None]
    if not pts:
        return
    ax.errorbar([x for x, _, _ in pts], [y * scale for _, y, _ in pts], fmt="none", ecolor=color, capsize=3,
                elinewidth=0.8, yerr=[[max(0.0, (y - lo) * scale) for _, y, (lo, _) in pts],
                                      [max(0.0, (hi - y) * scale) for _, y, (_, hi) in pts]])
