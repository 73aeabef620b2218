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
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from spon_exp import __version__
from spon_exp.config import resolve_aliases, sparsifier_options, validate
from spon_exp.sparsifiers import REGISTRY
from spon_exp.tracking.files import (ENV, METRICS, RESULTS, MetricsWriter, environment, read_json, write_json_atomic,
                                     write_text_atomic)
from spon_exp.tracking.identity import RunIdentity, calibration_seed, plain, sparsifier_label, training_seed
from spon_exp.tracking.store import read_entry, remove_entry, write_atomic, write_entry
from spon_exp.tracking.wandb_logger import Tracker

log = logging.getLogger(__name__)

ALPHA_FILE = "alpha.safetensors"
TRAIN_INFO_FILE = "train.json"  # next to the cached α: how it was trained (loss curve, steps)
UNITS_FILE = "eval_units.safetensors"  # per-block NLLs and per-document scores behind the intervals


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; its message says where, and that a re-run resumes."""


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


def is_done(run_dir: Path, chash: str) -> bool:
    previous = read_json(Path(run_dir) / RESULTS)
    return bool(previous and previous.get("status") == "ok" and previous.get("config_hash") == chash)


def guard_run_dir(run_dir: Path, chash: str) -> None:
    """Never overwrite a finished run of a *different* config in the same folder."""
    previous = read_json(run_dir / RESULTS)
    if previous and previous.get("config_hash") not in (None, chash) and previous.get("status") == "ok":
        raise FileExistsError(
            f"{run_dir} already holds finished run {previous['config_hash']} of a different config; "
            f"choose another hydra.run.dir (or remove that folder)"
        )


def _attempt_number(run_dir: Path, chash: str) -> int | None:
    """None while the folder holds no finished run of this config; else the number of a new
    attempt beside it (one more than any attempt file or folder there)."""
    if not is_done(run_dir, chash):
        return None
    numbers = [int(m.group(1)) for p in run_dir.glob("*.attempt-*")
               if (m := re.fullmatch(r".*\.attempt-(\d+)(\.[a-z]+)?", p.name))]
    return max(numbers, default=0) + 1


def _ppl_data(tokenizer, corpus: str, cfg: DictConfig):
    from spon_exp.data.corpora import token_blocks, token_stream

    p = cfg.eval.ppl
    if p.protocol == "chunks":
        return token_blocks(tokenizer, corpus, p.split, p.seq_len, p.max_sequences)
    stream = token_stream(tokenizer, corpus, p.split)
    return stream[: p.max_tokens] if p.max_tokens else stream


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

    @property
    def cache(self) -> Path:
        return Path(self.cfg.paths.cache)


class _Attempt:
    """Where one attempt records itself: results.json, metrics.jsonl and ``.hydra/``, or, while
    the folder holds a finished run of this config, ``results.attempt-<N>.json``,
    ``metrics.attempt-<N>.jsonl`` and ``.hydra.attempt-<N>/`` beside them (see :func:`run`)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, chash: str):
        self.cfg, self.run_dir = cfg, run_dir
        self.number = _attempt_number(run_dir, chash)
        self.keeps_finished_run = self.number is not None
        suffix = "" if self.number is None else f".attempt-{self.number}"
        self.results_file = run_dir / (RESULTS if self.number is None else f"results{suffix}.json")
        self.error_file = run_dir / f"error{suffix}.txt"
        self.metrics_file = run_dir / (METRICS if self.number is None else f"metrics{suffix}.jsonl")
        self.hydra_dir = run_dir / f"{HYDRA_DIR}{suffix}"

    def _record_run(self) -> None:  # the environment and config behind results.json
        write_json_atomic(self.run_dir / ENV, environment())
        write_text_atomic(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))

    def _log_handlers(self) -> list[logging.FileHandler]:
        """File handlers writing into this run folder (Hydra's ``<job>.log``)."""
        return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)
                and Path(h.baseFilename).parent == self.run_dir.resolve() and ".attempt-" not in h.baseFilename]

    def _redirect_logs(self) -> None:
        """Beside a finished run, this attempt logs to ``<job>.attempt-<N>.log``: the run's log stays as it is."""
        self._logs = []
        for handler in self._log_handlers():
            path = Path(handler.baseFilename)
            handler.acquire()
            try:
                handler.close()
                handler.baseFilename = str(path.with_name(f"{path.stem}.attempt-{self.number}{path.suffix}"))
            finally:
                handler.release()
            self._logs.append((handler, path))

    def _restore_logs(self, ok: bool) -> None:
        for handler, path in getattr(self, "_logs", []):
            handler.acquire()
            try:
                handler.close()
                if ok and Path(handler.baseFilename).exists():
                    os.replace(handler.baseFilename, path)  # the attempt that produced results.json
                handler.baseFilename = str(path)
            finally:
                handler.release()

    def start(self, results: dict) -> None:
        if self.keeps_finished_run:
            self._redirect_logs()
            log.info("%s holds a finished run of this config: this attempt writes %s and replaces results.json "
                     "only if it finishes ok", self.run_dir, self.results_file.name)
        else:
            self.error_file.unlink(missing_ok=True)  # from an earlier, interrupted attempt
        write_json_atomic(self.results_file, results)
        if not self.keeps_finished_run:
            self._record_run()

    def failed(self) -> None:
        self.error_file.write_text(traceback.format_exc())

    def finish(self, results: dict, ok: bool) -> None:
        results["finished_at"] = datetime.now(timezone.utc).isoformat()
        write_json_atomic(self.results_file, results)
        self._restore_logs(ok)
        if ok and self.keeps_finished_run:  # this attempt's record becomes the run's
            self._record_run()
            if self.metrics_file.exists():
                os.replace(self.metrics_file, self.run_dir / METRICS)
            if self.hydra_dir.is_dir():
                _replace_folder(self.hydra_dir, self.run_dir / HYDRA_DIR)
            write_json_atomic(self.run_dir / RESULTS, results)
            self.results_file.unlink()


