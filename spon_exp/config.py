"""Dataclass schemas of the experiment config, registered in Hydra's ConfigStore.

Every YAML option under ``conf/<group>/`` extends the schema of its group (``defaults:
[<schema name>]``), so a misspelt key or a wrong type fails when Hydra composes the config.
Range checks that types cannot express live in :func:`validate` and run before any model
loads.

Options declared elsewhere are not repeated here: a sparsifier's schema is ``name`` plus the
fields of its ``Options`` dataclass (in its module, with their range checks), and SPON's
training settings extend :class:`spon_exp.spon.train.TrainOptions`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from spon_exp.models.loading import PACKAGED
from spon_exp.sparsifiers import REGISTRY
from spon_exp.spon.train import TrainOptions
from spon_exp.tracking.identity import sparsifier_label


@dataclass
class ModelConfig:
    path: str = PACKAGED  # hub id, local folder, .gguf file, packaged:..., tiny-random:<family>
    name: str = "smollm2-135m"  # short label for tables, W&B and folder names
    dtype: str = "float32"  # float32 / bfloat16 / float16
    device: str = "cpu"  # cpu / cuda / cuda:N
    device_map: Optional[str] = None  # "auto" spreads a model larger than one GPU


#: ``sparsifier.*`` keys of the schema that are not the method's options
NOT_OPTIONS = ("name", "label", "sparsity")


def sparsifier_options(node) -> dict:
    """The method's options of a ``sparsifier`` config node (without ``name``, ``label`` and
    the ``sparsity`` alias)."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in NOT_OPTIONS}


#: method name -> (its class, its schema), one schema per registered class
_SPARSIFIER_SCHEMAS: dict[str, tuple[type, type]] = {}


def sparsifier_schema(name: str) -> type:
    """The schema of ``sparsifier=<name>`` (a method in :data:`REGISTRY`): ``name`` followed by
    the fields (types and defaults) of the sparsifier's ``Options`` dataclass, which declares
    them once, with their comments and range checks (checked by :func:`validate`, not at
    compose time). Made once per method and named after its class (``TealSparsifier`` ->
    ``TealConfig``), an attribute of this module: a pickled config names its schema class by
    reference (submitit ships the config)."""
    method = REGISTRY[name]
    made = _SPARSIFIER_SCHEMAS.get(name)
    if made is not None and made[0] is method:
        return made[1]
    class_name = method.__name__.removesuffix("Sparsifier") + "Config"
    taken = globals().get(class_name)
    if taken is not None and (made is None or taken is not made[1]):  # a reloaded class replaces its own
        raise ValueError(f"sparsifier {name!r}: its schema would be spon_exp.config.{class_name}, which is taken; "
                         f"rename {method.__name__}")
    options = method.Options
    types = typing.get_type_hints(options)

    def copied(f: dataclasses.Field) -> dataclasses.Field:
        if f.default_factory is not dataclasses.MISSING:
            return field(default_factory=f.default_factory)
        return field(default=f.default)

    schema = dataclasses.make_dataclass(
        class_name, [("name", str, field(default=name)),
                     # a preset's label for tables and W&B (sparsifier=teal_ref): not part of a run's identity
                     ("label", Optional[str], field(default=None)),
                     # sparsifier.sparsity=0.4: the same setting as the top-level sparsity=0.4 (resolve_aliases)
                     ("sparsity", Optional[float], field(default=None))]
        + [(f.name, types[f.name], copied(f)) for f in dataclasses.fields(options)])
    schema.__module__ = __name__
    globals()[class_name] = schema
    _SPARSIFIER_SCHEMAS[name] = (method, schema)
    return schema


def sparsifier_schemas() -> dict[str, type]:
    """``<name>_schema`` -> schema, for every registered sparsifier: what ``defaults:
    [<name>_schema]`` of ``conf/sparsifier/<name>.yaml`` extends."""
    return {f"{name}_schema": sparsifier_schema(name) for name in sorted(REGISTRY)}


sparsifier_schemas()  # the package's methods' schemas, importable from here (DenseConfig, TealConfig, ...)


