"""Figures over seeds: a configuration's mean over its seeds, with a 95 % interval that covers
both training randomness and the evaluation text, and paired differences between two
configurations.

One run's interval (:mod:`spon_exp.evaluation.uncertainty`) resamples the evaluation blocks
of that run: it says how far the figure would move on other text, not with another seed.
A seed changes the calibration sample and α training's batch order, and on the default
config that alone moves the gap closure by several points. So a configuration run with
seeds ``s = 1..n``, all scored on the same blocks ``b = 1..m``, is read as a crossed design
(seeds × blocks), and its interval comes from a **two-level bootstrap**; each resample:

1. draws ``m`` block indices with replacement, the *same* draw for every seed and every
   variant (every seed is scored on the same text, so the text's randomness is shared);
2. recomputes each seed's statistic (perplexity per variant, gap closure) on those blocks;
3. draws ``n`` seeds with replacement and averages their statistics. The seed draw's
   deviation from the all-seed mean is scaled by ``sqrt(n / (n - 1))``, which makes the
   bootstrap variance of a mean over seeds unbiased (an unscaled bootstrap underestimates it
   by ``(n - 1) / n``: a third with 3 seeds).

The interval is the 2.5 and 97.5 percentiles of the resampled means. Resampling both levels
of a crossed design counts the interaction once more than it occurs, so the interval errs
on the wide side; with few seeds the percentile interval still cannot reach beyond what the
seeds showed (with 3 seeds it is narrower than a t interval would be): read it with the
between-seed SD beside it, and run more seeds where a conclusion hangs on it.

A **comparison** of configurations A and B (candidate − baseline) does the same with the
difference of their statistics: *paired* by seed when both ran the same seeds (seed ``s`` of
A against seed ``s`` of B, so what a seed shares between the two cancels), with independent
seed draws otherwise; the block draw is always shared, as both are scored on the same text.

Zero-shot averages and recovery are aggregated the same way, documents standing for blocks:
each resample draws every task's documents once (shared by seeds and variants), as a run's
own interval does (:func:`spon_exp.evaluation.uncertainty.zeroshot_intervals`).

Runs whose per-block NLLs (per-document scores) are not at hand (``eval_units.safetensors``
missing, or rows read from W&B) resample the seeds only: their ``covers`` says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spon_exp.evaluation.perplexity import MIN_RELATIVE_GAP, BlockNLL
from spon_exp.evaluation.uncertainty import Bootstrap

VARIANTS = ("dense", "sparse", "spon")


@dataclass
class SeedRun:
    """One seed's perplexity figures on one corpus: the values as the run stored them and,
    where available, the per-block NLLs behind them (the same blocks for every variant)."""

    seed: int | None
    ppl: dict[str, float]
    blocks: dict[str, BlockNLL] | None = None


def _gap(dense: torch.Tensor, sparse: torch.Tensor, spon: torch.Tensor) -> torch.Tensor:
    """Gap closure, NaN where there is no gap (:func:`spon_exp.evaluation.perplexity.gap_closure`)."""
    gap = sparse - dense
    out = torch.full_like(gap, float("nan"))
    defined = gap > MIN_RELATIVE_GAP * dense
    out[defined] = (sparse - spon)[defined] / gap[defined]
    return out


def _statistics(ppl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ppl/<variant>``, ``ppl/final`` (the model as the run left it: +SPON, else sparse, else
    dense) and, with all three variants, ``gap_closure``: tensors of one shape."""
    out = {f"ppl/{v}": p for v, p in ppl.items()}
    final = next((v for v in ("spon", "sparse", "dense") if v in ppl), None)
    if final is not None:
        out["ppl/final"] = ppl[final]
    if set(VARIANTS) <= ppl.keys():
        out["gap_closure"] = _gap(ppl["dense"], ppl["sparse"], ppl["spon"])
    return out


def point_values(runs: Sequence[SeedRun]) -> dict[str, list[float]]:
    """Each statistic's value per seed, as the runs stored them (gap closure recomputed from
    the stored perplexities, NaN where undefined)."""
    variants = [v for v in VARIANTS if all(v in r.ppl and r.ppl[v] is not None for r in runs)]
    ppl = {v: torch.tensor([float(r.ppl[v]) for r in runs], dtype=torch.float64) for v in variants}
    return {k: [float(x) for x in t] for k, t in _statistics(ppl).items()}


