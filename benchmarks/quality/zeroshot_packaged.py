"""Zero-shot accuracy of the packaged model (dense), one lm-eval run per task.

Checks that no multiple-choice task is clearly below chance (value < floor - 2 stderr),
which would point at a label-mapping bug (floor: uniform chance; for BoolQ the score of
the worse constant answer, since BoolQ is 62 % "yes"). Example (offline, 200 documents per task,
20 per MMLU subject):

    .venv/bin/python benchmarks/quality/zeroshot_packaged.py --limit 200 --mmlu-limit 20 \
        --tasks piqa,hellaswag,arc_easy,arc_challenge,winogrande,boolq,openbookqa,lambada_openai,mmlu \
        --out benchmarks/results/zeroshot_packaged.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from spon_exp.evaluation.zeroshot import DEFAULT_TASKS, resolve_tasks

# Accuracy of uniform guessing (ARC has a few 3- and 5-choice items; 0.25 is close enough).
CHANCE = {"piqa": 0.5, "hellaswag": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25,
          "winogrande": 0.5, "boolq": 0.5, "openbookqa": 0.25, "mmlu": 0.25}


def boolq_floor(n: int | None) -> float:
    """Score of the worse constant answer on the first ``n`` BoolQ documents.

    BoolQ is 62 % "yes": a model that (almost) always answers "no" scores ~0.38, below
    uniform chance, with a correct label mapping. Only a score clearly below this floor
    points at a mapping bug.
    """
    from spon_exp.evaluation.offline_data import load_jsonl

    docs = load_jsonl("boolq", "validation")[:n]
    yes = sum(d["label"] for d in docs) / len(docs)
    return min(yes, 1 - yes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="packaged:smollm2-135m-instruct")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated task names")
    ap.add_argument("--limit", type=float, default=200, help="documents per task (<=0: all)")
    ap.add_argument("--mmlu-limit", type=float, default=20, help="documents per MMLU subject (<=0: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--source", default="offline", choices=["offline", "hub"])  # hub: HF_DATASETS_OFFLINE=1 reads the local cache
    ap.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def as_limit(x: float):
        return None if x <= 0 else (int(x) if float(x).is_integer() else x)

    resolved = resolve_tasks(args.tasks, source=args.source)  # fails before the model loads

    from spon_exp.evaluation.zeroshot import evaluate_zeroshot
    from spon_exp.models.loading import load_model

    loaded = load_model(args.model)
    rows, runs = [], {}
    for task in resolved:
        limit = as_limit(args.mmlu_limit if task.name == "mmlu" else args.limit)
        t0 = time.perf_counter()
        res = evaluate_zeroshot(loaded.model, loaded.tokenizer, [task], batch_size=args.batch_size,
                                num_fewshot=args.num_fewshot, limit=limit)
        runs[task.name] = res
        metrics = res["tasks"][task.name]
        metric = res["metric_name"][task.name]
        value = res["paper_metric"][task.name]
        stderr = metrics.get(f"{metric}_stderr") or 0.0
        chance = CHANCE.get(task.name)
        n = res["n_samples"][task.name]
        floor = boolq_floor(n) if task.name == "boolq" else chance
        flag = ""
        if floor is not None and value < floor - 2 * stderr:
            flag = "BELOW CHANCE"
        rows.append(dict(task=task.name, source=task.source, metric=metric, value=value, stderr=stderr,
                         acc=metrics.get("acc"), chance=chance, floor=floor, n=n,
                         seconds=round(time.perf_counter() - t0, 1), flag=flag))

    print(f"\nmodel {args.model}, {args.num_fewshot}-shot, limit {as_limit(args.limit)} "
          f"(MMLU {as_limit(args.mmlu_limit)} per subject)")
    print("| task | source | n | metric | value ± stderr | acc | chance | floor | time (s) | |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        chance = "-" if r["chance"] is None else f"{r['chance']:.2f}"
        floor = "-" if r["floor"] is None else f"{r['floor']:.3f}"
        acc = "-" if r["acc"] is None else f"{r['acc']:.3f}"
        print(f"| {r['task']} | {r['source']} | {r['n']} | {r['metric']} | {r['value']:.3f} ± "
              f"{r['stderr']:.3f} | {acc} | {chance} | {floor} | {r['seconds']} | {r['flag']} |")
    print("floor: score below which a mapping bug is suspected (uniform chance; for BoolQ the "
          "worse constant answer on the evaluated documents)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows, "runs": runs}, indent=1))
    return 1 if any(r["flag"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
