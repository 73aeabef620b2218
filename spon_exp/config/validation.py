"""Checks that types cannot express, run before any model loads: ranges, files, devices,
corpora, lengths against the model's context, zero-shot tasks and the hub's reachability.
Each failure is a :class:`ConfigError` whose message is one sentence saying what to do."""

from __future__ import annotations

import logging
import os

from spon_exp.config.schema import sparsifier_options
from spon_exp.sparsifiers import REGISTRY
from spon_exp.tracking.identity import sparsifier_label


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
    _check_paths_and_names(cfg)
    for ok, message in [*_spon_checks(cfg), *_calib_and_eval_checks(cfg)]:
        if not ok:
            raise ConfigError(message)
    _check_zeroshot(cfg)
    _check_hub(cfg)
    _check_sparsifier(cfg)
    _check_pruner(cfg)
    _check_lengths_and_corpora(cfg)


def _check_paths_and_names(cfg) -> None:
    """Sparsity, the model's files, dtype, device, corpora and projection names."""
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


def _spon_checks(cfg) -> list[tuple[bool, str]]:
    s = cfg.spon
    return [
        (s.count >= 0, f"spon.count must be >= 0 (0 = SPON off), got {s.count}"),
        (s.lr > 0, f"spon.lr must be > 0, got {s.lr}"),
        (s.steps is not None or s.epochs is not None, "set spon.steps or spon.epochs"),
        (s.steps is None or s.steps >= 0, f"spon.steps must be >= 0, got {s.steps}"),
        (s.checkpoint_every >= 0, f"spon.checkpoint_every must be >= 0 (0 = never), got {s.checkpoint_every}"),
        (s.init in ("zero", "mean_dropped"), f"spon.init must be zero or mean_dropped, got {s.init!r}"),
        (s.apply in ("all", "sparsified"),
         f"spon.apply must be all (α on every token) or sparsified (only on the sparsified tokens), got {s.apply!r}"),
        (s.schedule in ("constant", "cosine", "linear"), f"spon.schedule must be constant, cosine or linear, got {s.schedule!r}"),
        (s.average in ("none", "ema", "polyak"), f"spon.average must be none, ema or polyak, got {s.average!r}"),
        (0 < s.ema_decay < 1, f"spon.ema_decay must be in (0, 1), e.g. 0.95, got {s.ema_decay}"),
        (0 <= s.average_from < 1, f"spon.average_from is a fraction of the steps in [0, 1), got {s.average_from}"),
    ]


def _calib_and_eval_checks(cfg) -> list[tuple[bool, str]]:
    c, p, e = cfg.calib, cfg.eval.ppl, cfg.eval
    return [
        (c.num_sequences >= 1, f"calib.num_sequences must be >= 1, got {c.num_sequences}"),
        (c.seq_len >= 2, f"calib.seq_len must be >= 2, got {c.seq_len}"),
        (c.bos in ("auto", "none", "row"), f"calib.bos must be auto, none or row, got {c.bos!r}"),
        (c.bos == "none" or c.seq_len >= 3,
         f"calib.bos={c.bos} may put a BOS in front of calib.seq_len - 1 text tokens; calib.seq_len={c.seq_len} "
         f"is too short, use 3 or more"),
        (p.seq_len >= 2, f"eval.ppl.seq_len must be >= 2, got {p.seq_len}"),
        (p.protocol in ("chunks", "sliding"), f"eval.ppl.protocol must be chunks or sliding, got {p.protocol!r}"),
        (p.context >= 0, f"eval.ppl.context must be >= 0, got {p.context}"),
        (p.window >= 1, f"eval.ppl.window must be >= 1, got {p.window}"),
        (p.bos in ("auto", "none", "chunk", "stream"), f"eval.ppl.bos must be auto, none, chunk or stream, got {p.bos!r}"),
        (p.score in ("all", "sparsified"), f"eval.ppl.score must be all or sparsified, got {p.score!r}"),
        (p.split in ("evaluation", "validation"),
         f"eval.ppl.split must be evaluation (the test split) or validation, got {p.split!r}"),
        (not cfg.search.seeds or p.split == "validation",
         "a search trial (search.seeds set) must score the validation split, never the test split: "
         "set eval.ppl.split=validation"),
        (len(set(cfg.search.seeds)) == len(cfg.search.seeds), f"search.seeds repeats a seed: {list(cfg.search.seeds)}"),
        (p.score_first_window or p.max_tokens is None or p.max_tokens > p.context + 1,
         f"eval.ppl.score_first_window=false leaves the first eval.ppl.context + 1 = {p.context + 1} tokens "
         f"unscored, so eval.ppl.max_tokens={p.max_tokens} scores nothing; raise eval.ppl.max_tokens"),
        (cfg.logger.backend in ("none", "wandb"), f"logger.backend must be none or wandb, got {cfg.logger.backend!r}"),
        (set(e.variants) <= {"dense", "sparse", "spon"}, f"eval.variants must be among dense/sparse/spon, got {list(e.variants)}"),
        (e.bootstrap.resamples >= 100, f"eval.bootstrap.resamples must be >= 100, got {e.bootstrap.resamples}"),
        (0 < e.bootstrap.confidence < 1, f"eval.bootstrap.confidence must be in (0, 1), got {e.bootstrap.confidence}"),
        (0 < e.sensitivity_perturbation < 0.1,
         f"eval.sensitivity_perturbation is a small relative change (e.g. 1e-6), got {e.sensitivity_perturbation}"),
    ]


