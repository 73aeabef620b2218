"""The ``spon-exp`` console script: the only module that imports Hydra's app machinery.

A user error (a bad value, a missing model or corpus, a folder holding another run) ends a
single run with one line, ``spon-exp: error: ...``, and exit code 2; ``--verbose`` (or
``SPON_EXP_VERBOSE=1``, or Hydra's ``HYDRA_FULL_ERROR=1``) adds its traceback. Any other
exception is a bug and keeps its traceback. Ctrl-C ends with one line saying where the run
stopped and that re-running the command resumes it, and exit code 130; SIGTERM (``kill``, or
SLURM before a time limit) the same way with exit code 143: while it runs, this command handles
SIGTERM (``spon_exp/interrupts.py``). results.json then says ``interrupted`` and where.

Exit codes: 0 done, 1 a bug (a traceback), 2 a user error (one line), 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, OverrideParseException, SearchPathException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from spon_exp.config import ConfigError, register_configs, resolve_aliases
from spon_exp.interrupts import SIGTERM_EXIT, Terminated, sigterm_as_interrupt, terminated
from spon_exp.sweeping.study import StudyError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
VERBOSE_FLAG = "--verbose"  # taken out of sys.argv before Hydra parses it
VERBOSE_ENV = "SPON_EXP_VERBOSE"  # how the flag reaches launched jobs (and can be set directly)
log = logging.getLogger("spon_exp")

register_configs()


def _verbose() -> bool:
    """``--verbose`` / ``SPON_EXP_VERBOSE=1``, or the user's own ``HYDRA_FULL_ERROR=1`` (which
    :func:`main` turns into ``SPON_EXP_VERBOSE=1`` before setting ``HYDRA_FULL_ERROR`` itself)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _save_hydra_files(cfg: DictConfig, folder: Path) -> None:
    """What Hydra writes to ``.hydra/`` (``hydra.output_subdir`` is null in conf/config.yaml so
    that Hydra itself writes nothing before the folder guard has accepted the run), into the
    folder the run gives (``.hydra.attempt-<N>/`` beside a finished run's)."""
    hydra_cfg = HydraConfig.get()
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")


def _main(cfg: DictConfig) -> dict | float | None:
    from spon_exp.assets import AssetError
    from spon_exp.data.corpora import CorpusError
    from spon_exp.hostmem import applies_to_run, keep_freed_memory
    from spon_exp.models.loading import ModelNotFoundError
    from spon_exp.runner import run
    from spon_exp.tracking.disk import as_disk_full
    from spon_exp.tracking.files import RESULTS, read_json
    from spon_exp.tracking.identity import config_hash
    from spon_exp.tracking.run_folder import guard_run_dir, is_done, results_file
    from spon_exp.tracking.summary import summary_table

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.search.seeds:  # a recipe-search trial: the sweeper (Optuna) gets its objective
        return _trial(cfg, run_dir)
    try:  # sparsifier.sparsity=0.4 is sparsity=0.4: one name for one run
        resolve_aliases(cfg, explicit_sparsity=_explicit_sparsity())
    except ConfigError as e:
        return _user_error(e, run_dir)
    if cfg.skip_if_done and is_done(run_dir, config_hash(cfg)):  # said, not logged: the run's log stays as it is
        print(f"spon-exp: {run_dir} holds a finished run of this config: skipped (results: {run_dir / RESULTS}); "
              f"skip_if_done=false runs it again beside it, as attempt N")
        return read_json(run_dir / RESULTS)
    try:
        guard_run_dir(run_dir, config_hash(cfg))  # before .hydra/ is written: a refused config changes nothing
        if applies_to_run(cfg.model.device, cfg.model.device_map, cfg.malloc_tuning):
            keep_freed_memory()  # CPU runs only: temporaries reuse warm pages (spon_exp/hostmem.py)
        results = run(cfg, run_dir, hydra_files=lambda folder: _save_hydra_files(cfg, folder))
    except (ConfigError, ModelNotFoundError, CorpusError, FileExistsError, AssetError) as e:
        return _user_error(e, run_dir)
    except KeyboardInterrupt as e:  # results.json records where; the message says how to resume
        if _verbose():
            traceback.print_exc()
        print(f"spon-exp: {_one_line(e) if str(e) else 'interrupted'}", file=sys.stderr)
        sys.exit(SIGTERM_EXIT if terminated(e) else 130)
    except Exception as e:
        full = as_disk_full(e, run_dir)  # a full disk or quota: one line naming the folder, as a user error
        if full is None:
            raise
        return _user_error(full, run_dir)
    print(summary_table(results))
    print(f"results: {results_file(run_dir, results.get('attempt'))}")
    return results


