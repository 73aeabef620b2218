"""The experiment config: its schemas (:mod:`.schema`, typed dataclasses Hydra checks at
compose time), its resolvers (:mod:`.resolvers`) and the checks run before any model loads
(:mod:`.validation`)."""

from spon_exp.config.resolvers import model_name, register_resolvers, sqlite_url, trial_dirname
from spon_exp.config.schema import (NOT_OPTIONS, SCHEMAS, BootstrapConfig, CalibConfig, Config, EvalConfig, LoggerConfig,
                                    ModelConfig, PathsConfig, PplConfig, SearchConfig, SponConfig, ZeroshotConfig,
                                    sparsifier_options, sparsifier_schema, sparsifier_schemas, store_schemas)
from spon_exp.config.validation import ConfigError, resolve_aliases, scored_token_check, validate


def register_configs() -> None:
    """The resolvers and the schemas, before Hydra composes a config."""
    register_resolvers()
    store_schemas()


def __getattr__(name: str) -> type:
    """The sparsifier schemas (``TealConfig``, ...) live in :mod:`.schema`, made on first use."""
    from spon_exp.config import schema

    return getattr(schema, name)


__all__ = ["NOT_OPTIONS", "SCHEMAS", "BootstrapConfig", "CalibConfig", "Config", "ConfigError", "EvalConfig",
           "LoggerConfig", "ModelConfig", "PathsConfig", "PplConfig", "SearchConfig", "SponConfig", "ZeroshotConfig",
           "model_name", "register_configs", "register_resolvers", "resolve_aliases", "scored_token_check",
           "sparsifier_options", "sparsifier_schema", "sparsifier_schemas", "sqlite_url", "store_schemas",
           "trial_dirname", "validate"]