@dataclass
class CalibConfig:
    corpus: str = "wikipedia"  # packaged name, hub corpus or a .txt/.jsonl path
    # sequences for SPON training: 150 steps x batch 1 then never revisit one (chosen by
    # measurement, benchmarks/results/spon_tuning.jsonl)
    num_sequences: int = 256
    seq_len: int = 256
    threshold_sequences: int = 16  # the first N of them calibrate the sparsifier
    batch_size: int = 4  # forward batch for calibration passes
    # none: blocks of text only; row: every block is BOS + seq_len - 1 text tokens, as the rows of
    # TEAL's and LaRoSA's reference calibration (docs/FIDELITY.md, "calibration BOS"); auto: row
    # when the evaluation puts a BOS before every block or window (eval.ppl.bos resolves to
    # chunk: Gemma-3's tokenizer), none otherwise, so thresholds and α see the inputs evaluated
    bos: str = "auto"
    # seeds the calibration sampling alone (the sparsifier's subsampling of activations); null
    # follows the top-level seed. Crossed with spon.seed, spon-exp-collect splits the spread
    # between seeds into its calibration and α-training parts
    seed: Optional[int] = None


@dataclass
class SponConfig(TrainOptions):  # the training settings (lr, steps, ...) are TrainOptions' fields
    count: int = 1  # spontaneous neurons per projection; 0 = SPON off
    projections: Any = "all"  # all / attention / mlp / down_proj, or a list of names ([q_proj,up_proj])
    init: str = "zero"  # zero / mean_dropped
    train: bool = True  # false: keep the init (the training-free baseline)
    checkpoint_every: int = 20  # steps between resumable checkpoints; a run keeps them (train_alpha's default: 0 = never)
    seed: Optional[int] = None  # seeds α training's batch order alone; null follows the top-level seed


@dataclass
class PplConfig:
    corpora: list[str] = field(default_factory=lambda: ["wikipedia"])
    protocol: str = "chunks"  # chunks / sliding
    seq_len: int = 256  # chunks: block length
    max_sequences: Optional[int] = 32  # chunks: blocks evaluated (null = all)
    context: int = 2048  # sliding: context tokens
    window: int = 512  # sliding: scored tokens per window
    max_tokens: Optional[int] = None  # sliding: evaluate only the first N tokens of the stream
    batch_size: int = 4
    # where a BOS token goes: auto (the tokenizer's add_bos_token: per chunk for chunks, at the
    # stream start for sliding) / none / chunk (before every block or window) / stream (once)
    bos: str = "auto"
    score_first_window: bool = True  # sliding: false leaves the first context + 1 tokens unscored (TEAL)
    # which tokens count: all (every target of the protocol) / sparsified (only the positions the
    # sparsifier's token policy sparsified, the same positions for dense, sparse and +SPON)
    score: str = "all"
    # true (experiment=paper): a config that would score a token computed from dense inputs fails validation
    forbid_dense_scored: bool = False
    # evaluation: the test split every table reports; validation: the split a recipe search scores
    # (sweeps/tune_spon*.yaml), disjoint from it and from calibration
    split: str = "evaluation"


@dataclass
class ZeroshotConfig:
    tasks: list[str] = field(default_factory=list)  # empty = no zero-shot evaluation
    batch_size: Any = 16  # an int, or lm-eval's auto / auto:N (largest batch that fits, detected N times)
    num_fewshot: int = 0
    limit: Optional[int] = None
    # offline: spon-exp's packaged copies (same data everywhere, no network); hub: lm-eval's
    # own tasks, data from the hub or, with HF_DATASETS_OFFLINE=1, the local hub cache
    source: str = "offline"
    apply_chat_template: bool = False  # lm-eval's option: prompts through the tokenizer's chat template
    fewshot_as_multiturn: bool = True  # lm-eval's option (and default): few-shot examples as chat turns
    log_samples: bool = False  # per-item table of dense / sparse / +SPON answers: zeroshot_samples.csv (+ W&B table)


@dataclass
class BootstrapConfig:
    # 95 % intervals on every figure: paired bootstrap over evaluation blocks / documents
    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0


