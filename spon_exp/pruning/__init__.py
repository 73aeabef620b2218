"""One-shot weight pruning (``pruner=wanda`` / ``pruner=sparsegpt``), the paper's comparison
for activation sparsity + SPON.

A pruned run loads the model, evaluates it dense, prunes every linear layer of the decoder
blocks once (the seven projections :mod:`spon_exp.models.adapters` finds; not the head or the
embeddings), block by block on calibration windows of the run's corpus
(:mod:`.driver`), or restores the pruned weights from the cache (:mod:`.stage`), and
evaluates the pruned model as the run's ``sparse`` variant. Pruning runs with
``sparsifier=dense`` and ``spon.count=0``: the methods are compared side by side, not stacked.
"""

from spon_exp.pruning.base import Pruner, PruningOptions
from spon_exp.pruning.registry import NONE, PRUNERS, build_pruner, check_pruner, pruner_name, pruner_of

__all__ = ["NONE", "PRUNERS", "Pruner", "PruningOptions", "build_pruner", "check_pruner", "pruner_name", "pruner_of"]
