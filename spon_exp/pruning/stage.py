"""The pruning stage of a run: prune the loaded model (or restore its pruned weights from the
cache) after the dense baseline, then evaluate it as the run's ``sparse`` variant.

Calibration windows: ``pruner.calib_sequences`` windows of ``pruner.seq_len`` tokens (null:
``calib.seq_len``) at random offsets of the run's calibration stream (``calib.corpus``, its
calibration split, passages joined as every spon-exp calibration joins them), drawn with the
run's ``seed``; with the run's calibration BOS policy ``row`` each window is the BOS followed
by ``seq_len − 1`` text tokens.

Cache entry ``<cache>/pruned/<pruner key>/`` (a :mod:`spon_exp.tracking.store` entry, keyed by
:func:`spon_exp.tracking.identity.pruner_key`): every projection's keep mask as packed bits
(``masks.safetensors``), for a method that updates the kept weights (SparseGPT) also the kept
values in the model's dtype (``values.safetensors``), and ``pruning.json`` (shapes, kept
counts, what the pruning measured). Wanda's entry is the masks alone: the kept weights are the
loaded model's, which the key's model path and dtype name.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from spon_exp.models.adapters import find_decoder_blocks
from spon_exp.pruning.base import Pruner
from spon_exp.pruning.driver import prune_model
from spon_exp.pruning.registry import pruner_of
from spon_exp.tracking.store import read_entry, write_entry

log = logging.getLogger(__name__)

MASKS_FILE = "masks.safetensors"
VALUES_FILE = "values.safetensors"
INFO_FILE = "pruning.json"


def calibration_windows(tokenizer, corpus: str, seq_len: int, count: int, seed: int,
                        bos_token_id: int | None = None) -> torch.Tensor:
    """``[count, seq_len]`` token windows at seeded random offsets of the corpus's calibration
    stream (overlaps allowed, as the references draw them); with ``bos_token_id`` each is that
    BOS followed by ``seq_len − 1`` text tokens."""
    from spon_exp.data.corpora import CorpusError, token_stream

    stream = token_stream(tokenizer, corpus, "calibration")
    text = seq_len - (bos_token_id is not None)
    if stream.numel() < text:
        raise CorpusError(f"Corpus {corpus!r} has {stream.numel()} calibration tokens, fewer than one pruning window "
                          f"of {text}; use pruner.seq_len={stream.numel()} or less, or a larger corpus")
    starts = torch.randint(0, stream.numel() - text + 1, (count,), generator=torch.Generator().manual_seed(seed))
    windows = torch.stack([stream[s:s + text] for s in starts.tolist()]).long()
    if bos_token_id is not None:
        windows = torch.cat([torch.full_like(windows[:, :1], int(bos_token_id)), windows], dim=1)
    return windows


def pack(keep: torch.Tensor) -> torch.Tensor:
    """A bool mask as uint8 bits (1 bit per weight; numpy's bit order)."""
    return torch.from_numpy(np.packbits(keep.detach().cpu().numpy().reshape(-1)))


def unpack(bits: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=math.prod(shape)).reshape(shape).astype(bool))


def _projections(model) -> dict:
    return {p.key: p for b in find_decoder_blocks(model) for p in b.projections.values()}


def save_pruned(folder: Path, model, pruner: Pruner, masks: dict[str, torch.Tensor], info: dict) -> None:
    """Fill a cache entry folder from the pruned ``model`` and its packed keep ``masks``."""
    from safetensors.torch import save_file

    projections = _projections(model)
    save_file(masks, str(folder / MASKS_FILE))
    if pruner.updates_weights:
        values = {}
        for key in masks:
            weight = projections[key].module.weight
            keep = unpack(masks[key], list(weight.shape)).to(weight.device)
            values[key] = weight.detach()[keep].cpu().contiguous()
        save_file(values, str(folder / VALUES_FILE))
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1))


@torch.no_grad()
def load_pruned(folder: Path, model) -> dict:
    """Apply a cache entry's pruned weights to ``model`` (as loaded); returns its ``pruning.json``.
    Every shape and count is checked before any weight changes, so a damaged entry raises with
    the model untouched (the caller then prunes again)."""
    from safetensors.torch import load_file

    info = json.loads((folder / INFO_FILE).read_text())
    projections = _projections(model)
    masks = load_file(str(folder / MASKS_FILE))
    values = load_file(str(folder / VALUES_FILE)) if info["updates_weights"] else {}
    layout = info["projections"]
    if set(layout) != set(projections) or set(masks) != set(projections):
        raise ValueError(f"the entry covers projections {sorted(layout)[:3]}..., the model has {sorted(projections)[:3]}...")
    for key, p in projections.items():
        shape, kept = layout[key]["shape"], layout[key]["kept"]
        if list(p.module.weight.shape) != shape or masks[key].numel() != math.ceil(math.prod(shape) / 8):
            raise ValueError(f"{key}: shape {shape} in the entry, {list(p.module.weight.shape)} in the model")
        if values and values[key].numel() != kept:
            raise ValueError(f"{key}: {values[key].numel()} kept values where {kept} were written")
    for key, p in projections.items():
        weight = p.module.weight
        keep = unpack(masks[key], list(weight.shape)).to(weight.device)
        if values:
            weight.zero_()
            weight[keep] = values[key].to(device=weight.device, dtype=weight.dtype)
        else:
            weight.masked_fill_(~keep, 0)
    return info


