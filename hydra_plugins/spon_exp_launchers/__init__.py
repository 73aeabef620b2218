"""spon-exp's Hydra plugins (Hydra finds plugins only under ``hydra_plugins``); their logic is
in ``spon_exp/sweeping``.

- Launchers that skip finished runs (:mod:`spon_exp.sweeping.launchers`): Hydra's basic
  launcher and submitit's local and SLURM launchers behind :class:`SkipFinishedMixin`. Their
  configs (``config.py``) are the plugins' own dataclasses with ``_target_`` (and what else
  differs) changed, stored as ``hydra/launcher=spon_basic``, ``spon_submitit_local`` and
  ``spon_submitit_slurm``; ``conf/hydra/launcher/submitit_{local,slurm}.yaml`` select them under
  the plugin's own names, and ``conf/launcher/*.yaml`` set the cluster's parameters.
- The recipe search's sweeper (``sweeps/tune_spon_cpu.yaml`` sets ``hydra.sweeper._target_``):
  hydra-optuna-sweeper's settings, run by :func:`spon_exp.sweeping.search.run_study`.

Hydra exposes its basic launcher only as ``hydra._internal.core_plugins.basic_launcher``; there
is no public class to put the skip in front of (``hydra.plugins.launcher.Launcher`` is the bare
interface), so that import stays. Modules here import nothing heavy: Hydra imports them when it
scans for plugins, at every start.
"""

from __future__ import annotations

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from spon_exp.sweeping.launchers import SkipFinishedMixin


class SkipFinishedBasicLauncher(SkipFinishedMixin, BasicLauncher):
    pass


class SkipFinishedSlurmLauncher(SkipFinishedMixin, SlurmLauncher):
    pass


class SkipFinishedSubmititLocalLauncher(SkipFinishedMixin, LocalLauncher):
    pass


class SponOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's settings and search-space syntax, spon-exp's loop around them."""

    def sweep(self, arguments: list[str]) -> None:
        from spon_exp.sweeping.search import run_study

        run_study(self.sweeper, arguments)
