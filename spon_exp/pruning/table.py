"""The paper's pruning comparison as ``spon-exp-collect`` writes it (``methods_<corpus>.md``):
one line per method — dense, each activation sparsifier, the same + SPON, each pruned model —
with its perplexity over seeds ± half the 95 % interval (seeds and evaluation blocks), beside
the full per-configuration tables (``ppl_<corpus>.md``). Written only where the runs hold a
pruned model."""

from __future__ import annotations

from collections import defaultdict


def _lines(groups: list[list[dict]], corpus: str) -> list[tuple[dict, str, str, dict]]:
    """``(first row, method, variant, summary)`` per method line of one corpus, dense first,
    then the activation sparsifiers (and + SPON), then the pruned models."""
    from spon_exp.collect import group_summary

    dense, activation, pruned = {}, [], []
    for group in groups:
        summary = group_summary(group, corpus)
        if not summary["n"]:
            continue
        first = group[0]
        stats = summary.get("statistics") or {}
        rank = (summary["n"], not first.get("pruner"))  # the most seeds; an unpruned run's on a tie
        if "ppl/dense" in stats and rank > dense.get(first["model"], ((0, False),))[0]:
            dense[first["model"]] = (rank, first, summary)
        if first.get("pruner"):
            pruned.append((first, first["pruner"], "sparse", summary))
        elif "ppl/sparse" in stats:
            activation.append((first, first["sparsifier"], "sparse", summary))
            if "ppl/spon" in stats:
                activation.append((first, f"{first['sparsifier']} + SPON", "spon", summary))
    return [(first, "dense", "dense", summary) for _, first, summary in dense.values()] + activation + pruned


def method_tables(rows: list[dict]) -> dict[str, list[list[str]]]:
    """``{"methods_<corpus>": table}`` where a run holds a pruned model, else ``{}``."""
    from spon_exp.collect import _fmt, _pm, _stat, seed_groups

    if not any(r.get("pruner") for r in rows):
        return {}
    groups = seed_groups([r for r in rows if r["status"] == "ok"])
    corpora = sorted({c for r in rows for c in r["ppl"]})
    header = ["model", "method", "calibration", "sparsity", "n", "perplexity", "interval over", "seed_group"]
    tables = {}
    for corpus in corpora:
        by_model = defaultdict(list)
        for first, method, variant, summary in _lines(groups, corpus):
            stat = _stat(summary, f"ppl/{variant}")
            by_model[first["model"]].append([
                str(first["model"]), method, str(first["calib_corpus"]),
                "-" if variant == "dense" else _fmt(first["sparsity"]), str(summary["n"]),
                _pm(stat.get("mean"), stat.get("ci")), summary.get("covers", "-"),
                str(first.get("seed_group") or "-")[:8]])
        tables[f"methods_{corpus}"] = [header, *[line for model in sorted(by_model) for line in by_model[model]]]
    return tables
