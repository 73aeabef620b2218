"""How the tables print a value: ``30.58 ± 0.90`` with an interval (± the half-width), the
exact numbers and interval ends for the CSVs, and Markdown."""

from __future__ import annotations

import math

from spon_exp.tracking.intervals import format_with_interval, interval

#: what names a table row (with the sparsity): model, sparsifier (a preset: its label), corpus, SPON count
ROW_KEYS = ("model", "sparsifier", "calib_corpus", "spon_count")


def missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt(x, digits=2) -> str:
    if missing(x):
        return "-"
    return f"{x:.{digits}f}"


def pm(x, ci, digits=2) -> str:
    """``30.58 ± 0.90``: the value and the half-width ``(hi - lo) / 2`` of its interval, or
    the plain value when the run has no interval (older runs)."""
    return "-" if missing(x) else format_with_interval(x, ci, digits)


def pct(x, ci) -> str:
    """A fraction in percent, ``55.9 % ± 4.1`` with an interval; without one the plain
    ``56 %`` these tables always showed (so tables of older runs do not change)."""
    if missing(x):
        return "-"
    if interval(ci) is None:
        return f"{x * 100:.0f} %"
    return format_with_interval(x, ci, 1, 100, " %")


def g(x) -> str:
    return "-" if missing(x) else f"{x:.3g}"


def ci_columns(*names: str) -> list[str]:
    return [c for n in names for c in (n, f"{n}_ci_low", f"{n}_ci_high")]


def exact(x, ci) -> list:
    """Values of :func:`ci_columns`: the numbers as stored (blank where absent), not the
    rounded text of the Markdown table."""
    if missing(x):
        return [None, None, None]
    return [x, *(interval(ci) or (None, None))]


def row_key(row: dict) -> tuple:
    return tuple(str(row.get(k)) for k in ROW_KEYS)


def to_markdown(table: list[list[str]]) -> str:
    header, *body = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"
