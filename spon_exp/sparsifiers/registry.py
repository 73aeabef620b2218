"""The sparsifier registry: every method, by its config name.

A method registers itself where it is defined, with the class decorator :func:`register`::

    @register
    class RandomChannelsSparsifier(Sparsifier):
        name = "random_channels"
        Options = RandomChannelsOptions

Every module of this package is imported when the package is (:func:`_import_methods`, at the
end of this file), so a method in a new ``spon_exp/sparsifiers/<module>.py`` is registered
without being named anywhere else. A method defined outside the package (a notebook, a test,
a plugin) is registered once its module has been imported.

Everything that is per method derives from the registry: ``build_sparsifier``, the Hydra
schema ``<name>_schema`` of ``sparsifier=<name>`` (``spon_exp.config``, from ``Options``),
the config checks (``Options.__post_init__``), and whether a run trains SPON (``sparsifies``).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from spon_exp.sparsifiers.base import Sparsifier, SparsifierOptions

#: config name (``sparsifier=<name>``) -> class
REGISTRY: dict[str, type[Sparsifier]] = {}

#: ``sparsifier.*`` config keys that are not the method's options
NOT_OPTIONS = ("name", "label", "sparsity")


def sparsifier_options(node) -> dict:
    """The method's options of a ``sparsifier`` config node or dict (without ``name``,
    ``label`` and the ``sparsity`` alias): what its constructor takes besides ``sparsity``."""
    if not isinstance(node, dict):  # a DictConfig (omegaconf only imported for one)
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(node, resolve=True)
    return {k: v for k, v in node.items() if k not in NOT_OPTIONS}


def register(cls: type[Sparsifier]) -> type[Sparsifier]:
    """Class decorator: add a :class:`Sparsifier` subclass to :data:`REGISTRY` under its
    ``name``. Checks the contract the config derives from: a new lowercase identifier as the
    name, and ``Options`` a dataclass extending :class:`SparsifierOptions`."""
    if not (isinstance(cls, type) and issubclass(cls, Sparsifier)):
        raise TypeError(f"register takes a Sparsifier subclass, got {cls!r}")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower() or name == Sparsifier.name:
        raise ValueError(f"{cls.__name__} must set its own name = '<config name>' (a lowercase identifier), "
                         f"got {name!r}")
    options = cls.Options
    if not (dataclasses.is_dataclass(options) and issubclass(options, SparsifierOptions)):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass extending SparsifierOptions, got {options!r}")
    taken = REGISTRY.get(name)
    if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"sparsifier name {name!r} is taken by {taken.__module__}.{taken.__qualname__}")
    REGISTRY[name] = cls  # the same class again (a reloaded module) replaces its entry
    return cls


def build_sparsifier(name: str, **kwargs) -> Sparsifier:
    """Instantiate a registered sparsifier by name (``sorted(REGISTRY)``):
    ``build_sparsifier("teal", sparsity=0.5, allocation="greedy")``."""
    if name not in REGISTRY:
        raise ValueError(f"Unknown sparsifier {name!r}; choose from {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)


def _import_methods() -> None:
    """Import every module of this package, so each method's ``@register`` has run."""
    package = __name__.rpartition(".")[0]
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{module.name}")


_import_methods()
