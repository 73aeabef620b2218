"""The forward passes of a diagnosis: each sequence through each variant of one model
(dense / sparse / +SPON), recording per input site the always-kept curve of the method's
keep mask and per decoder block the hidden-state drift from the dense model."""

from __future__ import annotations

from collections import defaultdict

import torch

from spon_exp.diagnostics.curves import always_kept_curve


class Variants:
    """One model as dense / sparse / +SPON: the sparsifier on or off, the projections' original
    or folded biases."""

    def __init__(self, model, sparsifier, original: dict, folded: dict):
        self.model, self.sparsifier, self.original, self.folded = model, sparsifier, original, folded
        self.names = ["dense"] + (["sparse"] if sparsifier is not None else []) + (["spon"] if folded else [])

    @torch.no_grad()
    def set(self, variant: str) -> None:
        from torch import nn

        biases = self.folded if variant == "spon" else self.original
        for module, b in biases.items():
            module.bias = None if b is None else nn.Parameter(b, requires_grad=False)
        if self.sparsifier is not None:
            self.sparsifier.enabled = variant != "dense"


@torch.no_grad()
def forward_statistics(model, blocks, variants: Variants, sites: dict, ids: torch.Tensor, sparsifier) -> dict:
    """One forward per sequence and variant: the Figure-1 curves and the drift per layer."""
    from tqdm.auto import tqdm

    from spon_exp.export.modeling_spon_sparse import sparsified_tokens
    from spon_exp.sparsifiers.hooks import HookSet

    device = next(model.parameters()).device
    curves: dict = defaultdict(lambda: defaultdict(list))  # variant -> (layer, site) -> [curve per sequence]
    drift: dict = {v: defaultdict(lambda: {"rel_l2": 0.0, "cosine": 0.0, "tokens": 0}) for v in variants.names}
    measured = None
    current: dict = {"variant": None, "hidden": {}}
    hooks = HookSet()
    site_map = sites.get("sites", {})
    policy = sites.get("policy", {})

    def mask_hook(key):
        masker = site_map[key]["masker"]

        def hook(module, args):
            x = args[0].detach()
            tokens = x.shape[-2]
            mask = masker.keep_mask(x).reshape(-1, tokens, x.shape[-1])[0]  # one sequence per forward
            head = tokens - sparsified_tokens(policy, tokens)
            curves[current["variant"]][key].append(always_kept_curve(mask, head).cpu())
        return hook

    def block_hook(index):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            current["hidden"][index] = h.detach().float()[0]
        return hook

    for key, info in site_map.items():
        hooks.pre(info["module"], mask_hook(key), prepend=True)  # the raw input, before the sparsifier
    for b in blocks:
        hooks.post(b.module, block_hook(b.index))
    try:
        for seq in tqdm(ids, desc="diagnostics", leave=False):
            measured = _one_sequence(model, seq.to(device), variants, current, drift, sparsifier, measured)
    finally:
        hooks.remove()
        variants.set("spon" if "spon" in variants.names else "sparse" if "sparse" in variants.names else "dense")
    figure1 = {v: {key: torch.stack(cs).mean(dim=0) for key, cs in per.items()} for v, per in curves.items()}
    drift_json = {v: {"layer": sorted(per), "rel_l2": [per[i]["rel_l2"] / per[i]["tokens"] for i in sorted(per)],
                      "cosine": [per[i]["cosine"] / per[i]["tokens"] for i in sorted(per)]}
                  for v, per in drift.items()}
    if measured is not None:
        measured = {k: s / measured["_tokens"] for k, s in measured.items() if k != "_tokens"}
    return {"figure1": figure1, "drift": drift_json, "measured": measured}


def _one_sequence(model, seq: torch.Tensor, variants: Variants, current: dict, drift: dict, sparsifier, measured):
    """Every variant's forward of one sequence (the sparse one measured), each layer's drift
    from the dense hidden states added to ``drift``; returns the measured sparsity so far."""
    dense_hidden = None
    for variant in variants.names:
        variants.set(variant)
        current["variant"], current["hidden"] = variant, {}
        if variant == "sparse" and sparsifier is not None:
            with sparsifier.measuring():
                model(seq[None])
            measured = _accumulate(measured, sparsifier.measured_sparsity(), seq.numel())
        else:
            model(seq[None])
        if variant == "dense":
            dense_hidden = current["hidden"]
        for index, h in current["hidden"].items():
            ref = dense_hidden[index]
            rel = (h - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)
            cos = torch.nn.functional.cosine_similarity(h, ref, dim=-1)
            d = drift[variant][index]
            d["rel_l2"] += float(rel.sum())
            d["cosine"] += float(cos.sum())
            d["tokens"] += h.shape[0]
    return measured


def _accumulate(total: dict | None, m: dict, tokens: int) -> dict:
    total = total or {"_tokens": 0}
    for key, v in (m.get("per_projection") or {}).items():
        total[key] = total.get(key, 0.0) + v * tokens
    total["_tokens"] += tokens
    return total
