"""Launchers that skip finished runs: a re-launched sweep must not redo work.

Before submitting, each job's config is composed, its run folder located, and the job dropped
when that folder's ``results.json`` says ``ok`` for the same config hash. Failed or missing
runs are launched again. ``hydra_plugins/spon_exp_launchers`` puts :class:`SkipFinishedMixin`
in front of Hydra's basic launcher and submitit's local and SLURM launchers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@contextlib.contextmanager
def hydra_config_of(cfg: DictConfig) -> Iterator[None]:
    """``cfg`` as Hydra's current config inside the block. The ``${hydra:...}`` resolver (a
    sweep's ``subdir`` is built with it) reads Hydra's one global config and no public API
    resolves against another, so a job's config is made the global one while its folder is
    read, and the launch's config put back after, as Hydra's own ``run_job`` does per job."""
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        yield
    finally:
        if previous is not None:
            HydraConfig.instance().set_config(previous)


def job_config(launcher: Launcher, overrides: Sequence[str]) -> DictConfig:
    """The full config (``hydra`` node included) of the job that ``overrides`` launch."""
    return launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))


def job_folder(launcher: Launcher, overrides: Sequence[str]) -> Path:
    """The run folder of the job that ``overrides`` launch (``hydra.sweep.dir``/``subdir``)."""
    cfg = job_config(launcher, overrides)
    with hydra_config_of(cfg):
        return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)


def finished(launcher: Launcher, overrides: Sequence[str]) -> bool:
    """Whether the job's run folder holds an ``ok`` results.json of the same config."""
    from spon_exp.tracking.run_folder import is_done
    from spon_exp.tracking.identity import config_hash

    cfg = job_config(launcher, overrides)
    with hydra_config_of(cfg):
        run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        task_cfg = cfg.copy()
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        return is_done(run_dir, config_hash(task_cfg))


class SkipFinishedMixin:
    """In front of a Hydra launcher: jobs whose run finished ok are not launched again."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        todo = [o for o in job_overrides if not finished(self, o)]  # type: ignore[arg-type]
        skipped = len(job_overrides) - len(todo)
        if skipped:
            log.info("Skipping %d of %d runs: their results.json says ok for the same config", skipped,
                     len(job_overrides))
        if not todo:
            return []
        return super().launch(todo, initial_job_idx)  # type: ignore[misc]
