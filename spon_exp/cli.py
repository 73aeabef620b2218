"""The ``spon-exp`` console script: the only module that imports Hydra's app machinery.

A user error (a bad value, a missing model or corpus, a folder holding another run) ends a
single run with one line, ``spon-exp: error: ...``, and exit code 2; ``--verbose`` (or
``SPON_EXP_VERBOSE=1``, or Hydra's ``HYDRA_FULL_ERROR=1``) adds its traceback. Any other
exception is a bug and keeps its traceback. Ctrl-C ends with one line saying where the run
stopped and that re-running the command resumes it, and exit code 130.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from spon_exp.config import ConfigError, register_configs, resolve_aliases

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
VERBOSE_FLAG = "--verbose"  # taken out of sys.argv before Hydra parses it
VERBOSE_ENV = "SPON_EXP_VERBOSE"  # how the flag reaches launched jobs (and can be set directly)
log = logging.getLogger("spon_exp")

register_configs()


def _verbose() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in (VERBOSE_ENV, "HYDRA_FULL_ERROR"))


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
    from spon_exp.data.corpora import CorpusError
    from spon_exp.hostmem import applies_to_run, keep_freed_memory
    from spon_exp.models.loading import ModelNotFoundError
    from spon_exp.runner import run
    from spon_exp.tracking.files import RESULTS, read_json
    from spon_exp.tracking.identity import config_hash
    from spon_exp.tracking.run_folder import guard_run_dir, is_done
    from spon_exp.tracking.summary import summary_table

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:  # sparsifier.sparsity=0.4 is sparsity=0.4: one name for one run
        resolve_aliases(cfg, explicit_sparsity=any(o.split("=", 1)[0].lstrip("+~") == "sparsity"
                                                   for o in HydraConfig.get().overrides.task))
    except ConfigError as e:
        return _user_error(e, run_dir)
    if cfg.search.seeds:  # a recipe-search trial: the sweeper (Optuna) gets its objective
        return _trial(cfg, run_dir)
    if cfg.skip_if_done and is_done(run_dir, config_hash(cfg)):
        log.info("Skipping %s: results.json there says ok for this config", run_dir)
        return read_json(run_dir / RESULTS)
    try:
        guard_run_dir(run_dir, config_hash(cfg))  # before .hydra/ is written: a refused config changes nothing
        if applies_to_run(cfg.model.device, cfg.model.device_map, cfg.malloc_tuning):
            keep_freed_memory()  # CPU runs only: temporaries reuse warm pages (spon_exp/hostmem.py)
        results = run(cfg, run_dir, hydra_files=lambda folder: _save_hydra_files(cfg, folder))
    except (ConfigError, ModelNotFoundError, CorpusError, FileExistsError) as e:
        return _user_error(e, run_dir)
    except KeyboardInterrupt as e:  # results.json records where; the message says how to resume
        if _verbose():
            traceback.print_exc()
        print(f"spon-exp: {_one_line(e) if str(e) else 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    print(summary_table(results))
    print(f"results: {run_dir / RESULTS}")
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


def _trial(cfg: DictConfig, trial_dir: Path) -> float:
    """One trial of a recipe search: validated once, then every seed run (:func:`spon_exp.sweeping.trial.run_trial`)."""
    from spon_exp.config import validate
    from spon_exp.sweeping.trial import run_trial

    validate(cfg)  # a bad config fails the trial before any seed runs
    return run_trial(cfg, trial_dir, overrides=list(HydraConfig.get().overrides.task))


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


def main() -> None:
    """``spon-exp [--verbose] [--multirun] key=value ...``: Hydra parses everything but ``--verbose``."""
    if VERBOSE_FLAG in sys.argv[1:]:
        sys.argv = [sys.argv[0], *(a for a in sys.argv[1:] if a != VERBOSE_FLAG)]
        os.environ[VERBOSE_ENV] = "1"
    for arg in sys.argv[1:]:  # before Hydra: its own errors for these do not say what to do
        problem = _override_problem(arg)
        if problem:
            print(f"spon-exp: error: {problem}", file=sys.stderr)
            sys.exit(1)  # a compose error, as Hydra's own
    try:
        _hydra_main()
    except KeyboardInterrupt:  # while composing or launching, outside any run
        print("spon-exp: interrupted", file=sys.stderr)
        sys.exit(130)
    if FAILED_JOBS:
        print(f"spon-exp: error: {len(FAILED_JOBS)} job(s) of the sweep failed (one line each above; their "
              f"results.json says why); fix them and re-launch: finished jobs are skipped", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
