"""No sparsity: the dense reference as a sparsifier (``sparsifier=dense``).

Attaching selects the projections but puts no hook on them, there is nothing to calibrate
and the measured sparsity is 0. Its sparse model is the dense one (``sparsifies = False``),
so a run evaluates only the dense variant and trains no SPON.
"""

from __future__ import annotations

import torch

from spon_exp.sparsifiers.base import Sparsifier
from spon_exp.sparsifiers.registry import register


@register
class DenseSparsifier(Sparsifier):
    name = "dense"
    sparsifies = False

    def register_hooks(self) -> None:
        """None: every projection computes on its full input."""

    def sparsify(self, proj, x, measure):
        return x, (torch.zeros((), dtype=torch.long) if measure else None)

    def measured_sparsity(self) -> dict:
        return {"model": 0.0, "per_layer": {str(layer): 0.0 for layer in sorted({p.layer for p in self.projections})},
                "per_projection": dict.fromkeys((p.key for p in self.projections), 0.0)}