@dataclass
class EvalConfig:
    ppl: PplConfig = field(default_factory=PplConfig)
    zeroshot: ZeroshotConfig = field(default_factory=ZeroshotConfig)
    variants: list[str] = field(default_factory=lambda: ["dense", "sparse", "spon"])
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    # re-evaluate the sparse model with every threshold scaled by 1 +- sensitivity_perturbation
    # (first corpus) and record the spread: how much of a difference is numerical chaos
    sensitivity: bool = False
    sensitivity_perturbation: float = 1e-6


@dataclass
class LoggerConfig:
    backend: str = "none"  # none / wandb
    mode: str = "offline"  # offline / online (wandb)
    project: str = "spon-exp"
    entity: Optional[str] = None
    group: Optional[str] = None  # default: the sweep name or "single"
    tags: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    # not the working directory: $SPON_EXP_OUTPUTS, else outputs/ of this repository (beside conf/)
    outputs: str = f"${{oc.env:SPON_EXP_OUTPUTS,'{Path(__file__).resolve().parents[1] / 'outputs'}'}}"
    cache: str = "${paths.outputs}/cache"  # calibration artefacts and trained alphas, by hash


@dataclass
class SearchConfig:
    # non-empty: this job is one trial of a recipe search (sweeps/tune_spon*.yaml). It runs the
    # config once per seed (into <job folder>/seed=<s>) and returns the mean gap closure of
    # the first perplexity corpus to the sweeper (Optuna); it must score eval.ppl.split=validation
    seeds: list[int] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = MISSING
    sparsifier: Any = MISSING
    calib: CalibConfig = MISSING
    spon: SponConfig = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    sparsity: float = 0.5
    seed: int = 0
    sweep_name: str = "single"  # names the group of runs (W&B group, sweep folder)
    save_export: bool = True  # write the folded sparse state (thresholds + biases) into the run folder
    save_checkpoint: bool = False  # also a from_pretrained-loadable checkpoint (a full weight copy)
    skip_if_done: bool = False  # re-launched sweeps: skip a run whose results.json says ok
    # glibc malloc tuning (spon_exp/hostmem.py), applied to CPU runs only (model.device=cpu without
    # model.device_map); false leaves the allocator alone. Not part of a run's identity (its hash)
    malloc_tuning: bool = True
    search: SearchConfig = field(default_factory=SearchConfig)
    # groups whose content is not part of the schema (hydra/launcher is validated by Hydra)
    launcher: Any = None
    experiment: Any = None
    local: Any = None


SCHEMAS = {
    "model": {"model_schema": ModelConfig},
    "calib": {"calib_schema": CalibConfig},
    "spon": {"spon_schema": SponConfig},
    "eval": {"eval_schema": EvalConfig},
    "logger": {"logger_schema": LoggerConfig},
}


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
    import hashlib

    return "trial-" + hashlib.sha256(override_dirname.encode()).hexdigest()[:12]


def sqlite_url(folder: str, name: str = "optuna.db") -> str:
    path = Path(folder).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / name}"


def register_configs() -> None:
    from spon_exp.tracking.identity import flat_dirname

    # sweep run folders: ${spon_flat_dirname:${hydra:job.override_dirname}} (conf/config.yaml)
    OmegaConf.register_new_resolver("spon_flat_dirname", flat_dirname, replace=True)
    # model.name: the config file's name for its own path, else one derived from model.path
    OmegaConf.register_new_resolver("spon_model_name", model_name, replace=True)
    # a search trial's folder: a short hash of its overrides (many swept recipe keys are too long a name)
    OmegaConf.register_new_resolver("spon_trial_dirname", trial_dirname, replace=True)
    # an Optuna study beside its sweep: sqlite:///<sweep folder>/optuna.db (the folder made first)
    OmegaConf.register_new_resolver("spon_sqlite", sqlite_url, replace=True)
    # a single run's folder name: the sparsity, given as sparsity= or as its alias sparsifier.sparsity=
    OmegaConf.register_new_resolver("spon_sparsity", lambda alias, sparsity: sparsity if alias is None else alias,
                                    replace=True)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    # sparsifier schemas from the registry as it is now: a method registered after import has one too
    for group, schemas in {**SCHEMAS, "sparsifier": sparsifier_schemas()}.items():
        for name, node in schemas.items():
            cs.store(group=group, name=name, node=node)


