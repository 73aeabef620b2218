"""What SPON recovers, defined once: the variants a run evaluates, the perplexity gap closure
and the zero-shot recovery, for single values and for tensors of bootstrap resamples.

One convention for an undefined ratio: a single value is ``None`` (results.json, tables);
inside a tensor of resamples it is NaN, the only "missing" a tensor can hold. No torch import
here, so the tables (``spon-exp-collect``) use it without loading torch.
"""

from __future__ import annotations

import math

#: the evaluated variants, in table order: the dense model, the sparsified one, sparse + SPON
VARIANTS = ("dense", "sparse", "spon")

#: Below this relative gap between sparse and dense perplexity the gap closure is undefined:
#: a ratio over a gap of a few hundredths of a point is noise, not recovery.
MIN_RELATIVE_GAP = 0.01


def gap_closure(dense, sparse, spon):
    """(sparse − spon) / (sparse − dense) of perplexities: 1 = SPON recovers all of the loss,
    0 = none. Undefined when a value is missing or the sparse model is not worse than dense by
    more than :data:`MIN_RELATIVE_GAP` (1 %): there is no gap to close.

    Floats give a float or None; tensors (resamples) give a tensor with NaN where undefined."""
    if _is_tensor(dense, sparse, spon):
        gap = sparse - dense
        return _ratio(sparse - spon, gap, gap > MIN_RELATIVE_GAP * dense)
    if dense is None or sparse is None or spon is None or sparse - dense <= MIN_RELATIVE_GAP * dense:
        return None
    return (sparse - spon) / (sparse - dense)


def zeroshot_recovery(dense, sparse, spon):
    """(spon − sparse) / (dense − sparse) of zero-shot accuracies: 1 = back to dense, 0 = no
    gain, negative = worse than plain sparse. Undefined where dense and sparse are equal.

    Floats give a float or None; tensors (resamples) give a tensor with NaN where undefined."""
    if _is_tensor(dense, sparse, spon):
        gap = dense - sparse
        return _ratio(spon - sparse, gap, gap != 0)
    if dense is None or sparse is None or spon is None:
        return None
    gap = dense - sparse
    if gap == 0 or math.isnan(gap):
        return None
    return (spon - sparse) / gap


def _is_tensor(*values) -> bool:
    return any(type(v).__module__.startswith("torch") for v in values)


def _ratio(numerator, denominator, defined):
    out = numerator.new_full(numerator.shape, float("nan"))
    out[defined] = numerator[defined] / denominator[defined]
    return out
