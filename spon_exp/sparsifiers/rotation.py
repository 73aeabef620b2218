"""Input rotations folded into the consuming weights: ``W' = W·Q``, input ``x·Q``.

A method that masks a site's input in a rotated basis (LaRoSA; WINA's orthogonalising
transform) computes ``W · (mask(x·Q) · Qᵀ)`` at run time: two extra ``d × d`` products per
site. As the reference deployments do, :class:`FoldedRotations` folds ``Q`` into the
weights instead: every consumer of the site gets ``W' = W·Q`` and the site's container (the
attention module for ``qkv_input``, the MLP module for ``gate_up_input``) receives
``x·Q``, so the consumers compute ``W'·(x·Q) = W·x`` (to rounding) with one rotation per
site, and a mask applied to their input acts on the rotated coordinates directly.

Every consumer of a rotated site is folded, including projections the sparsifier does not
sparsify: they all read the container's input. The rotation hook is always on: switching
the sparsifier off (``disabled()``) leaves the dense function, which needs the rotation. The
rotated input is what every other hook on the consumers sees (calibration recorders, SPON's
initialisation), and SPON's α lives in the rotated space: ``b' = b + W'·α`` folds exactly.

``remove()`` restores the original weights bit for bit (they are kept on the CPU while
folded: a copy of every consumer's weights in host memory). A bias that
SPON folded meanwhile (``b + W'·α``) belongs to the folded weights: detaching leaves it, so
use such a model with the sparsifier attached (as the runner and the export do).
"""

from __future__ import annotations

import torch

from spon_exp.models.adapters import DecoderBlock
from spon_exp.sparsifiers.hooks import HookSet

FOLDABLE_SITES = ("qkv_input", "gate_up_input")


def rotate(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x·Q`` computed in ``Q``'s dtype, returned in ``x``'s."""
    return (x.to(q.dtype) @ q.to(x.device)).to(x.dtype)


class FoldedRotations:
    """Rotations ``Q`` per ``(layer, site)`` folded into one model's weights (see the module doc)."""

    def __init__(self) -> None:
        self.hooks = HookSet()  # never switched off: the folded weights need the rotated input
        self._originals: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.sites: dict[tuple[int, str], torch.Tensor] = {}

    @property
    def folded(self) -> bool:
        return bool(self.sites)

    def fold(self, blocks: list[DecoderBlock], rotations: dict[tuple[int, str], torch.Tensor],
             weight_maps: dict[tuple[int, str], torch.Tensor] | None = None) -> None:
        """Fold each ``Q`` (``in × in``, orthogonal) into the consumers of its site.

        A site with an entry in ``weight_maps`` takes a general invertible input map ``M``
        (``rotations``) with its weights mapped by ``weight_maps`` ``= M⁻ᵀ``: the consumers read
        ``x·M`` with weights ``W·M⁻ᵀ`` (WINA's transform with the norm's scale fused)."""
        self.remove()
        weight_maps = weight_maps or {}
        by_index = {b.index: b for b in blocks}
        for (layer, site), q in rotations.items():
            block = by_index.get(layer)
            container = block.containers.get(site) if block is not None else None
            if site not in FOLDABLE_SITES or container is None:
                raise ValueError(f"Cannot fold a rotation of layer {layer} {site}: only the inputs of the attention "
                                 f"and MLP modules ({', '.join(FOLDABLE_SITES)}) can be rotated")
            device = next(p for p in block.projections.values() if p.site == site).module.weight.device
            q = q.to(device)
            w_map = weight_maps.get((layer, site), q).to(device=device, dtype=q.dtype)
            with torch.no_grad():
                for proj in block.projections.values():
                    if proj.site != site:
                        continue
                    weight = proj.module.weight
                    if weight.shape[1] != q.shape[0]:
                        raise ValueError(f"Rotation of layer {layer} {site} is {tuple(q.shape)}, but {proj.key} "
                                         f"reads {weight.shape[1]} inputs")
                    self._originals.append((weight, weight.detach().to("cpu", copy=True)))
                    weight.copy_((weight.to(q.dtype) @ w_map).to(weight.dtype))
            self.hooks.pre(container, self._hook(q), with_kwargs=True)
            self.sites[(layer, site)] = q

    @staticmethod
    def _hook(q: torch.Tensor):
        def hook(module, args, kwargs):
            if args:
                return (rotate(args[0], q), *args[1:]), kwargs
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": rotate(kwargs["hidden_states"], q)}
            raise RuntimeError(f"{type(module).__name__} was called without hidden states to rotate")
        return hook

    def remove(self) -> None:
        """Take the rotation hooks down and restore the original weights exactly."""
        self.hooks.remove()
        with torch.no_grad():
            for weight, original in reversed(self._originals):
                weight.copy_(original.to(weight.device))
        self._originals.clear()
        self.sites = {}
