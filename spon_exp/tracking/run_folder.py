"""A run folder: the names of its files, whether it holds a finished run, and the record one
attempt leaves in it.

A finished run is never written again. Every file of a folder whose results.json says ``ok``
stays as it is, byte for byte:

- a re-run of the same config is skipped (``skip_if_done=true``, the default), or, with
  ``skip_if_done=false`` (or :func:`spon_exp.runner.run` called again), runs as attempt ``N``
  *beside* it: every file it writes is an ``*.attempt-<N>.*`` file (results, metrics, α,
  evaluation units, export state, samples, Hydra's record, the log, W&B), and they stay so
  whether it ends ok or not (:class:`Attempt`);
- the first attempt writes α, the evaluation units, the samples and the export state under
  ``*.partial*`` names and gives them their names only when it finishes ok, just before its
  results.json says ``ok``;
- one process writes a folder at a time (:func:`writing`: a lock on the folder; the second
  refuses in one line, naming the first);
- a folder holding files spon-exp does not write (someone else's results.json or config.yaml,
  any other file) is refused (:func:`guard_run_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import traceback
from collections.abc import Iterator
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


LOCK_FILE = ".spon-exp.lock"  # while a process writes the folder: who (the lock itself is on the folder)
#: names spon-exp (and its tools) write in a run folder; anything else there was put by someone else
OWN_NAMES = re.compile(r"""(results|metrics|env|config|error|alpha|eval_units|zeroshot_samples|export|wandb|trial)
                           (\.(partial|attempt-\d+|replaced))?(\.(json|jsonl|yaml|txt|safetensors|csv))?
                           |\.hydra(\.attempt-\d+|\.replaced)?|[^/]*\.log|hf_export|diagnostics|seed=.*
                           |\.spon-exp\.lock|\..*\.\d+\.[0-9a-f]+\.(tmp|old)""", re.VERBOSE)


def _written_by_spon_exp(results: dict | None) -> bool:
    return isinstance(results, dict) and "config_hash" in results and "spon_exp_version" in results


def guard_run_dir(run_dir: Path, chash: str) -> None:
    """Never write into a folder holding a finished run of a *different* config, or files
    spon-exp did not write (someone else's results.json or config.yaml, or any other file)."""
    previous = read_json(run_dir / RESULTS)
    if previous and previous.get("config_hash") not in (None, chash) and previous.get("status") == "ok":
        raise FileExistsError(
            f"{run_dir} already holds finished run {previous['config_hash']} of a different config; "
            f"choose another hydra.run.dir (or remove that folder)"
        )
    if not run_dir.is_dir():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if not OWN_NAMES.fullmatch(p.name))
    if (run_dir / RESULTS).exists() and not _written_by_spon_exp(previous):  # its config.yaml is not ours either
        foreign = [RESULTS, *([CONFIG_FILE] if (run_dir / CONFIG_FILE).exists() else []), *foreign]
    elif (run_dir / CONFIG_FILE).exists() and previous is None:
        foreign.insert(0, CONFIG_FILE)  # spon-exp writes results.json first
    if foreign:
        raise FileExistsError(f"{run_dir} holds {foreign[0]}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, "
                              f"which spon-exp did not write: choose another hydra.run.dir (or empty that folder)")


class RunFolderBusy(FileExistsError):
    """Another process is writing the run folder."""


