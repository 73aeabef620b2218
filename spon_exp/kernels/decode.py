"""Real sparse decoding: the sparsified projections skip the weight columns of zeroed inputs.

``enable_sparse_decode(sparsifier)`` gives every projection the sparsifier hooks a
transposed, contiguous copy of its weight (``weight_t``, each input's column one contiguous
row) and switches the module to :class:`SparseDecodeLinear`, whose forward calls
:func:`spon_exp.kernels.sparse_matvec.sparse_linear`: for a single token (batch 1 decode)
only the rows of kept inputs are read; for anything else (prefill, batch > 1) it computes
the dense product, so results are always those of the masked-dense model. The sparsifier's
hooks stay where they are (the module object is the same, only its class changes), and
``disable_sparse_decode`` restores ``nn.Linear`` and frees the copies.

Fold SPON alphas into the biases first (``fold_alpha``): decoding then costs exactly the
sparse model's work.
"""

from __future__ import annotations

import torch
from torch import nn

from spon_exp.kernels.sparse_matvec import sparse_linear
from spon_exp.sparsifiers.base import Sparsifier


MODES = ("ordered", "auto", "ordered_dense")


class SparseDecodeLinear(nn.Linear):
    """An ``nn.Linear`` that also holds ``weight_t = weight.T`` and skips zero inputs at batch 1."""

    weight_t: torch.Tensor
    decode_mode: str = "ordered"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.weight_t, self.bias, mode=self.decode_mode)


def enable_sparse_decode(sparsifier: Sparsifier, mode: str = "ordered") -> int:
    """Switch the sparsifier's projections to the sparse decode path; returns how many.

    ``mode``: ``"ordered"`` (default) accumulates every output over the kept inputs in index
    order, and ``"ordered_dense"`` computes the masked-dense product in that same order
    without skipping anything: the two give bit-identical logits, so greedy decoding with
    ``"ordered"`` emits exactly the masked-dense reference's tokens (its speed against
    ``"auto"``: benchmarks/results/sparse_matvec.json). ``"auto"`` picks split-K or
    output split by shape and groups rows; it equals masked dense to float rounding only.
    """
    if mode not in MODES:
        raise ValueError(f"sparse decode mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not sparsifier.attached:
        raise RuntimeError("Attach (and calibrate) the sparsifier before enabling sparse decoding")
    count = 0
    for proj in sparsifier.projections:
        lin = proj.module
        if type(lin) is not SparseDecodeLinear:
            if type(lin) is not nn.Linear:
                raise TypeError(f"{proj.module_path} is a {type(lin).__name__}, not a plain nn.Linear")
            with torch.no_grad():
                lin.register_buffer("weight_t", lin.weight.detach().t().contiguous(), persistent=False)
            lin.__class__ = SparseDecodeLinear
            count += 1
        lin.decode_mode = mode
    return count


def disable_sparse_decode(sparsifier: Sparsifier) -> None:
    for proj in sparsifier.projections:
        lin = proj.module
        if type(lin) is SparseDecodeLinear:
            del lin.weight_t
            lin.__dict__.pop("decode_mode", None)
            lin.__class__ = nn.Linear
