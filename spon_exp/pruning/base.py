"""What every one-shot weight-pruning method shares: its options, the N:M pattern, and the
interface the layer-by-layer driver (:mod:`spon_exp.pruning.driver`) calls.

A method is a small class: ``statistic(columns, device)`` makes the accumulator of one
projection input's calibration statistic (Wanda: the squared norm of every input column;
SparseGPT: the layer Hessian ``XXᵀ``), which the driver fills from the inputs a decoder block
sees; ``prune(weight, statistic)`` returns the pruned weight and its keep mask. Methods share
this module, never each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from spon_exp.sparsifiers.base import check_sparsity


@dataclass
class CalibrationOptions:
    """What a pruner calibrates on (``pruner.*``). ``pruner=none`` carries these too, so a sweep
    can set them once for all its points; a run without a pruner leaves them out of its identity."""

    calib_sequences: int = 128  # windows of the calibration corpus (nsamples in both references)
    seq_len: Optional[int] = None  # tokens per window; null = calib.seq_len (the references: 2048)

    def __post_init__(self) -> None:
        if self.calib_sequences < 1:
            raise ValueError(f"calib_sequences must be >= 1, got {self.calib_sequences}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (or null for calib.seq_len), got {self.seq_len}")


@dataclass
class PruningOptions(CalibrationOptions):
    """Options of every pruning method: the calibration, and the sparsity pattern."""

    # N:M: prune prune_n of every prune_m consecutive input weights of a row (2:4, 4:8);
    # both 0 = unstructured (the run's sparsity of every row or block)
    prune_n: int = 0
    prune_m: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.prune_n, self.prune_m) != (0, 0) and not 0 < self.prune_n < self.prune_m:
            raise ValueError(f"prune_n:prune_m must be 0:0 (unstructured) or N:M with 0 < N < M (2:4, 4:8), "
                             f"got {self.prune_n}:{self.prune_m}")

    @property
    def structured(self) -> bool:
        return self.prune_n > 0


def pattern_sparsity(options: PruningOptions, sparsity: float) -> float:
    """The sparsity a method prunes to: the run's, which an N:M pattern must equal (N/M), as
    both references require (Wanda's main.py asserts 0.5 for 2:4 and 4:8)."""
    sparsity = check_sparsity(sparsity)
    if options.structured and abs(sparsity - options.prune_n / options.prune_m) > 1e-9:
        raise ValueError(f"{options.prune_n}:{options.prune_m} pruning removes {options.prune_n / options.prune_m:g} "
                         f"of the weights, but sparsity={sparsity:g}; set sparsity={options.prune_n / options.prune_m:g}")
    return sparsity


def smallest_per_group(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M prune mask of ``score`` (rows x columns, columns a multiple of ``m``): in every
    row, the ``n`` smallest scores of each run of ``m`` consecutive columns (True = pruned)."""
    rows, columns = score.shape
    if columns % m:
        raise ValueError(f"{columns} input columns are not a multiple of M={m}; N:M pruning needs whole groups")
    groups = score.reshape(rows, columns // m, m)
    prune = torch.zeros_like(groups, dtype=torch.bool)
    prune.scatter_(-1, torch.topk(groups, n, dim=-1, largest=False).indices, True)
    return prune.reshape(rows, columns)


def smallest_per_row(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The prune mask of the ``int(columns · sparsity)`` smallest scores of every row (a stable
    sort: ties go to the lower column), as Wanda's reference sorts each output row."""
    k = int(score.shape[1] * sparsity)
    prune = torch.zeros_like(score, dtype=torch.bool)
    prune.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
    return prune


class Pruner:
    """Base class of a one-shot pruning method: ``Pruner(sparsity, options)`` or
    ``Pruner(sparsity, **fields of Options)``."""

    name = "base"
    Options: type[PruningOptions] = PruningOptions
    #: False when the kept weights stay as they were (Wanda): a cached result is the mask alone
    updates_weights = False

    def __init__(self, sparsity: float = 0.5, options: PruningOptions | None = None, **kwargs):
        self.options = options if options is not None else self.Options(**kwargs)
        self.sparsity = pattern_sparsity(self.options, sparsity)

    @property
    def label(self) -> str:
        """``wanda`` / ``sparsegpt 2:4``: the name tables and logs give the method."""
        o = self.options
        return f"{self.name} {o.prune_n}:{o.prune_m}" if o.structured else self.name

    def describe(self) -> dict:
        return {"name": self.name, "sparsity": self.sparsity, **asdict(self.options)}

    def statistic(self, columns: int, device: torch.device):
        """A fresh accumulator of one input's calibration statistic (``add(x)``)."""
        raise NotImplementedError

    def prune(self, weight: torch.Tensor, statistic) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pruned weight in weight's dtype, keep mask)``; ``statistic`` is left as it is."""
        raise NotImplementedError
