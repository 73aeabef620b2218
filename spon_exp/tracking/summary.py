"""The short table a run prints when it ends: perplexities with their intervals, gap closure,
the fold check, sensitivity and timings, read from results.json alone."""

from __future__ import annotations

from spon_exp.tracking.intervals import format_with_interval


def summary_table(results: dict) -> str:
    """The short table printed at the end of a run (± half the 95 % interval)."""
    measured, effective = results["sparsity"].get("measured"), results["sparsity"].get("effective")
    method = (results.get("pruner") or {}).get("label") or results.get("sparsifier_label") or results["sparsifier"]
    lines = [f"spon-exp run {results['config_hash']}  [{results['status']}]",
             f"model {results['model']['name']}  sparsifier {method}  "
             f"target sparsity {results['sparsity']['target']}  measured "
             + (f"{measured:.3f}" if measured is not None else "n/a")
             + (f"  effective {effective:.3f}" if effective is not None else ""),
             f"{'corpus':<14}{'dense':>18}{'sparse':>18}{'+SPON':>18}{'gap closed':>18}"]
    for corpus, v in results["ppl"].items():
        ci = (results.get("ppl_ci") or {}).get(corpus) or {}
        cells = [format_with_interval(v.get(k), ci.get(k)) for k in ("dense", "sparse", "spon")]
        gap = format_with_interval(results["gap_closure"].get(corpus),
                                   (results.get("gap_closure_ci") or {}).get(corpus), digits=1, scale=100, suffix=" %")
        lines.append(f"{corpus:<14}" + "".join(f"{c:>18}" for c in cells) + f"{gap:>18}")
    zs = results.get("zeroshot")
    if zs:
        avg_ci = zs.get("average_ci") or {}
        lines.append("zero-shot avg  " + "  ".join(f"{k} {format_with_interval(v, avg_ci.get(k), digits=4)}"
                                                   for k, v in zs["average"].items())
                     + (f"  recovery {format_with_interval(zs['recovery'], zs.get('recovery_ci'), 1, 100, ' %')}"
                        if zs.get("recovery") is not None else ""))
    if results.get("fold"):
        lines.append(f"fold check: max |logit difference| {results['fold']['max_abs_logit_diff']:g} "
                     f"on {results['fold']['checked_on']}")
    sens = results.get("sensitivity")
    if sens and sens.get("spread") is not None:
        lines.append(f"sensitivity: thresholds x(1 ± {sens['relative_perturbation']:g}) move sparse perplexity by up to "
                     f"{sens['spread']:.4f} ({sens['relative_spread'] * 100:.2f} %)")
    note = effective_sparsity_note(results["sparsity"])
    if note:
        lines.append(note)
    if (results.get("ppl_protocol") or {}).get("score") == "sparsified":
        lines.append("perplexity scores only the tokens the token policy sparsified (eval.ppl.score=sparsified)")
    if results["ppl"]:
        lines.append(f"± is half the 95 % interval over the evaluation text of this one seed ({results.get('seed')}); "
                     f"it excludes training randomness: compare over seeds (--multirun seed=0,1,2, then spon-exp-collect)")
    lines.append("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings"].items()))
    return "\n".join(lines)


#: Measured and effective sparsity further apart than this get a line in the summary.
EFFECTIVE_SPARSITY_GAP = 0.05


def effective_sparsity_note(sparsity: dict) -> str | None:
    """One line when the token policy kept enough tokens dense that the sparsity over every
    evaluated token is far below the sparsity over the sparsified ones."""
    measured, effective = sparsity.get("measured"), sparsity.get("effective")
    if measured is None or effective is None or measured - effective <= EFFECTIVE_SPARSITY_GAP:
        return None
    return (f"note: effective sparsity {effective:.3f} over every evaluated token is {(measured - effective) * 100:.0f} "
            f"points below the measured {measured:.3f}: the token policy ran the other tokens dense")
