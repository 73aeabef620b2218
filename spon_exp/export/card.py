"""The model card (README.md) of an export: what was measured, and how to load it."""

from __future__ import annotations

from pathlib import Path
from string import Template

from spon_exp.tracking.intervals import format_with_interval, interval

METHOD_NAMES = {"teal": "TEAL", "wina": "WINA", "rsparse": "R-Sparse", "larosa": "LaRoSA"}


def _ci_text(ci, scale: float = 1.0, digits: int = 3, suffix: str = "") -> str:
    pair = interval(ci)
    return "" if pair is None else f" [{pair[0] * scale:.{digits}f}, {pair[1] * scale:.{digits}f}]{suffix}"


def _figures(results: dict) -> list[str]:
    lines = ["| corpus | dense | sparse | +SPON | gap closed |", "|---|---|---|---|---|"]
    for corpus, values in (results.get("ppl") or {}).items():
        ci = (results.get("ppl_ci") or {}).get(corpus) or {}
        cells = [format_with_interval(values.get(v), ci.get(v)) + _ci_text(ci.get(v)) if values.get(v) is not None
                 else "-" for v in ("dense", "sparse", "spon")]
        g = (results.get("gap_closure") or {}).get(corpus)
        g_ci = (results.get("gap_closure_ci") or {}).get(corpus)
        gap = "-" if g is None else format_with_interval(g, g_ci, 1, 100, " %") + _ci_text(g_ci, 100, 1, " %")
        lines.append(f"| {corpus} | " + " | ".join(cells) + f" | {gap} |")
    zs = results.get("zeroshot") or {}
    if zs.get("average"):
        avg_ci = zs.get("average_ci") or {}
        lines += ["", "Zero-shot average accuracy (lm-eval"
                  + (f" {zs['lm_eval_version']}" if zs.get("lm_eval_version") else "")
                  + (f", limit {zs['limit']} items per task" if zs.get("limit") else "") + "): "
                  + ", ".join(f"{v} {format_with_interval(a, avg_ci.get(v), 4)}" for v, a in zs["average"].items())
                  + (f"; recovery {format_with_interval(zs['recovery'], zs.get('recovery_ci'), 1, 100, ' %')}"
                     if zs.get("recovery") is not None else "") + "."]
    return lines


#: The card's text, with ``$name`` placeholders (:class:`string.Template`) that :func:`model_card` fills
TEMPLATE = Path(__file__).with_name("model_card.md")


def model_card(results: dict, config: dict, spec: dict, repo_id: str | None = None) -> str:
    """README.md of an export folder: :data:`TEMPLATE` filled in from the run and the export."""
    method = spec["sparsifier"]["name"]
    nice = METHOD_NAMES.get(method, method)
    sparsity = results.get("sparsity") or {}
    measured = sparsity.get("measured")
    model = config["model"]
    spon = results.get("spon") or {}
    check = spec.get("export_check")
    fold = results.get("fold")
    checks = []
    if fold:
        checks.append(f"Folding SPON into the biases changed no logit (max |difference| "
                      f"{fold['max_abs_logit_diff']:g} on {fold['checked_on']}).")
    if check:
        checks.append(f"This export, loaded back with `trust_remote_code=True`, gave logits equal bit for bit to the "
                      f"run's folded sparse model (max |difference| {check['max_abs_logit_diff']:g} on "
                      f"{check['checked_on']}, {check['device']}).")
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        method=method,
        method_name=nice,
        model_name=model.get("name", model["path"]),
        target=sparsity.get("target"),
        plus_spon=" + SPON" if spon.get("count") else "",
        config_hash=results["config_hash"],
        version=results.get("spon_exp_version", "?"),
        model_path=model["path"],
        dtype=model.get("dtype", "float32"),
        options=", ".join(f"`{k}={v}`" for k, v in spec["sparsifier"].items() if k not in ("name", "sparsity")),
        measured="not measured" if measured is None
        else f"{measured:.4f} (parameter-weighted, on {sparsity.get('measured_on')})",
        spon=f"{spon.get('count', 0)} vector(s) per projection"
        + (f", {spon.get('steps', 0)} training steps, final KL {spon['final_kl']:.4g}"
           if spon.get("final_kl") is not None else ""),
        calib_corpus=results.get("calib_corpus"),
        seed=results.get("seed"),
        figures="\n".join(_figures(results)),
        checks="".join(f"{paragraph}\n\n" for paragraph in checks),
        where=repo_id or "path/to/this/folder",
        without_remote_code=_without_remote_code(spec),
        biases=len(spec.get("biases") or []),
        token_policy=spec["token_policy"],
        runtime_notes=_runtime_notes(spec),
        bias_policy=_bias_policy(spec),
    )


def _bias_policy(spec: dict) -> str:
    """Which bias runs when (``spon.apply`` of the run)."""
    if not spec.get("biases"):
        return "This run trained no SPON: the projections keep their own biases."
    if spec.get("spon_apply", "all") != "sparsified":
        return ("**Which bias runs when:** the folded bias `b'` on every token, prefill and decode alike "
                "(the run's `spon.apply=all`), also on tokens the token policy keeps dense.")
    return ("**Which bias runs when** (the run's `spon.apply=sparsified`): α acts only on the tokens whose inputs "
            "were sparsified. A forward whose tokens are all sparsified (every decode token) computes with the "
            "folded bias `b'`; a forward whose leading tokens the token policy keeps dense (a prefill) computes with "
            "the projection's original bias (`dense_bias.<module name>`, none where the layer had none), so those "
            "tokens are the dense model's, and adds `b' − b` to its sparsified trailing tokens. Switched off "
            "(`model.sparse_runtime.disabled()`), every token gets the original bias: the dense model.")


def _without_remote_code(spec: dict) -> str:
    """What loading the folder without ``trust_remote_code`` gives."""
    if spec.get("folded_rotations"):
        return ("Without `trust_remote_code` this folder is **not usable**: the rotations are folded into the weights "
                "(`W·Q`) and only the runtime rotates the inputs to match.")
    return ("Without `trust_remote_code`, transformers loads the plain base weights: dense, without the SPON biases "
            "(not the measured model).")


def _runtime_notes(spec: dict) -> str:
    """The runtime's rotated sites and R-Sparse's low-rank path, where the export has them."""
    notes = ""
    rotated = sorted({e["site"].split(".", 1)[1] for e in spec["projections"] if e.get("rotation")})
    if rotated:
        notes += (f" Rotated sites: {', '.join(rotated)} (each consumer's hook computes `x·Q`, masks it in that basis "
                  "and multiplies it back by `Qᵀ`).")
    if spec.get("folded_rotations"):
        folded = sorted({f["site"].split(".", 1)[1] for f in spec["folded_rotations"]})
        notes += (f" Rotated sites: {', '.join(folded)} (`Q` is folded into the consumers' weights, `W·Q`, in "
                  "`model.safetensors`; a pre-hook on the attention / MLP module rotates its input once, `x·Q`, and "
                  "the consumers mask the rotated input).")
    if any(e.get("low_rank") for e in spec["projections"]):
        notes += (" R-Sparse's dropped channels go through the rank-r path `U_r S_r V_rᵀ (x − x ⊙ m)`, added to the "
                  "output.")
    return notes