@contextlib.contextmanager
def writing(run_dir: Path) -> Iterator[None]:
    """This process writes ``run_dir`` alone inside the block: a lock on the folder (released by
    the kernel when the process dies, even by kill -9); a second process refuses at once with
    :class:`RunFolderBusy`, naming the first (``.spon-exp.lock`` says who, while it writes)."""
    fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = read_json(run_dir / LOCK_FILE) or {}
            who = f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}" if holder else \
                "another process"
            raise RunFolderBusy(f"{run_dir} is being written by another spon-exp run ({who}): wait for it to end, or "
                                f"choose another hydra.run.dir") from None
        write_json_atomic(run_dir / LOCK_FILE, {"pid": os.getpid(), "host": socket.gethostname(),
                                                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        try:
            yield
        finally:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the lock


def attempt_number(run_dir: Path, chash: str) -> int | None:
    """None while the folder holds no finished run of this config; else the number of a new
    attempt beside it (one more than any attempt file or folder there)."""
    if not is_done(run_dir, chash):
        return None
    numbers = [int(m.group(1)) for p in run_dir.glob("*.attempt-*")
               if (m := re.fullmatch(r".*\.attempt-(\d+)(\.[a-z]+)?", p.name))]
    return max(numbers, default=0) + 1


#: what an attempt writes under its own name until it finishes ok (first attempt), or for good (beside a finished run)
ARTEFACTS = (ALPHA_FILE, UNITS_FILE, SAMPLES_FILE, EXPORT_DIR)


def results_file(run_dir: Path, attempt: int | None) -> Path:
    """The results of attempt ``attempt`` beside a finished run, or the run's results.json."""
    return Path(run_dir) / (RESULTS if attempt is None else f"results.attempt-{attempt}.json")


def _named(name: str, tag: str) -> str:
    """``alpha.safetensors`` -> ``alpha.<tag>.safetensors``; ``export`` -> ``export.<tag>``."""
    stem, dot, suffix = name.partition(".")
    return f"{stem}.{tag}{dot}{suffix}"


class Attempt:
    """Where one attempt records itself. The first one: results.json, metrics.jsonl, ``.hydra/``,
    env.json, config.yaml, and its artefacts (α, evaluation units, samples, export state) under
    ``*.partial*`` names until it finishes ok. Beside a finished run of this config, attempt
    ``N``: every one of these as ``*.attempt-<N>*``, for good; the finished run's files are
    never written (see the module docstring)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, chash: str):
        self.cfg, self.run_dir = cfg, run_dir
        self.number = attempt_number(run_dir, chash)
        self.keeps_finished_run = self.number is not None
        self.tag = "partial" if self.number is None else f"attempt-{self.number}"
        suffix = "" if self.number is None else f".attempt-{self.number}"
        self.results_file = results_file(run_dir, self.number)
        self.error_file = run_dir / f"error{suffix}.txt"
        self.metrics_file = run_dir / (METRICS if self.number is None else f"metrics{suffix}.jsonl")
        self.hydra_dir = run_dir / f"{HYDRA_DIR}{suffix}"
        self.tracker_dir = run_dir if self.number is None else run_dir / f"wandb{suffix}"  # W&B's own folder

    def path(self, name: str) -> Path:
        """Where this attempt writes the artefact ``name`` (one of :data:`ARTEFACTS`)."""
        return self.run_dir / _named(name, self.tag)

    def _record_run(self) -> None:  # the environment and config behind this attempt's results
        own = (lambda name: name) if self.number is None else (lambda name: _named(name, self.tag))
        write_json_atomic(self.run_dir / own(ENV), environment())
        write_text_atomic(self.run_dir / own(CONFIG_FILE), OmegaConf.to_yaml(self.cfg, resolve=True))

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

    def _restore_logs(self) -> None:
        for handler, path in getattr(self, "_logs", []):
            handler.acquire()
            try:
                handler.close()
                handler.baseFilename = str(path)
            finally:
                handler.release()

    def start(self, results: dict) -> None:
        results["attempt"] = self.number
        if self.keeps_finished_run:
            self._redirect_logs()
            log.info("%s holds a finished run of this config: this attempt writes beside it, as %s and the other "
                     "*.attempt-%d.* files; the finished run's files stay as they are", self.run_dir,
                     self.results_file.name, self.number)
        else:
            self.error_file.unlink(missing_ok=True)  # from an earlier, interrupted attempt
            for name in ARTEFACTS:  # an earlier, interrupted attempt's
                stale = self.path(name)
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        write_json_atomic(self.results_file, results)
        self._record_run()

    def failed(self) -> None:
        self.error_file.write_text(traceback.format_exc())

    def finish(self, results: dict, ok: bool) -> None:
        """Record how the attempt ended; a first attempt that finished ok gives its artefacts
        their names first, so that a results.json saying ``ok`` always has them beside it."""
        results["finished_at"] = datetime.now(timezone.utc).isoformat()
        if ok and not self.keeps_finished_run:
            for name in ARTEFACTS:
                staged, final = self.path(name), self.run_dir / name
                if staged.is_dir():
                    replace_folder(staged, final)
                elif staged.exists():
                    os.replace(staged, final)
        write_json_atomic(self.results_file, results)
        self._restore_logs()


def replace_folder(new: Path, target: Path) -> None:
    """``target`` replaced by ``new`` (two renames; the old one removed after)."""
    old = target.with_name(f"{target.name}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
