"""Real sparse decoding: the sparsified projections skip the weight columns of zeroed inputs.

``enable_sparse_decode(sparsifier)`` gives every projection the sparsifier hooks a
transposed, contiguous copy of its weight (``weight_t``, each input's column one contiguous
row) and switches the module to :class:`SparseDecodeLinear`, whose forward calls the
``spon_exp::sparse_linear`` op (:mod:`spon_exp.kernels.ops`): on the CPU the C kernel reads
only the rows of kept inputs for a single token, on CUDA the Triton GEMV does so for 1 to 8
tokens (the union of their kept inputs); prefill and larger batches compute the dense
product, so results are always those of the masked-dense model. The sparsifier's hooks stay
where they are (the module object is the same, only its class changes), and
``disable_sparse_decode`` restores ``nn.Linear`` and frees the copies.

Every method whose hooks hand the projection an input with exact zeros decodes this way:
TEAL, WINA (threshold and top-k), R-Sparse, whose pre-hook gives the op the masked input
and whose forward hook adds the low-rank term of the dropped channels to the op's output,
and LaRoSA with its rotation folded into the weights (``rotation=folded``, the default: the
projections read ``topk(x·Q)``). With ``rotation=runtime`` LaRoSA's input ``topk(x·Q)·Qᵀ``
has almost no zeros, so it decodes correctly but at dense speed.

Enable it last: after calibration (LaRoSA folds ``Q`` into the weights there; ``weight_t``
is a copy, so a weight changed later needs ``disable_sparse_decode`` and
``enable_sparse_decode`` again) and after ``fold_alpha`` (SPON's parametrised bias is not a
plain ``nn.Linear``; folded, decoding costs exactly the sparse model's work).
"""

from __future__ import annotations

import torch
from torch import nn

from spon_exp.kernels.ops import sparse_linear
from spon_exp.sparsifiers.base import Sparsifier


MODES = ("ordered", "auto", "ordered_dense", "dense")


class SparseDecodeLinear(nn.Linear):
    """An ``nn.Linear`` that also holds ``weight_t = weight.T`` and skips zero inputs when decoding."""

    weight_t: torch.Tensor
    decode_mode: str = "ordered"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_mode == "dense":
            return super().forward(x)
        return sparse_linear(x, self.weight_t, self.bias, mode=self.decode_mode)


def enable_sparse_decode(sparsifier: Sparsifier, mode: str = "ordered") -> int:
    """Switch the sparsifier's projections to the sparse decode path; returns how many.

    ``mode``: ``"ordered"`` (default) accumulates every output over the kept inputs in a
    fixed order, and ``"ordered_dense"`` computes the masked-dense product in that same order
    without skipping anything: the two give bit-identical logits, so greedy decoding with
    ``"ordered"`` emits exactly the masked-dense reference's tokens. On the CPU ``"auto"``
    picks split-K or output split by shape and groups rows (equal to masked dense to float
    rounding only; its speed against ``"ordered"``: benchmarks/results/sparse_matvec.json);
    on CUDA the Triton GEMV always sums in its one fixed order, so ``"auto"`` is
    ``"ordered"`` there. Against torch's own dense product (another summation order) the
    logits agree to float rounding, in bf16 to a few units in the last place. ``"dense"`` is
    ``nn.Linear``'s own product with the original weight: the baseline a benchmark switches
    to and back without rebuilding the copies (a mode switch only sets an attribute).
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
