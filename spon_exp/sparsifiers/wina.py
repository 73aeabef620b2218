"""WINA (arXiv 2505.19427): weight-informed activation sparsity.

Score of input channel ``i`` of projection ``W``: ``|x_i| · ‖W[:, i]‖₂`` (the column's L2
norm, cached per projection). The reference code (microsoft/wina) multiplies by the norm
only for k_proj and gate_proj and scores the other projections by ``|x_i|`` alone:
``norm_projections`` chooses (a list of names, ``all`` or ``none``).

Masks:
- ``topk`` (the reference scripts' default): per token keep the ``k = int(in·(1−s))``
  channels of highest score.
- ``threshold``: keep channels whose score exceeds a calibrated ``tau`` (exact quantile
  of the calibration scores, one per projection; refined on sparse activations like TEAL).

The reference keeps the first 1 % of each prefill dense: it sparsifies only the last
``int(0.99·T)`` tokens of a multi-token forward (so at least one token stays dense) and
always sparsifies a single decode token. ``dense_first_fraction=0.01`` reproduces exactly
that; the default 0 sparsifies every token, like the other methods here. It combines with
the common ``token_policy`` (the fewer sparsified tokens win).

With column norms the score differs between q/k/v (and gate/up), so a projection that uses
its norm gets its own mask; projections scored by ``|x|`` alone on one site share theirs.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import torch
from torch import nn

from spon_exp.models.adapters import PROJECTIONS, Projection
from spon_exp.sparsifiers.base import Sparsifier
from spon_exp.sparsifiers.calibration import (MAX_CALIBRATION_VALUES, calibration_passes, exact_threshold,
                                              record_inputs, site_group)
from spon_exp.sparsifiers.scoring import ColumnNorms, keep_count, topk_mask

MODES = ("topk", "threshold")
REFERENCE_NORM_PROJECTIONS = ("k_proj", "gate_proj")


def resolve_norm_projections(which) -> tuple[str, ...]:
    """``all`` / ``none`` / a list of projection names -> the names using column norms."""
    if isinstance(which, str):
        if which == "all":
            return PROJECTIONS
        if which == "none":
            return ()
        which = [which]
    names = tuple(which)
    bad = [n for n in names if n not in PROJECTIONS]
    if bad:
        raise ValueError(f"norm_projections: unknown names {bad}; use 'all', 'none' or names from {PROJECTIONS}")
    return names


class WinaSparsifier(Sparsifier):
    name = "wina"

    def __init__(self, sparsity: float = 0.5, mode: str = "topk",
                 norm_projections: str | list[str] = REFERENCE_NORM_PROJECTIONS,
                 dense_first_fraction: float = 0.0, calibration_context: str = "sparse", refine_passes: int = 2,
                 max_calibration_values: int = MAX_CALIBRATION_VALUES, seed: int = 0, **kwargs):
        super().__init__(sparsity, **kwargs)
        if not 0.0 <= dense_first_fraction < 1.0:
            raise ValueError(f"dense_first_fraction must be in [0, 1) (reference: 0.01), got {dense_first_fraction}")
        self.dense_first_fraction = float(dense_first_fraction)
        if mode not in MODES:
            raise ValueError(f"WINA mode must be one of {MODES}, got {mode!r}")
        calibration_passes(calibration_context, refine_passes)  # validates both
        self.mode = mode
        self.norm_projections = list(norm_projections) if not isinstance(norm_projections, str) else norm_projections
        self._norm_names = set(resolve_norm_projections(norm_projections))
        self.calibration_context = calibration_context
        self.refine_passes = int(refine_passes)
        self.max_calibration_values = max_calibration_values
        self.seed = seed
        self.thresholds: dict[str, float] = {}
        self.column_norms = ColumnNorms()

    def attach(self, model: nn.Module) -> WinaSparsifier:
        self.column_norms.clear()
        return super().attach(model)

    def describe(self) -> dict:
        return {**super().describe(), "mode": self.mode, "norm_projections": self.norm_projections,
                "dense_first_fraction": self.dense_first_fraction, "calibration_context": self.calibration_context,
                "refine_passes": self.refine_passes}

    def sparsified_tokens(self, num_tokens: int) -> int:
        n = super().sparsified_tokens(num_tokens)
        if self.dense_first_fraction > 0 and num_tokens > 1:  # the reference's last int(0.99·T) tokens
            n = min(n, int(num_tokens * (1.0 - self.dense_first_fraction)))
        return n

    def uses_norm(self, proj: Projection) -> bool:
        return proj.name in self._norm_names

    def share_key(self, proj: Projection) -> Hashable:
        own = proj.name if self.uses_norm(proj) else "magnitude"
        return own if self.mode == "topk" else (own, self.thresholds.get(proj.key))

    def score(self, proj: Projection, x: torch.Tensor) -> torch.Tensor:
        """``|x_i|·‖W[:, i]‖₂`` (or ``|x_i|``), in float32."""
        s = x.detach().float().abs()
        if self.uses_norm(proj):
            s = s * self.column_norms(proj).to(s.device)
        return s

    def score_group(self, proj: Projection) -> Hashable:
        """Projections whose scores coincide (``|x|`` on one site) are calibrated together."""
        return (proj.layer, proj.name) if self.uses_norm(proj) else site_group(proj)

    # ----------------------------------------------------------- calibration
    def calibrate(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        if self.mode == "topk":
            return  # top-k needs no statistics
        batches = list(batches)
        passes = calibration_passes(self.calibration_context, self.refine_passes)
        for i in range(passes):
            recorder = record_inputs(self, model, batches, dense=(i == 0), desc=f"WINA calibration {i + 1}/{passes}",
                                     max_values=self.max_calibration_values, seed=self.seed,
                                     score=self.score, group=self.score_group)
            cache: dict = {}
            for p in self.projections:
                group = self.score_group(p)
                if group not in cache:
                    cache[group] = exact_threshold(recorder.site_values(group), self.sparsity)
                self.thresholds[p.key] = cache[group]
            self._refresh_consumers()

    # -------------------------------------------------------------- masking
    def sparsify(self, proj, x, measure):
        score = self.score(proj, x)
        if self.mode == "topk":
            mask = topk_mask(score, keep_count(x.shape[-1], self.sparsity))
        else:
            tau = self.thresholds.get(proj.key)
            if tau is None:
                raise RuntimeError(f"WINA threshold for {proj.key} is missing: call calibrate() or load_state_dict() first")
            mask = score > tau
        out = x * mask.to(x.dtype)
        dropped = (~mask).sum() if measure else None
        return out, dropped

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"threshold.{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.thresholds.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.thresholds = {k.removeprefix("threshold."): float(v) for k, v in state.items() if k.startswith("threshold.")}
        unknown = [k for k in state if not k.startswith("threshold.")]
        if unknown:
            raise ValueError(f"Unexpected WINA state keys {unknown[:5]}")
        if self.mode == "threshold":
            missing = [p.key for p in self.projections if p.key not in self.thresholds]
            if missing:
                raise ValueError(f"Saved WINA thresholds lack projections {missing[:5]} (model/projection mismatch)")
        self.column_norms.clear()  # weights may differ from the model seen before
        self._refresh_consumers()
