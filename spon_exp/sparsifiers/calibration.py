"""Calibration machinery shared by the threshold methods (TEAL, WINA's threshold mode, R-Sparse).

Everything stays on the model's device: a recorder hook keeps a uniform random sample of
each site's input values (or scores) as a device tensor, drawn on the device; the exact
quantile (``kthvalue``) then runs there too. Nothing is copied to the host per hook call,
and no host ``randperm`` runs over millions of entries (a 2048-token batch of an 8B model
feeds 8-58 M values per site).

Sampling: a batch contributes ``numel · max_values / (expected tokens · width)`` values
drawn uniformly *with replacement* (``randint``, O(kept) instead of a permutation of the
whole batch), so every site keeps about ``max_values`` values over the calibration pass;
below that budget every value is kept and the quantile is exact on the calibration data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import nn

from spon_exp.models.adapters import Projection
from spon_exp.sparsifiers.base import Sparsifier, SparsifierOptions, run_batches
from spon_exp.sparsifiers.hooks import HookSet

# dense: thresholds from dense activations only (TEAL's reference). sparse: then refine them
# on the activations the sparse model really sees (upstream sparsity shifts downstream
# inputs, so dense thresholds over- or undershoot the target deeper in the model).
CALIBRATION_CONTEXTS = ("dense", "sparse")
HISTOGRAM_BINS = 10_000  # TEAL's reference: 1st-99th percentile split linearly + 2 tail bins
# Values kept per site and pass. A quantile of a uniform sample of 2**20 values lands within
# ±0.1 % (two standard deviations, sqrt(s(1-s)/n)) of the target sparsity, and kthvalue over
# it costs a quarter of what 2**22 did (benchmarks/RESULTS.md, "The default run, one seed", has
# runs calibrated on 2**22 values per site).
MAX_CALIBRATION_VALUES = 2**20


@dataclass
class CalibratedOptions(SparsifierOptions):
    """Options of the methods that calibrate thresholds (TEAL, WINA's threshold mode, R-Sparse)."""

    calibration_context: str = "sparse"  # dense = TEAL reference; sparse = refine on sparse activations
    refine_passes: int = 2  # sparse context: passes refining the thresholds on sparse activations
    max_calibration_values: int = MAX_CALIBRATION_VALUES  # per input site and pass; a uniform sample above

    def __post_init__(self) -> None:
        super().__post_init__()
        calibration_passes(self.calibration_context, self.refine_passes)  # validates both


def site_group(proj: Projection) -> Hashable:
    """Projections reading one input tensor: their raw input values are recorded once."""
    return (proj.layer, proj.site)


class SiteRecorder:
    """Collects input values of each group of projections during forwards, on their device.

    By default a group is an input site (raw values, recorded once per site); a method
    scoring inputs per projection (WINA, R-Sparse: ``|x_i|·‖W[:, i]‖``) passes ``score``
    (``(proj, x) -> values``) and a ``group`` function. Keeps about ``max_values`` values
    per group (see the module docstring); ``expected_tokens`` is the pass's token count.
    """

    def __init__(self, projections: list[Projection], max_values: int, expected_tokens: int, seed: int = 0,
                 score: Callable[[Projection, torch.Tensor], torch.Tensor] | None = None,
                 group: Callable[[Projection], Hashable] = site_group):
        self.values: dict[Hashable, list[torch.Tensor]] = {}
        self.max_values = max_values
        self.expected_tokens = expected_tokens
        self.seed = seed
        self.score = score
        self._generators: dict[torch.device, torch.Generator] = {}
        self.hooks = HookSet()
        first_of_group: dict[Hashable, Projection] = {}
        for p in projections:
            first_of_group.setdefault(group(p), p)
        for key, p in first_of_group.items():
            # prepend: record the raw input, before any sparsifier hook changes it
            self.hooks.pre(p.module, self._hook(key, p), prepend=True)

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return g

    def _hook(self, key, proj):
        def hook(module, args):
            x = args[0].detach()
            if self.score is not None:
                x = self.score(proj, x)
            flat = x.reshape(-1)
            total = self.expected_tokens * x.shape[-1]
            if total > self.max_values:
                keep = max(1, int(flat.numel() * self.max_values / total))
                flat = flat[torch.randint(flat.numel(), (keep,), device=flat.device,
                                          generator=self._generator(flat.device))]
            self.values.setdefault(key, []).append(flat.to(torch.float32, copy=True))
        return hook

    def remove(self):
        self.hooks.remove()

    def site_values(self, key) -> torch.Tensor:
        return torch.cat(self.values[key])


def record_inputs(sparsifier: Sparsifier, model: nn.Module, batches: list[torch.Tensor], dense: bool, desc: str,
                  max_values: int, seed: int = 0, **recorder_kwargs) -> SiteRecorder:
    """One calibration pass: the sparsifier's projections' inputs, with sparsity off
    (``dense``) or on (what the sparse model really sees)."""
    tokens = sum(b.numel() for b in batches)
    recorder = SiteRecorder(sparsifier.projections, max_values, tokens, seed, **recorder_kwargs)
    try:
        with contextlib.ExitStack() as stack:
            if dense:
                stack.enter_context(sparsifier.disabled())
            run_batches(model, batches, desc=desc)
    finally:
        recorder.remove()
    return recorder


def calibration_passes(context: str, refine_passes: int) -> int:
    """Dense pass, plus ``refine_passes`` passes on sparse activations in the sparse context."""
    if context not in CALIBRATION_CONTEXTS:
        raise ValueError(f"calibration_context must be one of {CALIBRATION_CONTEXTS}, got {context!r}")
    if refine_passes < 0:
        raise ValueError(f"refine_passes must be >= 0, got {refine_passes}")
    return 1 + (refine_passes if context == "sparse" else 0)


def exact_threshold(values: torch.Tensor, sparsity: float) -> float:
    """Smallest tau such that a fraction ``sparsity`` of ``|values|`` is <= tau (on the
    values' device)."""
    mags = values.abs().reshape(-1)
    k = int(round(sparsity * mags.numel()))
    if k <= 0:
        return 0.0
    return float(torch.kthvalue(mags, min(k, mags.numel())).values)


def histogram_threshold(values: torch.Tensor, sparsity: float, bins: int = HISTOGRAM_BINS) -> float:
    """TEAL's ``icdf(0.5 + s/2)`` of the signed distribution from a tail-aware histogram."""
    if sparsity <= 0:
        return 0.0
    v = values.reshape(-1).float()
    sorted_v = torch.sort(v).values
    n = sorted_v.numel()
    lo, hi = sorted_v[int(0.01 * (n - 1))], sorted_v[int(0.99 * (n - 1))]
    inner = torch.linspace(float(lo), float(hi), bins + 1, device=v.device)
    edges = torch.cat([sorted_v[:1], inner, sorted_v[-1:]])
    # bucketize = histogram with these (non-uniform) edges, on any device
    index = (torch.bucketize(v, edges[1:-1], right=True)).clamp_(0, len(edges) - 2)
    counts = torch.bincount(index, minlength=len(edges) - 1).double().cpu()
    edges = edges.double().cpu()
    cdf = torch.cumsum(counts, 0) / counts.sum()
    p = 0.5 + sparsity / 2
    i = int(torch.searchsorted(cdf, torch.tensor(p, dtype=torch.float64)))
    i = min(i, len(counts) - 1)
    below = float(cdf[i - 1]) if i > 0 else 0.0
    frac = (p - below) / max(float(cdf[i]) - below, 1e-12)
    return float(edges[i] + frac * (edges[i + 1] - edges[i]))


def threshold_from_sorted(sorted_magnitudes: torch.Tensor, sparsity: float) -> float:
    """:func:`exact_threshold` on magnitudes sorted once (many queries on one site)."""
    n = sorted_magnitudes.numel()
    k = int(round(min(sparsity, 1.0) * n))
    return 0.0 if k <= 0 else float(sorted_magnitudes[min(k, n) - 1])
