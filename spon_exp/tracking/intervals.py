"""Reading and printing the 95 % intervals stored in results.json (``*_ci``: ``[lo, hi]``).

Torch-free, so ``spon-exp-collect`` and the W&B logger read intervals without importing the
evaluation code that computes them (:mod:`spon_exp.evaluation.uncertainty`).
"""

from __future__ import annotations

import math


def interval(ci) -> tuple[float, float] | None:
    """``(lo, hi)`` of a stored 95 % interval, or None when there is none: runs written before
    intervals existed have no ``*_ci`` keys, and a statistic without a defined value (e.g. gap
    closure with no gap) stores ``null``."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return None
    lo, hi = ci
    if not all(isinstance(v, (int, float)) and not math.isnan(v) for v in (lo, hi)):
        return None
    return float(lo), float(hi)


def half_width(ci) -> float | None:
    pair = interval(ci)
    return None if pair is None else (pair[1] - pair[0]) / 2


def format_with_interval(value: float | None, ci, digits: int = 3, scale: float = 1.0, suffix: str = "") -> str:
    """``30.580 ± 0.902`` (± the interval's half-width; the interval itself may be asymmetric),
    or the plain value where there is no interval."""
    if value is None:
        return "-"
    text = f"{value * scale:.{digits}f}{suffix}"
    hw = half_width(ci)
    return text if hw is None else f"{text} ± {hw * scale:.{digits}f}"
