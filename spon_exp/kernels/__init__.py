"""Compute kernels for sparse decoding (batch-1 matvec that skips zeroed inputs)."""

from __future__ import annotations

from spon_exp.kernels.sparse_matvec import (
    SPLIT_K_MAX_OUT,
    autotune,
    choose_mode,
    kernel_available,
    kernel_info,
    sparse_linear,
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
