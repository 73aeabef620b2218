"""Per-layer reconstruction error of one-shot pruning on the packaged model: magnitude, Wanda and
SparseGPT at 50 %, unstructured and 2:4.

Every projection of every decoder block is pruned by each method on the *same* inputs, the
dense model's activations on calibration windows (one layer at a time, so the methods see one
X; a run prunes block by block on the pruned blocks' outputs instead), and scored by its
relative output error ``‖WX − ŴX‖² / ‖WX‖²`` on held-out inputs (the evaluation split) and on
the calibration inputs: ``trace(D Σ Dᵀ) / trace(W Σ Wᵀ)`` with ``D = W − Ŵ``, ``Σ = XXᵀ``.
Magnitude is the baseline of Wanda's reference (``prune_magnitude``): the smallest ``|W|``
across the whole layer (N:M: within each group of a row). The sanity ordering is SparseGPT ≤
Wanda ≤ magnitude: SparseGPT minimises this error on the calibration inputs, Wanda
approximates the same saliency without updates, magnitude ignores the inputs.

    OMP_NUM_THREADS=1 python benchmarks/quality/pruning_error.py

Writes ``benchmarks/results/pruning_error/pruning_error.json`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from spon_exp.data.corpora import token_blocks
from spon_exp.models.adapters import PROJECTIONS, find_decoder_blocks
from spon_exp.models.loading import PACKAGED, load_model
from spon_exp.pruning.base import smallest_per_group
from spon_exp.pruning.sparsegpt import Hessian, sparsegpt_prune
from spon_exp.pruning.stage import calibration_windows
from spon_exp.pruning.wanda import wanda_prune_mask

OUT = Path(__file__).resolve().parents[1] / "results" / "pruning_error"
METHODS = ("magnitude", "wanda", "sparsegpt")


def magnitude_prune(weight: torch.Tensor, sparsity: float, n: int, m: int) -> torch.Tensor:
    """Wanda's reference baseline: the smallest |W| of the whole layer (N:M: of each group)."""
    if n:
        return weight.masked_fill(smallest_per_group(weight.abs(), n, m), 0)
    k = int(weight.numel() * sparsity)
    prune = torch.zeros(weight.numel(), dtype=torch.bool)
    prune[torch.sort(weight.abs().flatten(), stable=True).indices[:k]] = True
    return weight.masked_fill(prune.reshape(weight.shape), 0)


@torch.no_grad()
def site_covariances(model, blocks, batches) -> dict[tuple[int, str], Hessian]:
    """Σ xxᵀ of every projection input site over the batches (q/k/v, gate/up: one each)."""
    stats, handles = {}, []
    for b in blocks:
        for name in PROJECTIONS:
            p = b.projections[name]
            if (b.index, p.site) not in stats:
                stat = stats[(b.index, p.site)] = Hessian(p.module.in_features, p.module.weight.device)
                handles.append(p.module.register_forward_pre_hook(lambda m, args, stat=stat: stat.add(args[0])))
    body = model.get_decoder()
    for batch in batches:
        body(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()
    return stats


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, covariance: torch.Tensor) -> float:
    d = (weight - pruned).double()
    w = weight.double()
    cov = covariance.double()
    return float(torch.einsum("ij,jk,ik->", d, cov, d) / torch.einsum("ij,jk,ik->", w, cov, w))


def prune_all(weight: torch.Tensor, cal: Hessian, sparsity: float, n: int, m: int) -> dict[str, torch.Tensor]:
    squares = torch.diagonal(cal.sum)  # Σ_t x_tj², Wanda's statistic
    return {"magnitude": magnitude_prune(weight, sparsity, n, m),
            "wanda": weight.masked_fill(wanda_prune_mask(weight, squares, sparsity, n, m), 0),
            "sparsegpt": sparsegpt_prune(weight, cal.matrix(), sparsity, n, m)[0]}


