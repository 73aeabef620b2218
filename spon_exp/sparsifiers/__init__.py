"""Sparsifiers: one module per method behind the hook-based ``Sparsifier`` interface (``dense``: none)."""

from __future__ import annotations

from spon_exp.sparsifiers.base import Sparsifier, SparsifierOptions, TokenPolicy, check_sparsity
from spon_exp.sparsifiers.dense import DenseSparsifier
from spon_exp.sparsifiers.hooks import HookSet
from spon_exp.sparsifiers.larosa import LarosaOptions, LarosaSparsifier
from spon_exp.sparsifiers.rsparse import RSparseOptions, RSparseSparsifier
from spon_exp.sparsifiers.teal import TealOptions, TealSparsifier
from spon_exp.sparsifiers.wina import WinaOptions, WinaSparsifier

REGISTRY: dict[str, type[Sparsifier]] = {
    cls.name: cls for cls in (DenseSparsifier, TealSparsifier, WinaSparsifier, RSparseSparsifier, LarosaSparsifier)
}


def build_sparsifier(name: str, **kwargs) -> Sparsifier:
    """Instantiate a registered sparsifier by name (``dense``, ``teal``, ``wina``, ``rsparse``, ``larosa``):
    ``build_sparsifier("teal", sparsity=0.5, allocation="greedy")``."""
    if name not in REGISTRY:
        raise ValueError(f"Unknown sparsifier {name!r}; choose from {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)


__all__ = ["REGISTRY", "DenseSparsifier", "HookSet", "LarosaOptions", "LarosaSparsifier", "RSparseOptions",
           "RSparseSparsifier", "Sparsifier", "SparsifierOptions", "TealOptions", "TealSparsifier", "TokenPolicy",
           "WinaOptions", "WinaSparsifier", "build_sparsifier", "check_sparsity"]
