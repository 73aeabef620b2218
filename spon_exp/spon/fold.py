"""Fold trained alphas into biases and export / re-attach the sparse model.

Folding: ``b' = b + W·Σα`` (a bias is created where the layer had none) and the α path
is removed, so inference costs exactly what the plain sparse model costs. With
``spon.apply=sparsified`` each projection keeps two biases, its original one for the tokens
the token policy keeps dense and ``b'`` for the sparsified ones (:mod:`spon_exp.spon.gating`).

Export (``save_sparse_state``): ``sparse_state.safetensors`` (sparsifier state + every
folded bias, and under ``apply=sparsified`` the original biases as ``dense_bias.*``) and
``sparse_state.json`` (which sparsifier, its settings, which projections, ``spon_apply``);
``load_sparse_state`` re-attaches both to a freshly loaded model. Where the architecture's
config can declare biases (Llama-style ``attention_bias`` / ``mlp_bias``),
``export_checkpoint`` also writes a complete checkpoint that plain
``AutoModelForCausalLM.from_pretrained`` loads (dense weights + folded biases; attach the
sparsifier state to run it sparse).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spon_exp.models.adapters import ATTENTION, MLP, find_decoder_blocks
from spon_exp.models.head import chunked_logits, final_hidden
from spon_exp.sparsifiers import Sparsifier, build_sparsifier
from spon_exp.spon.alpha import Spon
from spon_exp.spon.gating import GatedBiases
from spon_exp.tracking.store import write_atomic, write_entry

STATE_FILE = "sparse_state.safetensors"
META_FILE = "sparse_state.json"


@torch.no_grad()
def fold_alpha(spon: Spon) -> dict[str, torch.Tensor]:
    """Store each projection's SPON bias ``b + W·Σα`` as its plain bias and detach the α
    path. The stored tensor is the one the attached SPON computed with, so the folded model's
    logits equal the unfolded model's bit for bit (:func:`fold_alpha_checked` proves it).
    Under ``apply="sparsified"`` the projections keep their original biases and the
    sparsifier's :class:`GatedBiases` puts ``b'`` on the sparsified tokens (``sparsifier.bias_gate``).
    Returns the folded biases ``b'``."""
    if spon.folded:
        raise RuntimeError("These alphas are already folded")
    biases = {p.key: spon.bias(p, spon.original_bias(p)).detach().clone() for p in spon.projections}
    dense = {p.key: spon.original_bias(p) for p in spon.projections}
    dense = {k: None if b is None else b.detach().clone() for k, b in dense.items()}
    spon.detach()
    if spon.apply == "sparsified":
        GatedBiases(spon.sparsifier, dense, biases).attach()
    else:
        for p in spon.projections:
            p.module.bias = nn.Parameter(biases[p.key], requires_grad=False)
    spon.folded = True
    return biases


class FoldMismatchError(RuntimeError):
    """The folded model's logits differ from those of the model SPON was evaluated with."""


@torch.no_grad()
def _max_abs_logit_diff(model: nn.Module, hidden_a: torch.Tensor, hidden_b: torch.Tensor, chunk: int) -> float:
    a, b = hidden_a.reshape(-1, hidden_a.shape[-1]), hidden_b.reshape(-1, hidden_b.shape[-1])
    pairs = zip(chunked_logits(model, a, chunk), chunked_logits(model, b, chunk))
    return max(float((za - zb).abs().max()) for (_, za), (_, zb) in pairs)


@torch.no_grad()
def fold_alpha_checked(model: nn.Module, spon: Spon, ids: torch.Tensor, checked_on: str = "",
                       chunk: int = 1024) -> tuple[dict[str, torch.Tensor], dict]:
    """Fold, and prove on ``ids`` that folding left every logit unchanged.

    Returns ``(biases, {"max_abs_logit_diff", "checked_on"})``; raises
    :class:`FoldMismatchError` when any logit differs (the folded model would not be the
    model whose numbers were reported)."""
    if not spon.enabled:
        raise RuntimeError("Switch SPON on before folding it: the check compares against the SPON model")
    ids = ids.to(next(model.parameters()).device)
    before = final_hidden(model, ids)
    biases = fold_alpha(spon)
    after = final_hidden(model, ids)
    report = {"max_abs_logit_diff": _max_abs_logit_diff(model, before, after, chunk),
              "checked_on": checked_on or f"{ids.shape[0]} x {ids.shape[-1]} tokens"}
    if report["max_abs_logit_diff"] != 0.0:
        raise FoldMismatchError(
            f"Folding SPON into the biases changed the logits by up to {report['max_abs_logit_diff']:.3g} on "
            f"{report['checked_on']}: the folded model is not the evaluated one (a bug; please report it)")
    return biases, report


