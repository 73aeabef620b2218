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
from pathlib import Path

import torch

from spon_exp.diagnostics.curves import length_grid
from spon_exp.diagnostics.measure import Variants, forward_statistics
from spon_exp.tracking.files import METRICS, read_json

log = logging.getLogger(__name__)

FOLDER = "diagnostics"
JSON_FILE = "diagnostics.json"
DEFAULT_MAX_LENGTH = 2048
DEFAULT_SEQUENCES = 4


class DiagnoseError(ValueError):
    """A user error: the folder is not a finished run, or the settings do not fit it."""


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
    from spon_exp.export.run_folder import ExportError, read_run

    try:
        return read_run(run_dir)
    except ExportError as e:
        raise DiagnoseError(str(e)) from None


def _check_files(run_dir: Path, results: dict) -> None:
    """The files diagnose reads (the export's sparse state, α), checked whole before any model
    loads: one clear error naming a missing or damaged one."""
    from spon_exp.export.run_folder import ExportError, check_run_files
    from spon_exp.models.loading import safetensors_problem

    if results.get("sparsifier") != "dense":
        if not (run_dir / "export" / "sparse_state.safetensors").is_file():
            raise DiagnoseError(f"{run_dir} has no export/sparse_state.safetensors (run with save_export=false?); "
                                f"run its command again with save_export=true into a new folder (hydra.run.dir=...)")
        try:
            check_run_files(run_dir)
        except ExportError as e:
            raise DiagnoseError(str(e)) from None
    alpha = run_dir / "alpha.safetensors"
    problem = safetensors_problem(alpha) if alpha.is_file() else None
    if problem:
        raise DiagnoseError(f"{alpha} is damaged ({problem}); run the run's command again into a new folder "
                            f"(hydra.run.dir=...) to write it again")


def diagnose(run_dir: str | Path, max_length: int | None = None, sequences: int = DEFAULT_SEQUENCES,
             device: str = "cpu", log_to_wandb: bool = True) -> dict:
    """Compute, plot and write the diagnostics of the run in ``run_dir`` (see the module
    docstring); returns the JSON written."""
    from spon_exp.data.corpora import token_blocks
    from spon_exp.models.adapters import find_decoder_blocks
    from spon_exp.models.loading import load_model

    run_dir = Path(run_dir)
    results, config = _read_run(run_dir)
    _refuse_pruned(run_dir, results)
    _check_files(run_dir, results)
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
    sparsifier, variants, sites = _variants(model, blocks, run_dir, results)
    log.info("Diagnosing %s: %s on %d x %d tokens of %s", run_dir, "/".join(variants.names), ids.shape[0],
             length, corpus)
    stats = forward_statistics(model, blocks, variants, sites, ids, sparsifier)
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


def _refuse_pruned(run_dir: Path, results: dict) -> None:
    if results.get("pruner"):  # pruner=wanda / sparsegpt
        raise DiagnoseError(f"The run in {run_dir} pruned its weights ({results['pruner'].get('label')}); these "
                            f"diagnostics measure activation masks and α, which a pruned run has none of (its dense and "
                            f"pruned perplexities are in results.json; benchmarks/quality/pruning_error.py measures "
                            f"per-layer reconstruction error)")


def _variants(model, blocks, run_dir: Path, results: dict):
    """The run's sparse state loaded into ``model`` (none for a dense run): the sparsifier, the
    dense / sparse / +SPON variants (the biases before and after the fold) and the mask sites."""
    from spon_exp.spon.fold import load_sparse_state, read_sparse_state

    sparsifier, folded, original, sites = None, {}, {}, {}
    if results.get("sparsifier") != "dense":
        state_dir = run_dir / "export"
        modules = {p.key: p.module for b in blocks for p in b.projections.values()}
        _, _, saved_biases = read_sparse_state(state_dir)
        original = {modules[k]: (None if modules[k].bias is None else modules[k].bias.detach().clone())
                    for k in saved_biases}
        sparsifier = load_sparse_state(model, state_dir)
        folded = {modules[k]: modules[k].bias.detach().clone() for k in saved_biases}
        sites = _site_maskers(sparsifier, saved_biases, run_dir)
    return sparsifier, Variants(model, sparsifier, original, folded), sites


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
