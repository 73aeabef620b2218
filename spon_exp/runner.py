"""One experiment, end to end, in plain Python: ``run(cfg, run_dir) -> results``.

load model -> attach sparsifier -> calibrate (or re-use cached thresholds) -> evaluate
dense / sparse -> train SPON alpha (or re-use cached alpha) -> fold into biases ->
evaluate sparse+SPON -> export -> results.json (+ W&B). Nothing here imports Hydra.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig

from spon_exp import __version__
from spon_exp.config import resolve_aliases, sparsifier_options, validate
from spon_exp.pruning import pruner_name
from spon_exp.evaluation.session import Evaluation
from spon_exp.sparsifiers import REGISTRY
from spon_exp.tracking.disk import as_disk_full
from spon_exp.tracking.files import MetricsWriter
from spon_exp.tracking.identity import RunIdentity, calibration_seed, plain, sparsifier_label, training_seed
from spon_exp.tracking.run_folder import (ALPHA_FILE, EXPORT_DIR, SAMPLES_FILE, UNITS_FILE, Attempt, guard_run_dir,
                                          writing)
from spon_exp.tracking.store import read_entry, remove_entry, write_atomic, write_entry
from spon_exp.tracking.wandb_logger import Tracker

log = logging.getLogger(__name__)

TRAIN_INFO_FILE = "train.json"  # next to the cached α: how it was trained (loss curve, steps)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, see spon_exp.interrupts) during a run; its message says where, and
    that a re-run resumes."""


class Timer:
    def __init__(self, metrics: MetricsWriter):
        self.timings: dict[str, float] = {}
        self.metrics = metrics
        self.current = "setup"  # the stage running; after a failure, the stage it happened in

    @contextlib.contextmanager
    def stage(self, name: str):
        log.info("== %s", name)
        previous, self.current = self.current, name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            self.timings[name] = self.timings.get(name, 0.0) + seconds
            self.metrics.write("timing", stage=name, seconds=seconds)
        self.current = previous


def sparsifier_kwargs(cfg: DictConfig) -> dict:
    """The sparsifier's constructor arguments; ``seed`` seeds its calibration sampling
    (``calib.seed``, else the run's ``seed``)."""
    return {"sparsity": cfg.sparsity, "seed": calibration_seed(cfg), **sparsifier_options(cfg.sparsifier)}


@dataclass
class RunContext:
    """What every stage of one run reads and writes: the config, the folder, the run's
    identity (computed once; ``calib.bos=auto`` names its calibration artefacts once the
    tokenizer is loaded), the results being built, timings, metrics and the tracker."""

    cfg: DictConfig
    run_dir: Path
    identity: RunIdentity
    results: dict
    timer: Timer
    metrics: MetricsWriter
    tracker: Tracker | None = None
    attempt: Attempt | None = None

    @property
    def cache(self) -> Path:
        return Path(self.cfg.paths.cache)

    def path(self, name: str) -> Path:
        """Where this attempt writes the run-folder artefact ``name`` (α, units, samples, export)."""
        return self.run_dir / name if self.attempt is None else self.attempt.path(name)


def _initial_results(cfg: DictConfig, identity: RunIdentity, timer: Timer) -> dict:
    return {
        "status": "running", "error": None, "config_hash": identity.config_hash, "spon_exp_version": __version__,
        "started_at": datetime.now(timezone.utc).isoformat(), "finished_at": None,
        "model": {"path": cfg.model.path, "name": cfg.model.name, "dtype": cfg.model.dtype},
        "sparsifier": cfg.sparsifier.name, "sparsifier_label": sparsifier_label(cfg.sparsifier),
        "spon_count": cfg.spon.count, "calib_corpus": cfg.calib.corpus,
        "seed": cfg.seed, "seeds": {"calib": calibration_seed(cfg), "spon": training_seed(cfg)},
        "seed_group": identity.seed_group, "sweep_name": cfg.sweep_name,
        "wandb_run_id": identity.wandb_run_id,
        "sparsity": {"target": cfg.sparsity, "measured": None, "effective": None},
        "ppl": {}, "gap_closure": {}, "timings": timer.timings, "cache": {},
    }


