"""Real sparse decoding: the sparsified projections skip the weight columns of zeroed inputs.

``enable_sparse_decode(sparsifier)`` puts a :class:`SparseDecodeLinear` in place of every
projection the sparsifier hooks, in the projection's parent module. The stand-in shares the
``nn.Linear``'s weight and bias (the same Parameters) and its hook registries (the same
dicts, so the sparsifier's hooks run on it and its handles still remove them), adds a
transposed, contiguous copy of the weight (``weight_t``, each input's column one contiguous
row), and its forward calls the ``spon_exp::sparse_linear`` op (:mod:`spon_exp.kernels.ops`):
on the CPU the C kernel reads only the rows of kept inputs for a single token, on CUDA the
Triton GEMV does so for 1 to 8 tokens (the union of their kept inputs); prefill and larger
batches compute the dense product, so results are always those of the masked-dense model.
The sparsifier's projections (``proj.module``) point at the stand-ins while decoding is on;
``disable_sparse_decode`` puts the original ``nn.Linear`` modules back and frees the copies.

Every method whose hooks hand the projection an input with exact zeros decodes this way:
TEAL, WINA (threshold and top-k), R-Sparse, whose pre-hook gives the op the masked input
and whose forward hook adds the low-rank term of the dropped channels to the op's output,
and LaRoSA with its rotation folded into the weights (``rotation=folded``, the default: the
projections read ``topk(x·Q)``). With ``rotation=runtime`` LaRoSA's input ``topk(x·Q)·Qᵀ``
has almost no zeros, so it decodes correctly but without skipping any weight rows.

Enable it last: after calibration (LaRoSA folds ``Q`` into the weights there; ``weight_t``
is a copy, so a weight changed later needs ``disable_sparse_decode`` and
``enable_sparse_decode`` again) and after ``fold_alpha`` (SPON's parametrised bias is not a
plain ``nn.Linear``; folded, decoding costs exactly the sparse model's work).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from spon_exp.kernels.ops import sparse_linear

MODES = ("ordered", "auto", "ordered_dense", "dense")


class _Projection(Protocol):
    module: nn.Module  # the projection's nn.Linear, replaced in its parent while decoding
    module_path: str


class _Block(Protocol):
    module: nn.Module  # a decoder block: the projections' parents lie inside it


class HookedProjections(Protocol):
    """What sparse decoding needs of a sparsifier (:class:`spon_exp.sparsifiers.base.Sparsifier`
    is one): whether it is attached, the projections it hooks and the blocks that hold them."""

    @property
    def attached(self) -> bool: ...

    projections: Sequence[_Projection]
    blocks: Sequence[_Block]


class SparseDecodeLinear(nn.Linear):
    """Stands in for an ``nn.Linear`` while sparse decoding is on: the same weight and bias
    Parameters and the same hooks, plus ``weight_t = weight.T`` (contiguous), and a forward that
    skips zero inputs when decoding. :meth:`original` is the ``nn.Linear`` it replaced."""

    weight_t: torch.Tensor

    def __init__(self, linear: nn.Linear, mode: str = "ordered") -> None:
        nn.Module.__init__(self)  # not nn.Linear's: the linear's own Parameters are taken, none made
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.training = linear.training
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        with torch.no_grad():
            self.register_buffer("weight_t", linear.weight.detach().t().contiguous(), persistent=False)
        self.decode_mode = mode
        # the linear's hook registries themselves (forward, backward, state-dict), not copies:
        # its hooks run here, hooks added to either module are on both, and a handle removes
        # its hook from both
        for name, registry in vars(linear).items():
            if "hook" in name:
                self.__dict__[name] = registry
        self.__dict__["_original"] = linear  # a plain attribute: not a submodule of the stand-in

    def original(self) -> nn.Linear:
        return self.__dict__["_original"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_mode == "dense":
            return super().forward(x)
        return sparse_linear(x, self.weight_t, self.bias, mode=self.decode_mode)


def _swap(sparsifier: HookedProjections, new: dict[int, nn.Module]) -> None:
    """Wherever a module ``m`` with ``id(m)`` in ``new`` is a child inside the sparsifier's
    blocks, its parent holds ``new[id(m)]`` under the same name instead, and so does every
    projection of the sparsifier that held ``m``. Raises, changing nothing, when one of them
    is not inside the blocks."""
    slots = [(parent, name, child) for block in sparsifier.blocks for parent in block.module.modules()
             for name, child in parent.named_children() if id(child) in new]
    lost = new.keys() - {id(child) for _, _, child in slots}
    if lost:
        path = next(p.module_path for p in sparsifier.projections if id(p.module) in lost)
        raise RuntimeError(f"{path} is not inside the sparsifier's decoder blocks: cannot replace it")
    for parent, name, child in slots:
        setattr(parent, name, new[id(child)])
    for proj in sparsifier.projections:
        proj.module = new.get(id(proj.module), proj.module)


def enable_sparse_decode(sparsifier: HookedProjections, mode: str = "ordered") -> int:
    """Switch the sparsifier's projections to the sparse decode path; returns how many.

    ``mode``: ``"ordered"`` (default) accumulates every output over the kept inputs in a
    fixed order, and ``"ordered_dense"`` computes the masked-dense product in that same order
    without skipping anything: the two give bit-identical logits, so greedy decoding with
    ``"ordered"`` emits exactly the masked-dense reference's tokens. On the CPU ``"auto"``
    picks split-K or output split by shape and groups rows (equal to masked dense to float
    rounding only; its speed against ``"ordered"``: ``benchmarks/perf/sparse_matvec.py``);
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
    linears: dict[int, nn.Linear] = {}
    for proj in sparsifier.projections:
        if type(proj.module) is SparseDecodeLinear:
            continue
        if type(proj.module) is not nn.Linear:
            raise TypeError(f"{proj.module_path} is a {type(proj.module).__name__}, not a plain nn.Linear")
        linears[id(proj.module)] = proj.module
    _swap(sparsifier, {key: SparseDecodeLinear(lin, mode) for key, lin in linears.items()})
    for proj in sparsifier.projections:
        proj.module.decode_mode = mode
    return len(linears)


def disable_sparse_decode(sparsifier: HookedProjections) -> None:
    """Put the original ``nn.Linear`` modules back in their parents (and in the sparsifier's
    projections) and drop the transposed copies."""
    stand_ins = {id(p.module): p.module for p in sparsifier.projections if type(p.module) is SparseDecodeLinear}
    _swap(sparsifier, {key: stand_in.original() for key, stand_in in stand_ins.items()})
    for stand_in in stand_ins.values():
        del stand_in.weight_t