HYDRA_DIR = ".hydra"  # Hydra's record of the run (written by the CLI through run(..., hydra_files=...))


def _replace_folder(new: Path, target: Path) -> None:
    """``target`` replaced by ``new`` (two renames; the old one removed after)."""
    old = target.with_name(f"{target.name}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


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

    A finished run is never lost to a later attempt: when ``run_dir`` already holds an ``ok``
    results.json of the same config (``skip_if_done=false``, or this function called again),
    the new attempt records itself in ``results.attempt-<N>.json`` (and, failing,
    ``error.attempt-<N>.txt``) and leaves results.json, env.json and config.yaml alone.
    Only if it ends ``ok`` does it replace them, and its attempt file is then removed; a
    failed attempt's files stay as its record. The same holds for the training log
    (``metrics.attempt-<N>.jsonl``) and Hydra's record (``hydra_files``, a function writing
    the ``.hydra`` files into the folder it is given: ``.hydra.attempt-<N>/``), so a killed
    re-attempt never rewrites a byte of the finished run.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolve_aliases(cfg)  # sparsifier.sparsity -> sparsity, before the run is named
    identity = RunIdentity.of(cfg)
    guard_run_dir(run_dir, identity.config_hash)
    attempt = _Attempt(cfg, run_dir, identity.config_hash)
    if hydra_files is not None:
        hydra_files(attempt.hydra_dir)
    metrics = MetricsWriter(attempt.metrics_file)
    timer = Timer(metrics)
    ctx = RunContext(cfg, run_dir, identity, _initial_results(cfg, identity, timer), timer, metrics)
    attempt.start(ctx.results)
    ok = False
    try:
        t_total = time.perf_counter()
        validate(cfg)
        ctx.tracker = Tracker(cfg, identity.wandb_run_id, run_dir, plain(cfg), identity.config_hash,
                              metrics_file=attempt.metrics_file)
        _run_stages(ctx)
        ctx.results["timings"]["total"] = time.perf_counter() - t_total
        ctx.results["status"] = "ok"
        ok = True
    except BaseException as e:  # noqa: BLE001 - record every failure, then re-raise
        ctx.results["status"] = "failed"
        ctx.results["error"] = f"{type(e).__name__}: {e}"
        attempt.failed()
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C: say where, and that a re-run resumes
            ctx.results["error"] = _interrupted(e, timer.current)
            raise RunInterrupted(ctx.results["error"]) from e
        raise
    finally:
        attempt.finish(ctx.results, ok)
        if ctx.tracker is not None:
            ctx.tracker.finish(ctx.results, ok)
    return ctx.results


