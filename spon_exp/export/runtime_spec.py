"""Translate an attached, loaded sparsifier into what the export's runtime reads.

The runtime (``modeling_spon_sparse.py``, copied into the export) knows three masks
(``hardshrink`` on ``|x|``, a score ``threshold``, per-token ``topk``), a score of ``|x|`` or
``|x|·‖W[:, i]‖₂``, a rotation of the input site, and R-Sparse's low-rank path. Each method
states here, per projection, which of them it uses and with what numbers; a new method adds
its translator to :data:`TRANSLATORS` (an export of a method without one stops with a clear
error). Everything else is generic:

- a site is rotated when the method's state holds ``rotation.{layer}.{site}``. When the
  method's description says ``rotation == "runtime"`` (LaRoSA before that option existed too)
  each consumer's hook rotates its input, masks it and multiplies it back by ``Qᵀ``;
  otherwise ``Q`` is folded into the consumers' weights (``W·Q``, in the model the export
  saves) and the runtime rotates the site container's input once (``folded_rotations``), as
  :mod:`spon_exp.sparsifiers.rotation` does; the consumers mask the rotated input;
- the token policy, the sharing of one masked input per site (``share_key``) and the folded
  biases come from the base class; a folded ``spon.apply=sparsified`` model (the sparsifier's
  ``bias_gate``) adds ``"spon_apply": "sparsified"`` and each projection's original bias
  (``dense_bias.<module>``, listed in ``dense_biases``; none where the layer had none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch

from spon_exp.models.adapters import Projection
from spon_exp.sparsifiers import Sparsifier
from spon_exp.sparsifiers.scoring import keep_count

#: must equal ``FORMAT`` in modeling_spon_sparse.py
FORMAT = "spon-exp-sparse-runtime/1"


class NotExportableError(ValueError):
    """The run's sparsifier has no translation into the export runtime."""


def _teal(sp, p: Projection, tensors: dict) -> dict:
    return {"mask": "hardshrink", "threshold": float(sp.thresholds[p.key])}


def _wina(sp, p: Projection, tensors: dict) -> dict:
    entry: dict = {"score_float32": True}
    if sp.uses_norm(p):
        entry["column_norm"] = _put(tensors, f"column_norm.{p.key}", sp.column_norms(p))
    if sp.options.mode == "topk":
        entry.update(mask="topk", keep=keep_count(p.module.in_features, sp.projection_sparsity(p)), ties="break")
    else:
        entry.update(mask="threshold", threshold=float(sp.thresholds[p.key]))
    return entry


def _rsparse(sp, p: Projection, tensors: dict) -> dict:
    entry = {"mask": "threshold", "threshold": float(sp.thresholds[p.key]), "score_float32": True}
    if sp.uses_norm(p):  # plain |x| where the share is 1 (the reference's sparse mode)
        entry["column_norm"] = _put(tensors, f"column_norm.{p.key}", sp.column_norms(p))
    down, up = sp.factors[p.key]
    if down.shape[0] > 0:
        entry["low_rank"] = [_put(tensors, f"factor_down.{p.key}", down), _put(tensors, f"factor_up.{p.key}", up)]
    return entry


def _larosa(sp, p: Projection, tensors: dict) -> dict:
    return {"mask": "topk", "keep": keep_count(p.module.in_features, sp.site_sparsity(p)), "score_float32": True,
            "ties": getattr(sp.options, "ties", "break")}


TRANSLATORS: dict[str, Callable[[Sparsifier, Projection, dict], dict]] = {
    "teal": _teal, "wina": _wina, "rsparse": _rsparse, "larosa": _larosa,
}


def _put(tensors: dict, name: str, value: torch.Tensor) -> str:
    tensors[name] = value.detach().cpu().contiguous().clone()
    return name


def entry_key(p: Projection) -> str:
    return f"rotation.{p.layer}.{p.site}"


def rotate_back(description: dict) -> bool:
    """Whether a rotated site's masked input is multiplied back by ``Qᵀ`` at run time."""
    default = "runtime" if description.get("name") == "larosa" else "folded"
    return description.get("rotation", default) == "runtime"


def runtime_spec(sparsifier: Sparsifier, biases: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(spec, tensors)``: the JSON the runtime reads and the tensors it needs, for a
    sparsifier attached to the model with its state loaded, and the folded ``biases``
    (keyed ``<layer>.<projection>``)."""
    translate = TRANSLATORS.get(sparsifier.name)
    if translate is None:
        raise NotExportableError(f"The export runtime has no translation for sparsifier {sparsifier.name!r} "
                                 f"(it knows {sorted(TRANSLATORS)}); add one to spon_exp/export/runtime_spec.py")
    state = sparsifier.state_dict()
    description = sparsifier.describe()
    back = rotate_back(description)
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for p in sparsifier.projections:
        entry = {"module": p.module_path, "key": p.key, "site": f"{p.layer}.{p.site}",
                 "share": repr(sparsifier.share_key(p)), **translate(sparsifier, p, tensors)}
        if back and f"rotation.{p.layer}.{p.site}" in state:  # rotated in the hook, and back
            entry["rotation"] = _put(tensors, entry_key(p), state[entry_key(p)])
        entries.append(entry)
    folded = []
    if not back:  # Q folded into every consumer's weights (W·Q, in the model): rotate the container's input
        for block in sparsifier.blocks:
            for site, container in block.containers.items():
                name = f"rotation.{block.index}.{site}"
                if name in state:
                    child = next(n for n, m in block.module.named_children() if m is container)
                    folded.append({"module": f"{block.module_path}.{child}", "site": f"{block.index}.{site}",
                                   "rotation": _put(tensors, name, state[name])})
    paths = {p.key: p.module_path for b in sparsifier.blocks for p in b.projections.values()}
    bias_modules = []
    for key, b in sorted((biases or {}).items()):
        tensors[f"bias.{paths[key]}"] = b.detach().cpu().contiguous().clone()
        bias_modules.append(paths[key])
    spec = {"format": FORMAT, "sparsifier": description, "token_policy": asdict(sparsifier.tokens),
            "rotate_back": back, "folded_rotations": folded, "projections": entries, "biases": bias_modules}
    gate = sparsifier.bias_gate if biases else None
    if gate is not None:  # spon.apply=sparsified: the original biases for the tokens kept dense
        spec["spon_apply"] = "sparsified"
        spec["dense_biases"] = []
        for key, b in sorted(gate.dense.items()):
            if b is not None:
                _put(tensors, f"dense_bias.{paths[key]}", b)
                spec["dense_biases"].append(paths[key])
    return spec, tensors
