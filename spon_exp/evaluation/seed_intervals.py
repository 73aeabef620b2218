"""The 95 % interval of a mean over seeds that were all scored on the same evaluation blocks.

A seed's statistic (a perplexity, the gap closure) is ``T_s = θ + a_s + B + e_s``: ``a_s`` what
the seed does (calibration sample, α training order), ``B`` what the shared text does to every
seed alike, ``e_s`` what the text does to this seed only (seed × block). The mean over ``n``
seeds has variance ``σ_a²/n + Var(B) + Var(e)/n``; two estimates add up to it:

- **seeds**: ``s²/n``, the between-seed variance of the seeds' values over their number:
  ``σ_a²/n + Var(e)/n``, with ``n − 1`` degrees of freedom;
- **blocks**: ``Var(B)``, from block resamples (one draw shared by every seed and variant,
  :class:`~spon_exp.evaluation.uncertainty.Bootstrap`): the variance of the seed mean over the
  resamples, ``Var(B) + Var(e)/n``, less the seed-specific ``Var(e)/n`` that ``s²/n`` already
  holds (read off the seeds' own resample variances), with ``m − 1`` degrees of freedom.

The interval is the mean ± a Student t quantile times the square root of the sum. Its degrees
of freedom are Welch–Satterthwaite's, the seed part taken at an upper confidence bound of its
variance (:func:`interval_df`): with 2 seeds and seed-dominated variance the quantile is then
close to 12.7, as it must be for the interval to hold its level; when the blocks dominate it
is close to the normal one. A comparison sums the same parts for a difference: paired seeds
give one seed part (the per-seed differences), unpaired sides one each. Coverage, measured on
simulated runs for 2 to 10 seeds: benchmarks/RESULTS.md, "Coverage of the intervals over seeds".

``percentile`` is the interval spon-exp used before (a two-level bootstrap: blocks and seeds
resampled, the seed draw scaled by √(n/(n−1)), 2.5 and 97.5 percentiles). It under-covers with
few seeds when the seeds disagree; it stays selectable to compare with tables made with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spon_exp.evaluation.uncertainty import Bootstrap

METHODS = ("t", "percentile")


#: The degrees of freedom take a seed part at this one-sided upper confidence bound of its
#: variance (75 %): see :func:`interval_df`
SEED_VARIANCE_BOUND = 0.75


@dataclass(frozen=True)
class Part:
    """One source of a mean's variance, the degrees of freedom of its estimate, and whether it
    is a between-seed part (few degrees of freedom: see :func:`interval_df`)."""

    name: str
    variance: float
    df: float
    seeds: bool = False


def satterthwaite_df(parts: Sequence[Part]) -> float:
    """Welch–Satterthwaite degrees of freedom of a sum of independent variance estimates."""
    total = sum(p.variance for p in parts)
    spread = sum(p.variance ** 2 / p.df for p in parts if p.variance > 0)
    return math.inf if spread == 0 else total ** 2 / spread


def interval_df(parts: Sequence[Part]) -> float:
    """Welch–Satterthwaite degrees of freedom, the between-seed parts taken together (their own
    Satterthwaite degrees of freedom ``k``) at the upper 75 % confidence bound of their variance,
    ``s² k / χ²_k(0.25)``: ×9.8 for 2 seeds, ×3.5 for 3, ×1.5 for 10. Satterthwaite's formula on
    the estimates alone gives many degrees of freedom exactly when the between-seed variance came
    out small by chance, which is when the interval is too narrow: with 2 seeds its coverage
    falls to 88 % when the seeds dominate. With the bound the simulated runs of
    ``benchmarks/quality/coverage.py`` are covered 93–98 % of the time for 2 to 10 seeds,
    whatever the share of seeds and blocks (benchmarks/RESULTS.md). The variance itself is not
    changed."""
    from scipy.stats import chi2

    seeds = [p for p in parts if p.seeds and p.variance > 0]
    others = [p for p in parts if not p.seeds]
    if not seeds:
        return satterthwaite_df(others)
    k = satterthwaite_df(seeds)
    variance = sum(p.variance for p in seeds)
    return satterthwaite_df([Part("seeds", variance * k / float(chi2.ppf(1 - SEED_VARIANCE_BOUND, k)), k), *others])


def t_quantile(confidence: float, df: float) -> float:
    from scipy.stats import norm, t

    tail = 0.5 + confidence / 2
    return float(norm.ppf(tail)) if math.isinf(df) else float(t.ppf(tail, df))


def t_interval(center: float | None, parts: Sequence[Part], confidence: float) -> dict:
    """``{"ci", "df", "parts"}``: ``center`` ± t(df) · √(Σ variances); ``ci`` None without a
    center or a part."""
    out = {"ci": None, "df": None, "parts": {p.name: p.variance for p in parts}}
    if center is None or not parts:
        return out
    variance = sum(p.variance for p in parts)
    df = interval_df(parts)
    half = 0.0 if variance == 0 else t_quantile(confidence, df) * math.sqrt(variance)
    out.update(ci=[center - half, center + half], df=None if math.isinf(df) else df)
    return out


def _finite_rows(per_seed: torch.Tensor, boot: Bootstrap) -> torch.Tensor | None:
    """The resamples (rows of ``[resamples, seeds]``) where every seed's statistic is defined;
    None where it is undefined in more than the tail mass of them (as :meth:`Bootstrap.interval`)."""
    rows = per_seed[torch.isfinite(per_seed).all(1)].double()
    tail = (1.0 - boot.confidence) / 2
    return rows if rows.shape[0] >= max(2, math.ceil(boot.resamples * (1 - tail))) else None


def _seed_specific(per_seed: torch.Tensor) -> float:
    """The part of a seed mean's block variance that each seed has on its own (seed × block),
    ``(V_each − V_mean) / (n − 1)``: ``V_each`` a seed's block variance (averaged over the
    seeds), ``V_mean`` the seed mean's. The between-seed variance already counts it."""
    n = per_seed.shape[1]
    return (float(per_seed.var(0).mean()) - float(per_seed.mean(1).var())) / (n - 1)