TRIAL_FILE = "trial.json"


class TrialFailed(RuntimeError):
    """A search trial whose runs failed or gave no gap closure: the sweeper records it as failed."""


def run_trial(cfg: DictConfig, trial_dir: str | Path, overrides: list[str] | None = None) -> float:
    """One trial of a recipe search (``search.seeds``): the config run once per seed into
    ``<trial_dir>/seed=<s>`` (finished seeds are read back), and the mean of their gap
    closures on the first perplexity corpus (the validation split) returned, the objective
    the sweeper maximises. ``trial.json`` records every seed's value and the job's
    ``overrides`` (the recipe the sweeper chose). Raises
    :class:`TrialFailed` when a seed's run fails or its gap closure is undefined or not
    finite (a diverged α), so the sweeper records a failed trial, not a 0."""
    trial_dir = Path(trial_dir)
    seeds = list(cfg.search.seeds)
    corpus = cfg.eval.ppl.corpora[0]
    values, runs = [], {}
    for seed in seeds:
        seed_cfg = cfg.copy()
        with open_dict(seed_cfg):
            seed_cfg.seed = seed
            seed_cfg.search.seeds = []
            if "hydra" in seed_cfg:
                del seed_cfg["hydra"]
        seed_dir = trial_dir / f"seed={seed}"
        if is_done(seed_dir, RunIdentity.of(seed_cfg).config_hash):
            results = read_json(seed_dir / RESULTS)
        else:
            try:
                results = run(seed_cfg, seed_dir)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of a seed fails the trial
                runs[str(seed)] = {"error": f"{type(e).__name__}: {e}"}
                write_json_atomic(trial_dir / TRIAL_FILE, {"status": "failed", "seeds": runs, "overrides": overrides})
                raise TrialFailed(f"seed {seed} failed: {type(e).__name__}: {e}") from e
        gap = (results.get("gap_closure") or {}).get(corpus)
        runs[str(seed)] = {"gap_closure": gap, "ppl": (results.get("ppl") or {}).get(corpus),
                           "config_hash": results.get("config_hash")}
        if gap is None or not math.isfinite(gap):
            write_json_atomic(trial_dir / TRIAL_FILE, {"status": "failed", "seeds": runs, "overrides": overrides})
            raise TrialFailed(f"seed {seed}: no finite gap closure on {corpus} ({gap}); the trial failed")
        values.append(gap)
    objective = sum(values) / len(values)
    write_json_atomic(trial_dir / TRIAL_FILE, {"status": "ok", "objective": objective, "metric": f"gap_closure/{corpus}",
                                               "split": cfg.eval.ppl.split, "seeds": runs, "overrides": overrides})
    log.info("trial: mean gap closure on %s (%s split) over seeds %s: %.4f", corpus, cfg.eval.ppl.split, seeds,
             objective)
    return objective


def _interrupted(e: KeyboardInterrupt, stage: str) -> str:
    from spon_exp.spon.train import TrainingInterrupted

    if isinstance(e, TrainingInterrupted):  # "interrupted at step N; ... resume from step M"
        return str(e)
    return (f"interrupted during {stage}; re-run the same command to continue "
            f"(calibration and finished stages are cached)")


