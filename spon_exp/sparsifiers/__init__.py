"""Sparsifiers: one module per method behind the hook-based ``Sparsifier`` interface."""

from __future__ import annotations

from spon_exp.sparsifiers.base import Sparsifier, check_sparsity
from spon_exp.sparsifiers.teal import TealSparsifier

REGISTRY: dict[str, type[Sparsifier]] = {
    TealSparsifier.name: TealSparsifier,
}


def build_sparsifier(name: str, **kwargs) -> Sparsifier:
    """Instantiate a registered sparsifier by name (``teal``, ...)."""
    if name not in REGISTRY:
        raise ValueError(f"Unknown sparsifier {name!r}; choose from {sorted(REGISTRY)} (or 'dense' for none)")
    return REGISTRY[name](**kwargs)


__all__ = ["REGISTRY", "Sparsifier", "TealSparsifier", "build_sparsifier", "check_sparsity"]
