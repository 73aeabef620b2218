"""TEAL (arXiv 2408.14690): magnitude thresholds, one per (layer, projection).

Mask ``|x_i| > tau`` (strict). ``tau`` is calibrated on dense activations either as the
exact ``s``-quantile of ``|x|`` (default; hits the target on the calibration data) or as
TEAL's histogram of the signed values with ``tau = icdf(0.5 + s/2)`` (assumes symmetry).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from spon_exp.models.adapters import Projection
from spon_exp.sparsifiers.base import Sparsifier, run_batches

log = logging.getLogger(__name__)

THRESHOLD_MODES = ("exact", "histogram")
# dense: thresholds from dense activations only (TEAL's reference). sparse: then refine them
# on the activations the sparse model really sees (upstream sparsity shifts downstream
# inputs, so dense thresholds over- or undershoot the target deeper in the model).
CALIBRATION_CONTEXTS = ("dense", "sparse")
HISTOGRAM_BINS = 10_000  # TEAL's reference: 1st-99th percentile split linearly + 2 tail bins


class SiteRecorder:
    """Collects input values of each (layer, site) during dense forwards.

    Keeps at most ``max_values`` values per site: each batch contributes a uniform random
    subset sized so that the total stays within budget (``expected_values`` known ahead).
    """

    def __init__(self, projections: list[Projection], max_values: int, expected_tokens: int, seed: int = 0):
        self.values: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.max_values = max_values
        self.expected_tokens = expected_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self._handles = []
        first_of_site: dict[tuple[int, str], Projection] = {}
        for p in projections:
            first_of_site.setdefault((p.layer, p.site), p)
        for site, p in first_of_site.items():
            # prepend: record the raw input, before any sparsifier hook changes it
            self._handles.append(p.module.register_forward_pre_hook(self._hook(site), prepend=True))

    def _hook(self, site):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
            total = self.expected_tokens * x.shape[-1]
            flat = x.reshape(-1)
            if total > self.max_values:
                keep = max(1, int(flat.numel() * self.max_values / total))
                idx = torch.randperm(flat.numel(), generator=self.generator)[:keep]
                flat = flat[idx]
            self.values.setdefault(site, []).append(flat.clone())
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()

    def site_values(self, site) -> torch.Tensor:
        return torch.cat(self.values[site])


def exact_threshold(values: torch.Tensor, sparsity: float) -> float:
    """Smallest tau such that a fraction ``sparsity`` of ``|values|`` is <= tau."""
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
    inner = torch.linspace(float(lo), float(hi), bins + 1)
    edges = torch.cat([sorted_v[:1], inner, sorted_v[-1:]])
    counts = torch.histogram(v.clamp(float(edges[0]), float(edges[-1])), bins=edges).hist
    cdf = torch.cumsum(counts, 0) / counts.sum()
    p = 0.5 + sparsity / 2
    i = int(torch.searchsorted(cdf, torch.tensor(p)))
    i = min(i, len(counts) - 1)
    below = float(cdf[i - 1]) if i > 0 else 0.0
    frac = (p - below) / max(float(cdf[i]) - below, 1e-12)
    return float(edges[i] + frac * (edges[i + 1] - edges[i]))


class TealSparsifier(Sparsifier):
    name = "teal"

    def __init__(self, sparsity: float = 0.5, threshold_mode: str = "exact", allocation: str = "uniform",
                 calibration_context: str = "sparse", refine_passes: int = 2,
                 max_calibration_values: int = 2**22, seed: int = 0, **kwargs):
        super().__init__(sparsity, **kwargs)
        if calibration_context not in CALIBRATION_CONTEXTS:
            raise ValueError(f"calibration_context must be one of {CALIBRATION_CONTEXTS}, got {calibration_context!r}")
        self.calibration_context = calibration_context
        self.refine_passes = int(refine_passes)
        if threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
        if allocation != "uniform":
            raise ValueError(f"allocation {allocation!r} is not available; use 'uniform'")
        self.threshold_mode = threshold_mode
        self.allocation = allocation
        self.max_calibration_values = max_calibration_values
        self.seed = seed
        self.thresholds: dict[str, float] = {}

    def describe(self) -> dict:
        return {**super().describe(), "threshold_mode": self.threshold_mode, "allocation": self.allocation,
                "calibration_context": self.calibration_context, "refine_passes": self.refine_passes}

    def share_key(self, proj: Projection) -> Hashable:
        return self.thresholds.get(proj.key)

    def target_sparsity(self, proj: Projection) -> float:
        return self.sparsity

    def threshold_for(self, values: torch.Tensor, sparsity: float) -> float:
        if self.threshold_mode == "exact":
            return exact_threshold(values, sparsity)
        return histogram_threshold(values, sparsity)

    def calibrate(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        batches = list(batches)
        passes = 1 + (self.refine_passes if self.calibration_context == "sparse" else 0)
        for i in range(passes):
            recorder = self._record(model, batches, dense=(i == 0), desc=f"TEAL calibration {i + 1}/{passes}")
            self._fit_thresholds(recorder)

    def _record(self, model: nn.Module, batches: list[torch.Tensor], dense: bool, desc: str) -> SiteRecorder:
        tokens = sum(b.numel() for b in batches)
        recorder = SiteRecorder(self.projections, self.max_calibration_values, tokens, self.seed)
        try:
            with contextlib.ExitStack() as stack:
                if dense:
                    stack.enter_context(self.disabled())
                run_batches(model, batches, desc=desc)
        finally:
            recorder.remove()
        return recorder

    def _fit_thresholds(self, recorder: SiteRecorder) -> None:
        cache: dict = {}
        for p in self.projections:
            key = ((p.layer, p.site), self.target_sparsity(p))
            if key not in cache:
                cache[key] = self.threshold_for(recorder.site_values((p.layer, p.site)), key[1])
            self.thresholds[p.key] = cache[key]
        self._refresh_consumers()

    def sparsify(self, proj, x, measure):
        tau = self.thresholds.get(proj.key)
        if tau is None:
            raise RuntimeError(f"TEAL threshold for {proj.key} is missing: call calibrate() or load_state_dict() first")
        out = F.hardshrink(x, tau) if tau > 0 else x  # hardshrink keeps x where |x| > tau
        dropped = (out == 0).sum() if measure else None
        return out, dropped

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"threshold.{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.thresholds.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.thresholds = {k.removeprefix("threshold."): float(v) for k, v in state.items() if k.startswith("threshold.")}
        missing = [p.key for p in self.projections if p.key not in self.thresholds]
        if missing:
            raise ValueError(f"Saved TEAL thresholds lack projections {missing[:5]} (model/projection mismatch)")
        self._refresh_consumers()
