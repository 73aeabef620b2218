"""The pruning methods by config name (``pruner=<name>``), their Hydra schemas and the config
checks. ``pruner=none`` (the default) prunes nothing and leaves a run exactly as it was."""

from __future__ import annotations

import dataclasses
import typing

from spon_exp.pruning.base import CalibrationOptions, Pruner
from spon_exp.pruning.sparsegpt import SparseGPT
from spon_exp.pruning.wanda import Wanda

NONE = "none"
#: config name -> class
PRUNERS: dict[str, type[Pruner]] = {"wanda": Wanda, "sparsegpt": SparseGPT}


def pruner_options(node) -> dict:
    """The method's options of a ``pruner`` config node (everything but ``name``)."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    return {k: v for k, v in plain.items() if k != "name"}


def build_pruner(name: str, sparsity: float, **options) -> Pruner:
    if name not in PRUNERS:
        raise ValueError(f"Unknown pruner {name!r}; choose from {[NONE, *sorted(PRUNERS)]}")
    return PRUNERS[name](sparsity, **options)


def pruner_name(cfg) -> str:
    """``cfg.pruner.name``; ``none`` for a config without a ``pruner`` node (written before it existed)."""
    node = cfg.get("pruner") if hasattr(cfg, "get") else None
    return (node.get("name") if node is not None else None) or NONE


def pruner_of(cfg) -> Pruner | None:
    """The run's pruning method, or None for ``pruner=none``."""
    name = pruner_name(cfg)
    return None if name == NONE else build_pruner(name, cfg.sparsity, **pruner_options(cfg.pruner))


def check_pruner(cfg) -> None:
    """One clear ValueError for a pruner config that cannot work (checked before any model loads)."""
    from spon_exp.sparsifiers import REGISTRY

    name = pruner_name(cfg)
    if name == NONE:
        return
    pruner = pruner_of(cfg)  # options and N:M against the sparsity
    if REGISTRY[cfg.sparsifier.name].sparsifies:
        raise ValueError(f"weight pruning is compared with activation sparsity side by side, not stacked on it: "
                         f"use sparsifier=dense with it (conf/pruner/{name}.yaml sets it), or pruner=none for "
                         f"sparsifier={cfg.sparsifier.name}")
    if cfg.spon.count > 0:
        raise ValueError(f"spon.count={cfg.spon.count}: SPON trains against the same model with its sparsity "
                         f"switched off, which a pruned model ({pruner.label}) does not have; use spon.count=0 "
                         f"(conf/pruner/{name}.yaml sets it)")


#: config name -> schema class, made once (an attribute of this module: a pickled config names it)
_SCHEMAS: dict[str, type] = {}


def _schema(name: str, options: type) -> type:
    class_name = ("None" if name == NONE else PRUNERS[name].__name__) + "PrunerConfig"
    if name in _SCHEMAS:
        return _SCHEMAS[name]
    types = typing.get_type_hints(options)
    schema = dataclasses.make_dataclass(
        class_name, [("name", str, dataclasses.field(default=name))]
        + [(f.name, types[f.name], dataclasses.field(default=f.default)) for f in dataclasses.fields(options)])
    schema.__module__ = __name__
    globals()[class_name] = schema
    _SCHEMAS[name] = schema
    return schema


def pruner_schemas() -> dict[str, type]:
    """``<name>_schema`` -> schema for ``pruner=none`` and every method: ``name`` then the fields
    of its ``Options`` (``none`` keeps the calibration fields, so a sweep sets them for all points)."""
    return {f"{NONE}_schema": _schema(NONE, CalibrationOptions),
            **{f"{name}_schema": _schema(name, cls.Options) for name, cls in sorted(PRUNERS.items())}}


pruner_schemas()  # importable from here (NonePrunerConfig, WandaPrunerConfig, SparseGPTPrunerConfig)
