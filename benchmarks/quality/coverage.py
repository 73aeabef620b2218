"""Coverage of the intervals over seeds, on simulated runs whose true values are known.

Each simulated run is one seed of a configuration scored on the same ``m`` evaluation blocks
as every other seed. A block's per-token NLL of variant ``v`` (dense, sparse, +SPON) is

    log P_v  +  a[seed, v]  +  text[block]  +  text_v[block, v]  +  seed_text[seed, block, v]

- ``a``: what the seed does: a calibration part shared by sparse and +SPON, plus α training's
  own part for +SPON (dense has no seed);
- ``text``: how hard the block is, for every variant alike;
- ``text_v``: how much sparsity hurts the block (sparse, and +SPON correlated with it);
- ``seed_text``: the seed × block interaction (sparse and +SPON).

The truth of a configuration is the mean over seeds, on unlimited text, of each statistic
(perplexity per variant, gap closure), computed by Monte Carlo over 10^6 seeds. A candidate
configuration differs by a fixed shift of sparse and +SPON; its terms correlate with the
baseline's (the same seeds for a paired comparison, other seeds for an unpaired one, the same
text for both). For every scenario and number of seeds the script draws ``--datasets``
datasets, runs ``spon_exp.evaluation.seeds.aggregate`` and ``compare`` on them with the
earlier percentile interval and the t interval, and reports how often each 95 % interval
covers the truth and its median width (gap closure in points, perplexity in its own units).

    flock /tmp/heavy.lock env OMP_NUM_THREADS=1 python benchmarks/quality/coverage.py
    python benchmarks/quality/coverage.py --datasets 50 --seeds 3   # a quick look

Writes ``benchmarks/results/quality/coverage.json``; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from spon_exp.evaluation.gap import gap_closure
from spon_exp.evaluation.perplexity import BlockNLL
from spon_exp.evaluation.seeds import SeedRun, aggregate, compare
from spon_exp.evaluation.uncertainty import Bootstrap

RESULTS = Path(__file__).resolve().parents[1] / "results" / "quality" / "coverage.json"
VARIANTS = ("dense", "sparse", "spon")
LOG_PPL = np.log([24.81, 37.3, 29.5])  # the default config's dense, sparse, +SPON
SHIFT = np.array([0.0, 0.03, 0.02])  # the candidate: worse sparse, slightly worse +SPON (log units)
TOKENS = 255  # scored tokens per block (256-token blocks)
SPON_FOLLOWS_SPARSE = 0.6  # +SPON's text and seed × text terms: this much of sparse's, plus its own
CELL_STATS = ("gap_closure", "ppl/dense", "ppl/sparse", "ppl/spon")
COMPARED_STATS = ("gap_closure", "ppl/sparse", "ppl/spon")  # dense is the same model on both sides


@dataclass(frozen=True)
class Scenario:
    """Standard deviations of the terms, in per-token NLL (log perplexity) units."""

    calib: float  # the seed's calibration effect (sparse and +SPON)
    train: float  # α training's own seed effect (+SPON)
    text: float  # the block's difficulty (every variant)
    sparse_text: float  # the block's sparsity-specific term (sparse; +SPON follows it in part)
    spon_text: float  # +SPON's own block term
    seed_text: float  # seed × block (sparse and +SPON)
    same_seed: float = 0.8  # correlation of the candidate's seed effects with the baseline's (same seed)
    same_text: float = 0.7  # ... of its sparsity-specific block terms (same text)
    same_seed_text: float = 0.5  # ... of its seed × block terms (same seed, same block)


SCENARIOS = {
    # the seeds disagree far more than the text moves the gap closure
    "seed-dominated": Scenario(calib=0.02, train=0.02, text=0.02, sparse_text=0.01, spon_text=0.01, seed_text=0.005),
    # the two are about equal for one run
    "balanced": Scenario(calib=0.008, train=0.008, text=0.1, sparse_text=0.04, spon_text=0.04, seed_text=0.02),
    # the text dominates; the seeds barely matter
    "block-dominated": Scenario(calib=0.002, train=0.002, text=0.38, sparse_text=0.06, spon_text=0.06, seed_text=0.02),
    # the default config's magnitudes: between-seed SD of the gap closure ~3.3 points, a run's
    # own interval ± ~5 points, perplexity's block SD of the dense model's (32 blocks)
    "default-like": Scenario(calib=0.0124, train=0.0124, text=0.38, sparse_text=0.05, spon_text=0.05,
                             seed_text=0.05),
}


def _terms(rng: np.random.Generator, shape_seeds: tuple, blocks: int) -> dict:
    """Standard-normal draws of every term: ``seed`` [..., n, 2] (calibration, training), ``text``
    [..., m], ``text_v`` [..., m, 2] (sparse, +SPON's own), ``seed_text`` [..., n, m, 2]."""
    lead, n = shape_seeds[:-1], shape_seeds[-1]
    return {"seed": rng.standard_normal((*lead, n, 2)), "text": rng.standard_normal((*lead, blocks)),
            "text_v": rng.standard_normal((*lead, blocks, 2)), "seed_text": rng.standard_normal((*lead, n, blocks, 2))}


def _correlated(rng: np.random.Generator, z: dict, sc: Scenario, paired: bool) -> dict:
    """The candidate's standard-normal terms: the same text, the same or other seeds."""
    def mix(x, rho):
        return rho * x + math.sqrt(1 - rho ** 2) * rng.standard_normal(x.shape)

    return {"seed": mix(z["seed"], sc.same_seed) if paired else rng.standard_normal(z["seed"].shape),
            "text": z["text"], "text_v": mix(z["text_v"], sc.same_text),
            "seed_text": mix(z["seed_text"], sc.same_seed_text) if paired else rng.standard_normal(z["seed_text"].shape)}


def _log_ppl(z: dict, sc: Scenario, shift: np.ndarray) -> np.ndarray:
    """Per-token NLL ``[..., seeds, blocks, variant]`` from standard-normal terms."""
    seed = z["seed"][..., None, :] * [sc.calib, sc.train]  # [..., n, 1, 2]
    sparse_seed, spon_seed = seed[..., 0], seed[..., 0] + seed[..., 1]
    text = z["text"][..., None, :] * sc.text  # [..., 1, m]
    tv = z["text_v"][..., None, :, :]
    sparse_text = tv[..., 0] * sc.sparse_text
    spon_text = SPON_FOLLOWS_SPARSE * sparse_text + tv[..., 1] * sc.spon_text
    st = z["seed_text"] * sc.seed_text
    sparse_st, spon_st = st[..., 0], SPON_FOLLOWS_SPARSE * st[..., 0] + st[..., 1] * math.sqrt(1 - SPON_FOLLOWS_SPARSE ** 2)
    base = LOG_PPL + shift
    dense = base[0] + text + 0 * sparse_seed
    sparse = base[1] + text + sparse_seed + sparse_text + sparse_st
    spon = base[2] + text + spon_seed + spon_text + spon_st
    return np.stack(np.broadcast_arrays(dense, sparse, spon), axis=-1)


def truth(sc: Scenario, shift: np.ndarray, seeds: int = 1_000_000, seed: int = 1) -> dict:
    """Each statistic's mean over seeds on unlimited text (the block terms average out)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((seeds, 2))
    log = LOG_PPL + shift
    dense = np.full(seeds, math.exp(log[0]))
    sparse = np.exp(log[1] + sc.calib * z[:, 0])
    spon = np.exp(log[2] + sc.calib * z[:, 0] + sc.train * z[:, 1])
    gap = gap_closure(*(torch.from_numpy(x) for x in (dense, sparse, spon)))
    return {"ppl/dense": float(dense.mean()), "ppl/sparse": float(sparse.mean()), "ppl/spon": float(spon.mean()),
            "gap_closure": float(gap.mean())}


def _runs(nll: np.ndarray, seeds: list[int]) -> list[SeedRun]:
    """SeedRuns from per-token NLL ``[seeds, blocks, variant]``."""
    tokens = torch.full((nll.shape[1],), TOKENS, dtype=torch.int64)
    out = []
    for s, per_seed in zip(seeds, nll):
        blocks = {v: BlockNLL(torch.from_numpy(per_seed[:, i] * TOKENS), tokens) for i, v in enumerate(VARIANTS)}
        out.append(SeedRun(s, {v: b.perplexity for v, b in blocks.items()}, blocks))
    return out


def _record(tally: dict, key: tuple, stats: dict, target: dict) -> None:
    for name, want in target.items():
        ci = stats[name]["ci"]
        entry = tally.setdefault((*key, name), {"covered": 0, "undefined": 0, "widths": []})
        if ci is None:
            entry["undefined"] += 1
            continue
        entry["covered"] += ci[0] <= want <= ci[1]
        entry["widths"].append(ci[1] - ci[0])


def simulate(name: str, sc: Scenario, n: int, datasets: int, blocks: int, boot: Bootstrap, seed: int) -> dict:
    """``{(kind, method, statistic): tally}`` over ``datasets`` simulated datasets."""
    rng = np.random.default_rng([seed, n, list(SCENARIOS).index(name)])
    z = _terms(rng, (datasets, n), blocks)
    base = _log_ppl(z, sc, np.zeros(3))
    paired = _log_ppl(_correlated(rng, z, sc, True), sc, SHIFT)
    unpaired = _log_ppl(_correlated(rng, z, sc, False), sc, SHIFT)
    t_base, t_cand = truth(sc, np.zeros(3)), truth(sc, SHIFT)
    target_diff = {k: t_cand[k] - t_base[k] for k in COMPARED_STATS}
    tally: dict = {}
    for d in range(datasets):
        a, b = _runs(base[d], list(range(n))), _runs(paired[d], list(range(n)))
        c = _runs(unpaired[d], list(range(100, 100 + n)))
        for method in ("percentile", "t"):
            _record(tally, ("cell", method), aggregate(a, boot, method)["statistics"],
                    {k: t_base[k] for k in CELL_STATS})
            _record(tally, ("paired", method), compare(a, b, boot, method)["statistics"], target_diff)
            _record(tally, ("unpaired", method), compare(a, c, boot, method)["statistics"], target_diff)
    return tally


def scale_of(name: str, sc: Scenario, blocks: int, boot: Bootstrap) -> dict:
    """What the scenario looks like: the gap closure's between-seed SD and one run's block SE."""
    rng = np.random.default_rng(7)
    nll = _log_ppl(_terms(rng, (400,), blocks), sc, np.zeros(3))
    per_seed = [aggregate(_runs(nll[s:s + 1], [s]), boot)["statistics"]["gap_closure"] for s in range(0, 400, 40)]
    se = float(np.median([(g["parts"]["blocks"]) ** 0.5 for g in per_seed]))
    gaps = np.asarray(truth_per_seed(sc))
    return {"gap_sd_between_seeds_pts": float(gaps.std()) * 100, "gap_block_se_one_run_pts": se * 100}


def truth_per_seed(sc: Scenario, seeds: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(3)
    z = rng.standard_normal((seeds, 2))
    dense = np.full(seeds, math.exp(LOG_PPL[0]))
    sparse = np.exp(LOG_PPL[1] + sc.calib * z[:, 0])
    spon = np.exp(LOG_PPL[2] + sc.calib * z[:, 0] + sc.train * z[:, 1])
    return gap_closure(*(torch.from_numpy(x) for x in (dense, sparse, spon))).numpy()


def table(results: dict, seeds: list[int], kind: str, stats: tuple) -> str:
    lines = [f"| scenario | statistic | interval | {' | '.join(f'n = {n}' for n in seeds)} |",
             "|---|---|---|" + "---|" * len(seeds)]
    for name in results:
        for stat in stats:
            for method, label in (("percentile", "old"), ("t", "new")):
                cells = []
                for n in seeds:
                    r = results[name][str(n)][f"{kind}/{method}/{stat}"]
                    unit = 100 if stat == "gap_closure" else 1
                    cells.append(f"{r['coverage'] * 100:.1f} % ({r['median_width'] * unit:.2f})")
                lines.append(f"| {name} | {stat} | {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 5, 10])
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    boot = Bootstrap(resamples=args.resamples)
    results: dict = {}
    start = time.perf_counter()
    for name in args.scenarios:
        results[name] = {"scenario": asdict(SCENARIOS[name]), "scale": scale_of(name, SCENARIOS[name], args.blocks, boot)}
        for n in args.seeds:
            tally = simulate(name, SCENARIOS[name], n, args.datasets, args.blocks, boot, seed=0)
            results[name][str(n)] = {"/".join(k): {"coverage": t["covered"] / args.datasets,
                                                   "undefined": t["undefined"],
                                                   "median_width": float(np.median(t["widths"])) if t["widths"] else None}
                                     for k, t in tally.items()}
            print(f"{name}, n={n}: {time.perf_counter() - start:.0f} s", flush=True)
    meta = {"datasets": args.datasets, "blocks": args.blocks, "resamples": args.resamples, "seeds": args.seeds,
            "seconds": time.perf_counter() - start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    for name in results:
        s = results[name]["scale"]
        print(f"{name}: gap closure between-seed SD {s['gap_sd_between_seeds_pts']:.1f} pts, "
              f"one run's block SE {s['gap_block_se_one_run_pts']:.1f} pts")
    for kind, stats in (("cell", CELL_STATS), ("paired", COMPARED_STATS), ("unpaired", COMPARED_STATS)):
        print(f"\n### {kind}: coverage (median width)\n")
        print(table(results, args.seeds, kind, stats))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
