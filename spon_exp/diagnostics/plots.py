"""PNGs of a run's diagnostics (one run), and side by side for many runs (``spon-exp-collect``)."""

from __future__ import annotations

from pathlib import Path

LABELS = {"dense": "dense", "sparse": "sparse", "spon": "+SPON"}
COLORS = {"dense": "tab:gray", "sparse": "tab:red", "spon": "tab:blue"}
SITES = ("qkv_input", "o_proj_input", "gate_up_input", "down_proj_input")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(d: dict) -> str:
    r = d["run"]
    return f"{r['model']} {r['sparsifier']} s={r['target_sparsity']} ({r['config_hash']})"


def write_plots(d: dict, folder: Path) -> dict[str, str]:
    """figure1.png, figure1_per_layer.png, drift.png, kl_curve.png, sparsity.png (those with
    data); returns ``{name: file name}``."""
    plt = _pyplot()
    written = {}
    for draw in (_figure1, _figure1_per_layer, _drift, _kl_curve, _sparsity_grid):
        name_fig = draw(plt, d)
        if name_fig is not None:
            name, fig = name_fig
            written[name] = _save(fig, folder, f"{name}.png")
    return written


def _figure1(plt, d: dict):
    f1 = d["figure1"]
    if not f1["average"]:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, curve in f1["average"].items():
        ax.plot(f1["length"], curve, label=LABELS[v], color=COLORS[v])
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("fraction of channels kept for all tokens")
    ax.set_title("Always-kept channels, mean over layers and sites\n" + _title(d), fontsize=9)
    ax.legend()
    return "figure1", fig


def _figure1_per_layer(plt, d: dict):
    f1 = d["figure1"]
    if not f1["average"]:
        return None
    variants = list(f1["per_site"])
    fig, axes = plt.subplots(len(variants), len(SITES), figsize=(3.2 * len(SITES), 2.6 * len(variants)),
                             sharex=True, sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, v in enumerate(variants):
        per = f1["per_site"][v]
        layers = sorted({int(k.split(".", 1)[0]) for k in per})
        for col, site in enumerate(SITES):
            ax = axes[row][col]
            for layer in layers:
                curve = per.get(f"{layer}.{site}")
                if curve is not None:
                    ax.plot(f1["length"], curve, color=cmap(layer / max(1, len(layers) - 1)), lw=0.8)
            ax.set_xscale("log")
            ax.set_ylim(-0.02, 1.02)
            if row == 0:
                ax.set_title(site, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{LABELS[v]}\nkept for all tokens", fontsize=8)
            if row == len(variants) - 1:
                ax.set_xlabel("sequence length")
    fig.suptitle("Always-kept channels per layer (colour: depth, dark = first)\n" + _title(d), fontsize=9)
    return "figure1_per_layer", fig


def _drift(plt, d: dict):
    drift = {v: x for v, x in d["drift"].items() if v != "dense"}
    if not drift:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for v, x in drift.items():
        a1.plot(x["layer"], x["rel_l2"], marker=".", label=LABELS[v], color=COLORS[v])
        a2.plot(x["layer"], x["cosine"], marker=".", label=LABELS[v], color=COLORS[v])
    a1.set_ylabel("‖h − h_dense‖ / ‖h_dense‖")
    a2.set_ylabel("cosine(h, h_dense)")
    for ax in (a1, a2):
        ax.set_xlabel("layer (residual stream after the block)")
        ax.legend()
    fig.suptitle("Hidden-state drift against the dense model\n" + _title(d), fontsize=9)
    return "drift", fig


def _kl_curve(plt, d: dict):
    kl = d["kl_curve"]
    if not kl["step"]:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(kl["step"], kl["kl"], color=COLORS["spon"])
    ax.set_xlabel("step")
    ax.set_ylabel("KL(dense ‖ sparse + SPON)")
    ax.set_title("α training\n" + _title(d), fontsize=9)
    return "kl_curve", fig


def _sparsity_grid(plt, d: dict):
    per = d["sparsity"]["per_projection"]
    if not per:
        return None
    import numpy as np

    layers = sorted({int(k.split(".", 1)[0]) for k in per})
    names = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
             if any(k.endswith("." + n) for k in per)]
    grid = np.full((len(names), len(layers)), np.nan)
    for k, v in per.items():
        layer, name = k.split(".", 1)
        grid[names.index(name), layers.index(int(layer))] = v
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(layers) + 2), 3.6))
    im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1)
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    ax.set_xlabel("layer")
    fig.colorbar(im, ax=ax, label="measured sparsity")
    ax.set_title(f"Measured sparsity per projection ({d['sparsity']['source']})\n" + _title(d), fontsize=8)
    return "sparsity", fig


