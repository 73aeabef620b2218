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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from omegaconf import open_dict

log = logging.getLogger(__name__)


def _finished(launcher: Launcher, overrides: Sequence[str]) -> bool:
    from spon_exp.runner import is_done
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

