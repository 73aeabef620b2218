"""Dataclass schemas of the experiment config, stored in Hydra's ConfigStore
(:func:`store_schemas`).

Every YAML option under ``conf/<group>/`` extends the schema of its group (``defaults:
[<schema name>]``), so a misspelt key or a wrong type fails when Hydra composes the config.
Range checks that types cannot express live in :mod:`spon_exp.config.validation`.

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
from omegaconf import MISSING

from spon_exp.models.loading import PACKAGED
from spon_exp.sparsifiers import REGISTRY
from spon_exp.sparsifiers.registry import NOT_OPTIONS, sparsifier_options  # noqa: F401 - re-exported
from spon_exp.spon.train import TrainOptions


@dataclass
class ModelConfig:
    path: str = PACKAGED  # hub id, local folder, .gguf file, packaged:..., tiny-random:<family>
    name: str = "smollm2-135m"  # short label for tables, W&B and folder names
    dtype: str = "float32"  # float32 / bfloat16 / float16
    device: str = "cpu"  # cpu / cuda / cuda:N
    device_map: Optional[str] = None  # "auto" spreads a model larger than one GPU


#: method name -> (its class, its schema), one schema per registered class
_SPARSIFIER_SCHEMAS: dict[str, tuple[type, type]] = {}


def sparsifier_schema(name: str) -> type:
    """The schema of ``sparsifier=<name>`` (a method in :data:`REGISTRY`): ``name`` followed by
    the fields (types and defaults) of the sparsifier's ``Options`` dataclass, which declares
    them once, with their comments and range checks (checked by validation, not at compose
    time). Made once per method and named after its class (``TealSparsifier`` -> ``TealConfig``),
    which this module answers for (:func:`__getattr__`): a pickled config names its schema
    class by reference (submitit ships the config)."""
    method = REGISTRY[name]
    made = _SPARSIFIER_SCHEMAS.get(name)
    if made is not None and made[0] is method:
        return made[1]
    class_name = _schema_name(method)
    taken = [s for n, (m, s) in _SPARSIFIER_SCHEMAS.items() if s.__name__ == class_name and n != name]
    if taken:
        raise ValueError(f"sparsifier {name!r}: its schema would be {__name__}.{class_name}, which is taken; "
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
    _SPARSIFIER_SCHEMAS[name] = (method, schema)
    return schema


def _schema_name(method: type) -> str:
    return method.__name__.removesuffix("Sparsifier") + "Config"


def __getattr__(name: str) -> type:
    """``TealConfig``, ``WinaConfig``, ...: the schema of the registered sparsifier whose class
    it is named after (made on first use), so ``pickle`` finds it by its qualified name."""
    for method_name, method in sorted(REGISTRY.items()):
        if _schema_name(method) == name:
            return sparsifier_schema(method_name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sparsifier_schemas() -> dict[str, type]:
    """``<name>_schema`` -> schema, for every registered sparsifier: what ``defaults:
    [<name>_schema]`` of ``conf/sparsifier/<name>.yaml`` extends."""
    return {f"{name}_schema": sparsifier_schema(name) for name in sorted(REGISTRY)}


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
    init: str = "mean_dropped"  # zero / mean_dropped (the recipe conf/spon/tuned.yaml selects)
    train: bool = True  # false: keep the init (the training-free baseline)
    # where α acts: all (every token) / sparsified (only the tokens the token policy sparsified,
    # trained so; the same model under token_policy=all): spon_exp/spon/gating.py, docs/configuration.md
    apply: str = "all"
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
    outputs: str = f"${{oc.env:SPON_EXP_OUTPUTS,'{Path(__file__).resolve().parents[2] / 'outputs'}'}}"
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
    pruner: Any = None  # one-shot weight pruning (conf/pruner/, spon_exp/pruning/); none = no pruning
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
    # a run whose folder's results.json says ok for this config is skipped (false: run it again beside it, as
    # attempt N: spon_exp/tracking/run_folder.py); a finished run's files are never written again
    skip_if_done: bool = True
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


def store_schemas() -> None:
    """Every schema into Hydra's ConfigStore: ``config_schema`` and each group's; sparsifier
    schemas from the registry as it is now (a method registered after import has one too)."""
    from spon_exp.pruning.registry import pruner_schemas

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, schemas in {**SCHEMAS, "sparsifier": sparsifier_schemas(), "pruner": pruner_schemas()}.items():
        for name, node in schemas.items():
            cs.store(group=group, name=name, node=node)
