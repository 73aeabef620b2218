"""The config's own resolvers (``${spon_...:}`` in conf/). Each computes a value and creates
nothing: resolving a config (``--cfg job`` included) leaves the file system as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import OmegaConf

from spon_exp.tracking.identity import flat_dirname


def model_name(path: str, known_path: str | None = None, known_name: str | None = None) -> str:
    """The name a run's model goes by (tables, W&B, folder names): ``known_name`` for the
    path a model config file declares, else the last part of ``model.path`` (``google/gemma-3-270m``
    -> ``gemma-3-270m``, ``/models/gemma.gguf`` -> ``gemma``, ``tiny-random:qwen3`` ->
    ``tiny-random-qwen3``), so a run on another model never carries the default's name."""
    if known_name is not None and path == known_path:
        return known_name
    if path.startswith("tiny-random:"):
        return f"tiny-random-{path.split(':', 1)[1] or 'llama'}"
    if path.startswith("packaged:"):
        return path.split(":", 1)[1]
    last = Path(str(path).rstrip("/\\")).name
    if last.endswith(".gguf"):
        last = last[: -len(".gguf")]
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in last) or "model"


def trial_dirname(override_dirname: str) -> str:
    """A search trial's folder: a short hash of its overrides (swept recipe keys make too long a name)."""
    return "trial-" + hashlib.sha256(override_dirname.encode()).hexdigest()[:12]


def sqlite_url(folder: str, name: str = "optuna.db") -> str:
    """``sqlite:///<folder>/<name>``; the folder is made by the sweeper that opens the study,
    not here."""
    return f"sqlite:///{Path(folder).expanduser().resolve() / name}"


def register_resolvers() -> None:
    # sweep run folders: ${spon_flat_dirname:${hydra:job.override_dirname}} (conf/config.yaml)
    OmegaConf.register_new_resolver("spon_flat_dirname", flat_dirname, replace=True)
    # model.name: the config file's name for its own path, else one derived from model.path
    OmegaConf.register_new_resolver("spon_model_name", model_name, replace=True)
    OmegaConf.register_new_resolver("spon_trial_dirname", trial_dirname, replace=True)
    # an Optuna study beside its sweep: sqlite:///<sweep folder>/optuna.db
    OmegaConf.register_new_resolver("spon_sqlite", sqlite_url, replace=True)
    # a single run's folder name: the sparsity, given as sparsity= or as its alias sparsifier.sparsity=
    OmegaConf.register_new_resolver("spon_sparsity", lambda alias, sparsity: sparsity if alias is None else alias,
                                    replace=True)
