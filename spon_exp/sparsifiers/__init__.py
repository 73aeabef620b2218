"""Sparsifiers: one module per method behind the hook-based ``Sparsifier`` interface."""

from __future__ import annotations

from spon_exp.sparsifiers.base import Sparsifier, check_sparsity
from spon_exp.sparsifiers.larosa import LarosaSparsifier
from spon_exp.sparsifiers.rsparse import RSparseSparsifier
from spon_exp.sparsifiers.teal import TealSparsifier
from spon_exp.sparsifiers.wina import WinaSparsifier

REGISTRY: dict[str, type[Sparsifier]] = {
    cls.name: cls for cls in (TealSparsifier, WinaSparsifier, RSparseSparsifier, LarosaSparsifier)
}


def build_sparsifier(name: str, **kwargs) -> Sparsifier:
    """Instantiate a registered sparsifier by name (``teal``, ``wina``, ``rsparse``, ``larosa``)."""
    if name not in REGISTRY:
        raise ValueError(f"Unknown sparsifier {name!r}; choose from {sorted(REGISTRY)} (or 'dense' for none)")
    return REGISTRY[name](**kwargs)


__all__ = ["REGISTRY", "LarosaSparsifier", "RSparseSparsifier", "Sparsifier", "TealSparsifier", "WinaSparsifier",
           "build_sparsifier", "check_sparsity"]
