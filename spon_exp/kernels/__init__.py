"""Compute kernels for sparse decoding: the ``spon_exp::sparse_linear`` op (:mod:`.ops`) with a
CPU backend (C, :mod:`.sparse_matvec`) and a CUDA backend (Triton, :mod:`.triton_gemv`,
imported only at the first CUDA call), and ``enable_sparse_decode`` (:mod:`.decode`)."""

from __future__ import annotations

from spon_exp.kernels.ops import sparse_linear
from spon_exp.kernels.sparse_matvec import (
    SPLIT_K_MAX_OUT,
    autotune,
    choose_mode,
    kernel_available,
    kernel_info,
    sparse_matvec,
)

__all__ = [
    "SPLIT_K_MAX_OUT",
    "autotune",
    "choose_mode",
    "kernel_available",
    "kernel_info",
    "sparse_linear",
    "sparse_matvec",
]
