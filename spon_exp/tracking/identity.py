"""Run identity: hashes of the resolved config and of what each cached artefact depends on."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # omegaconf only where a config is hashed: data/corpora.py imports this module
    from omegaconf import DictConfig  # on GPU nodes without Hydra/OmegaConf

# Keys that do not change a run's numbers: where it logs, how it is launched, where files go,
# how the host allocator is tuned. The one list: conf/config.yaml's override_dirname.exclude_keys
# spells the same keys as a command line gives them (tests/test_app.py checks they agree).
NON_IDENTITY_KEYS = ("logger", "launcher", "paths", "local", "experiment", "sweep_name", "skip_if_done",
                     "save_export", "save_checkpoint", "search", "malloc_tuning")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plain(cfg: DictConfig) -> dict:
    """The resolved config as plain containers (without Hydra's own node, if present), with
    the alias ``sparsifier.sparsity`` read as ``sparsity``: a config names the same run whether
    or not :func:`spon_exp.config.resolve_aliases` has moved it yet (the skip-finished launchers
    hash configs before the job does)."""
    from omegaconf import OmegaConf

    if "hydra" in cfg:
        c = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
             for k in cfg if k != "hydra"}
    else:
        c = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    alias = (c.get("sparsifier") or {}).get("sparsity") if isinstance(c.get("sparsifier"), dict) else None
    if alias is not None:
        c["sparsity"], c["sparsifier"]["sparsity"] = alias, None
    return c  # type: ignore[return-value]


def sparsifier_label(node) -> str:
    """The name a run's sparsifier goes by in results, tables and W&B: a preset's label
    (``sparsifier.label``, outside the identity), else the method's name."""
    return node.get("label") or node.name


#: Options added after runs were named, at the value that reproduces those runs: left out of
#: every hash while at that value, so existing runs and caches keep their names
NEW_OPTION_DEFAULTS = {"ppl": {"score": "all", "forbid_dense_scored": False, "split": "evaluation"},
                       "calib": {"bos": "none", "seed": None},
                       "spon": {"average": "none", "ema_decay": 0.95, "average_from": 0.5, "apply": "all", "seed": None}}


def calibration_seed(cfg) -> int:
    """The seed of the calibration sampling: ``calib.seed``, else the run's ``seed``."""
    own = cfg["calib"].get("seed")
    return cfg["seed"] if own is None else own


def training_seed(cfg) -> int:
    """The seed of α training's batch order: ``spon.seed``, else the run's ``seed``."""
    own = cfg["spon"].get("seed")
    return cfg["seed"] if own is None else own


def _seeds_that_follow(c: dict) -> dict:
    """``calib.seed`` / ``spon.seed`` set to the run's ``seed`` name the run they follow it in."""
    for group in ("calib", "spon"):
        if isinstance(c.get(group), dict) and c[group].get("seed") == c.get("seed"):
            c[group]["seed"] = None
    return c


def _without_new_defaults(group: str, node: dict) -> dict:
    return {k: v for k, v in node.items() if NEW_OPTION_DEFAULTS[group].get(k, object()) != v}


def _ppl_identity(ppl: dict) -> dict:
    return _without_new_defaults("ppl", ppl)


def _calib(c: dict, keys: tuple[str, ...], bos: str | None) -> dict:
    """The calibration settings an artefact depends on, ``bos`` only where it is not ``none``:
    ``bos``, where given, is what ``calib.bos=auto`` resolved to (a run with ``auto`` and one
    that spells the same value out share their calibration artefacts)."""
    node = {k: c["calib"][k] for k in (*keys, "bos") if k in c["calib"]}
    if bos is not None:
        node["bos"] = bos
    return _without_new_defaults("calib", node)


def _identity_config(cfg: DictConfig) -> dict:
    c = _seeds_that_follow({k: v for k, v in plain(cfg).items() if k not in NON_IDENTITY_KEYS})
    c.get("spon", {}).pop("checkpoint_every", None)
    for key in NOT_SPARSIFIER_SETTINGS:
        c.get("sparsifier", {}).pop(key, None)
    if "eval" in c and "ppl" in c["eval"]:
        c["eval"]["ppl"] = _ppl_identity(c["eval"]["ppl"])
    for group in ("calib", "spon"):
        if group in c:
            c[group] = _without_new_defaults(group, c[group])
    if (c.get("pruner") or {}).get("name", "none") == "none":  # no pruning: runs keep the names they had
        c.pop("pruner", None)
    return c


#: ``sparsifier.*`` keys that are no setting of the method: a preset's name, and the alias
#: ``sparsifier.sparsity`` (moved to the top-level ``sparsity`` before a run is named)
NOT_SPARSIFIER_SETTINGS = ("label", "sparsity")


def config_hash(cfg: DictConfig) -> str:
    """Names the run: its resolved config minus logging / launcher / path settings."""
    return _digest(_identity_config(cfg))


def seed_group(cfg: DictConfig) -> str:
    """Names the run's configuration across seeds: :func:`config_hash` computed without
    ``seed``, ``calib.seed`` and ``spon.seed``. Runs that differ only in their seeds share it:
    ``spon-exp-collect`` aggregates them, and W&B groups them by the ``seed_group`` config key."""
    c = _identity_config(cfg)
    c.pop("seed", None)
    for group in ("calib", "spon"):  # crossed calibration and training seeds: one configuration
        c.get(group, {}).pop("seed", None)
    return _digest(c)


#: Bumped when a built-in corpus's text changes (:mod:`spon_exp.data.corpora` builds it), so
#: nothing cached from the old text (token streams, thresholds, alphas, dense baselines) is read back
BUILTIN_TEXT_VERSION = {"wikitext2": "rows-joined-by-blank-line"}


def _text_versions(corpora) -> dict:
    """``{"text": {corpus: version}}`` for built-in corpora whose text was changed once (see
    :data:`BUILTIN_TEXT_VERSION`), else ``{}``: keys of other corpora stay as they were."""
    versions = {c: BUILTIN_TEXT_VERSION[c] for c in corpora if c in BUILTIN_TEXT_VERSION}
    return {"text": versions} if versions else {}


def sparsifier_key(cfg: DictConfig, calib_bos: str | None = None) -> str:
    """What calibrated thresholds depend on: weights, method, target, calibration data, seed
    (``calib_bos``: what ``calib.bos=auto`` resolved to, once the tokenizer is known)."""
    c = plain(cfg)
    return _digest({
        "model": {k: c["model"][k] for k in ("path", "dtype")},
        "sparsifier": {k: v for k, v in c["sparsifier"].items() if k not in NOT_SPARSIFIER_SETTINGS},
        "sparsity": c["sparsity"],
        "seed": calibration_seed(c),
        "calib": _calib(c, ("corpus", "seq_len", "threshold_sequences", "batch_size"), calib_bos),
        **_text_versions([c["calib"]["corpus"]]),
    })


def alpha_key(cfg: DictConfig, calib_bos: str | None = None) -> str:
    """What trained alphas depend on: the sparsifier's inputs plus SPON and training data."""
    c = plain(cfg)
    spon = _without_new_defaults("spon", {k: v for k, v in c["spon"].items() if k not in ("checkpoint_every", "seed")})
    if training_seed(c) != calibration_seed(c):  # else the sparsifier's key names it
        spon["seed"] = training_seed(c)
    return _digest({"sparsifier": sparsifier_key(cfg, calib_bos), "spon": spon,
                    "calib": _calib(c, ("corpus", "seq_len", "num_sequences"), calib_bos)})


def pruner_key(cfg: DictConfig, calib_bos: str | None = None) -> str | None:
    """What pruned weights depend on: weights, method and its options, sparsity, the
    calibration windows (corpus, their length, BOS policy, seed) and the forward batch; None
    without a pruner (``pruner=none``)."""
    c = plain(cfg)
    pruner = c.get("pruner") or {}
    if pruner.get("name", "none") == "none":
        return None
    calib = _calib(c, ("corpus", "batch_size"), calib_bos)
    calib["seq_len"] = pruner.get("seq_len") or c["calib"]["seq_len"]
    return _digest({
        "model": {k: c["model"][k] for k in ("path", "dtype")},
        "pruner": {k: v for k, v in pruner.items() if k != "seq_len"},
        "sparsity": c["sparsity"],
        "seed": c["seed"],
        "calib": calib,
        **_text_versions([c["calib"]["corpus"]]),
    })


#: ``sparsifier.*`` options that say which tokens of a forward are sparsified
TOKEN_POLICY_KEYS = ("token_policy", "token_fraction", "token_rounding", "dense_first_fraction")


def dense_key(cfg: DictConfig) -> str:
    """What the dense baseline depends on: the weights as loaded and the evaluation settings
    (not the sparsifier, the sparsity, SPON or the seed; but with ``eval.ppl.score=sparsified``
    the sparsifier's token policy, which picks the scored tokens)."""
    c = plain(cfg)
    scored = ({"scored_tokens": {k: c["sparsifier"][k] for k in TOKEN_POLICY_KEYS if k in c["sparsifier"]}}
              if c["eval"]["ppl"].get("score") == "sparsified" else {})
    return _digest({
        "model": {k: c["model"].get(k) for k in ("path", "dtype", "device", "device_map")},
        # every protocol option (bos, ...) included
        "ppl": _ppl_identity(c["eval"]["ppl"]), "zeroshot": c["eval"]["zeroshot"], **scored,
        **_text_versions(c["eval"]["ppl"]["corpora"]),
    })


def wandb_run_id(sweep_name: str, chash: str) -> str:
    """The W&B run id: one per (sweep name, config hash). Stable (a re-launched sweep or a
    requeued job continues its W&B run), and distinct for one config run in two sweeps (the
    config hash leaves ``sweep_name`` out, so it cannot be the id)."""
    return _digest({"sweep_name": sweep_name, "config_hash": chash})


#: A swept value longer than this, or holding a path separator, is shortened in folder names.
MAX_DIRNAME_VALUE = 48


def _split_items(text: str, sep: str) -> list[str]:
    """Split ``a=1,b=[x,y]`` at ``sep`` outside brackets and quotes."""
    items, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    items.append("".join(current))
    return items


def flat_dirname(override_dirname: str, item_sep: str = ",", kv_sep: str = "=") -> str:
    """One flat, readable folder name for a sweep run from Hydra's ``override_dirname``:
    a path-valued override (``calib.corpus=/data/x.txt``) becomes its file name plus a short
    hash of the whole path (``calib.corpus=x.txt~1a2b3c4d``), so runs never land in nested
    folders and two paths with one file name stay apart. Other values are kept as they are."""
    out = []
    for item in _split_items(override_dirname, item_sep):
        key, sep, value = item.partition(kv_sep)
        if sep and ("/" in value or "\\" in value or len(value) > MAX_DIRNAME_VALUE):
            stem = re.sub(r"[^A-Za-z0-9._+-]", "_", re.split(r"[/\\]", value.rstrip("/\\]})'\""))[-1])[:MAX_DIRNAME_VALUE]
            value = f"{stem}~{hashlib.sha256(value.encode()).hexdigest()[:8]}" if stem else \
                hashlib.sha256(value.encode()).hexdigest()[:8]
        out.append(f"{key}{sep}{value}")
    return item_sep.join(out)


@dataclass(frozen=True)
class RunIdentity:
    """Everything a run is known by, computed once from its config: the run's hash (its
    skip-if-done check), its W&B run id (sweep + hash) and the cache keys of what it reuses."""

    config_hash: str
    sparsifier_key: str
    alpha_key: str
    dense_key: str
    wandb_run_id: str
    seed_group: str
    pruner_key: str | None = None  # the pruned weights' cache entry (None: no pruner)

    @classmethod
    def of(cls, cfg: DictConfig) -> RunIdentity:
        chash = config_hash(cfg)
        return cls(chash, sparsifier_key(cfg), alpha_key(cfg), dense_key(cfg), wandb_run_id(cfg.sweep_name, chash),
                   seed_group(cfg), pruner_key(cfg))

    def with_calib_bos(self, cfg: DictConfig, bos: str) -> RunIdentity:
        """The same run, its calibration artefacts named by the BOS policy ``calib.bos=auto``
        resolved to (the run's own hash keeps ``auto``)."""
        return replace(self, sparsifier_key=sparsifier_key(cfg, bos), alpha_key=alpha_key(cfg, bos),
                       pruner_key=pruner_key(cfg, bos))
