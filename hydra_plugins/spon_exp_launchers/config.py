"""Configs of the launchers in this package: each is the plugin's own dataclass with only what
differs stated, stored in Hydra's ConfigStore (group ``hydra/launcher``). Hydra's plugin scan
imports this module.

No ``from __future__ import annotations`` here: the scan executes the module before it is in
``sys.modules``, where ``dataclass`` cannot resolve string annotations.
"""

from dataclasses import dataclass

# Hydra has no public name for its basic launcher's config (nor for the launcher: see __init__.py)
from hydra._internal.core_plugins.basic_launcher import BasicLauncherConf
from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf


@dataclass
class SkipFinishedBasicLauncherConf(BasicLauncherConf):
    _target_: str = "hydra_plugins.spon_exp_launchers.SkipFinishedBasicLauncher"


@dataclass
class SkipFinishedSubmititLocalConf(LocalQueueConf):
    _target_: str = "hydra_plugins.spon_exp_launchers.SkipFinishedSubmititLocalLauncher"


@dataclass
class SkipFinishedSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.spon_exp_launchers.SkipFinishedSlurmLauncher"
    max_num_timeout: int = 3  # requeues after a time limit or preemption (plugin: 0): alpha training resumes


cs = ConfigStore.instance()
cs.store(group="hydra/launcher", name="spon_basic", node=SkipFinishedBasicLauncherConf, provider="spon_exp")
cs.store(group="hydra/launcher", name="spon_submitit_local", node=SkipFinishedSubmititLocalConf, provider="spon_exp")
cs.store(group="hydra/launcher", name="spon_submitit_slurm", node=SkipFinishedSlurmConf, provider="spon_exp")