def run(cfg: DictConfig, run_dir: str | Path, hydra_files: Callable[[Path], None] | None = None) -> dict:
    """Run one experiment into ``run_dir``; always leaves a complete results.json.

    A finished run is never written again (``spon_exp/tracking/run_folder.py``): when ``run_dir``
    already holds an ``ok`` results.json of the same config (``skip_if_done=false``, or this
    function called again), the new attempt writes only ``*.attempt-<N>.*`` files beside it
    (results, metrics, α, evaluation units, export state, Hydra's record via ``hydra_files``, a
    function writing the ``.hydra`` files into the folder it is given), whether it ends ok or not.
    One process writes a folder at a time; a folder holding files spon-exp did not write is
    refused (both ``FileExistsError``).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolve_aliases(cfg)  # sparsifier.sparsity -> sparsity, before the run is named
    identity = RunIdentity.of(cfg)
    with writing(run_dir):  # a second process refuses at once
        guard_run_dir(run_dir, identity.config_hash)
        return _attempt(cfg, run_dir, identity, hydra_files)


def _attempt(cfg: DictConfig, run_dir: Path, identity: RunIdentity, hydra_files) -> dict:
    attempt = Attempt(cfg, run_dir, identity.config_hash)
    if hydra_files is not None:
        hydra_files(attempt.hydra_dir)
    metrics = MetricsWriter(attempt.metrics_file)
    timer = Timer(metrics)
    ctx = RunContext(cfg, run_dir, identity, _initial_results(cfg, identity, timer), timer, metrics, attempt=attempt)
    attempt.start(ctx.results)
    ok = False
    try:
        t_total = time.perf_counter()
        validate(cfg)
        ctx.tracker = Tracker(cfg, identity.wandb_run_id, attempt.tracker_dir, plain(cfg), identity.config_hash,
                              metrics_file=attempt.metrics_file)
        _run_stages(ctx)
        ctx.results["timings"]["total"] = time.perf_counter() - t_total
        ctx.results["status"] = "ok"
        ok = True
    except BaseException as e:  # noqa: BLE001 - record every failure, then re-raise
        ctx.results["status"] = "failed"
        ctx.results["error"] = f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError):  # a full disk may refuse the traceback file too
            attempt.failed()
        full = as_disk_full(e, run_dir)
        if full is not None:  # results.json records the one line the CLI shows
            ctx.results["error"] = str(full)
            raise full from e
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C or SIGTERM: say where, and that a re-run resumes
            ctx.results["status"] = "interrupted"
            ctx.results["error"] = _interrupted(e, timer.current)
            raise RunInterrupted(ctx.results["error"]) from e
        raise
    finally:
        attempt.finish(ctx.results, ok)
        if ctx.tracker is not None:
            ctx.tracker.finish(ctx.results, ok)
    return ctx.results


def _interrupted(e: KeyboardInterrupt, stage: str) -> str:
    from spon_exp.interrupts import terminated
    from spon_exp.spon.train import TrainingInterrupted

    by = "SIGTERM: " if terminated(e) else ""
    if isinstance(e, TrainingInterrupted):  # "interrupted at step N; ... resume from step M"
        return f"{by}{e}"
    return (f"{by}interrupted during {stage}; re-run the same command to continue "
            f"(calibration and finished stages are cached)")


def _run_stages(ctx: RunContext) -> None:
    """load -> calibrate-or-restore -> dense baseline -> sparse eval -> train-or-restore α ->
    fold (checked) -> evaluate -> export."""
    cfg, results = ctx.cfg, ctx.results
    torch.manual_seed(cfg.seed)
    model, tokenizer = _load_model(ctx)
    pruned = pruner_name(cfg) != "none"  # pruner=wanda / sparsegpt: the pruned model is the "sparse" variant
    # sparsifier=dense without a pruner: the sparse model is the dense one
    dense_only = not REGISTRY[cfg.sparsifier.name].sparsifies and not pruned
    use_spon = not dense_only and cfg.spon.count > 0
    variants = [v for v in cfg.eval.variants if v == "dense" or (v == "sparse" and not dense_only)
                or (v == "spon" and use_spon)]
    calib, evaluation = _load_data(ctx, model, tokenizer)

    sparsifier = _calibrate(ctx, model, calib)
    if "dense" in variants:
        _dense_baseline(ctx, evaluation, sparsifier)
        results.update(evaluation.summary())  # kept if a later stage fails
    if pruned:
        from spon_exp.pruning.stage import prune_stage

        prune_stage(ctx, model, tokenizer, evaluation)  # after the dense baseline: it changes the weights
    elif "sparse" in variants:
        _sparse_eval(ctx, evaluation, sparsifier)
    biases = _spon_stage(ctx, model, sparsifier, calib, evaluation, "spon" in variants) if use_spon else None
    results.update(evaluation.summary())
    if cfg.eval.zeroshot.log_samples and evaluation.zeroshot:
        results["zeroshot"]["samples"] = _sample_table(ctx, evaluation)
    evaluation.save_units(ctx.path(UNITS_FILE))
    if sparsifier is not None and cfg.save_export:
        _export(ctx, model, tokenizer, sparsifier, biases)
    bad = [f"{c}/{v}" for c, vs in results["ppl"].items() for v, x in vs.items() if not math.isfinite(x)]
    if bad:
        log.warning("Non-finite perplexity for %s", bad)


def _load_model(ctx: RunContext):
    from spon_exp.models.loading import load_model

    m = ctx.cfg.model
    with ctx.timer.stage("load_model"):
        loaded = load_model(m.path, m.dtype, m.device, m.device_map)
    return loaded.model, loaded.tokenizer


def calibration_bos(policy: str, evaluation_bos: str) -> str:
    """``none`` or ``row`` for a configured ``calib.bos``: ``auto`` follows the evaluation, a
    BOS row when it puts a BOS before every block or window (``evaluation_bos`` is the resolved
    ``eval.ppl.bos``: ``chunk``), text only when it puts none or one at the stream's start."""
    if policy != "auto":
        return policy
    return "row" if evaluation_bos == "chunk" else "none"


