"""The recipe search's loop: ask Optuna for a batch of recipes, launch them, tell the results.

It reads the settings of hydra-optuna-sweeper's sweeper (``hydra.sweeper.*``: ``params`` in its
search-space syntax -- ``choice``, ``range``, ``interval``, ``tag(log, ...)`` -- ``direction``,
``storage``, ``study_name``, ``n_trials``, ``n_jobs``, ``max_failure_rate``, ``sampler``) and maps
the search space to Optuna's distributions as that plugin does, so a study it started goes on
here. What happens around each trial is in :mod:`.study`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

from spon_exp.sweeping.study import (LAUNCH_ATTR, LaunchLock, StudyError, check_storage, lock_file,
                                     fail_abandoned_trials, objective_of, open_study, record_trial_failure,
                                     say_failed, shown, this_launch, trial_error, write_summary)

log = logging.getLogger(__name__)


def _distribution(override):
    """The Optuna distribution of one sweep override (hydra-optuna-sweeper's mapping)."""
    from hydra.core.override_parser.types import Transformer
    from optuna import distributions as d

    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return d.CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            return d.DiscreteUniformDistribution(value.start, value.stop, value.step)
        return d.IntUniformDistribution(int(value.start), int(value.stop), step=int(value.step))
    if override.is_interval_sweep():
        ints = isinstance(value.start, int) and isinstance(value.end, int)
        if "log" in value.tags:
            return d.IntLogUniformDistribution(value.start, value.end) if ints else \
                d.LogUniformDistribution(value.start, value.end)
        return d.IntUniformDistribution(value.start, value.end) if ints else d.UniformDistribution(value.start, value.end)
    raise StudyError(f"{override.input_line}: Optuna samples choice(...), range(...) and interval(...) sweeps only")


def search_space(params, arguments: Sequence[str]) -> tuple[dict, dict]:
    """``(distributions, fixed values)`` of ``hydra.sweeper.params`` and the command line's
    overrides (a swept one is searched, a plain one is passed to every trial)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    distributions, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(lines):
        name = override.get_key_element()
        if override.is_sweep_override():
            distributions[name] = _distribution(override)
            fixed.pop(name, None)
        else:
            fixed[name] = override.get_value_element_as_str()
            distributions.pop(name, None)
    return distributions, fixed


def _directions(direction) -> list[str]:
    """``hydra.sweeper.direction``: a name, a ``Direction``, or a list of them (several objectives)."""
    items = [direction] if isinstance(direction, str) or hasattr(direction, "name") else list(direction)
    return [getattr(d, "name", d) for d in items]


def run_study(sweeper, arguments: Sequence[str]) -> None:
    """The sweep of ``sweeper`` (hydra-optuna-sweeper's ``OptunaSweeperImpl``, set up by Hydra)."""
    if sweeper.search_space is not None:
        raise StudyError("hydra.sweeper.search_space is not supported here; give the search space as "
                         "hydra.sweeper.params (Hydra's override syntax)")
    if isinstance(sweeper.sampler, functools.partial):  # GridSampler, built from the search space upstream
        raise StudyError("a GridSampler is not supported by this sweeper; use hydra.sweeper.sampler=tpe (or random), "
                         "or a plain --multirun sweep for a grid")
    sweep_dir = Path(str(sweeper.config.hydra.sweep.dir))
    check_storage(sweeper.storage, sweep_dir)
    directions = _directions(sweeper.direction)
    distributions, fixed = search_space(sweeper.params, arguments)
    with LaunchLock(lock_file(sweeper.storage, sweep_dir)) as lock:
        study = open_study(sweeper.study_name, sweeper.storage, sweeper.sampler, directions)
        for trial in fail_abandoned_trials(study, lock.alone):  # its fixed values are its user attributes
            given = {k: v for k, v in trial.user_attrs.items() if k != LAUNCH_ATTR}
            _record(sweeper, trial.params, given, "its launch ended (killed?) before the trial finished")
        lock.share()
        log.info("Study %s in %s (%d trials so far): %d more, %d at a time", study.study_name,
                 "memory" if sweeper.storage is None else shown(sweeper.storage), len(study.trials), sweeper.n_trials,
                 sweeper.n_jobs)
        todo = sweeper.n_trials
        while todo > 0:
            size = min(todo, sweeper.n_jobs)
            _batch(sweeper, study, [study.ask(distributions) for _ in range(size)], fixed, len(directions))
            todo -= size
    import optuna

    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise StudyError(f"no trial of the study completed; each trial folder's trial.json under {sweep_dir} says why: "
                         f"fix that and re-launch (the study continues)")
    write_summary(study, sweep_dir, directions)


def _overrides(params: dict, fixed: dict) -> tuple[str, ...]:
    return tuple(f"{k}={v}" for k, v in {**params, **fixed}.items())


def _record(sweeper, params: dict, fixed: dict, why: str) -> Path | None:
    """The trial folder's trial.json says why it failed; returns the folder."""
    from spon_exp.sweeping.launchers import job_folder

    overrides = _overrides(params, fixed)
    try:
        folder = job_folder(sweeper.launcher, overrides)
    except Exception:  # noqa: BLE001 - a recipe that no longer composes: no folder to write into
        return None
    record_trial_failure(folder, trial_error(folder) or why, overrides)
    return folder


def _batch(sweeper, study, trials: list, fixed: dict, objectives: int) -> None:
    """Launch one batch of trials and tell Optuna how each ended."""
    import optuna

    launch = this_launch()
    overrides = []
    for trial in trials:
        trial.set_user_attr(LAUNCH_ATTR, launch)
        for name, value in fixed.items():  # as hydra-optuna-sweeper records them
            trial.set_user_attr(name, value)
        if sweeper.custom_search_space_extender:
            sweeper.custom_search_space_extender(sweeper.config, trial)
        overrides.append(_overrides(trial.params, fixed))
    try:
        returns = list(sweeper.launcher.launch(overrides, initial_job_idx=sweeper.job_idx))
    except BaseException as e:  # the launch itself failed or was interrupted: the batch's trials did not finish
        why = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
        for trial in trials:
            _record(sweeper, trial.params, fixed, why)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if isinstance(e, Exception):
            raise StudyError(f"launching trials {[t.number for t in trials]} failed ({why}); they are recorded as "
                             f"failed: re-launch to continue the study") from e
        raise
    sweeper.job_idx += len(returns)
    failures = 0
    for trial, ret in zip(trials, returns if len(returns) == len(trials) else [None] * len(trials)):
        values, why, exception = objective_of(ret) if ret is not None else (None, "it was not launched", None)
        if values is not None and len(values) == objectives:
            study.tell(trial, values)
            continue
        folder = _record(sweeper, trial.params, fixed, why or "it returned the wrong number of objectives")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        failures += 1
        say_failed(trial.number, folder, trial_error(folder) if folder else why, exception)
    if failures / len(trials) > sweeper.max_failure_rate:
        raise StudyError(f"{failures} of the {len(trials)} trials of the batch failed, more than "
                         f"hydra.sweeper.max_failure_rate={sweeper.max_failure_rate}: the sweep stops (their "
                         f"trial.json say why; re-launching continues the study)")