def block_part(per_seed: torch.Tensor | Sequence[torch.Tensor], boot: Bootstrap, df: float,
               signs: Sequence[int] = (1,)) -> Part | None:
    """The shared text's variance of a seed mean (``per_seed`` ``[resamples, seeds]``) or of a
    difference of seed means (``per_seed`` one tensor per side, ``signs`` +1 / −1): the variance
    over block resamples, less what each seed has on its own where a side has several seeds
    (that part is in the between-seed variance; counting it twice would widen the interval
    where the seed × block interaction is large). ``df`` degrees of freedom (blocks − 1); None
    where the statistic is undefined in too many resamples."""
    sides = [per_seed] if isinstance(per_seed, torch.Tensor) else list(per_seed)
    rows = _finite_rows(torch.cat(sides, dim=1), boot)
    if rows is None:
        return None
    sides = list(torch.split(rows, [x.shape[1] for x in sides], dim=1))
    total = float(sum(sign * x.mean(1) for sign, x in zip(signs, sides)).var())
    if all(x.shape[1] > 1 for x in sides):
        total = max(0.0, total - sum(_seed_specific(x) for x in sides))
    return Part("blocks", total, max(df, 1))


def seed_part(values: Sequence[float], name: str = "seeds") -> Part | None:
    """``s²/n`` of the seeds' values, ``n − 1`` degrees of freedom; None for fewer than two
    seeds or a value that is not finite."""
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return None
    n = len(values)
    mean = sum(values) / n
    return Part(name, sum((v - mean) ** 2 for v in values) / (n - 1) / n, n - 1, seeds=True)


def seed_mean(values: torch.Tensor, seed_idx: torch.Tensor) -> torch.Tensor:
    """``percentile``: per resample the mean over the drawn seeds (``values`` ``[resamples,
    seeds]``), its deviation from the all-seed mean scaled by √(n/(n−1)); one seed: as is."""
    n = values.shape[1]
    full = values.mean(1)
    if n == 1:
        return full
    drawn = torch.gather(values, 1, seed_idx).mean(1)
    return full + math.sqrt(n / (n - 1)) * (drawn - full)


def cell_interval(center: float | None, values: Sequence[float], per_seed: torch.Tensor | None, boot: Bootstrap,
                  block_df: float, method: str, seed_idx: torch.Tensor) -> dict:
    """A configuration's interval of one statistic: ``values`` the seeds' own, ``per_seed``
    ``[resamples, seeds]`` their values on each block resample (None without per-block data,
    ``block_df`` the blocks' degrees of freedom)."""
    if method == "percentile":
        if per_seed is None and len(values) < 2:
            return {"ci": None}
        seeds = torch.tensor(list(values), dtype=torch.float64).expand(boot.resamples, -1)
        return {"ci": boot.interval(seed_mean(seeds if per_seed is None else per_seed, seed_idx))}
    parts = [seed_part(values)]
    if per_seed is not None:
        parts.append(block_part(per_seed, boot, block_df))
        if parts[-1] is None:  # undefined in too many resamples: no interval
            return t_interval(None, [], boot.confidence)
    return t_interval(center, [p for p in parts if p is not None], boot.confidence)


def difference_interval(center: float | None, base: Sequence[float], cand: Sequence[float],
                        res_base: torch.Tensor | None, res_cand: torch.Tensor | None, paired: bool,
                        boot: Bootstrap, block_df: float, method: str) -> dict:
    """Candidate − baseline of one statistic: ``base`` / ``cand`` the seeds' values (in the same
    seed order on both sides when ``paired``), ``res_*`` ``[resamples, seeds]`` on the shared
    block resamples (None without per-block data)."""
    blocks = res_base is not None and res_cand is not None
    if method == "percentile":
        if paired:
            diffs = (res_cand - res_base) if blocks else _repeat([b - a for a, b in zip(base, cand)], boot)
            return {"ci": boot.interval(seed_mean(diffs, boot.indices(len(base), stream=2)))}
        rb, rc = (res_base, res_cand) if blocks else (_repeat(base, boot), _repeat(cand, boot))
        return {"ci": boot.interval(seed_mean(rc, boot.indices(len(cand), stream=3))
                                    - seed_mean(rb, boot.indices(len(base), stream=2)))}
    if paired:
        parts = [seed_part([b - a for a, b in zip(base, cand)])]
    elif min(len(base), len(cand)) > 1:
        parts = [seed_part(base, "seeds (baseline)"), seed_part(cand, "seeds (candidate)")]
    else:  # one side's seed variance is unknown: blocks only (the comparison gives no verdict)
        parts = []
    if blocks:
        if paired:
            parts.append(block_part(res_cand - res_base, boot, block_df))
        else:
            parts.append(block_part([res_base, res_cand], boot, block_df, signs=(-1, 1)))
        if parts[-1] is None:
            return t_interval(None, [], boot.confidence)
    return t_interval(center, [p for p in parts if p is not None], boot.confidence)


def _repeat(values: Sequence[float], boot: Bootstrap) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float64).expand(boot.resamples, -1)
