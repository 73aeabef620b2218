"""``--baseline`` / ``--candidate``: two configurations chosen by ``key=value`` conditions, and
candidate − baseline of each statistic with its interval over seeds and blocks."""

from __future__ import annotations

import math

from omegaconf import OmegaConf

from spon_exp.collect.format import fmt
from spon_exp.collect.groups import _bootstrap, _seed_run
from spon_exp.collect.runs import run_config
from spon_exp.evaluation.pairing import describe_left_out
from spon_exp.tracking.intervals import interval

#: ``key=value`` names a run's field in :func:`_row` under these spellings too
FIELD_ALIASES = {"model": "model", "model.name": "model", "sparsifier": "sparsifier", "sparsity": "sparsity",
                 "sparsifier.sparsity": "sparsity", "spon.count": "spon_count", "spon_count": "spon_count",
                 "calib": "calib_corpus", "calib.corpus": "calib_corpus", "calib_corpus": "calib_corpus",
                 "seed": "seed", "seed_group": "seed_group", "config_hash": "config_hash"}


def same_value(actual, wanted: str) -> bool:
    if actual is None:
        return wanted.lower() in ("null", "none")
    try:
        return math.isclose(float(actual), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return str(actual).lower() == wanted.lower()


def _config_value(row: dict, key: str):
    """A dotted key of the run's resolved config (``config.yaml`` in its folder)."""
    cfg = run_config(row)
    return None if cfg is None else OmegaConf.select(cfg, key, default=None)


def _matches(row: dict, condition: str) -> bool:
    key, sep, wanted = condition.partition("=")
    if not sep:
        raise ValueError(f"{condition!r} is not key=value (e.g. sparsity=0.4 or spon.lr=0.001)")
    if key in ("seed_group", "config_hash"):  # hashes: a prefix is enough, as the tables print 8 characters
        return str(row.get(key) or "").startswith(wanted) and bool(wanted)
    if key in FIELD_ALIASES:
        return same_value(row.get(FIELD_ALIASES[key]), wanted)
    return same_value(_config_value(row, key), wanted)


def _values_hint(rows: list[dict], conditions: list[str]) -> str:
    """For the first condition on a results field that no finished run meets: the values the
    runs have (``model=`` takes the name the tables print, not the config group)."""
    finished = [r for r in rows if r["status"] == "ok"]
    for condition in conditions:
        key = condition.partition("=")[0].strip()
        if key in FIELD_ALIASES and not any(_matches(r, condition) for r in finished):
            values = sorted({str(r.get(FIELD_ALIASES[key])) for r in finished})
            return f"; the finished runs have {key} = {', '.join(values[:10])}"
    return ""


def select_group(rows: list[dict], conditions: list[str], side: str) -> list[dict]:
    """The finished runs matching every ``key=value`` condition; they must be the seeds of one
    configuration, else a one-line error says how to narrow the selection."""
    chosen = [r for r in rows if r["status"] == "ok" and all(_matches(r, c) for c in conditions)]
    if not chosen:
        raise ValueError(f"--{side} {' '.join(conditions)} matches no finished run{_values_hint(rows, conditions)}")
    groups = sorted({str(r.get("seed_group")) for r in chosen})
    if len(groups) > 1:
        raise ValueError(f"--{side} {' '.join(conditions)} matches {len(groups)} configurations (seed groups "
                         f"{', '.join(g[:8] for g in groups)}); add key=value conditions until one is left, "
                         f"e.g. seed_group={groups[0][:8]}")
    return sorted(chosen, key=lambda r: str(r["seed"]))


def compare_groups(rows: list[dict], baseline: list[str], candidate: list[str]) -> dict:
    """``{corpus: spon_exp.evaluation.seeds.compare(...)}`` for every corpus both sides
    evaluated: candidate − baseline, with the interval over seeds and blocks."""
    from spon_exp.evaluation.seeds import compare

    base, cand = select_group(rows, baseline, "baseline"), select_group(rows, candidate, "candidate")
    if {id(r) for r in base} & {id(r) for r in cand}:
        raise ValueError("--baseline and --candidate select the same runs; make them differ")
    corpora = sorted(set.intersection(*[set(r["ppl"]) for r in [*base, *cand]]))
    if not corpora:
        raise ValueError("the two sides share no evaluation corpus")
    return {corpus: compare([_seed_run(r, corpus) for r in base], [_seed_run(r, corpus) for r in cand], _bootstrap())
            for corpus in corpora}


COMPARED = ("ppl/final", "gap_closure", "ppl/dense", "ppl/sparse", "ppl/spon")


def comparison_table(result: dict) -> list[list[str]]:
    header = ["corpus", "statistic", "baseline", "candidate", "candidate − baseline", "95 % interval", "excludes 0",
              "seeds", "interval over"]
    body = []
    for corpus, comp in result.items():
        seeds = (f"paired, n={comp['n_baseline']}" if comp["paired"]
                 else f"unpaired, n={comp['n_baseline']} / {comp['n_candidate']}")
        left_out = describe_left_out(comp.get("left_out") or {})
        seeds += f" ({left_out})" if left_out else ""
        verdicts = {True: "yes", False: "no", None: comp.get("refused") or "-"}  # no verdict: the reason
        for name in [n for n in COMPARED if n in comp["statistics"]]:
            st = comp["statistics"][name]
            scale, digits, unit = (100, 1, " pts") if name == "gap_closure" else (1, 3, "")
            ci = interval(st["ci"])
            body.append([corpus, name, fmt(None if st["baseline"] is None else st["baseline"] * scale, digits),
                         fmt(None if st["candidate"] is None else st["candidate"] * scale, digits),
                         "-" if st["difference"] is None else f"{st['difference'] * scale:+.{digits}f}{unit}",
                         "-" if ci is None else f"[{ci[0] * scale:+.{digits}f}, {ci[1] * scale:+.{digits}f}]",
                         verdicts[st["excludes_zero"]], seeds, comp["covers"]])
    return [header, *body]