class ConfigError(ValueError):
    """A config value that composes but cannot work; raised before any heavy work."""


def resolve_aliases(cfg, explicit_sparsity: bool = False) -> None:
    """``sparsifier.sparsity=0.4`` is the top-level ``sparsity=0.4``: moved there (and the
    alias cleared) before the run is named, so both spellings name one run. ``explicit_sparsity``:
    the top-level ``sparsity`` was also given; two different values are an error."""
    alias = cfg.sparsifier.get("sparsity") if "sparsifier" in cfg else None
    if alias is None:
        return
    if explicit_sparsity and cfg.sparsity != alias:
        raise ConfigError(f"sparsity={cfg.sparsity} and sparsifier.sparsity={alias} disagree; they are one setting: "
                          f"give only sparsity={alias}")
    cfg.sparsity = alias
    cfg.sparsifier.sparsity = None


def scored_token_check(cfg) -> str | None:
    """Why the perplexity protocol would score tokens computed from dense inputs (the token
    policy leaves the early tokens of a forward dense and ``eval.ppl.score=all`` scores them),
    or None when every scored token ran sparse."""
    from spon_exp.sparsifiers.base import TokenPolicy

    p = cfg.eval.ppl
    if p.score == "sparsified" or not REGISTRY[cfg.sparsifier.name].sparsifies:
        return None
    policy = TokenPolicy.from_options(sparsifier_options(cfg.sparsifier))
    if p.protocol == "chunks":
        forward = p.seq_len + int(p.bos == "chunk")
        scored = forward - 1  # every position but the last predicts a target
    else:
        forward = p.context + p.window + 1
        scored = p.window
    dense = forward - policy.sparsified(forward)  # the leading positions run dense
    first_scored = forward - 1 - scored  # the scored positions are the last ones but the very last
    if dense <= first_scored:
        return None
    return (f"sparsifier={sparsifier_label(cfg.sparsifier)} sparsifies only the last {forward - dense} of each "
            f"{forward}-token forward (sparsifier.token_policy={policy.kind}), so eval.ppl.score=all scores "
            f"{dense - first_scored} tokens per forward computed from dense inputs")