def _load_data(ctx: RunContext, model, tokenizer) -> tuple[torch.Tensor, Evaluation]:
    from spon_exp.data.corpora import token_blocks

    c = ctx.cfg.calib
    with ctx.timer.stage("load_data"):
        evaluation = Evaluation(ctx.cfg, model, tokenizer, ctx.timer, ctx.metrics)
        bos = calibration_bos(c.bos, evaluation.protocol.bos)
        if c.bos == "auto":
            log.info("calib.bos=auto: %s (the evaluation's BOS policy resolves to %s)", bos, evaluation.protocol.bos)
            ctx.identity = ctx.identity.with_calib_bos(ctx.cfg, bos)
        elif bos == "none" and evaluation.protocol.bos == "chunk":
            # Gemma-3: thresholds and α fitted without a BOS close a fraction of the gap that
            # they close with one (benchmarks/RESULTS.md, "SPON recipe search")
            log.warning("The evaluation puts a BOS before every block (eval.ppl.bos=%s resolves to chunk) but "
                        "calibration and α training do not (calib.bos=none): the sparsifier and α are fitted to "
                        "inputs the evaluated model never sees; set calib.bos=auto or row", ctx.cfg.eval.ppl.bos)
        ctx.results["calib_bos"] = bos
        calib = token_blocks(tokenizer, c.corpus, "calibration", c.seq_len, c.num_sequences,
                             bos_token_id=tokenizer.bos_token_id if bos == "row" else None)
        if calib.shape[0] < c.num_sequences:
            log.warning("Corpus %s has only %d calibration sequences of %d tokens (asked for %d)",
                        c.corpus, calib.shape[0], c.seq_len, c.num_sequences)
        return calib, evaluation


def _sparse_eval(ctx: RunContext, evaluation: Evaluation, sparsifier) -> None:
    evaluation.run("sparse", measure=sparsifier)
    ctx.results["sparsity"].update(evaluation.measured)
    ctx.results.update(evaluation.summary())
    if ctx.cfg.eval.sensitivity:
        with ctx.timer.stage("sensitivity"):
            ctx.results["sensitivity"] = evaluation.sensitivity(sparsifier, ctx.cfg.eval.sensitivity_perturbation)


