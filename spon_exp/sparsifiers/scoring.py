"""Scoring and masking helpers shared by several methods (WINA, R-Sparse, LaRoSA)."""

from __future__ import annotations

import torch

from spon_exp.models.adapters import Projection


TIES = ("break", "keep")


def kth_largest(score: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep``-th largest score of each row (shape ``[..., 1]``), by the device's fastest
    selection: ``kthvalue`` (a quickselect) on the CPU, ``topk(sorted=False)`` elsewhere."""
    if score.device.type == "cpu":
        return score.kthvalue(score.shape[-1] - keep + 1, dim=-1, keepdim=True).values
    return score.topk(keep, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)


def topk_mask(score: torch.Tensor, keep: int, ties: str = "break") -> torch.Tensor:
    """Boolean mask of the ``keep`` highest scores along the last dimension.

    ``ties="break"``: exactly ``keep`` per row (WINA's reference, ``topk`` + ``scatter``);
    where scores tie at the cut, ``torch.topk`` picks. ``ties="keep"``: every score equal to
    the ``keep``-th largest is kept too (LaRoSA's reference, ``|x| >= kthvalue``), so a row
    may keep more.

    Both compare against the row's ``keep``-th largest score (one selection, no sort and no
    index scatter: ~4x cheaper than ``topk`` + ``scatter`` on a CPU); with ``break`` only the
    rows where a tie made the mask too wide are redone with ``topk``.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    width = score.shape[-1]
    if keep >= width:
        return torch.ones_like(score, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    mask = score >= kth_largest(score, keep)
    if ties == "break":
        rows = mask.reshape(-1, width)
        wide = (rows.sum(dim=-1) > keep).nonzero().squeeze(-1)
        if wide.numel():
            exact = torch.zeros((wide.numel(), width), dtype=torch.bool, device=score.device)
            exact.scatter_(-1, score.reshape(-1, width)[wide].topk(keep, dim=-1).indices, True)
            rows[wide] = exact
    return mask


def magnitude_topk_mask(x: torch.Tensor, keep: int, ties: str = "break",
                        column_scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`topk_mask` of the score ``|x_i|·c_i`` (``c`` = ``column_scale`` or 1), in float32.

    On the CPU in float32 one fused kernel (:mod:`spon_exp.kernels.select`) scores, selects and
    masks each row in cache; elsewhere torch computes the score tensor and selects. With
    ``ties="break"`` the kernel takes the tied entries of lowest index, torch its own pick."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    from spon_exp.kernels.select import topk_mask_cpu

    mask = topk_mask_cpu(x, keep, ties, column_scale)
    if mask is not None:
        return mask
    score = x.detach().abs() if x.dtype == torch.float64 else x.detach().float().abs()  # float64 stays
    if column_scale is not None:
        score = score * column_scale.to(score.device)
    return topk_mask(score, keep, ties)


def topk_sparsify(x: torch.Tensor, keep: int, ties: str = "break", column_scale: torch.Tensor | None = None,
                  measure: bool = False) -> tuple[torch.Tensor, torch.Tensor | int | None]:
    """``x`` with all but its ``keep`` highest-scoring entries per row zeroed (score
    ``|x_i|·c_i``), and the number of zeroed entries if ``measure``. On the CPU without
    autograd one kernel pass writes the result (no mask tensor, no product); otherwise
    ``x * mask`` (:func:`magnitude_topk_mask`)."""
    from spon_exp.kernels.select import topk_sparsify_cpu

    fused = topk_sparsify_cpu(x, keep, ties, column_scale)
    if fused is not None:
        out, kept = fused
        return out, (x.numel() - kept if measure else None)
    mask = magnitude_topk_mask(x, keep, ties, column_scale)
    return x * mask.to(x.dtype), ((~mask).sum() if measure else None)


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