def _run_stages(ctx: RunContext) -> None:
    """load -> calibrate-or-restore -> dense baseline -> sparse eval -> train-or-restore α ->
    fold (checked) -> evaluate -> export."""
    cfg, results = ctx.cfg, ctx.results
    torch.manual_seed(cfg.seed)
    model, tokenizer = _load_model(ctx)
    dense_only = not REGISTRY[cfg.sparsifier.name].sparsifies  # sparsifier=dense: the sparse model is the dense one
    use_spon = not dense_only and cfg.spon.count > 0
    variants = [v for v in cfg.eval.variants if v == "dense" or (v == "sparse" and not dense_only)
                or (v == "spon" and use_spon)]
    calib, evaluation = _load_data(ctx, model, tokenizer)

    sparsifier = _calibrate(ctx, model, calib)
    if "dense" in variants:
        _dense_baseline(ctx, evaluation, sparsifier)
        results.update(evaluation.summary())  # kept if a later stage fails
    if "sparse" in variants:
        _sparse_eval(ctx, evaluation, sparsifier)
    biases = _spon_stage(ctx, model, sparsifier, calib, evaluation, "spon" in variants) if use_spon else None
    results.update(evaluation.summary())
    if cfg.eval.zeroshot.log_samples and evaluation.zeroshot:
        results["zeroshot"]["samples"] = _sample_table(ctx, evaluation)
    evaluation.save_units(ctx.run_dir / UNITS_FILE)
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


SAMPLES_FILE = "zeroshot_samples.csv"


def _sample_table(ctx: RunContext, evaluation: Evaluation) -> dict:
    """``eval.zeroshot.log_samples``: every evaluated document with the dense / sparse / +SPON
    answers side by side, into the run folder (and a W&B table); returns what results.json
    records of it (the file and, per task, how many answers differ)."""
    from spon_exp.evaluation.zeroshot import SAMPLE_COLUMNS, sample_table, sample_table_summary, write_sample_table

    rows = sample_table(evaluation.zeroshot)
    write_sample_table(ctx.run_dir / SAMPLES_FILE, rows)
    if ctx.tracker is not None:
        ctx.tracker.log_table("zeroshot/samples", SAMPLE_COLUMNS, rows)
    differing = sum(bool(r["differs"]) for r in rows)
    log.info("zero-shot samples: %d documents, %d with differing answers -> %s", len(rows), differing,
             ctx.run_dir / SAMPLES_FILE)
    return {"file": SAMPLES_FILE, "documents": len(rows), "documents_differing": differing,
            "per_task": sample_table_summary(rows)}


def _export(ctx: RunContext, model, tokenizer, sparsifier, biases) -> None:
    from spon_exp.spon import export_checkpoint, save_sparse_state

    with ctx.timer.stage("export"):
        save_sparse_state(ctx.run_dir / "export", sparsifier, biases,
                          extra_meta={"model": ctx.cfg.model.path, "config_hash": ctx.identity.config_hash})
        if ctx.cfg.save_checkpoint:
            ctx.results["checkpoint"] = str(export_checkpoint(model, tokenizer, ctx.run_dir / "export" / "checkpoint"))


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
    spon = Spon(sparsifier, cfg.spon.count, which)
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
    results["spon"] = {"count": cfg.spon.count, "projections": which,
                       "num_parameters": spon.num_parameters(), **train_info}
    write_atomic(ctx.run_dir / ALPHA_FILE, lambda tmp: save_file(spon.alpha_state(), str(tmp)))
    return spon


