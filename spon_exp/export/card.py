"""The model card (README.md) of an export: what was measured, and how to load it."""

from __future__ import annotations

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


def model_card(results: dict, config: dict, spec: dict, repo_id: str | None = None) -> str:
    """README.md of an export folder."""
    method = spec["sparsifier"]["name"]
    nice = METHOD_NAMES.get(method, method)
    sparsity = results.get("sparsity") or {}
    measured = sparsity.get("measured")
    model = config["model"]
    spon = results.get("spon") or {}
    check = spec.get("export_check")
    options = ", ".join(f"`{k}={v}`" for k, v in spec["sparsifier"].items() if k not in ("name", "sparsity"))
    where = repo_id or "path/to/this/folder"
    biases = len(spec.get("biases") or [])
    rotated = sorted({e["site"].split(".", 1)[1] for e in spec["projections"] if e.get("rotation")})
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [spon-exp, activation-sparsity, {method}]",
        "---",
        "",
        f"# {model.get('name', model['path'])}: {nice} at {sparsity.get('target')} sparsity"
        + (" + SPON" if spon.get("count") else ""),
        "",
        f"Exported by spon-exp from run `{results['config_hash']}` (the hash of the run's "
        f"resolved config; spon-exp {results.get('spon_exp_version', '?')}). This folder is the model that was "
        f"measured: it runs **sparse**, with the run's calibrated {nice} state and the SPON biases folded in.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{model['path']}` ({model.get('dtype', 'float32')}) |",
        f"| method | {nice} ({options}) |",
        f"| target sparsity | {sparsity.get('target')} |",
        f"| measured sparsity | {measured:.4f} (parameter-weighted, on {sparsity.get('measured_on')}) |"
        if measured is not None else "| measured sparsity | not measured |",
        f"| SPON | {spon.get('count', 0)} vector(s) per projection, {spon.get('steps', 0)} training steps, "
        f"final KL {spon['final_kl']:.4g} |" if spon.get("final_kl") is not None
        else f"| SPON | {spon.get('count', 0)} vector(s) per projection |",
        f"| calibration corpus | {results.get('calib_corpus')} |",
        f"| seed | {results.get('seed')} |",
        f"| config hash | `{results['config_hash']}` |",
        "",
        "## Figures of the run",
        "",
        "Perplexity (± half the 95 % paired-bootstrap interval over evaluation blocks, the interval in brackets):",
        "",
        *_figures(results),
        "",
    ]
    if results.get("fold"):
        lines += [f"Folding SPON into the biases changed no logit (max |difference| "
                  f"{results['fold']['max_abs_logit_diff']:g} on {results['fold']['checked_on']}).", ""]
    if check:
        lines += [f"This export, loaded back with `trust_remote_code=True`, gave logits equal bit for bit to the run's "
                  f"folded sparse model (max |difference| {check['max_abs_logit_diff']:g} on {check['checked_on']}, "
                  f"{check['device']}).", ""]
    lines += [
        "## How to load",
        "",
        "Plain `transformers` (no spon-exp needed); the runtime in `modeling_spon_sparse.py` is loaded with "
        "`trust_remote_code=True`:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{where}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "with model.sparse_runtime.disabled():   # optional: the same weights and biases, run dense",
        "    ...",
        "```",
        "",
        f'With spon-exp installed: `from spon_exp import load_sparse_model; model = load_sparse_model("{where}")`.',
        ("Without `trust_remote_code` this folder is **not usable**: the rotations are folded into the weights "
         "(`W·Q`) and only the runtime rotates the inputs to match."
         if spec.get("folded_rotations") else
         "Without `trust_remote_code`, transformers loads the plain base weights: dense, without the SPON biases "
         "(not the measured model)."),
        "",
        "## How the folded SPON bias works",
        "",
        "SPON trains per projection a vector α in the projection's input space; the sparse model then computes "
        "`W·(mask(x) + Σα) + b`, which is folded into a bias `b' = b + W·Σα`, so inference costs exactly what the "
        f"plain sparse model costs. This export holds {biases} folded biases in `sparse_runtime.safetensors` "
        "(`bias.<module name>`); the runtime sets each as its projection's bias when the model loads. Architectures "
        "whose configs declare no biases (Gemma3, Qwen3, Llama without `attention_bias` / `mlp_bias`) get a bias "
        "parameter created on those layers at load time, so `config.json` needs no bias flag and the weights in "
        "`model.safetensors` are the base model's own (biases the architecture declares, e.g. Qwen2's q/k/v, hold "
        "the folded values there too).",
        "",
        "## The sparse runtime",
        "",
        "`sparse_runtime.json` lists every sparsified projection by module name with its mask (`hardshrink`: "
        "TEAL's `|x| > τ`; `threshold`: score `> τ`; `topk`: the `keep` largest scores per token), its score "
        "(`|x|`, or `|x|·‖W[:, i]‖₂` with `column_norm`), its input site and the token policy "
        f"(`{spec['token_policy']}`); projections of one site that share a mask compute it once."
        + (f" Rotated sites: {', '.join(rotated)} (each consumer's hook computes `x·Q`, masks it in that basis "
           "and multiplies it back by `Qᵀ`)." if rotated else "")
        + (f" Rotated sites: {', '.join(sorted({f['site'].split('.', 1)[1] for f in spec['folded_rotations']}))} "
           "(`Q` is folded into the consumers' weights, `W·Q`, in `model.safetensors`; a pre-hook on the attention / "
           "MLP module rotates its input once, `x·Q`, and the consumers mask the rotated input)."
           if spec.get("folded_rotations") else "")
        + (" R-Sparse's dropped channels go through the rank-r path `U_r S_r V_rᵀ (x − x ⊙ m)`, added to the "
           "output." if any(e.get("low_rank") for e in spec["projections"]) else ""),
        "",
        "## Files",
        "",
        "| file | content |",
        "|---|---|",
        "| `config.json`, `model.safetensors`, `generation_config.json`, tokenizer files | the base model's "
        "config (+ `auto_map`) and weights |",
        "| `modeling_spon_sparse.py` | the runtime (imports torch, safetensors, transformers only) |",
        "| `sparse_runtime.json`, `sparse_runtime.safetensors` | masks, thresholds / rotations / factors, folded "
        "biases |",
        "| `manifest.json` | size and sha256 of every file |",
        "",
    ]
    return "\n".join(lines)
