"""The paper's pruning comparison as ``spon-exp-collect`` writes it (``methods_<corpus>.md``):
one line per method — dense, each activation sparsifier, the same + SPON, each pruned model —
with its perplexity over seeds ± half the 95 % interval (seeds and evaluation blocks), beside
the full per-configuration tables (``ppl_<corpus>.md``). Written only where the runs hold a
pruned model."""

from __future__ import annotations

from collections import defaultdict

from spon_exp.collect.format import fmt, pm
from spon_exp.collect.groups import configurations, stat


def _lines(configs: list, corpus: str) -> list[tuple[dict, str, str, dict]]:
    """``(first row, method, variant, summary)`` per method line of one corpus, dense first,
    then the activation sparsifiers (and + SPON), then the pruned models."""
    dense, activation, pruned = {}, [], []
    for config in configs:
        summary = config.ppl(corpus)
        if not summary["n"]:
            continue
        first = config.first
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


def method_tables(rows: list[dict], configs: list | None = None) -> dict[str, list[list[str]]]:
    """``{"methods_<corpus>": table}`` where a run holds a pruned model, else ``{}``;
    ``configs``: the runs' :class:`spon_exp.collect.groups.Configuration` list, if made already."""

    if not any(r.get("pruner") for r in rows):
        return {}
    configs = configurations(rows) if configs is None else configs
    header = ["model", "method", "calibration", "sparsity", "n", "perplexity", "interval over", "seed_group"]
    tables = {}
    for corpus in sorted({c for r in rows for c in r["ppl"]}):
        by_model = defaultdict(list)
        for first, method, variant, summary in _lines(configs, corpus):
            st = stat(summary, f"ppl/{variant}")
            by_model[first["model"]].append([
                str(first["model"]), method, str(first["calib_corpus"]),
                "-" if variant == "dense" else fmt(first["sparsity"]), str(summary["n"]),
                pm(st.get("mean"), st.get("ci")), summary.get("covers", "-"), str(first.get("seed_group") or "-")[:8]])
        tables[f"methods_{corpus}"] = [header, *[line for model in sorted(by_model) for line in by_model[model]]]
    return tables