def _spon_stage(ctx: RunContext, model, sparsifier, calib: torch.Tensor, evaluation: Evaluation,
                evaluate: bool) -> dict:
    """Train (or restore) α, fold it with the exactness check, evaluate; returns the biases."""
    from spon_exp.spon import fold_alpha_checked

    spon = _spon(ctx, model, sparsifier, calib)
    with ctx.timer.stage("fold"):
        ids, where = evaluation.first_batch(calib)
        biases, ctx.results["fold"] = fold_alpha_checked(model, spon, ids, checked_on=where)
    if evaluate:
        evaluation.run("spon")
    return biases


def _sample_table(ctx: RunContext, evaluation: Evaluation) -> dict:
    """``eval.zeroshot.log_samples``: every evaluated document with the dense / sparse / +SPON
    answers side by side, into the run folder (and a W&B table); returns what results.json
    records of it (the file and, per task, how many answers differ)."""
    from spon_exp.evaluation.zeroshot import SAMPLE_COLUMNS, sample_table, sample_table_summary, write_sample_table

    rows = sample_table(evaluation.zeroshot)
    write_sample_table(ctx.path(SAMPLES_FILE), rows)
    if ctx.tracker is not None:
        ctx.tracker.log_table("zeroshot/samples", SAMPLE_COLUMNS, rows)
    differing = sum(bool(r["differs"]) for r in rows)
    log.info("zero-shot samples: %d documents, %d with differing answers -> %s", len(rows), differing,
             ctx.path(SAMPLES_FILE))
    return {"file": SAMPLES_FILE, "documents": len(rows), "documents_differing": differing,
            "per_task": sample_table_summary(rows)}


def _export(ctx: RunContext, model, tokenizer, sparsifier, biases) -> None:
    from spon_exp.spon import export_checkpoint, save_sparse_state

    with ctx.timer.stage("export"):
        save_sparse_state(ctx.path(EXPORT_DIR), sparsifier, biases,
                          extra_meta={"model": ctx.cfg.model.path, "config_hash": ctx.identity.config_hash})
        if ctx.cfg.save_checkpoint:
            written = export_checkpoint(model, tokenizer, ctx.path(EXPORT_DIR) / "checkpoint")
            # recorded where it lies once the run ends ok: a first attempt's staged export folder is renamed then
            first = ctx.attempt is None or not ctx.attempt.keeps_finished_run
            final = ctx.run_dir / EXPORT_DIR / "checkpoint" if first else written
            ctx.results["checkpoint"] = None if written is None else str(final)


def _calibrate(ctx: RunContext, model, calib: torch.Tensor):
    """Attach the sparsifier and calibrate it, or load its cached state."""
    from spon_exp.sparsifiers import build_sparsifier
    from spon_exp.spon import save_sparse_state
    from spon_exp.spon.fold import read_sparse_state

    cfg, results, timer = ctx.cfg, ctx.results, ctx.timer
    sparsifier = build_sparsifier(cfg.sparsifier.name, **sparsifier_kwargs(cfg)).attach(model)
    skey = ctx.identity.sparsifier_key
    state_dir = ctx.cache / "sparsifier" / skey

    def load(folder: Path) -> bool:
        sparsifier.load_state_dict(read_sparse_state(folder)[1])
        return True

    with timer.stage("calibrate"):
        if read_entry(state_dir, load, "sparsifier state"):
            results["cache"]["sparsifier"] = "hit"
        else:
            threshold_batches = calib[: cfg.calib.threshold_sequences].split(cfg.calib.batch_size)
            sparsifier.calibrate(model, threshold_batches)
            write_entry(state_dir, lambda folder: save_sparse_state(folder, sparsifier))
            results["cache"]["sparsifier"] = "miss"
    results["cache"]["sparsifier_key"] = skey
    return sparsifier


def _dense_baseline(ctx: RunContext, evaluation: Evaluation, sparsifier) -> None:
    """Evaluate the dense model, or read it from the dense cache (shared by a sweep's runs)."""
    from spon_exp.evaluation.dense_cache import load_dense, save_dense
    from spon_exp.spon import dense_mode

    results = ctx.results
    dkey = ctx.identity.dense_key
    dense_dir = ctx.cache / "dense" / dkey
    cached = load_dense(dense_dir, evaluation.corpora, want_zeroshot=bool(evaluation.zeroshot_tasks))
    results["cache"]["dense_key"] = dkey
    if cached is not None:
        evaluation.restore("dense", *cached)
        results["cache"]["dense"] = "hit"
        return
    with dense_mode(sparsifier):
        evaluation.run("dense")
    save_dense(dense_dir, {c: b["dense"] for c, b in evaluation.blocks.items()}, evaluation.zeroshot.get("dense"))
    results["cache"]["dense"] = "miss"


