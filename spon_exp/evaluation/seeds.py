"""Figures over seeds: a configuration's mean over its seeds, with a 95 % interval that covers
both training randomness and the evaluation text, and differences between two configurations.

One run's interval (:mod:`spon_exp.evaluation.uncertainty`) resamples the evaluation blocks
of that run: it says how far the figure would move on other text, not with another seed.
A seed changes the calibration sample and α training's batch order, and on the default
config that alone moves the gap closure by several points. So a configuration run with
seeds ``s = 1..n``, all scored on the same blocks ``b = 1..m``, is read as a crossed design
(seeds × blocks). Its statistics (perplexity per variant, gap closure) are recomputed for
each seed on block resamples, one draw shared by every seed and every variant (every seed is
scored on the same text, so the text's randomness is shared), and the interval of their
mean over seeds adds that block part to the between-seed part (``s²/n``), with a t quantile
(:mod:`spon_exp.evaluation.seed_intervals`, which also keeps the earlier percentile method).

A **comparison** of configurations A and B (candidate − baseline) does the same with the
difference of their statistics: *paired* by seed on the seeds both ran (seed ``s`` of A
against seed ``s`` of B, so what a seed shares between the two cancels), unpaired where they
share fewer than two; the block draw is shared, as both are scored on the same text (runs
scored with another protocol, split, block length or tokens per block are refused:
:mod:`spon_exp.evaluation.pairing`). With fewer than two seeds on a side the between-seed
variance is unknown: the comparison gives its interval over blocks and no verdict.

Zero-shot averages and recovery are aggregated the same way, documents standing for blocks:
each resample draws every task's documents once (shared by seeds and variants), as a run's
own interval does (:func:`spon_exp.evaluation.uncertainty.zeroshot_intervals`).

Runs whose per-block NLLs (per-document scores) are not at hand (``eval_units.safetensors``
missing, or rows read from W&B) give the between-seed part only: their ``covers`` says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spon_exp.evaluation.pairing import check_same_text, pair_seeds, refusal
from spon_exp.evaluation.gap import VARIANTS, gap_closure, zeroshot_recovery
from spon_exp.evaluation.perplexity import BlockNLL
from spon_exp.evaluation.seed_intervals import METHODS, cell_interval, difference_interval
from spon_exp.evaluation.uncertainty import Bootstrap

@dataclass
class SeedRun:
    """One seed's perplexity figures on one corpus: the values as the run stored them and,
    where available, the per-block NLLs behind them (the same blocks for every variant) and
    how they were scored (results.json's ``ppl_protocol``)."""

    seed: object
    ppl: dict[str, float]
    blocks: dict[str, BlockNLL] | None = None
    protocol: dict | None = None


def _statistics(ppl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ppl/<variant>``, ``ppl/final`` (the model as the run left it: +SPON, else sparse, else
    dense) and, with all three variants, ``gap_closure``: tensors of one shape."""
    out = {f"ppl/{v}": p for v, p in ppl.items()}
    final = next((v for v in ("spon", "sparse", "dense") if v in ppl), None)
    if final is not None:
        out["ppl/final"] = ppl[final]
    if set(VARIANTS) <= ppl.keys():
        out["gap_closure"] = gap_closure(ppl["dense"], ppl["sparse"], ppl["spon"])
    return out


def _variants(runs: Sequence[SeedRun]) -> list[str]:
    return [v for v in VARIANTS if all(v in r.ppl and r.ppl[v] is not None for r in runs)]


def point_values(runs: Sequence[SeedRun]) -> dict[str, list[float]]:
    """Each statistic's value per seed, as the runs stored them (gap closure recomputed from
    the stored perplexities, NaN where undefined)."""
    ppl = {v: torch.tensor([float(r.ppl[v]) for r in runs], dtype=torch.float64) for v in _variants(runs)}
    return {k: [float(x) for x in t] for k, t in _statistics(ppl).items()}


def _resampled_statistics(runs: Sequence[SeedRun], variants: list[str], counts: torch.Tensor | None
                          ) -> dict[str, torch.Tensor] | None:
    """``{statistic: [resamples, seeds]}``: each seed's statistic on each block resample
    (``counts`` ``[resamples, blocks]``: how often each block is drawn, one draw for every seed
    and variant); None without one. Every run scored the same tokens per block
    (:func:`spon_exp.evaluation.pairing.check_same_text`)."""
    if counts is None:
        return None
    tokens = counts @ runs[0].blocks[variants[0]].tokens.double()
    ppl = {v: torch.exp(counts @ torch.stack([r.blocks[v].nll.double() for r in runs], dim=1) / tokens[:, None])
           for v in variants}
    return _statistics(ppl)


def _has_blocks(runs: Sequence[SeedRun]) -> bool:
    return all(r.blocks is not None for r in runs)


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


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"interval method must be one of {METHODS}, got {method!r}")


def aggregate(runs: Sequence[SeedRun], boot: Bootstrap, method: str = "t") -> dict:
    """A configuration's seeds on one corpus: per statistic (``ppl/<variant>``,
    ``gap_closure``) its ``mean`` over seeds, ``ci`` (the interval over seeds and blocks), its
    ``df`` and variance ``parts``, between-seed ``sd`` and every seed's ``values``; plus ``n``,
    ``seeds`` and ``covers`` (what the interval covers: ``seeds and blocks``, ``blocks`` for one
    seed, ``seeds`` without per-block data)."""
    if not runs:
        raise ValueError("no runs to aggregate")
    _check_method(method)
    blocks = _has_blocks(runs)
    m = check_same_text(runs) if blocks else None
    variants = _variants(runs)
    resampled = _resampled_statistics(runs, variants, boot.counts(m, stream=1) if blocks else None)
    values = point_values(runs)
    seed_idx = boot.indices(len(runs), stream=2)
    out = {"n": len(runs), "seeds": [r.seed for r in runs], "covers": _covers(len(runs), blocks),
           "method": method, "statistics": {}}
    for name, vals in values.items():
        mean = _mean(vals)
        per_seed = None if resampled is None else resampled[name]
        out["statistics"][name] = {"mean": mean, "sd": _sd(vals), "values": vals,
                                   **cell_interval(mean, vals, per_seed, boot, (m or 1) - 1, method, seed_idx)}
    return out


def compare(baseline: Sequence[SeedRun], candidate: Sequence[SeedRun], boot: Bootstrap, method: str = "t") -> dict:
    """Candidate − baseline for every statistic both have: ``difference`` (of the means over
    seeds), its ``ci`` and ``excludes_zero`` (None, with the reason in ``refused``, when a side
    has fewer than two seeds); ``paired`` says whether seeds were matched (on the seeds both
    ran, ``left_out`` naming the others) or taken as independent."""
    if not baseline or not candidate:
        raise ValueError("a comparison needs runs on both sides")
    _check_method(method)
    baseline, candidate, paired, left_out = pair_seeds(baseline, candidate)
    blocks = _has_blocks(baseline) and _has_blocks(candidate)
    m = check_same_text([*baseline, *candidate], blocks)
    variants = [v for v in _variants(baseline) if v in _variants(candidate)]
    counts = boot.counts(m, stream=1) if blocks else None
    res_a = _resampled_statistics(baseline, variants, counts)
    res_b = _resampled_statistics(candidate, variants, counts)
    val_a, val_b = point_values(baseline), point_values(candidate)
    n = len(baseline) if paired else min(len(baseline), len(candidate))
    refused = refusal(n, blocks)
    out = {"paired": paired, "n_baseline": len(baseline), "n_candidate": len(candidate), "left_out": left_out,
           "covers": _covers(n, blocks), "method": method, "refused": refused, "statistics": {}}
    for name in [k for k in val_a if k in val_b]:
        mean_a, mean_b = _mean(val_a[name]), _mean(val_b[name])
        difference = None if mean_a is None or mean_b is None else mean_b - mean_a
        interval = difference_interval(difference, val_a[name], val_b[name], None if res_a is None else res_a[name],
                                       None if res_b is None else res_b[name], paired, boot, (m or 1) - 1, method)
        ci = interval["ci"]
        out["statistics"][name] = {
            "baseline": mean_a, "candidate": mean_b, "difference": difference, **interval,
            "excludes_zero": None if ci is None or refused else bool(ci[0] > 0 or ci[1] < 0),
            "per_seed_differences": [b - a for a, b in zip(val_a[name], val_b[name])] if paired else None}
    return out


@dataclass
class ZeroshotSeedRun:
    """One seed's zero-shot task averages per variant and, where available, each task's
    per-document scores per variant (the same documents for every variant and seed)."""

    seed: object
    average: dict[str, float]
    items: dict[str, dict[str, torch.Tensor]] | None = None


def _zeroshot_statistics(average: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {f"average/{v}": a for v, a in average.items()}
    if set(VARIANTS) <= average.keys():
        out["recovery"] = zeroshot_recovery(average["dense"], average["sparse"], average["spon"])
    return out


def _resampled_averages(runs: Sequence[ZeroshotSeedRun], variants: list[str], boot: Bootstrap
                        ) -> tuple[dict[str, torch.Tensor], int]:
    """``{variant: [resamples, seeds]}`` task averages with every task's documents resampled
    (one draw per task, shared by seeds and variants), and their degrees of freedom
    (documents − tasks)."""
    tasks = sorted(runs[0].items[variants[0]])
    sizes = {t: {r.items[v][t].numel() for r in runs for v in variants} for t in tasks}
    if any(len(n) > 1 for n in sizes.values()):
        raise ValueError(f"runs scored on different documents ({sizes}): their documents cannot be paired")
    counts = {t: boot.counts(next(iter(sizes[t])), stream=10 + i) for i, t in enumerate(tasks)}
    average = {v: torch.stack([counts[t] @ torch.stack([r.items[v][t].double() for r in runs], dim=1)
                               / counts[t].shape[1] for t in tasks]).mean(0) for v in variants}
    return average, sum(next(iter(sizes[t])) for t in tasks) - len(tasks)


def aggregate_zeroshot(runs: Sequence[ZeroshotSeedRun], boot: Bootstrap, method: str = "t") -> dict:
    """A configuration's zero-shot figures over its seeds (``average/<variant>``, ``recovery``):
    as :func:`aggregate`, documents resampled within each task in place of blocks."""
    if not runs:
        raise ValueError("no runs to aggregate")
    _check_method(method)
    variants = [v for v in VARIANTS if all(v in r.average and r.average[v] is not None for r in runs)]
    items = all(r.items is not None and all(v in r.items for v in variants) for r in runs)
    resampled, df = None, 0
    if items:
        average, df = _resampled_averages(runs, variants, boot)
        resampled = _zeroshot_statistics(average)
    point = _zeroshot_statistics({v: torch.tensor([float(r.average[v]) for r in runs], dtype=torch.float64)
                                  for v in variants})
    seed_idx = boot.indices(len(runs), stream=2)
    out = {"n": len(runs), "seeds": [r.seed for r in runs], "covers": _covers(len(runs), items, "documents"),
           "method": method, "statistics": {}}
    for name, per_seed in point.items():
        values = [float(x) for x in per_seed]
        mean = _mean(values)
        out["statistics"][name] = {"mean": mean, "sd": _sd(values), "values": values,
                                   **cell_interval(mean, values, None if resampled is None else resampled[name],
                                                   boot, df, method, seed_idx)}
    return out
