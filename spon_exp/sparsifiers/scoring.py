"""Scoring and masking helpers shared by several methods (WINA, R-Sparse, LaRoSA)."""

from __future__ import annotations

import torch

from spon_exp.models.adapters import Projection


def topk_mask(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` highest scores along the last dimension (exactly
    ``keep`` per row, ties broken by ``torch.topk``)."""
    width = score.shape[-1]
    if keep >= width:
        return torch.ones_like(score, dtype=torch.bool)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if keep > 0:
        mask.scatter_(-1, score.topk(keep, dim=-1).indices, True)
    return mask


def keep_count(width: int, sparsity: float) -> int:
    """Channels kept per token by top-k at ``sparsity`` (the reference's ``int(in·(1−s))``)."""
    return max(0, min(width, int(width * (1.0 - sparsity))))


class ColumnNorms:
    """``‖W[:, i]‖₂`` of each projection's weight, computed once (float32, weight's device)."""

    def __init__(self):
        self._norms: dict[str, torch.Tensor] = {}

    def __call__(self, proj: Projection) -> torch.Tensor:
        norm = self._norms.get(proj.key)
        if norm is None:
            norm = proj.module.weight.detach().float().norm(dim=0)
            self._norms[proj.key] = norm
        return norm

    def clear(self) -> None:
        self._norms.clear()
