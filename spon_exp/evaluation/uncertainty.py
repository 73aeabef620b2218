"""Confidence intervals by paired bootstrap.

A thresholded model is chaotic (a relative 1e-6 change of its thresholds visibly moves
perplexity: docs/evaluation.md, "Numerical sensitivity", and ``eval.sensitivity=true`` measures it per run),
so one evaluation is one draw from a noisy process. Every figure therefore carries a
percentile interval from resampling its evaluation units with replacement: blocks for
perplexity, documents for zero-shot scores. Dense, sparse and sparse+SPON are scored on
the same units, so each resample uses the *same* indices for all of them (a paired
bootstrap): the gap closure and the zero-shot recovery get their interval from the same
resamples, and the correlation between the variants is kept.

What the interval means: were the evaluation set drawn again from the same distribution of
blocks (documents), the figure would fall inside it about 95 % of the time. It covers the
sampling of the evaluation data, not a retrained α or recalibrated thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from spon_exp.evaluation.gap import gap_closure, zeroshot_recovery
from spon_exp.evaluation.perplexity import BlockNLL


@dataclass(frozen=True)
class Bootstrap:
    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if self.resamples < 1:
            raise ValueError(f"bootstrap resamples must be >= 1, got {self.resamples}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"bootstrap confidence must be in (0, 1), got {self.confidence}")

    def indices(self, size: int, stream: int = 0) -> torch.Tensor:
        """``[resamples, size]`` indices drawn with replacement (seeded, so a run's interval
        is reproducible; ``stream`` separates the strata of one statistic)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + stream)
        return torch.randint(0, size, (self.resamples, size), generator=g)

    def counts(self, size: int, stream: int = 0) -> torch.Tensor:
        """``[resamples, size]``: how often each unit is drawn in each resample of
        :meth:`indices` (a statistic summed over units is then one matrix product)."""
        idx = self.indices(size, stream)
        return torch.zeros(self.resamples, size, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones_like(idx, dtype=torch.float64))

    def interval(self, samples: torch.Tensor) -> list[float] | None:
        """Percentile interval of the finite samples; None when too few are finite (an
        undefined statistic in more than the tail mass of the resamples)."""
        samples = samples[torch.isfinite(samples)]
        tail = (1.0 - self.confidence) / 2
        if samples.numel() < max(2, math.ceil(self.resamples * (1 - tail))):
            return None
        q = torch.quantile(samples.double(), torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
        return [float(q[0]), float(q[1])]


def perplexity_intervals(blocks: Mapping[str, BlockNLL], boot: Bootstrap) -> dict:
    """``{"ppl": {variant: [lo, hi]}, "gap_closure": [lo, hi] | None}`` for variants scored on
    the same blocks (``dense`` / ``sparse`` / ``spon``)."""
    sizes = {v: b.nll.numel() for v, b in blocks.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"Paired bootstrap needs the same blocks for every variant, got {sizes}")
    if not blocks:
        return {"ppl": {}, "gap_closure": None}
    idx = boot.indices(next(iter(sizes.values())))
    ppl = {v: torch.exp(b.nll[idx].sum(1) / b.tokens[idx].sum(1).double()) for v, b in blocks.items()}
    out: dict = {"ppl": {v: boot.interval(s) for v, s in ppl.items()}, "gap_closure": None}
    if {"dense", "sparse", "spon"} <= ppl.keys():
        out["gap_closure"] = boot.interval(gap_closure(ppl["dense"], ppl["sparse"], ppl["spon"]))
    return out


def zeroshot_intervals(items: Mapping[str, Mapping[str, torch.Tensor]], boot: Bootstrap) -> dict:
    """Intervals of each task's score, of the task average and of the recovery.

    ``items``: ``{variant: {task: per-document scores}}``, documents in the same order for
    every variant. Documents are resampled within each task (stratified), the same draw
    for every variant; the average is the mean of the task means, as reported."""
    variants = list(items)
    if not variants:
        return {"ci": {}, "average_ci": {}, "recovery_ci": None}
    tasks = list(items[variants[0]])
    task_means: dict[str, dict[str, torch.Tensor]] = {v: {} for v in variants}
    for stream, task in enumerate(tasks):
        sizes = {v: items[v][task].numel() for v in variants}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Paired bootstrap needs the same {task} documents for every variant, got {sizes}")
        idx = boot.indices(sizes[variants[0]], stream)
        for v in variants:
            task_means[v][task] = items[v][task].double()[idx].mean(1)
    averages = {v: torch.stack(list(task_means[v].values())).mean(0) for v in variants}
    out: dict = {"ci": {v: {t: boot.interval(m) for t, m in task_means[v].items()} for v in variants},
                 "average_ci": {v: boot.interval(a) for v, a in averages.items()}, "recovery_ci": None}
    if {"dense", "sparse", "spon"} <= averages.keys():
        out["recovery_ci"] = boot.interval(zeroshot_recovery(averages["dense"], averages["sparse"], averages["spon"]))
    return out