class Evaluation:
    """Evaluates the model as it currently is (hooks as set) under a variant's name, and keeps
    what the paired intervals resample: each corpus's per-block NLLs and each zero-shot task's
    per-document scores, per variant."""

    def __init__(self, cfg: DictConfig, model, tokenizer, timer: Timer, metrics: MetricsWriter):
        from spon_exp.evaluation.perplexity import PerplexityProtocol, resolve_bos
        from spon_exp.sparsifiers.base import TokenPolicy

        self.model, self.tokenizer, self.timer, self.metrics = model, tokenizer, timer, metrics
        p = cfg.eval.ppl
        bos, bos_token_id = resolve_bos(p.bos, p.protocol, tokenizer)  # "auto": the tokenizer's add_bos_token
        sparse_tokens = TokenPolicy.from_options(sparsifier_options(cfg.sparsifier)) if p.score == "sparsified" else None
        self.protocol = PerplexityProtocol(protocol=p.protocol, seq_len=p.seq_len, context=p.context,
                                           window=p.window, batch_size=p.batch_size, bos=bos,
                                           bos_token_id=bos_token_id, score_first_window=p.score_first_window,
                                           score=p.score, sparse_tokens=sparse_tokens)
        self.split = p.split  # evaluation (the test split) or validation (a recipe search's)
        self.data = {c: _ppl_data(tokenizer, c, cfg) for c in p.corpora}
        self.corpora = list(self.data)
        self.zeroshot_cfg = cfg.eval.zeroshot
        self.zeroshot_tasks = list(cfg.eval.zeroshot.tasks)  # validated before the model loaded
        self.bootstrap = cfg.eval.bootstrap
        self.blocks: dict[str, dict] = {c: {} for c in self.data}
        self.zeroshot: dict[str, dict] = {}
        self.measured: dict = {}

    def run(self, variant: str, measure=None) -> None:
        """Perplexity on every corpus (+ zero-shot); with ``measure`` (a sparsifier), its
        measured sparsity on the first corpus goes to :attr:`measured`."""
        from spon_exp.evaluation.perplexity import block_nll

        with self.timer.stage(f"eval_ppl_{variant}"):
            for i, (corpus, data) in enumerate(self.data.items()):
                counting = measure is not None and i == 0
                with measure.measuring() if counting else contextlib.nullcontext():
                    self.blocks[corpus][variant] = block_nll(self.model, data, self.protocol,
                                                             desc=f"perplexity {corpus} ({variant})")
                if counting:
                    m = measure.measured_sparsity()
                    self.measured = {"measured": m["model"], "effective": m["effective"], "per_layer": m["per_layer"],
                                     "per_projection": m["per_projection"], "measured_on": corpus}
                self._logged(corpus, variant)
        if self.zeroshot_tasks:
            from spon_exp.evaluation.zeroshot import evaluate_zeroshot

            z = self.zeroshot_cfg
            with self.timer.stage(f"eval_zeroshot_{variant}"):
                self.zeroshot[variant] = evaluate_zeroshot(self.model, self.tokenizer, self.zeroshot_tasks,
                                                           batch_size=z.batch_size, num_fewshot=z.num_fewshot,
                                                           limit=z.limit, source=z.source, log_samples=z.log_samples,
                                                           apply_chat_template=z.apply_chat_template,
                                                           fewshot_as_multiturn=z.fewshot_as_multiturn)

    def restore(self, variant: str, blocks: dict, zeroshot: dict | None) -> None:
        """Take a variant's results from a cache instead of evaluating it."""
        for corpus, b in blocks.items():
            self.blocks[corpus][variant] = b
            self._logged(corpus, variant, cached=True)
        if zeroshot is not None:
            self.zeroshot[variant] = zeroshot

    def _logged(self, corpus: str, variant: str, cached: bool = False) -> None:
        value = self.blocks[corpus][variant].perplexity
        self.metrics.write("ppl", corpus=corpus, variant=variant, value=value, cached=cached)
        log.info("perplexity %s %s: %.3f%s", corpus, variant, value, " (cached)" if cached else "")

    def first_batch(self, fallback: torch.Tensor) -> tuple[torch.Tensor, str]:
        """The first forward of the evaluation (the fold check's input) and its description."""
        from spon_exp.evaluation.perplexity import first_batch

        if not self.data:
            ids = fallback[:1]
            return ids, f"{ids.shape[0]} x {ids.shape[1]} calibration tokens"
        corpus = self.corpora[0]
        ids = first_batch(self.data[corpus], self.protocol)
        return ids, f"{ids.shape[0]} x {ids.shape[1]} tokens of {corpus}"

    def sensitivity(self, sparsifier, relative: float) -> dict:
        """The sparse model's perplexity on the first corpus with every threshold scaled by
        1 ± ``relative``: the spread is what numerical chaos alone does to the figure."""
        from spon_exp.evaluation.perplexity import block_nll

        corpus = self.corpora[0]
        base = self.blocks[corpus]["sparse"].perplexity
        perturbed = {}
        for sign in (1, -1):
            with sparsifier.thresholds_scaled(1 + sign * relative) as count:
                if count == 0:
                    return {"relative_perturbation": relative, "corpus": corpus, "sparse": base, "perturbed": {},
                            "spread": None, "relative_spread": None,
                            "note": f"{sparsifier.name} keeps no thresholds (top-k): nothing to perturb"}
                perturbed[f"{sign * relative:+g}"] = block_nll(self.model, self.data[corpus], self.protocol,
                                                                desc=f"sensitivity {sign * relative:+g}").perplexity
        values = [base, *perturbed.values()]
        spread = max(values) - min(values)
        log.info("sensitivity: sparse perplexity %.4f, thresholds x(1 +- %g): %s (spread %.4f)", base, relative,
                 ", ".join(f"{v:.4f}" for v in perturbed.values()), spread)
        return {"relative_perturbation": relative, "corpus": corpus, "sparse": base, "perturbed": perturbed,
                "spread": spread, "relative_spread": spread / base}

    def summary(self) -> dict:
        """``ppl``, ``ppl_ci``, ``gap_closure``, ``gap_closure_ci``, ``uncertainty`` and
        ``zeroshot`` (with its intervals) for results.json."""
        from spon_exp.evaluation.perplexity import gap_closure
        from spon_exp.evaluation.uncertainty import Bootstrap, perplexity_intervals

        boot = Bootstrap(self.bootstrap.resamples, self.bootstrap.confidence, self.bootstrap.seed)
        out: dict = {"ppl": {}, "ppl_ci": {}, "gap_closure": {}, "gap_closure_ci": {},
                     "ppl_protocol": {**self.protocol.describe(), "split": self.split},
                     "uncertainty": {"method": "paired bootstrap", "units": "perplexity: evaluation blocks; "
                                     "zero-shot: documents, within each task", "confidence": boot.confidence,
                                     "resamples": boot.resamples, "seed": boot.seed,
                                     "blocks": {c: next(iter(b.values())).nll.numel() if b else 0
                                                for c, b in self.blocks.items()}}}
        for corpus, variants in self.blocks.items():
            values = {v: b.perplexity for v, b in variants.items()}
            out["ppl"][corpus] = values
            intervals = perplexity_intervals(variants, boot)
            out["ppl_ci"][corpus] = intervals["ppl"]
            g = gap_closure(values.get("dense"), values.get("sparse"), values.get("spon"))
            if g is not None:
                out["gap_closure"][corpus] = g
                out["gap_closure_ci"][corpus] = intervals["gap_closure"]
        if self.zeroshot:
            out["zeroshot"] = _zeroshot_summary(self.zeroshot, boot)
        return out

    def save_units(self, path: Path) -> None:
        """Every variant's per-block NLLs and per-document scores (``<corpus>.<variant>.nll``,
        ``zeroshot.<variant>.<task>``): the units behind the intervals, for paired comparisons
        across runs."""
        from safetensors.torch import save_file

        state = {}
        for corpus, variants in self.blocks.items():
            for variant, b in variants.items():
                state.update(b.state(f"{corpus}.{variant}"))
        for variant, r in self.zeroshot.items():
            for task, scores in (r.get("item_scores") or {}).items():
                state[f"zeroshot.{variant}.{task}"] = torch.tensor(scores, dtype=torch.float64)
        if state:
            write_atomic(path, lambda tmp: save_file(state, str(tmp)))


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