def _check_sparsifier(cfg) -> None:
    """The method exists, its options are in range, and the protocol scores what it may."""
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


def _check_pruner(cfg) -> None:
    """A pruner's options, its N:M against the sparsity, and that it runs alone (spon_exp/pruning/)."""
    from spon_exp.pruning import check_pruner, pruner_name

    try:
        check_pruner(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"pruner={pruner_name(cfg)}: {e}") from None


OFFLINE_ADVICE = {
    "model": "work offline with the packaged model (model=smollm2_135m) or a local folder or .gguf file (model.path=...)",
    "corpus": "work offline with the packaged corpora (wikipedia, lambada) or a local .txt / .jsonl file",
}


def _check_hub(cfg) -> None:
    """What needs the Hugging Face hub (a hub model id, the hub corpora) either is in the local
    cache or the hub answers; otherwise one line before anything loads, instead of the hub
    client's retries and a traceback after the model loaded. Unreachable, the process then stays offline
    (``HF_HUB_OFFLINE``), so cached files load without a retry."""
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
    from spon_exp.models.loading import model_context_length

    _check_bos_tokens(cfg)
    try:
        positions = model_context_length(cfg.model.path)
    except (ValueError, OSError) as e:  # an unreadable config.json / GGUF, an unknown tiny family
        raise ConfigError(str(e)) from None
    if positions is not None:
        _check_positions(cfg, positions)
    _check_corpus_sizes(cfg)


def _check_bos_tokens(cfg) -> None:
    from spon_exp.models.loading import tokenizer_without_weights

    for key, value, fix in (("eval.ppl.bos", cfg.eval.ppl.bos, "none (or auto)"), ("calib.bos", cfg.calib.bos, "none")):
        if value in ("chunk", "row"):  # bos=stream without a BOS token encodes the stream without one
            tokenizer = tokenizer_without_weights(cfg.model.path)
            if tokenizer is not None and getattr(tokenizer, "bos_token_id", None) is None:
                raise ConfigError(f"{key}={value} needs a BOS token and the tokenizer of {cfg.model.path} has none; "
                                  f"use {key}={fix}")


def _check_positions(cfg, positions: int) -> None:
    """calib.seq_len, eval.ppl.seq_len (+ a BOS) and the sliding window against ``positions``."""
    from spon_exp.models.loading import tokenizer_without_weights

    p = cfg.eval.ppl
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


def _check_corpus_sizes(cfg) -> None:
    """Every local corpus split holds the tokens one block needs (built-in corpora are large)."""
    from spon_exp.data.corpora import BUILTIN, CorpusError, check_corpus_size
    from spon_exp.models.loading import tokenizer_without_weights

    p = cfg.eval.ppl
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