def _spon(ctx: RunContext, model, sparsifier, calib: torch.Tensor):
    """Build the SPON alphas and train them, or load them from the alpha cache (entry
    ``alpha/<key>``: α + train.json; ``alpha/<key>.checkpoint`` holds the resumable training
    checkpoint until the α entry is written)."""
    from safetensors.torch import load_file, save_file

    from spon_exp.spon import Spon

    cfg, results = ctx.cfg, ctx.results
    which = cfg.spon.projections  # a set name or a list of projection names
    which = which if isinstance(which, str) else [str(n) for n in which]
    spon = Spon(sparsifier, cfg.spon.count, which, apply=cfg.spon.apply)
    akey = ctx.identity.alpha_key
    alpha_dir = ctx.cache / "alpha" / akey
    checkpoint_dir = alpha_dir.with_name(f"{akey}.checkpoint")
    results["cache"]["alpha_key"] = akey

    def load(folder: Path) -> dict:
        info = json.loads((folder / TRAIN_INFO_FILE).read_text())
        spon.load_alpha_state(load_file(str(folder / ALPHA_FILE)))
        return info

    def fill(folder: Path) -> None:
        save_file(spon.alpha_state(), str(folder / ALPHA_FILE))
        (folder / TRAIN_INFO_FILE).write_text(json.dumps(train_info, indent=2, default=str))

    with ctx.timer.stage("train_alpha"):
        train_info = read_entry(alpha_dir, load, "trained alpha")
        if train_info is not None:
            results["cache"]["alpha"] = "hit"
        else:
            results["cache"]["alpha"] = "miss"
            train_info = _train(ctx, model, sparsifier, spon, calib, checkpoint_dir)
            write_entry(alpha_dir, fill)
            remove_entry(checkpoint_dir)
    results["spon"] = {"count": cfg.spon.count, "projections": which, "apply": cfg.spon.apply,
                       "num_parameters": spon.num_parameters(), **train_info}
    write_atomic(ctx.path(ALPHA_FILE), lambda tmp: save_file(spon.alpha_state(), str(tmp)))
    return spon


def _train(ctx: RunContext, model, sparsifier, spon, calib, checkpoint_dir) -> dict:
    from spon_exp.spon import TrainConfig, train_alpha

    cfg, metrics, tracker = ctx.cfg, ctx.metrics, ctx.tracker
    spon.initialise(cfg.spon.init, model, sparsifier, calib[: cfg.calib.threshold_sequences].split(cfg.calib.batch_size))
    if not cfg.spon.train or cfg.spon.steps == 0:
        return {"trained": False, "init": cfg.spon.init}
    s = cfg.spon
    tcfg = TrainConfig.from_options(s, seed=training_seed(cfg))

    def on_step(step: int, loss: float, lr: float) -> None:
        metrics.write("train", step=step, kl=loss, lr=lr)
        tracker.log({"train/kl": loss, "train/lr": lr}, step=step)

    def on_start(step: int) -> None:  # an earlier attempt's steps from here on are redone: log each once
        dropped = metrics.forget_steps("train", step)
        if dropped:
            log.info("metrics.jsonl: dropped %d train records of an earlier attempt (step >= %d)", dropped, step)
        tracker.replay_history(before_step=step)  # offline W&B: the earlier attempt's steps, into this attempt's run

    result = train_alpha(model, sparsifier, spon, calib, tcfg, on_step=on_step, on_start=on_start,
                         checkpoint_path=checkpoint_dir)
    return {"trained": True, "init": s.init, "steps": result.steps, "seconds": result.seconds,
            "resumed_from": result.resumed_from, "final_kl": result.losses[-1] if result.losses else None,
            "initial_kl": result.losses[0] if result.losses else None, "loss_curve": result.losses}
