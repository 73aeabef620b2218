"""Where the spread between seeds comes from, when a sweep crosses the calibration seed
(``calib.seed``) with α training's seed (``spon.seed``).

Every (calibration seed ``i``, training seed ``j``) pair of an ``I × J`` grid is one run, and its
statistic is read as ``y_ij = μ + C_i + S_j + E_ij``: ``C`` what the calibration sample does
(it fixes the thresholds, and through them what α is trained against), ``S`` what α training's
batch order does, ``E`` their interaction plus whatever else differs between the runs (the
seed × text term of the evaluation). A two-way random-effects ANOVA without replication
estimates each variance from the mean squares:

    σ_C² = (MS_C − MS_E) / J,   σ_S² = (MS_S − MS_E) / I,   σ_E² = MS_E

A negative estimate (a part too small to tell from the rest with this many seeds) is reported
as 0. The SD of one run with both seeds drawn anew is √(σ_C² + σ_S² + σ_E²).
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def crossed_seed_components(values: Mapping[tuple, float]) -> dict | None:
    """``{"levels": (I, J), "mean", "sd": {"calibration", "training", "interaction and rest",
    "one run"}, "mean_squares"}`` of ``{(calibration seed, training seed): value}``; None unless
    the values fill a complete grid of at least 2 × 2 finite values."""
    calib = sorted({c for c, _ in values}, key=str)
    train = sorted({s for _, s in values}, key=str)
    if len(calib) < 2 or len(train) < 2 or len(values) != len(calib) * len(train):
        return None
    y = [[values[(c, s)] for s in train] for c in calib]
    if not all(math.isfinite(v) for row in y for v in row):
        return None
    i_levels, j_levels = len(calib), len(train)
    grand = sum(map(sum, y)) / (i_levels * j_levels)
    row = [sum(r) / j_levels for r in y]
    col = [sum(y[i][j] for i in range(i_levels)) / i_levels for j in range(j_levels)]
    ms_c = j_levels * sum((m - grand) ** 2 for m in row) / (i_levels - 1)
    ms_s = i_levels * sum((m - grand) ** 2 for m in col) / (j_levels - 1)
    ms_e = sum((y[i][j] - row[i] - col[j] + grand) ** 2 for i in range(i_levels) for j in range(j_levels)) \
        / ((i_levels - 1) * (j_levels - 1))
    var = {"calibration": max(0.0, (ms_c - ms_e) / j_levels), "training": max(0.0, (ms_s - ms_e) / i_levels),
           "interaction and rest": ms_e}
    return {"levels": (i_levels, j_levels), "mean": grand,
            "sd": {**{k: math.sqrt(v) for k, v in var.items()}, "one run": math.sqrt(sum(var.values()))},
            "mean_squares": {"calibration": ms_c, "training": ms_s, "interaction and rest": ms_e}}