def _resampled_statistics(runs: Sequence[SeedRun], block_idx: torch.Tensor | None, resamples: int
                          ) -> dict[str, torch.Tensor]:
    """``{statistic: [resamples, seeds]}``: each seed's statistic on each block resample
    (``block_idx`` ``[resamples, blocks]``), or its stored value repeated without one."""
    variants = [v for v in VARIANTS if all(v in r.ppl and r.ppl[v] is not None for r in runs)]
    ppl = {}
    for v in variants:
        if block_idx is None:
            ppl[v] = torch.tensor([float(r.ppl[v]) for r in runs], dtype=torch.float64).expand(resamples, -1)
        else:
            ppl[v] = torch.stack([torch.exp(r.blocks[v].nll[block_idx].sum(1)
                                            / r.blocks[v].tokens[block_idx].sum(1).double()) for r in runs], dim=1)
    return _statistics(ppl)


def _has_blocks(runs: Sequence[SeedRun]) -> bool:
    return all(r.blocks is not None for r in runs)


def _block_count(runs: Sequence[SeedRun]) -> int | None:
    sizes = {b.nll.numel() for r in runs if r.blocks for b in r.blocks.values()}
    if len(sizes) > 1:
        raise ValueError(f"runs scored on different numbers of evaluation blocks ({sorted(sizes)}): "
                         f"not the same evaluation data, so their blocks cannot be paired")
    return sizes.pop() if sizes else None


def _seed_mean(values: torch.Tensor, seed_idx: torch.Tensor) -> torch.Tensor:
    """Per resample, the mean over the drawn seeds, its deviation from the all-seed mean scaled
    by sqrt(n / (n - 1)) (unbiased variance of a mean over n seeds); a single seed: as is."""
    n = values.shape[1]
    full = values.mean(1)
    if n == 1:
        return full
    drawn = torch.gather(values, 1, seed_idx).mean(1)
    return full + math.sqrt(n / (n - 1)) * (drawn - full)


def _covers(n_seeds: int, blocks: bool, units: str = "blocks") -> str:
    if blocks:
        return f"seeds and {units}" if n_seeds > 1 else units
    return "seeds" if n_seeds > 1 else "none"


