"""Where SPON's bias acts (``spon.apply``): on every token, or only on the sparsified ones.

``all`` (the default): every token of the sparse model computes with ``b' = b + W·Σα``, the
tokens a token policy keeps dense included.

``sparsified``: α acts only where the sparsifier's token policy sparsified the input, per
forward of a projection:

- every token sparsified (a decode token; every token under ``token_policy=all``): the
  projection computes with ``b'`` as its bias, exactly as under ``all``;
- the leading tokens kept dense (a prefill under ``last_half``, ``last_fraction``, WINA's
  ``dense_first_fraction``): the projection computes with its original bias, so those rows
  are the dense model's bit for bit, and its sparsified trailing rows get ``b' − b`` added;
- the sparsifier switched off: the original bias everywhere (the dense model).

The trained model (``b'`` from α, :class:`spon_exp.spon.alpha.Spon`) and the folded one
(``b'`` stored, :class:`GatedBiases`) compute these same operations on the same tensors, so
folding changes no logit. The export's runtime (``modeling_spon_sparse.py``) does the same
without spon-exp.
"""

from __future__ import annotations

import torch
from torch import nn

from spon_exp.models.adapters import Projection
from spon_exp.sparsifiers.base import Sparsifier

APPLY = ("all", "sparsified")


def check_apply(apply: str) -> str:
    if apply not in APPLY:
        raise ValueError(f"spon.apply must be one of {APPLY} (where α acts), got {apply!r}")
    return apply


def bias_delta(sparse_bias: torch.Tensor, dense_bias: torch.Tensor | None) -> torch.Tensor:
    """What a sparsified row of a mixed forward gets on top of the dense-bias product."""
    return sparse_bias if dense_bias is None else sparse_bias - dense_bias


def add_to_trailing_rows(output: torch.Tensor, delta: torch.Tensor, rows: int) -> torch.Tensor:
    """``output`` with ``delta`` added to its last ``rows`` tokens (in place without autograd:
    the same elementwise sums)."""
    tokens = output.shape[-2]
    if output.requires_grad and torch.is_grad_enabled():
        head, tail = output[..., : tokens - rows, :], output[..., tokens - rows:, :]
        return torch.cat([head, tail + delta], dim=-2)
    output[..., tokens - rows:, :] += delta
    return output


class RowSplit:
    """Each projection's current forward as the sparsifier splits it: ``(tokens, n)``, the
    last ``n`` rows sparsified. A pre-hook records it; the bias choice and the post-hook read it."""

    def __init__(self, sparsifier: Sparsifier):
        self.sparsifier = sparsifier
        self.current: dict[str, tuple[int, int]] = {}

    def record(self, key: str, x: torch.Tensor) -> tuple[int, int]:
        self.current[key] = split = self.sparsifier.sparsified_rows(x)
        return split

    def every_row_sparsified(self, key: str) -> bool:
        tokens, n = self.current.get(key, (1, 0))
        return n == tokens

    def mixed(self, key: str) -> int:
        """The sparsified row count where the forward also has dense rows, else 0."""
        tokens, n = self.current.get(key, (1, 0))
        return n if 0 < n < tokens else 0


class GatedBiases:
    """A folded ``spon.apply=sparsified`` model: per projection its original bias (``None``
    where it had none) and the folded ``b' = b + W·Σα``. The projection holds the original
    between forwards (so a switched-off sparsifier is the dense model); hooks in the
    sparsifier's own :class:`HookSet` put ``b'`` on it for a forward whose rows are all
    sparsified and add ``b' − b`` to the sparsified rows of a mixed one."""

    def __init__(self, sparsifier: Sparsifier, dense: dict[str, torch.Tensor | None],
                 sparse: dict[str, torch.Tensor]):
        self.sparsifier = sparsifier
        self.rows = RowSplit(sparsifier)
        self.dense = {k: None if b is None else nn.Parameter(b.detach().clone(), requires_grad=False)
                      for k, b in dense.items()}
        self.sparse = {k: nn.Parameter(b.detach().clone(), requires_grad=False) for k, b in sparse.items()}
        self.delta = {k: bias_delta(self.sparse[k].data, None if self.dense[k] is None else self.dense[k].data)
                      for k in self.sparse}

    def attach(self) -> GatedBiases:
        projections = {p.key: p for p in self.sparsifier.projections}
        missing = sorted(set(self.sparse) - set(projections))
        if missing:
            raise ValueError(f"Folded SPON biases for {missing[:3]} name no projection the sparsifier hooks")
        for key in self.sparse:
            proj = projections[key]
            proj.module.bias = self.dense[key]
            self.sparsifier.hooks.pre(proj.module, self._pre_hook(proj))
            self.sparsifier.hooks.post(proj.module, self._post_hook(proj))
        self.sparsifier.bias_gate = self
        return self

    def _pre_hook(self, proj: Projection):
        def hook(module, args):
            if not args:
                return
            self.rows.record(proj.key, args[0])
            if self.rows.every_row_sparsified(proj.key):
                module.bias = self.sparse[proj.key]
        return hook

    def _post_hook(self, proj: Projection):
        def hook(module, args, output):
            module.bias = self.dense[proj.key]
            rows = self.rows.mixed(proj.key)
            return add_to_trailing_rows(output, self.delta[proj.key], rows) if rows else None
        return hook