def _zeroshot_summary(per_variant: dict, boot) -> dict:
    from spon_exp.evaluation.uncertainty import zeroshot_intervals
    from spon_exp.evaluation.zeroshot import zeroshot_recovery

    out = {"variants": {}, "average": {}, "source": {}, "lm_eval_version": None, "batch_sizes": {}}
    for variant, r in per_variant.items():
        out["variants"][variant] = {task: {**metrics, "paper_metric": r["paper_metric"][task]}
                                    for task, metrics in r["tasks"].items()}
        out["average"][variant] = r["average"]
        out["source"] = r.get("source", {})
        out["lm_eval_version"] = r.get("lm_eval_version")
        out["limit"] = r.get("limit")
        for key in ("num_fewshot", "batch_size", "apply_chat_template", "fewshot_as_multiturn"):  # lm-eval's settings
            out[key] = r.get(key)
        out["batch_sizes"][variant] = r.get("batch_sizes")  # what batch_size=auto chose
    avg = out["average"]
    if {"dense", "sparse", "spon"} <= avg.keys():
        recovery = zeroshot_recovery(avg["dense"], avg["sparse"], avg["spon"])
        out["recovery"] = recovery if math.isfinite(recovery) else None  # undefined when sparse == dense
    items = {v: {t: torch.tensor(s, dtype=torch.float64) for t, s in (r.get("item_scores") or {}).items()}
             for v, r in per_variant.items()}
    if all(items.values()):
        intervals = zeroshot_intervals(items, boot)
        out.update(ci=intervals["ci"], average_ci=intervals["average_ci"])
        if out.get("recovery") is not None:
            out["recovery_ci"] = intervals["recovery_ci"]
    return out