def _sd(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return None
    mean = sum(finite) / len(finite)
    return math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values and all(math.isfinite(v) for v in values) else None


@dataclass
class ZeroshotSeedRun:
    """One seed's zero-shot task averages per variant and, where available, each task's
    per-document scores per variant (the same documents for every variant and seed)."""

    seed: int | None
    average: dict[str, float]
    items: dict[str, dict[str, torch.Tensor]] | None = None


def _recovery(dense: torch.Tensor, sparse: torch.Tensor, spon: torch.Tensor) -> torch.Tensor:
    """(spon − sparse) / (dense − sparse), NaN where dense equals sparse."""
    gap = dense - sparse
    out = torch.full_like(gap, float("nan"))
    defined = gap != 0
    out[defined] = (spon - sparse)[defined] / gap[defined]
    return out


def _zeroshot_statistics(average: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {f"average/{v}": a for v, a in average.items()}
    if set(VARIANTS) <= average.keys():
        out["recovery"] = _recovery(average["dense"], average["sparse"], average["spon"])
    return out


def aggregate_zeroshot(runs: Sequence[ZeroshotSeedRun], boot: Bootstrap) -> dict:
    """A configuration's zero-shot figures over its seeds (``average/<variant>``, ``recovery``):
    as :func:`aggregate`, documents resampled within each task in place of blocks."""
    if not runs:
        raise ValueError("no runs to aggregate")
    variants = [v for v in VARIANTS if all(v in r.average and r.average[v] is not None for r in runs)]
    items = all(r.items is not None and all(v in r.items for v in variants) for r in runs)
    if items:
        tasks = sorted(runs[0].items[variants[0]])
        sizes = {t: {r.items[v][t].numel() for r in runs for v in variants} for t in tasks}
        if any(len(n) > 1 for n in sizes.values()):
            raise ValueError(f"runs scored on different documents ({sizes}): their documents cannot be paired")
        idx = {t: boot.indices(next(iter(sizes[t])), stream=10 + i) for i, t in enumerate(tasks)}
        average = {v: torch.stack([torch.stack([r.items[v][t].double()[idx[t]].mean(1) for t in tasks]).mean(0)
                                   for r in runs], dim=1) for v in variants}
    else:
        average = {v: torch.tensor([float(r.average[v]) for r in runs], dtype=torch.float64).expand(boot.resamples, -1)
                   for v in variants}
    resampled = _zeroshot_statistics(average)
    point = _zeroshot_statistics({v: torch.tensor([float(r.average[v]) for r in runs], dtype=torch.float64)
                                  for v in variants})
    seed_idx = boot.indices(len(runs), stream=2)
    out = {"n": len(runs), "seeds": [r.seed for r in runs], "covers": _covers(len(runs), items, "documents"),
           "statistics": {}}
    for name, per_seed in resampled.items():
        values = [float(x) for x in point[name]]
        ci = boot.interval(_seed_mean(per_seed, seed_idx)) if (items or len(runs) > 1) else None
        out["statistics"][name] = {"mean": _mean(values), "ci": ci, "sd": _sd(values), "values": values}
    return out


def aggregate(runs: Sequence[SeedRun], boot: Bootstrap) -> dict:
    """A configuration's seeds on one corpus: per statistic (``ppl/<variant>``,
    ``gap_closure``) its ``mean`` over seeds, ``ci`` (the two-level interval), between-seed
    ``sd`` and every seed's ``values``; plus ``n``, ``seeds`` and ``covers`` (what the
    interval resamples: ``seeds and blocks``, ``blocks`` for one seed, ``seeds`` without
    per-block data)."""
    if not runs:
        raise ValueError("no runs to aggregate")
    blocks = _has_blocks(runs)
    m = _block_count(runs) if blocks else None
    block_idx = boot.indices(m, stream=1) if blocks else None
    seed_idx = boot.indices(len(runs), stream=2)
    resampled = _resampled_statistics(runs, block_idx, boot.resamples)
    values = point_values(runs)
    out = {"n": len(runs), "seeds": [r.seed for r in runs], "covers": _covers(len(runs), blocks), "statistics": {}}
    for name, per_seed in resampled.items():
        ci = boot.interval(_seed_mean(per_seed, seed_idx)) if (blocks or len(runs) > 1) else None
        out["statistics"][name] = {"mean": _mean(values[name]), "ci": ci, "sd": _sd(values[name]),
                                   "values": values[name]}
    return out


def compare(baseline: Sequence[SeedRun], candidate: Sequence[SeedRun], boot: Bootstrap) -> dict:
    """Candidate − baseline for every statistic both have: ``difference`` (of the means over
    seeds), its two-level ``ci``, and ``excludes_zero``; ``paired`` says whether seeds were
    matched (both ran the same seeds) or drawn independently."""
    if not baseline or not candidate:
        raise ValueError("a comparison needs runs on both sides")
    blocks = _has_blocks(baseline) and _has_blocks(candidate)
    m = _block_count([*baseline, *candidate]) if blocks else None
    block_idx = boot.indices(m, stream=1) if blocks else None
    seeds_a, seeds_b = [r.seed for r in baseline], [r.seed for r in candidate]
    paired = sorted(seeds_a, key=str) == sorted(seeds_b, key=str) and len(set(map(str, seeds_a))) == len(seeds_a)
    if paired:  # the same order on both sides: seed s against seed s
        order = {str(s): i for i, s in enumerate(seeds_a)}
        candidate = sorted(candidate, key=lambda r: order[str(r.seed)])
    res_a = _resampled_statistics(baseline, block_idx, boot.resamples)
    res_b = _resampled_statistics(candidate, block_idx, boot.resamples)
    val_a, val_b = point_values(baseline), point_values(candidate)
    out = {"paired": paired, "n_baseline": len(baseline), "n_candidate": len(candidate),
           "covers": _covers(min(len(baseline), len(candidate)), blocks), "statistics": {}}
    for name in [k for k in res_a if k in res_b]:
        if paired:
            diffs = [b - a for a, b in zip(val_a[name], val_b[name])]
            resampled = _seed_mean(res_b[name] - res_a[name], boot.indices(len(baseline), stream=2))
        else:
            diffs = None
            resampled = (_seed_mean(res_b[name], boot.indices(len(candidate), stream=3))
                         - _seed_mean(res_a[name], boot.indices(len(baseline), stream=2)))
        mean_a, mean_b = _mean(val_a[name]), _mean(val_b[name])
        difference = None if mean_a is None or mean_b is None else mean_b - mean_a
        enough = blocks or min(len(baseline), len(candidate)) > 1
        ci = boot.interval(resampled) if enough else None
        out["statistics"][name] = {
            "baseline": mean_a, "candidate": mean_b, "difference": difference, "ci": ci,
            "excludes_zero": None if ci is None else bool(ci[0] > 0 or ci[1] < 0),
            "per_seed_differences": diffs}
    return out
