"""Weights & Biases tracking: one W&B run per spon-exp run.

The run id is :func:`spon_exp.tracking.identity.wandb_run_id`: one per (sweep name, config
hash), stable across re-launches and SLURM requeues, distinct when one config runs in two
sweeps. The config hash itself is in the W&B config (``config_hash``).

Offline by default (``logger=wandb_offline``): the run is written under the run folder's
``wandb/`` and uploaded later with ``wandb sync <run folder>/wandb/offline-run-*``. wandb
cannot append to an offline run, so a later attempt of the same run (a SLURM requeue, a
re-launch after a failure) resumes it this way: the new attempt's W&B run first re-logs the
training history the run folder's ``metrics.jsonl`` kept from earlier attempts (each step
once, up to where this attempt resumes), and when it finishes it takes the place of the
earlier attempt's folder: one ``offline-run-*-<id>`` folder per run, holding the whole
history and the final summary, so ``wandb sync`` uploads one complete run. Online, W&B's own
``resume="allow"`` continues the run on the server.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from spon_exp.tracking.identity import sparsifier_label
from spon_exp.tracking.intervals import interval

log = logging.getLogger(__name__)


def grouping_keys(cfg) -> dict:
    """Flat keys to group and filter runs by on a dashboard. ``seed_group`` (the config hash
    without the seed) puts a configuration's seeds in one group: Group by it in the runs table
    for mean ± spread per configuration."""
    from spon_exp.tracking.identity import seed_group

    return {
        "seed_group": seed_group(cfg),
        "model_name": cfg.model.name,
        "sparsifier_name": sparsifier_label(cfg.sparsifier),
        "target_sparsity": cfg.sparsity,
        "spon_count": cfg.spon.count,
        "calib_corpus": cfg.calib.corpus,
        "seed": cfg.seed,
    }


def _ci_keys(key: str, ci) -> dict:
    """``<key>_ci_low`` / ``<key>_ci_high`` beside a summary value: two scalars, so W&B can
    plot and filter them (it cannot do either with a list)."""
    pair = interval(ci)
    return {} if pair is None else {f"{key}_ci_low": pair[0], f"{key}_ci_high": pair[1]}


def summary_from_results(results: dict) -> dict:
    out = {}
    ppl_ci = results.get("ppl_ci") or {}
    for corpus, values in (results.get("ppl") or {}).items():
        for variant, v in values.items():
            out[f"ppl/{corpus}/{variant}"] = v
            out.update(_ci_keys(f"ppl/{corpus}/{variant}", (ppl_ci.get(corpus) or {}).get(variant)))
    gap_ci = results.get("gap_closure_ci") or {}
    for corpus, v in (results.get("gap_closure") or {}).items():
        out[f"gap_closure/{corpus}"] = v
        if v is not None:
            out.update(_ci_keys(f"gap_closure/{corpus}", gap_ci.get(corpus)))
    sparsity = results.get("sparsity") or {}
    out["sparsity/target"] = sparsity.get("target")
    out["sparsity/measured"] = sparsity.get("measured")
    out["sparsity/effective"] = sparsity.get("effective")
    out.update(_zeroshot_summary(results.get("zeroshot") or {}))
    out["fold/max_abs_logit_diff"] = (results.get("fold") or {}).get("max_abs_logit_diff")
    out["sensitivity/relative_spread"] = (results.get("sensitivity") or {}).get("relative_spread")
    for stage, v in (results.get("timings") or {}).items():
        out[f"timings/{stage}"] = v
    out["status"] = results.get("status")
    return {k: v for k, v in out.items() if v is not None}


def _zeroshot_summary(zs: dict) -> dict:
    out = {}
    ci = zs.get("ci") or {}
    for variant, tasks in (zs.get("variants") or {}).items():
        for task, metrics in tasks.items():
            out[f"zeroshot/{variant}/{task}"] = metrics.get("paper_metric")
            out.update(_ci_keys(f"zeroshot/{variant}/{task}", (ci.get(variant) or {}).get(task)))
    average_ci = zs.get("average_ci") or {}
    for variant, v in (zs.get("average") or {}).items():
        out[f"zeroshot/{variant}/avg"] = v
        out.update(_ci_keys(f"zeroshot/{variant}/avg", average_ci.get(variant)))
    if zs.get("recovery") is not None:
        out["zeroshot/recovery"] = zs["recovery"]
        out.update(_ci_keys("zeroshot/recovery", zs.get("recovery_ci")))
    return out


def results_from_summary(summary: dict, config: dict, state: str | None = None, run_id: str | None = None) -> dict:
    """The part of a ``results.json`` that ``spon-exp-collect`` reads, rebuilt from a W&B run's
    summary and config (the inverse of :func:`summary_from_results` and :func:`grouping_keys`),
    so runs known only on W&B fill the same tables, intervals included."""
    results = {
        "status": summary.get("status", state), "config_hash": config.get("config_hash") or run_id,
        "model": {"name": config.get("model_name")}, "sparsifier": config.get("sparsifier_name"),
        "calib_corpus": config.get("calib_corpus"), "spon_count": config.get("spon_count"),
        "seed": config.get("seed"), "seed_group": config.get("seed_group"),
        "sparsity": {"target": config.get("target_sparsity"), "measured": summary.get("sparsity/measured"),
                     "effective": summary.get("sparsity/effective")},
        "ppl": {}, "ppl_ci": {}, "gap_closure": {}, "gap_closure_ci": {},
        "zeroshot": {"variants": {}, "ci": {}, "average": {}, "average_ci": {}},
    }
    zs = results["zeroshot"]
    for key, value in _without_ci(summary).items():
        parts = key.split("/")
        ci = _ci_from_summary(summary, key)
        if parts[0] == "ppl" and len(parts) == 3:
            results["ppl"].setdefault(parts[1], {})[parts[2]] = value
            if ci:
                results["ppl_ci"].setdefault(parts[1], {})[parts[2]] = ci
        elif parts[0] == "gap_closure" and len(parts) == 2:
            results["gap_closure"][parts[1]] = value
            results["gap_closure_ci"][parts[1]] = ci
        elif parts[0] == "zeroshot" and len(parts) == 3:
            variant, name = parts[1], parts[2]
            if name == "avg":
                zs["average"][variant] = value
                if ci:
                    zs["average_ci"][variant] = ci
            else:
                zs["variants"].setdefault(variant, {})[name] = {"paper_metric": value}
                if ci:
                    zs["ci"].setdefault(variant, {})[name] = ci
        elif key == "zeroshot/recovery":
            zs["recovery"], zs["recovery_ci"] = value, ci
        elif key == "fold/max_abs_logit_diff":
            results["fold"] = {"max_abs_logit_diff": value}
        elif key == "sensitivity/relative_spread":
            results["sensitivity"] = {"relative_spread": value}
    return results


def _without_ci(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.endswith(("_ci_low", "_ci_high"))}


def _ci_from_summary(summary: dict, key: str) -> list | None:
    lo, hi = summary.get(f"{key}_ci_low"), summary.get(f"{key}_ci_high")
    return None if lo is None or hi is None else [lo, hi]


def offline_run_dirs(run_dir, run_id: str) -> list[Path]:
    """The offline W&B folders of run ``run_id`` under a run folder, oldest first."""
    found = [p for p in (Path(run_dir) / "wandb").glob(f"offline-run-*-{run_id}*")
             if p.is_dir() and not p.name.endswith(".replaced")]
    return sorted(found, key=lambda p: p.name)


class Tracker:
    """No-op unless ``logger.backend == "wandb"``."""

    def __init__(self, cfg, run_id: str, run_dir, config: dict, config_hash: str | None = None,
                 metrics_file: Path | None = None):
        self.run = None
        self.run_dir = Path(run_dir)
        self.metrics_file = Path(metrics_file) if metrics_file else self.run_dir / "metrics.jsonl"  # this attempt's
        self.earlier: list[Path] = []  # offline folders of earlier attempts, replaced at finish
        self.replay_pending = False
        if cfg.logger.backend != "wandb":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        if cfg.logger.mode == "offline":
            self.earlier = offline_run_dirs(self.run_dir, run_id)
            self.replay_pending = bool(self.earlier)
        self.run = wandb.init(
            project=cfg.logger.project, entity=cfg.logger.entity, id=run_id, resume="allow",
            group=cfg.logger.group or cfg.sweep_name, job_type=sparsifier_label(cfg.sparsifier),
            name=f"{cfg.model.name}-{sparsifier_label(cfg.sparsifier)}-s{cfg.sparsity}-spon{cfg.spon.count}-seed{cfg.seed}",
            tags=list(cfg.logger.tags), dir=str(run_dir), mode=cfg.logger.mode,
            config={**config, **grouping_keys(cfg), "config_hash": config_hash, "sweep_name": cfg.sweep_name},
        )
        if self.earlier:
            log.info("W&B offline run %s: resuming the earlier attempt in %s", run_id, self.earlier[0].name)

    def replay_history(self, before_step: int | None = None) -> int:
        """Offline, in a later attempt: log the training steps earlier attempts recorded in
        ``metrics.jsonl`` (steps below ``before_step``, where this attempt resumes; all when
        None), once. Returns how many steps were re-logged."""
        if self.run is None or not self.replay_pending:
            return 0
        self.replay_pending = False
        metrics = self.metrics_file
        steps = 0
        for line in (metrics.read_text().splitlines() if metrics.exists() else []):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a torn last line of a killed attempt
                continue
            if record.get("event") == "train" and (before_step is None or record["step"] < before_step):
                self.log({"train/kl": record["kl"], "train/lr": record["lr"]}, step=record["step"])
                steps += 1
        return steps

    def _lost(self, what: str, error: Exception) -> None:
        """W&B failed (its service process gone, e.g. killed by SLURM's SIGTERM on preemption):
        tracking stops with a warning, the run goes on (metrics.jsonl and results.json hold every
        figure, and a later attempt re-logs the history)."""
        log.warning("W&B %s failed (%s: %s); tracking stops for this attempt, the run goes on",
                    what, type(error).__name__, error)
        self.run = None

    def log(self, data: dict, step: int | None = None) -> None:
        if self.run is None:
            return
        try:
            self.run.log(data, step=step)
        except Exception as e:  # noqa: BLE001 - never let tracking end a run
            self._lost("log", e)

    def log_table(self, key: str, columns: list[str], rows: list[dict]) -> None:
        """A table (one row per dict, values by column; lists and dicts as JSON text)."""
        if self.run is None:
            return
        import wandb

        def cell(value):
            return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value

        self.log({key: wandb.Table(columns=columns, data=[[cell(r.get(c)) for c in columns] for r in rows],
                                   allow_mixed_types=True)})

    def finish(self, results: dict, ok: bool) -> None:
        if self.run is None:
            return
        sync_dir = Path(self.run.settings.sync_dir)
        self.replay_history()  # a later attempt that trained nothing (α cached): the history still belongs here
        run, self.run = self.run, None
        if run is None:  # lost while replaying
            return
        try:  # never raise from here: it would hide the exception a failing run is ending with
            try:
                run.summary.update(summary_from_results(results))
            finally:
                run.finish(exit_code=0 if ok else 1)
        except Exception as e:  # noqa: BLE001
            self._lost("finish", e)
            return
        if self.earlier:
            self._take_place_of_earlier(sync_dir)

    def _take_place_of_earlier(self, sync_dir: Path) -> None:
        """This attempt's offline folder (which re-logged the earlier history) moves to the first
        attempt's folder name; the earlier folders go (their history lives on in this one)."""
        target = self.earlier[0]
        aside = target.with_name(target.name + ".replaced")
        shutil.rmtree(aside, ignore_errors=True)
        target.rename(aside)  # the earlier record stays until the complete one is in place
        sync_dir.rename(target)
        for old in [aside, *self.earlier[1:]]:
            shutil.rmtree(old, ignore_errors=True)
        latest = self.run_dir / "wandb" / "latest-run"
        if latest.is_symlink():
            latest.unlink()
            latest.symlink_to(target.name)

