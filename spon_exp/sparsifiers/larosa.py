"""LaRoSA (ICML 2025, arXiv 2507.01299): top-k in a rotated basis.

Per layer and rotated input site (``qkv_input``, ``gate_up_input``) a rotation ``Q``: the
eigenvectors of the *uncentred* covariance ``Σ xᵀx`` of the dense calibration inputs, with
``0.01·mean(diag)`` added to the diagonal, ``eigh`` in float64 (as alibaba/EfficientAI
``larosa/``). Per token the ``int(in·(1−s))`` largest rotated coordinates ``|x·Q|`` are kept
(``ties="keep"``, the reference's ``>= kthvalue``, keeps every coordinate equal to the cut);
the o_proj and down_proj inputs are top-k'd unrotated. q/k/v (and gate/up) share one
sparsified input. ``mlp_rotation="attention"`` rotates the MLP input with the attention
input's ``Q``, as the reference's evaluation loads it.

Where the rotation lives (``rotation``):
- ``folded`` (default, as the reference deploys it): ``W' = W·Q`` in the consumers' weights
  and the site's input rotated once (:mod:`spon_exp.sparsifiers.rotation`); the consumers
  read ``topk(x·Q)``. One ``d × d`` product per site; SPON's α lives in the rotated space.
- ``runtime``: the weights stay, the consumers read ``topk(x·Q)·Qᵀ`` (two products per site).

Sparsity per site (``split``):
- ``reference``: ``0.8·s`` on the rotated sites, ``1.2·s`` on o/down (the reference code);
  the measured parameter-weighted sparsity is then below ``s`` (≈0.92·s on Llama-2-7B).
- ``balanced`` (default): the same 2:3 ratio, scaled per layer so that the parameter-weighted
  sparsity equals ``s`` (for comparisons at equal measured sparsity).
- ``even``: ``s`` everywhere.

Accounting: the dropped count is the number of zeroed *rotated* coordinates (the entries a
deployment that folds ``Q`` into the weights, ``W' = W Q``, skips).

Deviations from the reference: the rotation is applied in ``rotation_dtype`` (float32 by
default; the reference rotates in float64 at run time, ``float64`` is available).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from spon_exp.models.adapters import Projection
from spon_exp.sparsifiers.base import Sparsifier, SparsifierOptions, run_batches
from spon_exp.sparsifiers.hooks import HookSet
from spon_exp.sparsifiers.registry import register
from spon_exp.sparsifiers.rotation import FoldedRotations
from spon_exp.sparsifiers.scoring import TIES, keep_count, topk_sparsify

ROTATED_SITES = ("qkv_input", "gate_up_input")
SPLITS = ("reference", "balanced", "even")
REFERENCE_SPLIT = (0.8, 1.2)  # (rotated sites, o/down inputs)
ROTATION_DTYPES = {"float32": torch.float32, "float64": torch.float64}
PLACEMENTS = ("folded", "runtime")
MLP_ROTATIONS = ("own", "attention")


def rotation_from_covariance(covariance: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """Eigenvectors (columns) of ``Σxᵀx + damping·mean(diag)·I``, computed in float64."""
    h = covariance.to(torch.float64).clone()
    h.diagonal().add_(damping * h.diagonal().mean())
    return torch.linalg.eigh(h).eigenvectors


def site_sparsities(sparsity: float, split: str, rotated_params: int, other_params: int) -> tuple[float, float]:
    """Sparsity of (rotated sites, o/down inputs) for a layer with those parameter counts."""
    if split == "even":
        return sparsity, sparsity
    low, high = REFERENCE_SPLIT
    scale = 1.0
    if split == "balanced":
        scale = (rotated_params + other_params) / (low * rotated_params + high * other_params)
    return min(1.0, low * scale * sparsity), min(1.0, high * scale * sparsity)


@dataclass
class LarosaOptions(SparsifierOptions):
    """LaRoSA's options (``sparsifier=larosa``)."""

    split: str = "balanced"  # balanced (0.8:1.2 ratio, hits s) / reference (0.8s rotated, 1.2s o,down) / even
    damping: float = 0.01  # added to the covariance diagonal, times its mean
    rotation_dtype: str = "float32"  # float32 / float64 (the reference rotates in float64)
    rotation: str = "folded"  # folded (W' = W·Q, one product per site) / runtime (topk(x·Q)·Qᵀ)
    mlp_rotation: str = "own"  # own (the MLP input's covariance) / attention (the reference's evaluation)
    ties: str = "keep"  # keep (every coordinate equal to the k-th, reference) / break (exactly k)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split not in SPLITS:
            raise ValueError(f"LaRoSA split must be one of {SPLITS}, got {self.split!r}")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")
        if self.rotation_dtype not in ROTATION_DTYPES:
            raise ValueError(f"rotation_dtype must be one of {sorted(ROTATION_DTYPES)}, got {self.rotation_dtype!r}")
        for name, value, allowed in (("rotation", self.rotation, PLACEMENTS), ("mlp_rotation", self.mlp_rotation,
                                     MLP_ROTATIONS), ("ties", self.ties, TIES)):
            if value not in allowed:
                raise ValueError(f"LaRoSA {name} must be one of {allowed}, got {value!r}")