def _summary(pruned: dict[str, float], projections: dict) -> dict:
    """Pruned fraction of the model (parameter-weighted), per layer and per projection."""
    sizes = {k: projections[k].num_params for k in pruned}
    layers: dict[int, list[str]] = {}
    for key in pruned:
        layers.setdefault(projections[key].layer, []).append(key)

    def weighted(keys) -> float:
        return sum(pruned[k] * sizes[k] for k in keys) / sum(sizes[k] for k in keys)

    return {"model": weighted(pruned), "per_layer": {str(i): weighted(keys) for i, keys in sorted(layers.items())},
            "per_projection": pruned}


def _prune(ctx, model, tokenizer, pruner: Pruner) -> tuple[dict, str]:
    """Prune ``model`` in place, or restore its pruned weights from the cache: ``(info, hit/miss)``."""
    cfg = ctx.cfg
    folder = ctx.cache / "pruned" / ctx.identity.pruner_key
    info = read_entry(folder, lambda f: load_pruned(f, model), "pruned weights")
    if info is not None:
        return info, "hit"
    bos = ctx.results.get("calib_bos", "none")
    seq_len = cfg.pruner.seq_len or cfg.calib.seq_len
    windows = calibration_windows(tokenizer, cfg.calib.corpus, seq_len, cfg.pruner.calib_sequences, cfg.seed,
                                  tokenizer.bos_token_id if bos == "row" else None)
    log.info("Pruning %s to %.0f %% on %d x %d calibration tokens of %s", pruner.label, pruner.sparsity * 100,
             *windows.shape, cfg.calib.corpus)
    masks: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    pruned = prune_model(model, windows.split(cfg.calib.batch_size), pruner,
                         on_pruned=lambda p, keep: masks.__setitem__(p.key, pack(keep)))
    projections = _projections(model)
    info = {"method": pruner.describe(), "label": pruner.label, "updates_weights": pruner.updates_weights,
            "calibration": {"corpus": cfg.calib.corpus, "windows": windows.shape[0], "seq_len": windows.shape[1],
                            "bos": bos, "seed": cfg.seed, "batch_size": cfg.calib.batch_size},
            "seconds": time.perf_counter() - t0, "pruned_fraction": _summary(pruned, projections),
            "projections": {k: {"shape": list(projections[k].module.weight.shape),
                                "kept": int(np.unpackbits(masks[k].numpy(),
                                                          count=projections[k].num_params).sum())}
                            for k in masks}}
    write_entry(folder, lambda f: save_pruned(f, model, pruner, masks, info))
    return info, "miss"


def prune_stage(ctx, model, tokenizer, evaluation) -> None:
    """Prune (or restore) the model after its dense baseline, record what was pruned in
    results.json (``pruner``; ``sparsity.measured``: the pruned fraction of the projections'
    weights) and evaluate it as ``sparse``."""
    pruner = pruner_of(ctx.cfg)
    with ctx.timer.stage("prune"):
        info, cached = _prune(ctx, model, tokenizer, pruner)
    fraction = info["pruned_fraction"]
    ctx.results["cache"].update(pruner=cached, pruner_key=ctx.identity.pruner_key)
    ctx.results["pruner"] = {**pruner.describe(), "label": f"pruned: {pruner.label}",
                             "calibration": info["calibration"], "seconds": info["seconds"],
                             "pruned_fraction": fraction}
    ctx.results["sparsity"].update(measured=fraction["model"], effective=fraction["model"], measured_on="weights",
                                   per_layer=fraction["per_layer"], per_projection=fraction["per_projection"])
    log.info("%s: %.4f of the projections' weights pruned (%s)", pruner.label, fraction["model"],
             "cached" if cached == "hit" else f"{info['seconds']:.0f} s")
    if ctx.cfg.eval.sensitivity:
        log.warning("eval.sensitivity perturbs activation thresholds; a pruned model has none: skipped")
    if "sparse" in ctx.cfg.eval.variants:
        evaluation.run("sparse")
        ctx.results.update(evaluation.summary())