def _save(fig, folder: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    _pyplot().close(fig)
    return name


def side_by_side(runs: list[tuple[str, dict]], out_dir: Path) -> list[Path]:
    """``diagnostics_drift.png`` and ``diagnostics_figure1.png``: the drift and Figure-1 curves of
    many runs (``(label, diagnostics.json)``) in one figure each; returns the files written."""
    if not runs:
        return []
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    files = []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (label, d) in enumerate(runs):
        for v, style in (("sparse", "--"), ("spon", "-")):
            x = d["drift"].get(v)
            if x:
                a1.plot(x["layer"], x["rel_l2"], style, color=cmap(i % 10), label=f"{label} {LABELS[v]}")
                a2.plot(x["layer"], x["cosine"], style, color=cmap(i % 10), label=f"{label} {LABELS[v]}")
    a1.set_ylabel("‖h − h_dense‖ / ‖h_dense‖")
    a2.set_ylabel("cosine(h, h_dense)")
    for ax in (a1, a2):
        ax.set_xlabel("layer")
    a2.legend(fontsize=6, loc="best")
    fig.suptitle("Hidden-state drift against the dense model (dashed: sparse, solid: +SPON)", fontsize=9)
    files.append(out_dir / _save(fig, out_dir, "diagnostics_drift.png"))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, d) in enumerate(runs):
        f1 = d["figure1"]
        for v, style in (("dense", ":"), ("sparse", "--"), ("spon", "-")):
            if v in f1["average"]:
                ax.plot(f1["length"], f1["average"][v], style, color=cmap(i % 10), label=f"{label} {LABELS[v]}")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("fraction of channels kept for all tokens")
    ax.legend(fontsize=6)
    ax.set_title("Always-kept channels, mean over layers and sites (dotted: dense, dashed: sparse, solid: +SPON)",
                 fontsize=8)
    files.append(out_dir / _save(fig, out_dir, "diagnostics_figure1.png"))
    return files


def collect_diagnostics(rows: list[dict], out_dir: Path) -> list[Path]:
    """For ``spon-exp-collect``: the runs among ``rows`` (its run rows, ``source`` = run folder)
    that hold ``diagnostics/diagnostics.json``, side by side: the two PNGs of
    :func:`side_by_side` and ``diagnostics_drift.csv`` (run, variant, layer, relative L2, cosine)."""
    import csv
    import json

    runs = []
    for r in rows:
        path = Path(str(r.get("source", ""))) / "diagnostics" / "diagnostics.json"
        if r.get("status") == "ok" and path.is_file():
            label = (f"{r.get('model')} {r.get('sparsifier')} s{r.get('sparsity')} spon{r.get('spon_count')} "
                     f"seed{r.get('seed')}")
            runs.append((label, json.loads(path.read_text())))
    if not runs:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    files = side_by_side(runs, out_dir)
    with open(out_dir / "diagnostics_drift.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "config_hash", "variant", "layer", "rel_l2", "cosine"])
        for label, d in runs:
            for v, x in d["drift"].items():
                for layer, rel, cos in zip(x["layer"], x["rel_l2"], x["cosine"]):
                    w.writerow([label, d["run"]["config_hash"], v, layer, rel, cos])
    return [*files, out_dir / "diagnostics_drift.csv"]