@register
class LarosaSparsifier(Sparsifier):
    name = "larosa"
    Options = LarosaOptions

    def _init_state(self) -> None:
        self.rotations: dict[tuple[int, str], torch.Tensor] = {}
        self._layer_sparsities: dict[int, tuple[float, float]] = {}
        self.folded = FoldedRotations()

    @property
    def folds(self) -> bool:
        return self.options.rotation == "folded"

    def is_rotated(self, proj: Projection) -> bool:
        return proj.site in ROTATED_SITES

    def share_key(self, proj: Projection) -> Hashable:
        return "rotated" if self.is_rotated(proj) else proj.name

    def attach(self, model: nn.Module) -> LarosaSparsifier:
        self._layer_sparsities = {}
        return super().attach(model)

    def detach(self) -> None:
        self.folded.remove()  # the original weights back, exactly
        super().detach()

    def _install(self, rotations: dict[tuple[int, str], torch.Tensor]) -> None:
        """Take ``rotations`` as the method's state, folded into the weights if ``rotation=folded``."""
        self.folded.remove()
        self.rotations = rotations
        if self.folds:
            self.folded.fold(self.blocks, rotations)

    def site_sparsity(self, proj: Projection) -> float:
        pair = self._layer_sparsities.get(proj.layer)
        if pair is None:
            layer = [p for p in self.projections if p.layer == proj.layer]
            rotated = sum(p.num_params for p in layer if self.is_rotated(p))
            other = sum(p.num_params for p in layer if not self.is_rotated(p))
            pair = self._layer_sparsities[proj.layer] = site_sparsities(self.sparsity, self.options.split, rotated, other)
        return pair[0] if self.is_rotated(proj) else pair[1]

    # ----------------------------------------------------------- calibration
    def calibrate(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        """Rotations from the dense inputs of every rotated site (one pass)."""
        self._install({})  # covariances of the original inputs
        sums: dict[tuple[int, str], torch.Tensor] = {}
        first: dict[tuple[int, str], Projection] = {}
        for p in self.projections:
            if self.is_rotated(p) and (self.options.mlp_rotation == "own" or p.site == "qkv_input"):
                first.setdefault((p.layer, p.site), p)

        def make(site):
            def hook(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
                h = x.T @ x
                sums[site] = h if site not in sums else sums[site] + h
            return hook

        with HookSet() as covariance, self.disabled():
            for site, p in first.items():
                covariance.pre(p.module, make(site), prepend=True)
            run_batches(model, batches, desc="LaRoSA covariance")
        dtype = ROTATION_DTYPES[self.options.rotation_dtype]
        rotations = {site: rotation_from_covariance(h, self.options.damping).to(dtype) for site, h in sums.items()}
        if self.options.mlp_rotation == "attention":
            for p in self.projections:
                if p.site == "gate_up_input" and (p.layer, "qkv_input") in rotations:
                    rotations[(p.layer, p.site)] = rotations[(p.layer, "qkv_input")]
        self._install(rotations)

    # -------------------------------------------------------------- masking
    def sparsify(self, proj, x, measure):
        keep = keep_count(x.shape[-1], self.site_sparsity(proj))
        if self.is_rotated(proj) and (proj.layer, proj.site) not in self.rotations:
            raise RuntimeError(f"LaRoSA rotation for layer {proj.layer} {proj.site} is missing: "
                               f"call calibrate() or load_state_dict() first")
        if self.is_rotated(proj) and not self.folds:
            q = self.rotations[(proj.layer, proj.site)].to(x.device)
            kept, dropped = topk_sparsify(x.to(q.dtype) @ q, keep, self.options.ties, measure=measure)
            return (kept @ q.T).to(x.dtype), dropped
        # unrotated sites, and folded ones (their input arrives rotated)
        return topk_sparsify(x, keep, self.options.ties, measure=measure)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"rotation.{layer}.{site}": q.detach().cpu().contiguous() for (layer, site), q in self.rotations.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        rotations = {}
        for k, v in state.items():
            if not k.startswith("rotation."):
                raise ValueError(f"Unexpected LaRoSA state key {k!r}")
            layer, site = k.removeprefix("rotation.").split(".", 1)
            rotations[(int(layer), site)] = v.to(ROTATION_DTYPES[self.options.rotation_dtype])
        needed = {(p.layer, p.site) for p in self.projections if self.is_rotated(p)}
        missing = sorted(needed - set(rotations))
        if missing:
            raise ValueError(f"Saved LaRoSA rotations lack {missing[:5]} (model/projection mismatch)")
        for p in self.projections:
            site = (p.layer, p.site)
            if site in rotations:
                rotations[site] = rotations[site].to(p.module.weight.device)
        self._install(rotations)
        self._refresh_consumers()
