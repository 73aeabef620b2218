"""A run folder: the names of its files, whether it holds a finished run, and the record one
attempt leaves in it.

A finished run is never lost to a later attempt: while the folder holds an ``ok``
results.json of the same config, a new attempt records itself in ``*.attempt-<N>.*`` files
beside it and replaces the run's record only if it ends ``ok`` (:class:`Attempt`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import traceback
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from spon_exp.tracking.files import ENV, METRICS, RESULTS, environment, read_json, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"  # the resolved config behind results.json
ALPHA_FILE = "alpha.safetensors"  # the trained α (also the name inside an α cache entry)
UNITS_FILE = "eval_units.safetensors"  # per-block NLLs and per-document scores behind the intervals
SAMPLES_FILE = "zeroshot_samples.csv"  # eval.zeroshot.log_samples: the per-document answers
EXPORT_DIR = "export"  # the folded sparse state (spon-exp-export reads it)
HYDRA_DIR = ".hydra"  # Hydra's record of the run (written by the CLI through run(..., hydra_files=...))


def is_done(run_dir: Path, chash: str) -> bool:
    previous = read_json(Path(run_dir) / RESULTS)
    return bool(previous and previous.get("status") == "ok" and previous.get("config_hash") == chash)


def guard_run_dir(run_dir: Path, chash: str) -> None:
    """Never overwrite a finished run of a *different* config in the same folder."""
    previous = read_json(run_dir / RESULTS)
    if previous and previous.get("config_hash") not in (None, chash) and previous.get("status") == "ok":
        raise FileExistsError(
            f"{run_dir} already holds finished run {previous['config_hash']} of a different config; "
            f"choose another hydra.run.dir (or remove that folder)"
        )


def attempt_number(run_dir: Path, chash: str) -> int | None:
    """None while the folder holds no finished run of this config; else the number of a new
    attempt beside it (one more than any attempt file or folder there)."""
    if not is_done(run_dir, chash):
        return None
    numbers = [int(m.group(1)) for p in run_dir.glob("*.attempt-*")
               if (m := re.fullmatch(r".*\.attempt-(\d+)(\.[a-z]+)?", p.name))]
    return max(numbers, default=0) + 1


class Attempt:
    """Where one attempt records itself: results.json, metrics.jsonl and ``.hydra/``, or, while
    the folder holds a finished run of this config, ``results.attempt-<N>.json``,
    ``metrics.attempt-<N>.jsonl`` and ``.hydra.attempt-<N>/`` beside them (see :func:`spon_exp.runner.run`)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, chash: str):
        self.cfg, self.run_dir = cfg, run_dir
        self.number = attempt_number(run_dir, chash)
        self.keeps_finished_run = self.number is not None
        suffix = "" if self.number is None else f".attempt-{self.number}"
        self.results_file = run_dir / (RESULTS if self.number is None else f"results{suffix}.json")
        self.error_file = run_dir / f"error{suffix}.txt"
        self.metrics_file = run_dir / (METRICS if self.number is None else f"metrics{suffix}.jsonl")
        self.hydra_dir = run_dir / f"{HYDRA_DIR}{suffix}"

    def _record_run(self) -> None:  # the environment and config behind results.json
        write_json_atomic(self.run_dir / ENV, environment())
        write_text_atomic(self.run_dir / CONFIG_FILE, OmegaConf.to_yaml(self.cfg, resolve=True))

    def _log_handlers(self) -> list[logging.FileHandler]:
        """File handlers writing into this run folder (Hydra's ``<job>.log``)."""
        return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)
                and Path(h.baseFilename).parent == self.run_dir.resolve() and ".attempt-" not in h.baseFilename]

    def _redirect_logs(self) -> None:
        """Beside a finished run, this attempt logs to ``<job>.attempt-<N>.log``: the run's log stays as it is."""
        self._logs = []
        for handler in self._log_handlers():
            path = Path(handler.baseFilename)
            handler.acquire()
            try:
                handler.close()
                handler.baseFilename = str(path.with_name(f"{path.stem}.attempt-{self.number}{path.suffix}"))
            finally:
                handler.release()
            self._logs.append((handler, path))

    def _restore_logs(self, ok: bool) -> None:
        for handler, path in getattr(self, "_logs", []):
            handler.acquire()
            try:
                handler.close()
                if ok and Path(handler.baseFilename).exists():
                    os.replace(handler.baseFilename, path)  # the attempt that produced results.json
                handler.baseFilename = str(path)
            finally:
                handler.release()

    def start(self, results: dict) -> None:
        if self.keeps_finished_run:
            self._redirect_logs()
            log.info("%s holds a finished run of this config: this attempt writes %s and replaces results.json "
                     "only if it finishes ok", self.run_dir, self.results_file.name)
        else:
            self.error_file.unlink(missing_ok=True)  # from an earlier, interrupted attempt
        write_json_atomic(self.results_file, results)
        if not self.keeps_finished_run:
            self._record_run()

    def failed(self) -> None:
        self.error_file.write_text(traceback.format_exc())

    def finish(self, results: dict, ok: bool) -> None:
        results["finished_at"] = datetime.now(timezone.utc).isoformat()
        write_json_atomic(self.results_file, results)
        self._restore_logs(ok)
        if ok and self.keeps_finished_run:  # this attempt's record becomes the run's
            self._record_run()
            if self.metrics_file.exists():
                os.replace(self.metrics_file, self.run_dir / METRICS)
            if self.hydra_dir.is_dir():
                replace_folder(self.hydra_dir, self.run_dir / HYDRA_DIR)
            write_json_atomic(self.run_dir / RESULTS, results)
            self.results_file.unlink()


def replace_folder(new: Path, target: Path) -> None:
    """``target`` replaced by ``new`` (two renames; the old one removed after)."""
    old = target.with_name(f"{target.name}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