def summary_table(results: dict) -> str:
    """The short table printed at the end of a run (± half the 95 % interval)."""
    from spon_exp.tracking.intervals import format_with_interval

    measured, effective = results["sparsity"].get("measured"), results["sparsity"].get("effective")
    lines = [f"spon-exp run {results['config_hash']}  [{results['status']}]",
             f"model {results['model']['name']}  sparsifier {results.get('sparsifier_label') or results['sparsifier']}  "
             f"target sparsity {results['sparsity']['target']}  measured "
             + (f"{measured:.3f}" if measured is not None else "n/a")
             + (f"  effective {effective:.3f}" if effective is not None else ""),
             f"{'corpus':<14}{'dense':>18}{'sparse':>18}{'+SPON':>18}{'gap closed':>18}"]
    for corpus, v in results["ppl"].items():
        ci = (results.get("ppl_ci") or {}).get(corpus) or {}
        cells = [format_with_interval(v.get(k), ci.get(k)) for k in ("dense", "sparse", "spon")]
        gap = format_with_interval(results["gap_closure"].get(corpus),
                                   (results.get("gap_closure_ci") or {}).get(corpus), digits=1, scale=100, suffix=" %")
        lines.append(f"{corpus:<14}" + "".join(f"{c:>18}" for c in cells) + f"{gap:>18}")
    zs = results.get("zeroshot")
    if zs:
        avg_ci = zs.get("average_ci") or {}
        lines.append("zero-shot avg  " + "  ".join(f"{k} {format_with_interval(v, avg_ci.get(k), digits=4)}"
                                                   for k, v in zs["average"].items())
                     + (f"  recovery {format_with_interval(zs['recovery'], zs.get('recovery_ci'), 1, 100, ' %')}"
                        if zs.get("recovery") is not None else ""))
    if results.get("fold"):
        lines.append(f"fold check: max |logit difference| {results['fold']['max_abs_logit_diff']:g} "
                     f"on {results['fold']['checked_on']}")
    sens = results.get("sensitivity")
    if sens and sens.get("spread") is not None:
        lines.append(f"sensitivity: thresholds x(1 ± {sens['relative_perturbation']:g}) move sparse perplexity by up to "
                     f"{sens['spread']:.4f} ({sens['relative_spread'] * 100:.2f} %)")
    note = effective_sparsity_note(results["sparsity"])
    if note:
        lines.append(note)
    if (results.get("ppl_protocol") or {}).get("score") == "sparsified":
        lines.append("perplexity scores only the tokens the token policy sparsified (eval.ppl.score=sparsified)")
    if results["ppl"]:
        lines.append(f"± is half the 95 % interval over the evaluation text of this one seed ({results.get('seed')}); "
                     f"it excludes training randomness: compare over seeds (--multirun seed=0,1,2, then spon-exp-collect)")
    lines.append("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings"].items()))
    return "\n".join(lines)


#: Measured and effective sparsity further apart than this get a line in the summary.
EFFECTIVE_SPARSITY_GAP = 0.05


def effective_sparsity_note(sparsity: dict) -> str | None:
    """One line when the token policy kept enough tokens dense that the sparsity over every
    evaluated token is far below the sparsity over the sparsified ones."""
    measured, effective = sparsity.get("measured"), sparsity.get("effective")
    if measured is None or effective is None or measured - effective <= EFFECTIVE_SPARSITY_GAP:
        return None
    return (f"note: effective sparsity {effective:.3f} over every evaluated token is {(measured - effective) * 100:.0f} "
            f"points below the measured {measured:.3f}: the token policy ran the other tokens dense")
