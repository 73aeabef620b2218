"""Hydra launchers that skip finished runs (Hydra only loads plugins from ``hydra_plugins``).

A re-launched sweep must not redo work: before submitting, each job's config is composed,
its run folder located, and the job dropped when that folder's ``results.json`` says
``ok`` for the same config hash. Failed or missing runs are launched again.

Their configs (``config.py``) are the plugins' dataclasses with ``_target_`` (and what else
differs) changed, stored in Hydra's ConfigStore as ``hydra/launcher=spon_basic``,
``spon_submitit_local`` and ``spon_submitit_slurm``. ``conf/hydra/launcher/submitit_{local,
slurm}.yaml`` only select them under the plugin's own names (a config file shadows a
ConfigStore entry of the same name, so ``hydra/launcher=submitit_slurm`` skips finished runs
too); ``conf/launcher/*.yaml`` set the cluster's parameters.

The recipe search's sweeper (``sweeps/tune_spon_cpu.yaml`` sets ``hydra.sweeper._target_``) is
hydra-optuna-sweeper's, except that a study in which no trial completed ends in one line and exit 2 (each
trial's ``trial.json`` says why) instead of the plugin's traceback from ``study.best_trial``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from omegaconf import open_dict

log = logging.getLogger(__name__)


def _finished(launcher: Launcher, overrides: Sequence[str]) -> bool:
    from spon_exp.tracking.run_folder import is_done
    from spon_exp.tracking.identity import config_hash

    previous = HydraConfig.instance().cfg
    try:
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        HydraConfig.instance().set_config(cfg)
        run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        task_cfg = cfg.copy()
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        return is_done(run_dir, config_hash(task_cfg))
    finally:
        if previous is not None:
            HydraConfig.instance().set_config(previous)


class SkipFinishedMixin:
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        todo = [o for o in job_overrides if not _finished(self, o)]  # type: ignore[arg-type]
        skipped = len(job_overrides) - len(todo)
        if skipped:
            log.info("Skipping %d of %d runs: their results.json says ok for the same config", skipped,
                     len(job_overrides))
        if not todo:
            return []
        return super().launch(todo, initial_job_idx)  # type: ignore[misc]


from hydra._internal.core_plugins.basic_launcher import BasicLauncher  # noqa: E402
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher  # noqa: E402


class SkipFinishedBasicLauncher(SkipFinishedMixin, BasicLauncher):
    pass


class SkipFinishedSlurmLauncher(SkipFinishedMixin, SlurmLauncher):
    pass


class SkipFinishedSubmititLocalLauncher(SkipFinishedMixin, LocalLauncher):
    pass



from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper  # noqa: E402


class SponOptunaSweeper(OptunaSweeper):
    def sweep(self, arguments: list[str]) -> None:
        storage = str(self.sweeper.storage or "")
        if storage.startswith("sqlite:///"):  # the study's folder (the ${spon_sqlite:} resolver creates nothing)
            Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        try:
            return super().sweep(arguments)
        except ValueError:  # the plugin's closing report asks the study for its best trial
            if self._completed_trials():
                raise
            sweep_dir = self.sweeper.config.hydra.sweep.dir  # the full config: sweep.dir names paths.outputs
            print(f"spon-exp: error: no trial of the study completed; each trial folder's trial.json under {sweep_dir} "
                  f"says why: fix that and re-launch (the study continues)", file=sys.stderr)
            raise SystemExit(2) from None

    def _completed_trials(self) -> int:
        import optuna

        impl = self.sweeper
        try:
            study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
        except Exception:  # noqa: BLE001 - no study to ask: let the original error through
            return 1
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
