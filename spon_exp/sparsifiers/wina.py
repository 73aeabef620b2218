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

Allocation: ``uniform`` (every projection at the target) or ``greedy``: the reference's
per-projection search (``greedyopt.py``, step 0.025 by default here as there), the same
machinery as TEAL's (:mod:`spon_exp.sparsifiers.greedy`); candidates take effect as top-k
counts at the candidate sparsities (threshold mode then calibrates each projection's
threshold at its allocated sparsity).

``transform=True`` (the reference's ``--transform``): per layer, the q/k/v input is mapped
into the right singular basis ``V`` of ``W_k·diag(γ)`` and the gate/up input into that of
``W_gate·diag(γ')`` (``γ`` the scale of the RMSNorm producing the input, fused first as the
reference's layer-norm fusion does), which makes k_proj's and gate_proj's columns
orthogonal: the basis in which the column-norm score is meant. The map folds into the
weights (:class:`~spon_exp.sparsifiers.rotation.FoldedRotations`): the consumers read
``x·diag(1/γ)·V`` with weights ``W·diag(γ)·V``, so the dense function is unchanged (to
rounding) and SPON's α lives in the transformed space. The reference rotates the residual
stream instead (SliceGPT-style, with shortcut matrices); on the projections' inputs that is
the same basis, and masks and scores are the same.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from spon_exp.models.adapters import PROJECTIONS, DecoderBlock, Projection
from spon_exp.sparsifiers.base import Sparsifier, run_batches
from spon_exp.sparsifiers.calibration import (CalibratedOptions, calibration_passes, exact_threshold, record_inputs,
                                              site_group)
from spon_exp.sparsifiers.greedy import BlockInputs, GreedyAllocation, GreedyOptions
from spon_exp.sparsifiers.registry import register
from spon_exp.sparsifiers.rotation import FoldedRotations
from spon_exp.sparsifiers.scoring import ColumnNorms, keep_count, topk_sparsify

MODES = ("topk", "threshold")
REFERENCE_NORM_PROJECTIONS = ("k_proj", "gate_proj")
#: the projection whose right singular basis the transform uses, per site (the reference's)
TRANSFORM_BASIS = {"qkv_input": "k_proj", "gate_up_input": "gate_proj"}


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
class WinaOptions(GreedyOptions, CalibratedOptions):
    """WINA's options (``sparsifier=wina``); the calibration options apply to threshold mode."""

    mode: str = "topk"  # topk (per token, k = int(in*(1-s)), reference) / threshold (calibrated)
    # projections scoring |x_i|*||W[:,i]||: reference k_proj + gate_proj; "all"; "none"; or a list
    norm_projections: Any = field(default_factory=lambda: list(REFERENCE_NORM_PROJECTIONS))
    dense_first_fraction: float = 0.0  # leading prefill tokens kept dense (reference: 0.01)
    greedy_step: float = 0.025  # greedy: the reference's base step (TEAL's is 0.05)
    transform: bool = False  # the reference's --transform: k/gate singular bases, folded into the weights

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.dense_first_fraction < 1.0:
            raise ValueError(f"dense_first_fraction must be in [0, 1) (reference: 0.01), got {self.dense_first_fraction}")
        if self.mode not in MODES:
            raise ValueError(f"WINA mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.norm_projections, str):
            self.norm_projections = list(self.norm_projections)
        resolve_norm_projections(self.norm_projections)  # validates the names


def norm_scale(block: DecoderBlock, site: str) -> torch.Tensor:
    """The per-channel scale ``γ`` of the RMSNorm producing ``site``'s input, read off the
    module (its output for an all-ones input, whose RMS is 1), in float64."""
    norm = block.norms.get(site)
    if norm is None or "rmsnorm" not in type(norm).__name__.lower():
        raise ValueError(f"WINA's transform needs the RMSNorm before layer {block.index}'s {site}; found "
                         f"{type(norm).__name__ if norm is not None else 'none'} (families with other norms are not supported)")
    weight = next(p for p in block.projections.values() if p.site == site).module.weight
    with torch.no_grad():
        return norm(torch.ones(1, weight.shape[1], dtype=weight.dtype, device=weight.device))[0].double()


def transform_maps(block: DecoderBlock, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """WINA's transform of one site: the input map ``diag(1/γ)·V`` and the weight map
    ``diag(γ)·V`` (``V`` the right singular vectors of ``W·diag(γ)`` for the site's basis
    projection; a zero ``γ_i`` gets 0 in the input map, its channel being always 0)."""
    gamma = norm_scale(block, site)
    weight = block.projections[TRANSFORM_BASIS[site]].module.weight.detach().double()
    v = torch.linalg.svd(weight * gamma, full_matrices=True).Vh.T
    inverse = torch.where(gamma != 0, 1.0 / gamma, torch.zeros_like(gamma))
    return v * inverse[:, None], v * gamma[:, None]


@register
class WinaSparsifier(GreedyAllocation, Sparsifier):
    name = "wina"
    Options = WinaOptions

    def _init_state(self) -> None:
        self._norm_names = set(resolve_norm_projections(self.options.norm_projections))
        self.thresholds: dict[str, float] = {}
        self.column_norms = ColumnNorms()
        self._init_greedy()
        self._candidate: dict[str, float] = {}  # greedy search: sparsities under evaluation
        self.folded = FoldedRotations()
        self.maps: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # transform: (input, weight) maps

    def attach(self, model: nn.Module) -> WinaSparsifier:
        self.column_norms.clear()
        return super().attach(model)

    def detach(self) -> None:
        self.folded.remove()  # the original weights back, exactly
        super().detach()

    # ------------------------------------------------------------ transform
    def _install_transform(self, maps: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.folded.remove()
        self.maps = maps
        if maps:
            self.folded.fold(self.blocks, {k: m[0] for k, m in maps.items()}, {k: m[1] for k, m in maps.items()})
        self.column_norms.clear()  # the folded weights' columns

    def apply_transform(self) -> None:
        """Compute and fold the transform of every site a selected projection reads (idempotent)."""
        if self.maps:
            return
        self.folded.remove()
        sites = sorted({(p.layer, p.site) for p in self.projections if p.site in TRANSFORM_BASIS})
        by_index = {b.index: b for b in self.blocks}
        maps = {}
        for layer, site in sites:
            input_map, weight_map = transform_maps(by_index[layer], site)
            maps[(layer, site)] = (input_map.float(), weight_map.float())
        self._install_transform(maps)

    # ----------------------------------------------------------- allocation
    def projection_sparsity(self, proj: Projection) -> float:
        """The sparsity of this projection's mask: a greedy candidate under evaluation, else its allocation."""
        candidate = self._candidate.get(proj.key)
        return candidate if candidate is not None else self.target_sparsity(proj)

    def uses_norm(self, proj: Projection) -> bool:
        return proj.name in self._norm_names

    def share_key(self, proj: Projection) -> Hashable:
        own = proj.name if self.uses_norm(proj) else "magnitude"
        if self.options.mode == "topk" or proj.key in self._candidate:
            allocated = not self.greedy or proj.layer in self.greedy_lookup or proj.key in self._candidate
            return own, self.projection_sparsity(proj) if allocated else None
        return own, self.thresholds.get(proj.key)

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
        """Transform (if on), greedy allocation (if on), thresholds (threshold mode); top-k
        with a uniform allocation needs no statistics."""
        batches = list(batches)
        if self.options.transform:
            self.apply_transform()
        if self.greedy:
            self._greedy_search(model, batches)
        if self.options.mode == "topk":
            self._refresh_consumers()
            return
        passes = calibration_passes(self.options.calibration_context, self.options.refine_passes)
        for i in range(passes):
            recorder = record_inputs(self, model, batches, dense=(i == 0), desc=f"WINA calibration {i + 1}/{passes}",
                                     max_values=self.options.max_calibration_values, seed=self.seed,
                                     score=self.score, group=self.score_group)
            cache: dict = {}
            for p in self.projections:
                key = (self.score_group(p), self.target_sparsity(p))
                if key not in cache:
                    cache[key] = exact_threshold(recorder.site_values(key[0]), key[1])
                self.thresholds[p.key] = cache[key]
            self._refresh_consumers()

    def _greedy_search(self, model: nn.Module, batches: list[torch.Tensor]) -> None:
        """The reference's per-projection search on dense block inputs, candidates as top-k counts."""
        capture = BlockInputs(self.blocks, self.options.greedy_sequences)
        try:
            with self.disabled():
                run_batches(model, batches, desc="WINA block inputs")
        finally:
            capture.remove()

        def apply(projs, sparsities):
            self._candidate.update({p.key: s for p, s in zip(projs, sparsities)})

        try:
            self.greedy_search(capture, apply)
        finally:
            self._candidate.clear()

    # -------------------------------------------------------------- masking
    def sparsify(self, proj, x, measure):
        if self.options.mode == "topk" or proj.key in self._candidate:  # greedy candidates are top-k counts
            norms = self.column_norms(proj).to(x.device) if self.uses_norm(proj) else None
            return topk_sparsify(x, keep_count(x.shape[-1], self.projection_sparsity(proj)), "break", norms, measure)
        tau = self.thresholds.get(proj.key)
        if tau is None:
            raise RuntimeError(f"WINA threshold for {proj.key} is missing: call calibrate() or load_state_dict() first")
        mask = self.score(proj, x) > tau
        out = x * mask.to(x.dtype)
        dropped = (~mask).sum() if measure else None
        return out, dropped

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"threshold.{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.thresholds.items()}
        state.update(self.greedy_state())
        for (layer, site), (input_map, weight_map) in self.maps.items():
            state[f"rotation.{layer}.{site}"] = input_map.detach().cpu().contiguous()
            state[f"rotation_weight.{layer}.{site}"] = weight_map.detach().cpu().contiguous()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.thresholds = {k.removeprefix("threshold."): float(v) for k, v in state.items() if k.startswith("threshold.")}
        self.load_greedy_state(state)
        known = ("threshold.", "greedy_lookup.", "rotation.", "rotation_weight.")
        unknown = [k for k in state if not k.startswith(known)]
        if unknown:
            raise ValueError(f"Unexpected WINA state keys {unknown[:5]}")
        maps = {}
        for k, v in state.items():
            if k.startswith("rotation."):
                layer, site = k.removeprefix("rotation.").split(".", 1)
                weight_map = state.get(f"rotation_weight.{layer}.{site}")
                if weight_map is None:
                    raise ValueError(f"Saved WINA transform lacks rotation_weight.{layer}.{site}")
                maps[(int(layer), site)] = (v.float(), weight_map.float())
        if self.options.transform and not maps:
            raise ValueError("The WINA state has no transform maps but transform=true: it was saved without the transform")
        if maps and not self.options.transform:
            raise ValueError("The WINA state holds transform maps but transform=false: load it with transform=true")
        self._install_transform(maps)
        if self.options.mode == "threshold":
            missing = [p.key for p in self.projections if p.key not in self.thresholds]
            if missing:
                raise ValueError(f"Saved WINA thresholds lack projections {missing[:5]} (model/projection mismatch)")
        self._refresh_consumers()
