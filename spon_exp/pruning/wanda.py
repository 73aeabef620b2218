"""Wanda (Sun et al., arXiv 2306.11695): prune by weight magnitude times input-activation norm.

Score of weight ``W_ij`` (output row ``i``, input column ``j``): ``|W_ij| · ‖X_j‖₂``, where
``‖X_j‖₂`` is the L2 norm of input feature ``j`` over every calibration token. Scores are
compared within each output row: unstructured pruning removes the ``int(columns · s)``
lowest-scored weights of every row; N:M removes the N lowest of every M consecutive weights of
a row. The kept weights are not changed. docs/FIDELITY.md ("Wanda") lists the reference's
choices and where this departs from them.
"""

from __future__ import annotations

import torch

from spon_exp.pruning.base import Pruner, smallest_per_group, smallest_per_row


class ColumnSquares:
    """Σ over calibration tokens of ``x_j²`` per input column, in float32 (the reference's
    ``scaler_row``, up to its constant 1 / number of sequences, which no row comparison sees)."""

    def __init__(self, columns: int, device: torch.device):
        self.sum = torch.zeros(columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        self.sum += x.pow(2).sum(dim=0)
        self.tokens += x.shape[0]


def wanda_prune_mask(weight: torch.Tensor, column_squares: torch.Tensor, sparsity: float,
                     prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
    """The weights Wanda prunes (True = pruned) given ``Σ_t x_tj²`` per input column."""
    score = weight.detach().abs().to(torch.float32) * column_squares.to(weight.device).sqrt()[None, :]
    if prune_n:
        return smallest_per_group(score, prune_n, prune_m)
    return smallest_per_row(score, sparsity)


class Wanda(Pruner):
    name = "wanda"

    def statistic(self, columns: int, device: torch.device) -> ColumnSquares:
        return ColumnSquares(columns, device)

    @torch.no_grad()
    def prune(self, weight: torch.Tensor, statistic: ColumnSquares) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.options
        keep = ~wanda_prune_mask(weight, statistic.sum, self.sparsity, o.prune_n, o.prune_m)
        return weight.masked_fill(~keep, 0), keep
