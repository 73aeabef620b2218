"""TEAL (arXiv 2408.14690): magnitude thresholds, one per (layer, projection).

Mask ``|x_i| > tau`` (strict). ``tau`` is calibrated on dense activations either as the
exact ``s``-quantile of ``|x|`` (default; hits the target on the calibration data) or as
TEAL's histogram of the signed values with ``tau = icdf(0.5 + s/2)`` (assumes symmetry).

Allocation: ``uniform`` (every projection at the target) or ``greedy`` (TEAL's block-wise
search, ``greedyopt.py`` in the reference code; :mod:`spon_exp.sparsifiers.greedy`).
Differences from the reference: during the search the thresholds are exact quantiles of the
dense site values (the reference uses its histogram icdf), a projection's sparsity is capped
at 1 (the reference can step past 1), the search can run on a subset of the calibration
sequences (``greedy_sequences``), and it stops at the target unless ``greedy_max_sparsity``
asks for more (the reference searches up to 0.9 once). The final thresholds follow
``threshold_mode`` and ``calibration_context`` as in uniform allocation.

The recorder and the threshold helpers live in :mod:`spon_exp.sparsifiers.calibration`,
shared with the other threshold-calibrated methods (WINA's threshold mode, R-Sparse).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spon_exp.models.adapters import Projection
from spon_exp.sparsifiers.base import Sparsifier
from spon_exp.sparsifiers.calibration import (CalibratedOptions, SiteRecorder, calibration_passes, exact_threshold,
                                              histogram_threshold, record_inputs, threshold_from_sorted)
from spon_exp.sparsifiers.greedy import BlockInputs, GreedyAllocation, GreedyOptions
from spon_exp.sparsifiers.registry import register

THRESHOLD_MODES = ("exact", "histogram")


@dataclass
class TealOptions(GreedyOptions, CalibratedOptions):
    """TEAL's options (``sparsifier=teal``; the module docstring describes each)."""

    threshold_mode: str = "exact"  # exact |x| quantile / histogram (TEAL's icdf(0.5+s/2))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {self.threshold_mode!r}")


@register
class TealSparsifier(GreedyAllocation, Sparsifier):
    name = "teal"
    Options = TealOptions

    def _init_state(self) -> None:
        self.thresholds: dict[str, float] = {}
        self._init_greedy()

    def share_key(self, proj: Projection) -> Hashable:
        return self.thresholds.get(proj.key)

    # ------------------------------------------------------------ calibration
    def threshold_for(self, values: torch.Tensor, sparsity: float) -> float:
        if self.options.threshold_mode == "exact":
            return exact_threshold(values, sparsity)
        return histogram_threshold(values, sparsity)

    def calibrate(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        batches = list(batches)
        passes = calibration_passes(self.options.calibration_context, self.options.refine_passes)
        capture = BlockInputs(self.blocks, self.options.greedy_sequences) if self.options.allocation == "greedy" else None
        try:
            recorder = record_inputs(self, model, batches, dense=True, desc=f"TEAL calibration 1/{passes}",
                                     max_values=self.options.max_calibration_values, seed=self.seed)
        finally:
            if capture is not None:
                capture.remove()
        if capture is not None:
            self._greedy_search(capture, recorder)
        self._fit_thresholds(recorder)
        for i in range(1, passes):
            recorder = record_inputs(self, model, batches, dense=False, desc=f"TEAL calibration {i + 1}/{passes}",
                                     max_values=self.options.max_calibration_values, seed=self.seed)
            self._fit_thresholds(recorder)

    def _greedy_search(self, capture: BlockInputs, recorder: SiteRecorder) -> None:
        """The greedy search, thresholds at exact quantiles of the dense site values."""
        sorted_mags: dict = {}

        def apply(projs, sparsities):
            for p, s in zip(projs, sparsities):
                if (p.layer, p.site) not in sorted_mags:
                    sorted_mags[(p.layer, p.site)] = recorder.site_values((p.layer, p.site)).abs().sort().values
                self.thresholds[p.key] = threshold_from_sorted(sorted_mags[(p.layer, p.site)], s)

        self.greedy_search(capture, apply)

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
        state = {f"threshold.{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.thresholds.items()}
        state.update(self.greedy_state())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.thresholds = {k.removeprefix("threshold."): float(v) for k, v in state.items() if k.startswith("threshold.")}
        self.load_greedy_state(state)
        missing = [p.key for p in self.projections if p.key not in self.thresholds]
        if missing:
            raise ValueError(f"Saved TEAL thresholds lack projections {missing[:5]} (model/projection mismatch)")
        self._refresh_consumers()
