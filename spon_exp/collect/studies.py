"""Recipe searches: the Optuna studies kept beside their sweeps, as tables of their trials."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from spon_exp.collect.compare import same_value
from spon_exp.collect.format import fmt, g, to_markdown


def read_studies(folder: str | Path) -> list[dict]:
    """Every Optuna study kept beside a sweep (``<sweep>/optuna.db``, sweeps/tune_spon*.yaml):
    its trials, best first, each with the recipe, the objective (mean validation gap
    closure), every seed's value and its folder (from the trial's ``trial.json``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies = []
    for db in sorted(Path(folder).rglob("optuna.db")):
        storage = f"sqlite:///{db.resolve()}"
        trial_files = {}
        for path in db.parent.glob("*/trial.json"):
            try:
                trial_files[path.parent] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
        for summary in optuna.get_all_study_summaries(storage):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
            trials = []
            for t in study.trials:
                folder_, record = _trial_folder(t.params, trial_files)
                trials.append({"number": t.number, "state": t.state.name, "objective": t.value,
                               "params": dict(t.params), "folder": str(folder_) if folder_ else None,
                               "seeds": {s: v.get("gap_closure") for s, v in (record or {}).get("seeds", {}).items()},
                               "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                               if t.datetime_complete and t.datetime_start else None})
            done = [t for t in trials if t["state"] == "COMPLETE" and t["objective"] is not None]
            done.sort(key=lambda t: t["objective"], reverse=maximize)
            rest = [t for t in trials if t not in done]
            best = done[0] if done else None
            studies.append({"study": summary.study_name, "storage": storage, "sweep": str(db.parent),
                            "direction": "maximize" if maximize else "minimize", "trials": done + rest,
                            "complete": len(done), "failed": sum(t["state"] == "FAIL" for t in trials),
                            "best": best})
    return studies


def _trial_folder(params: dict, trial_files: dict) -> tuple[Path | None, dict | None]:
    """The trial folder whose recorded overrides set every one of ``params``."""
    wanted = {k: v for k, v in params.items()}
    for folder, record in trial_files.items():
        given = dict(o.split("=", 1) for o in record.get("overrides") or [] if "=" in o)
        if all(k in given and same_value(v, given[k]) for k, v in wanted.items()):
            return folder, record
    return None, None


def trials_table(study: dict) -> list[list[str]]:
    keys = sorted({k for t in study["trials"] for k in t["params"]})
    seeds = sorted({s for t in study["trials"] for s in t["seeds"]}, key=str)
    header = ["rank", "trial", "state", "objective (gap closure %)", *[f"seed {s}" for s in seeds], *keys, "folder"]
    body = []
    for rank, t in enumerate(study["trials"], 1):
        cells = [str(rank) if t["state"] == "COMPLETE" else "-", str(t["number"]), t["state"],
                 fmt(None if t["objective"] is None else t["objective"] * 100, 1),
                 *[fmt(None if t["seeds"].get(s) is None else t["seeds"][s] * 100, 1) for s in seeds],
                 *[g(t["params"][k]) if isinstance(t["params"].get(k), float) else str(t["params"].get(k, "-"))
                   for k in keys], Path(t["folder"]).name if t["folder"] else "-"]
        body.append(cells)
    return [header, *body]


def write_studies(studies: list[dict], out: Path) -> list[Path]:
    written = []
    for study in studies:
        name = study["study"]
        table = trials_table(study)
        (out / f"trials_{name}.md").write_text(to_markdown(table))
        with (out / f"trials_{name}.csv").open("w", newline="") as f:
            csv.writer(f).writerows(table)
        best = {k: study[k] for k in ("study", "storage", "direction", "complete", "failed")}
        best["best"] = study["best"]
        (out / f"best_params_{name}.json").write_text(json.dumps(best, indent=2))
        written += [out / f"trials_{name}.md", out / f"best_params_{name}.json"]
    return written