def save_sparse_state(directory: str | Path, sparsifier: Sparsifier, biases: dict[str, torch.Tensor] | None = None,
                      extra_meta: dict | None = None) -> Path:
    """Write the sparsifier state and folded biases (safetensors + JSON); a folded
    ``apply=sparsified`` model's original biases too (``sparsifier.bias_gate``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"sparsifier.{k}": v.detach().cpu().contiguous() for k, v in sparsifier.state_dict().items()}
    for key, b in (biases or {}).items():
        tensors[f"bias.{key}"] = b.detach().cpu().contiguous()
    gate = sparsifier.bias_gate if biases else None
    for key, b in (gate.dense.items() if gate is not None else ()):
        if b is not None:  # a projection without a bias of its own keeps none for its dense tokens
            tensors[f"dense_bias.{key}"] = b.detach().cpu().contiguous()
    meta = {"sparsifier": sparsifier.describe(),
            "projections": {p.key: p.module_path for p in sparsifier.projections},
            "folded_biases": sorted((biases or {}).keys()), **(extra_meta or {})}
    if gate is not None:
        meta["spon_apply"] = "sparsified"
    write_atomic(directory / STATE_FILE, lambda t: save_file(tensors, str(t)))
    write_atomic(directory / META_FILE, lambda t: t.write_text(json.dumps(meta, indent=2)))
    return directory


def sparsifier_kwargs(description: dict) -> dict:
    """Constructor arguments of a sparsifier from its ``describe()`` output."""
    return {k: v for k, v in description.items() if k != "name"}


def read_sparse_state(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(meta, sparsifier_state, folded_biases)`` as written by :func:`save_sparse_state`
    (an ``apply=sparsified`` state's original biases: :func:`read_dense_biases`)."""
    directory = Path(directory)
    if not (directory / STATE_FILE).exists():
        raise FileNotFoundError(f"No {STATE_FILE} in {directory}; export one with save_sparse_state()")
    meta = json.loads((directory / META_FILE).read_text())
    tensors = load_file(str(directory / STATE_FILE))
    state = {k.removeprefix("sparsifier."): v for k, v in tensors.items() if k.startswith("sparsifier.")}
    biases = {k.removeprefix("bias."): v for k, v in tensors.items() if k.startswith("bias.")}
    return meta, state, biases


def read_dense_biases(directory: str | Path) -> dict[str, torch.Tensor | None] | None:
    """An ``apply=sparsified`` state's original bias per folded projection (None where the
    layer had none), or None for an ``apply=all`` state."""
    meta, _, biases = read_sparse_state(directory)
    if meta.get("spon_apply", "all") != "sparsified":
        return None
    tensors = load_file(str(Path(directory) / STATE_FILE))
    return {key: tensors.get(f"dense_bias.{key}") for key in biases}


@torch.no_grad()
def load_sparse_state(model: nn.Module, directory: str | Path) -> Sparsifier:
    """Attach a saved sparsifier (with its thresholds) and folded biases to ``model`` (an
    ``apply=sparsified`` state's two biases per projection, picked per token)."""
    meta, state, biases = read_sparse_state(directory)
    sparsifier = build_sparsifier(meta["sparsifier"]["name"], **sparsifier_kwargs(meta["sparsifier"]))
    sparsifier.attach(model)
    sparsifier.load_state_dict(state)
    dense = read_dense_biases(directory)
    if dense is not None:
        weights = {p.key: p.module.weight for p in sparsifier.projections}

        def cast(key: str, b: torch.Tensor | None) -> torch.Tensor | None:
            return None if b is None else b.to(device=weights[key].device, dtype=weights[key].dtype)

        GatedBiases(sparsifier, {k: cast(k, b) for k, b in dense.items()},
                    {k: cast(k, b) for k, b in biases.items()}).attach()
        return sparsifier
    modules = {p.key: p.module for b in sparsifier.blocks for p in b.projections.values()}
    for key, b in biases.items():
        lin = modules[key]
        b = b.to(device=lin.weight.device, dtype=lin.weight.dtype)
        if lin.bias is None:
            lin.bias = nn.Parameter(b.clone(), requires_grad=False)
        else:
            lin.bias.copy_(b)
    return sparsifier


def supports_bias_checkpoint(model: nn.Module) -> bool:
    return hasattr(model.config, "attention_bias") and hasattr(model.config, "mlp_bias")


@torch.no_grad()
def export_checkpoint(model: nn.Module, tokenizer, directory: str | Path) -> Path | None:
    """Save a from_pretrained-loadable checkpoint with the folded biases, or None where
    the architecture's config cannot declare biases on every projection."""
    if not supports_bias_checkpoint(model):
        return None
    directory = Path(directory)
    blocks = find_decoder_blocks(model)
    has_attn = any(b.projections[n].module.bias is not None for b in blocks for n in ATTENTION)
    has_mlp = any(b.projections[n].module.bias is not None for b in blocks for n in MLP)
    for b in blocks:
        for names, needed in ((ATTENTION, has_attn), (MLP, has_mlp)):
            for n in names:
                lin = b.projections[n].module
                if needed and lin.bias is None:  # config flags are per group: give the rest zero biases
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                        device=lin.weight.device), requires_grad=False)
    model.config.attention_bias = bool(model.config.attention_bias or has_attn)
    model.config.mlp_bias = bool(model.config.mlp_bias or has_mlp)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)

    return write_entry(directory, fill, replace=True)
