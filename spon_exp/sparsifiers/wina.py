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
that; the default 0 sparsifies every token, like the other methods here. It is a parameter
of the common token policy (:class:`~spon_exp.sparsifiers.base.TokenPolicy`) and combines
with ``token_policy`` (the fewer sparsified tokens win).

With column norms the score differs between q/k/v (and gate/up), so a projection that uses
its norm gets its own mask; projections scored by ``|x|`` alone on one site share theirs.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from spon_exp.models.adapters import PROJECTIONS, Projection
from spon_exp.sparsifiers.base import Sparsifier
from spon_exp.sparsifiers.calibration import (CalibratedOptions, calibration_passes, exact_threshold, record_inputs,
                                              site_group)
from spon_exp.sparsifiers.scoring import ColumnNorms, keep_count, magnitude_topk_mask

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


@dataclass
class WinaOptions(CalibratedOptions):
    """WINA's options (``sparsifier=wina``); the calibration options apply to threshold mode."""

    mode: str = "topk"  # topk (per token, k = int(in*(1-s)), reference) / threshold (calibrated)
    # projections scoring |x_i|*||W[:,i]||: reference k_proj + gate_proj; "all"; "none"; or a list
    norm_projections: Any = field(default_factory=lambda: list(REFERENCE_NORM_PROJECTIONS))
    dense_first_fraction: float = 0.0  # leading prefill tokens kept dense (reference: 0.01)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.dense_first_fraction < 1.0:
            raise ValueError(f"dense_first_fraction must be in [0, 1) (reference: 0.01), got {self.dense_first_fraction}")
        if self.mode not in MODES:
            raise ValueError(f"WINA mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.norm_projections, str):
            self.norm_projections = list(self.norm_projections)
        resolve_norm_projections(self.norm_projections)  # validates the names


class WinaSparsifier(Sparsifier):
    name = "wina"
    Options = WinaOptions

    def _init_state(self) -> None:
        self.tokens = replace(self.tokens, dense_first_fraction=self.options.dense_first_fraction)
        self._norm_names = set(resolve_norm_projections(self.options.norm_projections))
        self.thresholds: dict[str, float] = {}
        self.column_norms = ColumnNorms()

    def attach(self, model: nn.Module) -> WinaSparsifier:
        self.column_norms.clear()
        return super().attach(model)

    def uses_norm(self, proj: Projection) -> bool:
        return proj.name in self._norm_names

    def share_key(self, proj: Projection) -> Hashable:
        own = proj.name if self.uses_norm(proj) else "magnitude"
        return own if self.options.mode == "topk" else (own, self.thresholds.get(proj.key))

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
        if self.options.mode == "topk":
            return  # top-k needs no statistics
        batches = list(batches)
        passes = calibration_passes(self.options.calibration_context, self.options.refine_passes)
        for i in range(passes):
            recorder = record_inputs(self, model, batches, dense=(i == 0), desc=f"WINA calibration {i + 1}/{passes}",
                                     max_values=self.options.max_calibration_values, seed=self.seed,
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
        if self.options.mode == "topk":
            norms = self.column_norms(proj).to(x.device) if self.uses_norm(proj) else None
            mask = magnitude_topk_mask(x, keep_count(x.shape[-1], self.sparsity), "break", norms)
        else:
            score = self.score(proj, x)
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
        if self.options.mode == "threshold":
            missing = [p.key for p in self.projections if p.key not in self.thresholds]
            if missing:
                raise ValueError(f"Saved WINA thresholds lack projections {missing[:5]} (model/projection mismatch)")
        self.column_norms.clear()  # weights may differ from the model seen before
        self._refresh_consumers()