#: Jobs of this process's sweep that ended in a user error (the sweep exits 2 after the others ran)
FAILED_JOBS: list[str] = []


def _user_error(e: BaseException, run_dir: Path) -> None:
    """A user error: one line, no traceback (``--verbose`` adds it; results.json records the
    run as failed). A single run exits 2; a sweep job's line names its folder and the sweep
    goes on, then exits 2 (:func:`main`). Jobs of other processes (submitit) fail as jobs."""
    if _verbose():
        traceback.print_exc()
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        print(f"spon-exp: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    if not _in_launching_process():
        raise e  # a submitit job: its launcher records the failure
    print(f"spon-exp: error: {run_dir.name}: {_one_line(e)}", file=sys.stderr)
    FAILED_JOBS.append(str(run_dir))
    return None


def _in_launching_process() -> bool:
    """Whether this job runs inside the ``spon-exp --multirun`` process (Hydra's basic launcher)."""
    return os.getpid() == _MAIN_PID


_MAIN_PID = os.getpid()


def _explicit_sparsity() -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == "sparsity" for o in HydraConfig.get().overrides.task)


def _trial(cfg: DictConfig, trial_dir: Path) -> float | None:
    """One trial of a recipe search: validated once, then every seed run (:func:`spon_exp.sweeping.trial.run_trial`).
    A trial that fails on a user error (or a seed whose run fails) returns None and its
    trial.json says why; the sweep's loop (spon_exp/sweeping) prints one line and tells Optuna."""
    from spon_exp.assets import AssetError
    from spon_exp.config import validate
    from spon_exp.data.corpora import CorpusError
    from spon_exp.models.loading import ModelNotFoundError
    from spon_exp.sweeping.study import record_trial_failure
    from spon_exp.sweeping.trial import TrialFailed, run_trial
    from spon_exp.tracking.disk import DiskFullError

    overrides = list(HydraConfig.get().overrides.task)
    try:
        resolve_aliases(cfg, explicit_sparsity=_explicit_sparsity())
        validate(cfg)  # a bad config fails the trial before any seed runs
        return run_trial(cfg, trial_dir, overrides=overrides)
    except TrialFailed:
        return None  # its trial.json says why
    except (ConfigError, ModelNotFoundError, CorpusError, FileExistsError, AssetError, DiskFullError) as e:
        if _verbose():
            traceback.print_exc()
        record_trial_failure(trial_dir, _one_line(e), overrides)
        return None


class Preflight(Callback):
    """Before Hydra creates the run or sweep folder: every folder spon-exp will write into
    (the run / sweep folder, ``paths.outputs``, ``paths.cache``, ``$SPON_EXP_CACHE``) must be
    a writable folder, else one line and exit 2 (Hydra would fail on it with a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, ("hydra.run.dir", config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config, ("hydra.sweep.dir", config.hydra.sweep.dir))

    @staticmethod
    def _check(config: DictConfig, where: tuple[str, str]) -> None:
        from spon_exp.assets import folder_problem

        folders = [("paths.outputs", config.paths.outputs), where, ("paths.cache", config.paths.cache)]
        cache = os.environ.get("SPON_EXP_CACHE")
        if cache:
            folders.append(("$SPON_EXP_CACHE", cache))
        for key, folder in folders:
            problem = folder_problem(Path(str(folder)))
            if problem:
                fix = "point SPON_EXP_CACHE at a writable folder (or unset it)" if key.startswith("$") else \
                    f"choose a writable folder: {key}=<folder>" + (" (or $SPON_EXP_OUTPUTS)" if key == "paths.outputs" else "")
                print(f"spon-exp: error: {key}={folder} {problem}; {fix}", file=sys.stderr)
                sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> dict | float | None:
    return _main(cfg)


def _override_problem(arg: str) -> str | None:
    """What Hydra would reject in one ``key=value`` override with an error that does not say
    how to fix it: a config group option that does not exist (Hydra's list of choices also
    shows internal schema entries), or non-ASCII characters outside quotes (a lexer error)."""
    if arg.startswith("-") or "=" not in arg:
        return None
    key, value = arg.split("=", 1)
    key = key.lstrip("+~")
    if any(ord(c) > 127 for c in value) and not (value[:1] in "'\"" and value[-1:] == value[:1] and len(value) > 1):
        return (f"the value of {key} holds non-ASCII characters, which Hydra reads only inside quotes: write "
                f"{key}='{value}' (in a shell: \"{key}='{value}'\")")
    group = Path(CONFIG_DIR) / key
    if "/" in key or "." in key or not group.is_dir() or "(" in value or "$" in value:
        return None
    options = sorted(p.stem for p in group.glob("*.yaml"))
    unknown = [v for v in value.strip("[]").split(",") if v and v != "null" and v not in options]
    if unknown:
        return f"{key}={unknown[0]} is not a {key} config; choose one of: {', '.join(options)}"
    return None


@contextlib.contextmanager
def _hydra_errors_raised():
    """Hydra prints its own errors (a compose error in five lines, exit 1) unless
    ``HYDRA_FULL_ERROR=1``; set for the call, it raises them, and :func:`main` says a compose
    error in one line. The user's own ``HYDRA_FULL_ERROR=1`` means verbose (the full output)."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    if previous not in (None, "", "0"):
        os.environ[VERBOSE_ENV] = "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