def summarise(rows: list[dict], pattern: str) -> dict:
    chosen = [r for r in rows if r["pattern"] == pattern]
    out = {"pattern": pattern, "projections": len(chosen), "mean_heldout": {}, "mean_calibration": {},
           "per_projection_type": {}}
    for method in METHODS:
        out["mean_heldout"][method] = sum(r["heldout"][method] for r in chosen) / len(chosen)
        out["mean_calibration"][method] = sum(r["calibration"][method] for r in chosen) / len(chosen)
        out["per_projection_type"][method] = {
            name: sum(r["heldout"][method] for r in chosen if r["projection"] == name)
            / sum(r["projection"] == name for r in chosen) for name in PROJECTIONS}
    for split in ("heldout", "calibration"):
        e = [r[split] for r in chosen]
        out[f"ordered_{split}"] = {
            "sparsegpt<=wanda": sum(x["sparsegpt"] <= x["wanda"] for x in e),
            "wanda<=magnitude": sum(x["wanda"] <= x["magnitude"] for x in e),
            "both": sum(x["sparsegpt"] <= x["wanda"] <= x["magnitude"] for x in e)}
    return out


def markdown(summaries: list[dict], setting: str) -> str:
    lines = [f"{setting}\n", "| pattern | method | mean rel. error, held-out | mean rel. error, calibration | "
             + " | ".join(f"{n} (held-out)" for n in PROJECTIONS) + " |",
             "|---|---|---|---|" + "---|" * len(PROJECTIONS)]
    for s in summaries:
        for method in METHODS:
            lines.append(f"| {s['pattern']} | {method} | {s['mean_heldout'][method]:.4f} | "
                         f"{s['mean_calibration'][method]:.4f} | "
                         + " | ".join(f"{s['per_projection_type'][method][n]:.4f}" for n in PROJECTIONS) + " |")
    lines.append("")
    for s in summaries:
        o = s["ordered_heldout"]
        lines.append(f"{s['pattern']}: of {s['projections']} projections, held-out SparseGPT ≤ Wanda in "
                     f"{o['sparsegpt<=wanda']}, Wanda ≤ magnitude in {o['wanda<=magnitude']}, both in {o['both']} "
                     f"(calibration inputs: {s['ordered_calibration']['both']})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=PACKAGED)
    ap.add_argument("--corpus", default="wikipedia")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-sequences", type=int, default=16)
    ap.add_argument("--heldout-sequences", type=int, default=16)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    lm = load_model(args.model)
    model, blocks = lm.model, find_decoder_blocks(lm.model)
    calib = calibration_windows(lm.tokenizer, args.corpus, args.seq_len, args.calib_sequences, seed=0)
    heldout = token_blocks(lm.tokenizer, args.corpus, "evaluation", args.seq_len, args.heldout_sequences)
    cal = site_covariances(model, blocks, calib.split(args.batch_size))
    held = site_covariances(model, blocks, heldout.split(args.batch_size))
    rows = []
    for pattern, (n, m) in (("unstructured", (0, 0)), ("2:4", (2, 4))):
        for b in blocks:
            for name in PROJECTIONS:
                p = b.projections[name]
                weight = p.module.weight.detach()
                key = (b.index, p.site)
                pruned = prune_all(weight, cal[key], args.sparsity, n, m)
                rows.append({"pattern": pattern, "layer": b.index, "projection": name,
                             "heldout": {k: relative_error(weight, w, held[key].sum) for k, w in pruned.items()},
                             "calibration": {k: relative_error(weight, w, cal[key].sum) for k, w in pruned.items()}})
    summaries = [summarise(rows, p) for p in ("unstructured", "2:4")]
    setting = (f"{args.model}, sparsity {args.sparsity}, calibration {args.calib_sequences} x {args.seq_len} tokens "
               f"of {args.corpus} (seed 0), held-out {heldout.shape[0]} x {args.seq_len} tokens of its evaluation "
               f"split; each layer pruned on the dense model's inputs")
    result = {"setting": setting, "summaries": summaries, "rows": rows, "seconds": time.perf_counter() - t0,
              "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pruning_error.json").write_text(json.dumps(result, indent=1))
    (args.out / "summary.md").write_text(markdown(summaries, setting))
    print(markdown(summaries, setting))
    return result


if __name__ == "__main__":
    main()
