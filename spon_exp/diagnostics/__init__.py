"""Why SPON works, measured on a finished run: ``diagnose(run_dir)``.

For the run's dense, sparse and +SPON models (one model: the sparsifier switched off or on,
the projections' original or folded SPON biases), on ``sequences`` blocks of ``max_length``
tokens of the run's first evaluation corpus:

- **always-kept channels** (the paper's Figure 1): per layer and input site, the fraction of
  the site's input channels the method keeps for *every* token of a sequence, against the
  sequence length t = 1 … max_length (the cumulative AND of the per-token keep masks along
  the sequence, averaged over sequences). The keep mask is the method's own, computed by the
  export runtime's masking code on the site's input (in the rotated basis where the method
  rotates; tokens the token policy leaves dense count as kept). The sparse and +SPON curves
  are the masks those models apply; the dense curve is the mask the method *would* apply to
  the dense model's activations (the dense model itself keeps every channel). α adds a
  constant on every channel where it is non-zero (``alpha_support``: that fraction per site),
  so in the +SPON model those channels never rest;
- **hidden-state drift** per layer: the residual stream after each decoder block against the
  dense model's, per token ``‖h − h_dense‖ / ‖h_dense‖`` and cosine similarity, averaged over
  tokens and sequences;
- the **α training KL curve** (``metrics.jsonl``; the run's ``results.json`` loss curve when α
  came from the cache);
- **measured sparsity** per layer and projection (``results.json``, else measured here).

Writes ``<run_dir>/diagnostics/``: ``diagnostics.json`` and PNGs (see :mod:`.plots`);
logs them to the run's W&B run when it used W&B.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import torch

from spon_exp.tracking.files import METRICS, read_json

log = logging.getLogger(__name__)

FOLDER = "diagnostics"
JSON_FILE = "diagnostics.json"
DEFAULT_MAX_LENGTH = 2048
DEFAULT_SEQUENCES = 4
GRID_POINTS = 64  # sequence lengths kept in the JSON (log-spaced, 1 and max_length included)


class DiagnoseError(ValueError):
    """A user error: the folder is not a finished run, or the settings do not fit it."""


def length_grid(max_length: int, points: int = GRID_POINTS) -> list[int]:
    """Log-spaced sequence lengths 1 … max_length (each once)."""
    if max_length <= points:
        return list(range(1, max_length + 1))
    grid = {1, max_length}
    for i in range(points):
        grid.add(round(math.exp(math.log(max_length) * i / (points - 1))))
    return sorted(g for g in grid if 1 <= g <= max_length)


def always_kept_curve(mask: torch.Tensor, dense_head: int = 0) -> torch.Tensor:
    """``[T]``: for each t, the fraction of channels kept at every one of the first t tokens
    of ``mask`` (``[T, C]`` bool); the first ``dense_head`` tokens count as all kept."""
    if dense_head:
        mask = mask.clone()
        mask[:dense_head] = True
    return torch.cummin(mask.to(torch.uint8), dim=0).values.float().mean(dim=-1)


def read_kl_curve(run_dir: Path, results: dict) -> dict:
    """The α training KL per step: from metrics.jsonl, else results.json (α from the cache)."""
    steps, kl = [], []
    metrics = run_dir / METRICS
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "train":
                steps.append(int(event["step"]))
                kl.append(float(event["kl"]))
    if steps:
        return {"step": steps, "kl": kl, "source": METRICS}
    curve = (results.get("spon") or {}).get("loss_curve") or []
    if curve:
        return {"step": list(range(len(curve))), "kl": [float(v) for v in curve],
                "source": "results.json spon.loss_curve (alpha came from the cache: metrics.jsonl has no train steps)"}
    return {"step": [], "kl": [], "source": "no alpha training in this run"}


def _read_run(run_dir: Path) -> tuple[dict, dict]:
    from spon_exp.export import ExportError, read_run

    try:
        return read_run(run_dir)
    except ExportError as e:
        raise DiagnoseError(str(e)) from None


class _Variants:
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


def diagnose(run_dir: str | Path, max_length: int | None = None, sequences: int = DEFAULT_SEQUENCES,
             device: str = "cpu", log_to_wandb: bool = True) -> dict:
    """Compute, plot and write the diagnostics of the run in ``run_dir`` (see the module
    docstring); returns the JSON written."""
    from spon_exp.data.corpora import token_blocks
    from spon_exp.models.adapters import find_decoder_blocks
    from spon_exp.models.loading import load_model
    from spon_exp.spon.fold import load_sparse_state, read_sparse_state

    run_dir = Path(run_dir)
    results, config = _read_run(run_dir)
    if sequences < 1:
        raise DiagnoseError(f"--sequences must be >= 1, got {sequences}")
    model_cfg = config["model"]
    loaded = load_model(model_cfg["path"], model_cfg.get("dtype", "float32"), device)
    model = loaded.model
    context = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    length = int(max_length or min(DEFAULT_MAX_LENGTH, context))
    if not 1 < length <= context:
        raise DiagnoseError(f"--max-length must be in [2, {context}] (the model's context), got {length}")
    corpus = (config.get("eval", {}).get("ppl", {}).get("corpora") or [config.get("calib", {}).get("corpus")])[0]
    ids = token_blocks(loaded.tokenizer, corpus, "evaluation", length, sequences)
    blocks = find_decoder_blocks(model)
    sparsifier, folded, original, sites = None, {}, {}, {}
    state_dir = run_dir / "export"
    if results.get("sparsifier") != "dense":
        if not (state_dir / "sparse_state.safetensors").is_file():
            raise DiagnoseError(f"{run_dir} has no export/sparse_state.safetensors (run with save_export=false?); "
                                f"re-run it with save_export=true")
        modules = {p.key: p.module for b in blocks for p in b.projections.values()}
        _, _, saved_biases = read_sparse_state(state_dir)
        original = {modules[k]: (None if modules[k].bias is None else modules[k].bias.detach().clone())
                    for k in saved_biases}
        sparsifier = load_sparse_state(model, state_dir)
        folded = {modules[k]: modules[k].bias.detach().clone() for k in saved_biases}
        sites = _site_maskers(sparsifier, saved_biases, run_dir)
    variants = _Variants(model, sparsifier, original, folded)
    log.info("Diagnosing %s: %s on %d x %d tokens of %s", run_dir, "/".join(variants.names), ids.shape[0],
             length, corpus)
    stats = _forward_statistics(model, blocks, variants, sites, ids, sparsifier)
    grid = length_grid(length)
    out = {
        "run": {"config_hash": results["config_hash"], "model": model_cfg.get("name", model_cfg["path"]),
                "sparsifier": results.get("sparsifier"),
                "target_sparsity": (results.get("sparsity") or {}).get("target"),
                "spon_count": results.get("spon_count")},
        "data": {"corpus": corpus, "split": "evaluation", "sequences": int(ids.shape[0]), "max_length": length},
        "variants": variants.names,
        "figure1": _figure1_json(stats["figure1"], grid, sites),
        "drift": stats["drift"],
        "kl_curve": read_kl_curve(run_dir, results),
        "sparsity": _sparsity_json(results, stats.get("measured")),
    }
    from spon_exp.diagnostics.plots import write_plots
    from spon_exp.tracking.store import write_entry

    def fill(folder: Path) -> None:
        (folder / JSON_FILE).write_text(json.dumps(out, indent=1))
        out["plots"] = write_plots(out, folder)
        (folder / JSON_FILE).write_text(json.dumps(out, indent=1))

    if sparsifier is not None:
        sparsifier.detach()
    target = write_entry(run_dir / FOLDER, fill, replace=True)  # an earlier diagnosis of this run is replaced
    out["plots"] = {k: str(target / v) for k, v in out["plots"].items()}
    if log_to_wandb:
        from spon_exp.diagnostics.wandb_log import log_diagnostics

        out["wandb"] = log_diagnostics(run_dir, config, out, target)
    log.info("Diagnostics written to %s", target)
    return out


def _site_maskers(sparsifier, biases: dict, run_dir: Path) -> dict:
    """Per input site ``(layer, site)``: the export runtime's mask of its first projection,
    the token policy, and α's support (the fraction of channels where Σα ≠ 0, in the mask's
    basis)."""
    from safetensors.torch import load_file

    from spon_exp.export.modeling_spon_sparse import _Site
    from spon_exp.export.runtime_spec import NotExportableError, runtime_spec

    try:
        spec, tensors = runtime_spec(sparsifier, biases)
    except NotExportableError as e:
        raise DiagnoseError(str(e)) from None
    alpha_file = run_dir / "alpha.safetensors"
    alphas = load_file(str(alpha_file)) if alpha_file.exists() else {}
    by_key = {p.key: p for p in sparsifier.projections}
    sites: dict = {}
    for entry in spec["projections"]:
        p = by_key[entry["key"]]
        if (p.layer, p.site) in sites:
            continue
        site = _Site(entry, p.module, tensors, spec["rotate_back"])
        support = None
        a = alphas.get(f"alpha.{p.key}")
        if a is not None:
            total = a.float().sum(dim=0)
            if site.rotation is not None:
                total = total.to(site.rotation.dtype) @ site.rotation.cpu()
            support = float((total != 0).float().mean())
        sites[(p.layer, p.site)] = {"masker": site, "module": p.module, "alpha_support": support}
    return {"sites": sites, "policy": spec["token_policy"]}


@torch.no_grad()
def _forward_statistics(model, blocks, variants: _Variants, sites: dict, ids: torch.Tensor, sparsifier) -> dict:
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
            dense_hidden = None
            for variant in variants.names:
                variants.set(variant)
                current["variant"], current["hidden"] = variant, {}
                measuring = variant == "sparse" and sparsifier is not None
                if measuring:
                    with sparsifier.measuring():
                        model(seq[None].to(device))
                    m = sparsifier.measured_sparsity()
                    measured = _accumulate(measured, m, seq.numel())
                else:
                    model(seq[None].to(device))
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


def _accumulate(total: dict | None, m: dict, tokens: int) -> dict:
    total = total or {"_tokens": 0}
    for key, v in (m.get("per_projection") or {}).items():
        total[key] = total.get(key, 0.0) + v * tokens
    total["_tokens"] += tokens
    return total


def _figure1_json(figure1: dict, grid: list[int], sites: dict) -> dict:
    site_map = sites.get("sites", {})
    out: dict = {"length": grid, "average": {}, "per_site": {}, "per_layer": {},
                 "alpha_support": {f"{layer}.{site}": info["alpha_support"]
                                   for (layer, site), info in sorted(site_map.items())}}
    index = torch.tensor([g - 1 for g in grid])
    for variant, per in figure1.items():
        keys = sorted(per)
        if not keys:
            continue
        stacked = torch.stack([per[k] for k in keys])  # [sites, T]
        out["average"][variant] = stacked.mean(dim=0)[index].tolist()
        out["per_site"][variant] = {f"{layer}.{site}": per[(layer, site)][index].tolist() for layer, site in keys}
        layers = sorted({layer for layer, _ in keys})
        out["per_layer"][variant] = {str(layer): torch.stack([per[k] for k in keys if k[0] == layer]).mean(dim=0)[index]
                                     .tolist() for layer in layers}
    return out


def _sparsity_json(results: dict, measured_here: dict | None) -> dict:
    s = results.get("sparsity") or {}
    if s.get("per_projection"):
        return {"target": s.get("target"), "measured": s.get("measured"), "per_layer": s.get("per_layer"),
                "per_projection": s["per_projection"], "source": f"results.json (measured on {s.get('measured_on')})"}
    if measured_here:
        return {"target": s.get("target"), "measured": s.get("measured"), "per_layer": s.get("per_layer"),
                "per_projection": measured_here,
                "source": "measured by spon-exp-diagnose on its sequences "
                          "(results.json predates per-projection values)"}
    return {"target": s.get("target"), "measured": s.get("measured"), "per_layer": s.get("per_layer"),
            "per_projection": {}, "source": "none (dense run)"}


def load_diagnostics(run_dir: str | Path) -> dict | None:
    """The diagnostics.json of a run folder, or None."""
    return read_json(Path(run_dir) / FOLDER / JSON_FILE)