_TYPE_WORDS = {"Float": "a number", "Integer": "a whole number", "Boolean": "true or false"}


def compose_error_line(e: Exception) -> str:
    """One line for a Hydra compose error (a wrong type, an unknown key, a bad override),
    without Hydra's ``full_key`` / ``object_type`` detail lines."""
    lines = [line.strip() for part in (str(e), str(e.__cause__ or "")) for line in part.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("full_key:", "object_type=", "reference_type=",
                                                                     "To append to your config use"))]
    merging = re.fullmatch(r"Error merging override (\S+)", lines[0]) if lines else None
    if merging:
        override = merging.group(1)
        key = override.split("=", 1)[0].lstrip("+~")
        wrong = next((re.search(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", line)
                      for line in lines[1:] if "could not be converted" in line), None)
        if wrong:
            return f"{override}: {key} must be {_TYPE_WORDS.get(wrong.group(2), wrong.group(2))}, got '{wrong.group(1)}'"
        return f"{override}: {'; '.join(lines[1:])}"
    unknown = re.fullmatch(r"Could not override '(\S+)'\.", lines[0]) if lines else None
    if unknown:
        return (f"there is no config key {unknown.group(1)}: check its spelling (`spon-exp --cfg job` prints every "
                f"key and its value)")
    override = getattr(e, "override", None)  # OverrideParseException: the override it could not parse
    return (f"{override}: " if override and override not in lines[0] else "") + ("; ".join(lines) or type(e).__name__)


def main() -> None:
    """``spon-exp [--verbose] [--multirun] key=value ...``: Hydra parses everything but ``--verbose``."""
    if VERBOSE_FLAG in sys.argv[1:]:
        sys.argv = [sys.argv[0], *(a for a in sys.argv[1:] if a != VERBOSE_FLAG)]
        os.environ[VERBOSE_ENV] = "1"
    for arg in sys.argv[1:]:  # before Hydra: its own errors for these do not say what to do
        problem = _override_problem(arg)
        if problem:
            print(f"spon-exp: error: {problem}", file=sys.stderr)
            sys.exit(2)  # a compose error: a user error
    try:
        with _hydra_errors_raised(), sigterm_as_interrupt():
            _hydra_main()
    except KeyboardInterrupt as e:  # while composing or launching, or a sweep's in-process run (its message)
        said = _one_line(e) if str(e) and not isinstance(e, Terminated) else "interrupted"
        print(f"spon-exp: {'SIGTERM: ' if terminated(e) and not said.startswith('SIGTERM') else ''}{said}",
              file=sys.stderr)
        sys.exit(SIGTERM_EXIT if terminated(e) else 130)
    except (ConfigCompositionException, OverrideParseException, SearchPathException) as e:
        if _verbose():
            raise
        print(f"spon-exp: error: {compose_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except StudyError as e:  # the recipe search's study (spon_exp/sweeping): its storage, or no trial completed
        if _verbose():
            raise
        print(f"spon-exp: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    if FAILED_JOBS:
        print(f"spon-exp: error: {len(FAILED_JOBS)} job(s) of the sweep failed (one line each above; their "
              f"results.json says why); fix them and re-launch: finished jobs are skipped", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
