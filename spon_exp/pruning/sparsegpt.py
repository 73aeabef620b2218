"""SparseGPT (Frantar & Alistarh, arXiv 2301.00774): one-shot pruning with OBS weight updates.

For a linear layer ``y = W x`` and calibration inputs ``X`` (columns = tokens), the layer
Hessian of the reconstruction error ``‖WX − ŴX‖²`` is ``H = 2XXᵀ``. The input columns are
processed left to right; pruning weight ``W_iq`` of column ``q`` moves the not yet processed
weights of row ``i`` by ``−W_iq / [H_F⁻¹]_qq · [H_F⁻¹]_q,:`` (the Optimal Brain Surgeon update,
``F`` = the columns not yet processed), and then ``q`` leaves ``F``. The rows of the upper
Cholesky factor of ``H⁻¹`` are exactly those eliminated inverse rows (over their diagonal's
square root), so one factorisation serves every column. Columns are handled in blocks of
``blocksize``: updates inside a block are applied column by column, the rest of the matrix is
updated once per block (lazy batch updates).

Mask selection is adaptive: unstructured, at the start of every block the ``int(rows ·
blocksize · s)`` weights of the block with the lowest OBS saliency ``w² / [H_F⁻¹]_qq`` (with the
weights as the previous blocks left them) are pruned; N:M, at the first column of every group
of M, the N lowest-saliency weights of each row in the group. ``H`` is dampened by
``percdamp · mean(diag H)``; a column whose input was always 0 ("dead") gets ``H_qq = 1`` and
its weights 0. docs/FIDELITY.md ("SparseGPT") lists the reference's choices and the departures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spon_exp.pruning.base import Pruner, PruningOptions, smallest_per_group


@dataclass
class SparseGPTOptions(PruningOptions):
    blocksize: int = 128  # columns per lazy-update block (and per adaptive mask selection)
    percdamp: float = 0.01  # dampening: this fraction of the mean diagonal of H is added to it

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize}")
        if not self.percdamp > 0:
            raise ValueError(f"percdamp must be > 0 (the references use 0.01), got {self.percdamp}")
        if self.structured and self.blocksize % self.prune_m:
            raise ValueError(f"blocksize={self.blocksize} must be a multiple of prune_m={self.prune_m}: an N:M group "
                             f"may not straddle two blocks")


class Hessian:
    """``2/n · Σ xxᵀ`` over the calibration tokens in float32, ``n`` counting sequences as the
    reference's running average does (a constant scale, which no mask or update sees)."""

    def __init__(self, columns: int, device: torch.device):
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.sequences = 0

    def add(self, x: torch.Tensor) -> None:
        self.sequences += x.shape[0] if x.dim() > 2 else 1
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        self.sum.addmm_(x.T, x)

    def matrix(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.sequences, 1))


def inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of ``H⁻¹`` (``U`` with ``UᵀU = H⁻¹``)."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)


def _block_mask(saliency: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The ``int(numel · s)`` lowest saliencies of a block, ties to the earlier entry."""
    k = int(saliency.numel() * sparsity)
    prune = torch.zeros(saliency.numel(), dtype=torch.bool, device=saliency.device)
    prune[torch.sort(saliency.flatten(), stable=True).indices[:k]] = True
    return prune.reshape(saliency.shape)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, prune_n: int = 0,
                    prune_m: int = 0, blocksize: int = 128, percdamp: float = 0.01
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pruned weight in weight's dtype, keep mask)`` of one layer (see the module docstring)."""
    W = weight.detach().to(torch.float32).clone()
    H = hessian.to(device=W.device, dtype=torch.float32).clone()
    columns = W.shape[1]
    if prune_n and columns % prune_m:
        raise ValueError(f"{columns} input columns are not a multiple of M={prune_m}; N:M pruning needs whole groups")
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.diagonal(H).mean())
    Hinv = inverse_cholesky(H)
    prune = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1)
        errors = torch.zeros_like(W1)
        mask1 = (torch.zeros_like(W1, dtype=torch.bool) if prune_n
                 else _block_mask(W1.pow(2) / d.pow(2)[None, :], sparsity))
        for i in range(i2 - i1):
            if prune_n and i % prune_m == 0:
                group = W1[:, i:i + prune_m].pow(2) / d[i:i + prune_m].pow(2)[None, :]
                mask1[:, i:i + prune_m] = smallest_per_group(group, prune_n, prune_m)
            w = W1[:, i].clone()  # W1 is updated in place below
            err = w.masked_fill(~mask1[:, i], 0) / d[i]  # (w − q) / d: q keeps w where not pruned
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = w.masked_fill(mask1[:, i], 0)
            errors[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= errors @ Hinv[i1:i2, i2:]
        prune[:, i1:i2] = mask1
    return W.masked_fill(prune, 0).to(weight.dtype), ~prune


class SparseGPT(Pruner):
    name = "sparsegpt"
    Options = SparseGPTOptions
    updates_weights = True

    def statistic(self, columns: int, device: torch.device) -> Hessian:
        return Hessian(columns, device)

    def prune(self, weight: torch.Tensor, statistic: Hessian) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.options
        return sparsegpt_prune(weight, statistic.matrix(), self.sparsity, o.prune_n, o.prune_m, o.blocksize, o.percdamp)
