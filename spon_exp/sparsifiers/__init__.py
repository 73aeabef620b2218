"""Sparsifiers: one module per method behind the hook-based ``Sparsifier`` interface (``dense``: none).

Importing the package imports every module in it (``registry``), so each method's
``@register`` has run and ``REGISTRY`` lists them all.
"""

from __future__ import annotations

from spon_exp.sparsifiers.base import Sparsifier, SparsifierOptions, TokenPolicy, check_sparsity
from spon_exp.sparsifiers.dense import DenseSparsifier
from spon_exp.sparsifiers.hooks import HookSet
from spon_exp.sparsifiers.larosa import LarosaOptions, LarosaSparsifier
from spon_exp.sparsifiers.registry import REGISTRY, build_sparsifier, register
from spon_exp.sparsifiers.rsparse import RSparseOptions, RSparseSparsifier
from spon_exp.sparsifiers.teal import TealOptions, TealSparsifier
from spon_exp.sparsifiers.wina import WinaOptions, WinaSparsifier

__all__ = ["REGISTRY", "DenseSparsifier", "HookSet", "LarosaOptions", "LarosaSparsifier", "RSparseOptions",
           "RSparseSparsifier", "Sparsifier", "SparsifierOptions", "TealOptions", "TealSparsifier", "TokenPolicy",
           "WinaOptions", "WinaSparsifier", "build_sparsifier", "check_sparsity", "register"]