def validate(cfg) -> None:
    """Everything a config implies, checked before the model loads (no weights read): ranges,
    the model's files, dtype and device, sequence lengths against the model's context, and
    corpora (readable UTF-8 text, each split large enough for one block)."""
    from spon_exp.data.corpora import CorpusError, check_corpus
    from spon_exp.models.adapters import projection_names
    from spon_exp.models.loading import check_device, check_model_path, resolve_dtype
    from spon_exp.sparsifiers.base import check_sparsity

    try:
        check_sparsity(cfg.sparsity)
        check_model_path(cfg.model.path)
        resolve_dtype(cfg.model.dtype)
        if not cfg.model.device_map:  # with a device map, accelerate places the model
            check_device(cfg.model.device)
        for corpus in [cfg.calib.corpus, *cfg.eval.ppl.corpora]:
            check_corpus(corpus)
        try:
            projection_names(cfg.spon.projections)  # a set name, or a list (a ListConfig iterates as one)
        except ValueError as e:
            raise ValueError(f"spon.projections: {e}") from None
    except (ValueError, FileNotFoundError, CorpusError) as e:
        raise ConfigError(str(e)) from None
    checks = [
        (cfg.spon.count >= 0, f"spon.count must be >= 0 (0 = SPON off), got {cfg.spon.count}"),
        (cfg.spon.lr > 0, f"spon.lr must be > 0, got {cfg.spon.lr}"),
        (cfg.spon.steps is not None or cfg.spon.epochs is not None, "set spon.steps or spon.epochs"),
        (cfg.spon.steps is None or cfg.spon.steps >= 0, f"spon.steps must be >= 0, got {cfg.spon.steps}"),
        (cfg.calib.num_sequences >= 1, f"calib.num_sequences must be >= 1, got {cfg.calib.num_sequences}"),
        (cfg.calib.seq_len >= 2, f"calib.seq_len must be >= 2, got {cfg.calib.seq_len}"),
        (cfg.calib.bos in ("auto", "none", "row"), f"calib.bos must be auto, none or row, got {cfg.calib.bos!r}"),
        (cfg.calib.bos == "none" or cfg.calib.seq_len >= 3,
         f"calib.bos={cfg.calib.bos} may put a BOS in front of calib.seq_len - 1 text tokens; calib.seq_len={cfg.calib.seq_len} "
         f"is too short, use 3 or more"),
        (cfg.eval.ppl.seq_len >= 2, f"eval.ppl.seq_len must be >= 2, got {cfg.eval.ppl.seq_len}"),
        (cfg.eval.ppl.protocol in ("chunks", "sliding"), f"eval.ppl.protocol must be chunks or sliding, got {cfg.eval.ppl.protocol!r}"),
        (cfg.eval.ppl.context >= 0, f"eval.ppl.context must be >= 0, got {cfg.eval.ppl.context}"),
        (cfg.eval.ppl.window >= 1, f"eval.ppl.window must be >= 1, got {cfg.eval.ppl.window}"),
        (cfg.eval.ppl.bos in ("auto", "none", "chunk", "stream"),
         f"eval.ppl.bos must be auto, none, chunk or stream, got {cfg.eval.ppl.bos!r}"),
        (cfg.eval.ppl.score in ("all", "sparsified"), f"eval.ppl.score must be all or sparsified, got {cfg.eval.ppl.score!r}"),
        (cfg.eval.ppl.split in ("evaluation", "validation"),
         f"eval.ppl.split must be evaluation (the test split) or validation, got {cfg.eval.ppl.split!r}"),
        (not cfg.search.seeds or cfg.eval.ppl.split == "validation",
         "a search trial (search.seeds set) must score the validation split, never the test split: "
         "set eval.ppl.split=validation"),
        (len(set(cfg.search.seeds)) == len(cfg.search.seeds), f"search.seeds repeats a seed: {list(cfg.search.seeds)}"),
        (cfg.eval.ppl.score_first_window or cfg.eval.ppl.max_tokens is None
         or cfg.eval.ppl.max_tokens > cfg.eval.ppl.context + 1,
         f"eval.ppl.score_first_window=false leaves the first eval.ppl.context + 1 = {cfg.eval.ppl.context + 1} tokens "
         f"unscored, so eval.ppl.max_tokens={cfg.eval.ppl.max_tokens} scores nothing; raise eval.ppl.max_tokens"),
        (cfg.spon.checkpoint_every >= 0, f"spon.checkpoint_every must be >= 0 (0 = never), got {cfg.spon.checkpoint_every}"),
        (cfg.spon.init in ("zero", "mean_dropped"), f"spon.init must be zero or mean_dropped, got {cfg.spon.init!r}"),
        (cfg.spon.schedule in ("constant", "cosine", "linear"), f"spon.schedule must be constant, cosine or linear, got {cfg.spon.schedule!r}"),
        (cfg.spon.average in ("none", "ema", "polyak"), f"spon.average must be none, ema or polyak, got {cfg.spon.average!r}"),
        (0 < cfg.spon.ema_decay < 1, f"spon.ema_decay must be in (0, 1), e.g. 0.95, got {cfg.spon.ema_decay}"),
        (0 <= cfg.spon.average_from < 1, f"spon.average_from is a fraction of the steps in [0, 1), got {cfg.spon.average_from}"),
        (cfg.logger.backend in ("none", "wandb"), f"logger.backend must be none or wandb, got {cfg.logger.backend!r}"),
        (set(cfg.eval.variants) <= {"dense", "sparse", "spon"}, f"eval.variants must be among dense/sparse/spon, got {list(cfg.eval.variants)}"),
        (cfg.eval.bootstrap.resamples >= 100, f"eval.bootstrap.resamples must be >= 100, got {cfg.eval.bootstrap.resamples}"),
        (0 < cfg.eval.bootstrap.confidence < 1, f"eval.bootstrap.confidence must be in (0, 1), got {cfg.eval.bootstrap.confidence}"),
        (0 < cfg.eval.sensitivity_perturbation < 0.1,
         f"eval.sensitivity_perturbation is a small relative change (e.g. 1e-6), got {cfg.eval.sensitivity_perturbation}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _check_zeroshot(cfg)
    _check_hub(cfg)
    from spon_exp.sparsifiers import build_sparsifier

    if cfg.sparsifier.name not in REGISTRY:
        raise ConfigError(f"Unknown sparsifier {cfg.sparsifier.name!r}; choose from {sorted(REGISTRY)}")
    options = sparsifier_options(cfg.sparsifier)
    try:  # constructing checks every option's range; no model is touched
        build_sparsifier(cfg.sparsifier.name, sparsity=cfg.sparsity, **options)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"sparsifier={cfg.sparsifier.name}: {e}") from None
    dense_scored = scored_token_check(cfg) if cfg.eval.ppl.forbid_dense_scored else None
    if dense_scored:
        raise ConfigError(f"this protocol (eval.ppl.forbid_dense_scored=true, experiment=paper) scores only tokens "
                          f"computed sparse, but {dense_scored}; use eval.ppl.score=sparsified or "
                          f"sparsifier.token_policy=all")
    _check_lengths_and_corpora(cfg)


OFFLINE_ADVICE = {
    "model": "work offline with the packaged model (model=smollm2_135m) or a local folder or .gguf file (model.path=...)",
    "corpus": "work offline with the packaged corpora (wikipedia, lambada) or a local .txt / .jsonl file",
}


def _check_hub(cfg) -> None:
    """What needs the Hugging Face hub (a hub model id, the hub corpora) either is in the local
    cache or the hub answers; otherwise one line before anything loads, instead of the hub
    client's retries and a traceback after the model loaded. Unreachable, the process then stays offline
    (``HF_HUB_OFFLINE``), so cached files load without a retry."""
    import os

    from spon_exp import hub
    from spon_exp.data.corpora import BUILTIN, PACKAGED as PACKAGED_CORPORA
    from spon_exp.models.loading import is_hub_id

    corpora = {("calib", cfg.calib.corpus, "calibration")} | {("eval.ppl.corpora", c, cfg.eval.ppl.split)
                                                              for c in cfg.eval.ppl.corpora}
    hub_corpora = [(key, name, split) for key, name, split in corpora if name in BUILTIN and name not in PACKAGED_CORPORA]
    hub_model = is_hub_id(cfg.model.path)
    if not (hub_corpora or hub_model) or hub.hub_reachable():
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if hub_model:
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(cfg.model.path, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the local cache
            raise ConfigError(f"model.path={cfg.model.path} is a hub id, the Hugging Face hub is unreachable from here "
                              f"and the model is not in the local cache; {OFFLINE_ADVICE['model']}") from None
    for key, name, split in sorted(hub_corpora):
        try:
            BUILTIN[name](split)
        except Exception:  # noqa: BLE001 - not in the local datasets cache
            raise ConfigError(f"{key}={name} needs the Hugging Face hub, which is unreachable from here, and it is "
                              f"not in the local datasets cache; {OFFLINE_ADVICE['corpus']}") from None


def _check_zeroshot(cfg) -> None:
    """Task names, source and lm-eval options, before the model loads."""
    import logging

    from spon_exp.evaluation.zeroshot import check_batch_size, resolve_tasks
    from spon_exp.models.loading import tokenizer_without_weights

    z = cfg.eval.zeroshot
    try:
        check_batch_size(z.batch_size)
        if not z.tasks:
            set_options = [k for k, default in (("apply_chat_template", False), ("log_samples", False)) if z[k] != default]
            if set_options:
                logging.getLogger(__name__).warning("eval.zeroshot.%s set but eval.zeroshot.tasks is empty: no zero-shot "
                                                    "evaluation runs (e.g. eval=zeroshot or eval.zeroshot.tasks=[piqa])",
                                                    " / ".join(set_options))
            return
        resolve_tasks(list(z.tasks), source=z.source)  # unknown task names fail here
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None
    if z.apply_chat_template:
        tokenizer = tokenizer_without_weights(cfg.model.path)
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"eval.zeroshot.apply_chat_template=true needs a chat template and the tokenizer of "
                              f"{cfg.model.path} has none; use eval.zeroshot.apply_chat_template=false")


def _check_lengths_and_corpora(cfg) -> None:
    """Sequence lengths against the model's positions, and every corpus split against the
    tokens one block needs: from the model's config and tokenizer, no weights loaded."""
    from spon_exp.data.corpora import BUILTIN, CorpusError, check_corpus_size
    from spon_exp.models.loading import model_context_length, tokenizer_without_weights

    p = cfg.eval.ppl
    for key, value, fix in (("eval.ppl.bos", p.bos, "none (or auto)"), ("calib.bos", cfg.calib.bos, "none")):
        if value in ("chunk", "row"):  # bos=stream without a BOS token encodes the stream without one
            tokenizer = tokenizer_without_weights(cfg.model.path)
            if tokenizer is not None and getattr(tokenizer, "bos_token_id", None) is None:
                raise ConfigError(f"{key}={value} needs a BOS token and the tokenizer of {cfg.model.path} has none; "
                                  f"use {key}={fix}")
    try:
        positions = model_context_length(cfg.model.path)
    except (ValueError, OSError) as e:  # an unreadable config.json / GGUF, an unknown tiny family
        raise ConfigError(str(e)) from None
    if positions is not None:
        where = f"{cfg.model.path} has {positions} positions (max_position_embeddings)"
        lengths = [("calib.seq_len", cfg.calib.seq_len)] + ([("eval.ppl.seq_len", p.seq_len)] if p.protocol == "chunks" else [])
        for key, value in lengths:
            if value > positions:
                raise ConfigError(f"{key}={value} is longer than the model's context: {where}; use {key}={positions} or less")
        # a BOS in front of a block (or of every window) feeds one token more
        bos_extra = int(p.bos == "chunk")
        fed = p.seq_len if p.protocol == "chunks" else p.context + p.window + 1
        if p.bos == "auto" and p.protocol == "chunks" and fed == positions:  # only at the limit is the tokenizer asked
            from spon_exp.evaluation.perplexity import tokenizer_adds_bos

            tokenizer = tokenizer_without_weights(cfg.model.path)
            bos_extra = int(tokenizer is not None and tokenizer_adds_bos(tokenizer))
        if bos_extra and fed == positions:  # (longer than the context: the checks around say so)
            raise ConfigError(f"eval.ppl.bos puts a BOS token in front of {'a block' if p.protocol == 'chunks' else 'every window'}, "
                              f"so each forward feeds {fed + 1} tokens and {where}; shorten "
                              f"{'eval.ppl.seq_len' if p.protocol == 'chunks' else 'eval.ppl.context'} by one "
                              f"or use eval.ppl.bos=none")
        if p.protocol == "sliding" and p.context + p.window + 1 > positions:
            window = min(p.window, (positions - 1) // 2)  # keep the window if half the context holds it
            fix = (f"eval.ppl.context={positions - p.window - 1} or less" if window == p.window else
                   f"eval.ppl.context + eval.ppl.window <= {positions - 1}, e.g. eval.ppl.context="
                   f"{positions - 1 - window} eval.ppl.window={window}")
            raise ConfigError(f"eval.ppl.context + eval.ppl.window = {p.context} + {p.window} is longer than the model's "
                              f"context: each window feeds {p.context + p.window + 1} tokens (with the one before the "
                              f"window) and {where}; use {fix}")
    needs: dict[str, dict] = {cfg.calib.corpus: {"calibration": (cfg.calib.seq_len, f"calib.seq_len={cfg.calib.seq_len}")}}
    evaluation = (p.seq_len, f"eval.ppl.seq_len={p.seq_len}") if p.protocol == "chunks" else (2, "eval.ppl.protocol=sliding")
    for corpus in p.corpora:
        needs.setdefault(corpus, {})[p.split] = evaluation
    if all(corpus in BUILTIN for corpus in needs):  # large corpora: nothing to count
        return
    tokenizer = tokenizer_without_weights(cfg.model.path)
    try:
        for corpus, need in needs.items():
            check_corpus_size(corpus, need, tokenizer)
    except CorpusError as e:
        raise ConfigError(str(e)) from None
