"""One experiment, end to end, in plain Python: ``run(cfg, run_dir) -> results``.

load model -> attach sparsifier -> calibrate (or re-use cached thresholds) -> evaluate
dense / sparse -> train SPON alpha (or re-use cached alpha) -> fold into biases ->
evaluate sparse+SPON -> export -> results.json (+ W&B). Nothing here imports Hydra.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from spon_exp import __version__
from spon_exp.config import validate
from spon_exp.tracking.files import ENV, METRICS, RESULTS, MetricsWriter, environment, read_json, write_json_atomic
from spon_exp.tracking.identity import alpha_key, config_hash, plain, sparsifier_key
from spon_exp.tracking.wandb_logger import Tracker

log = logging.getLogger(__name__)

ALPHA_FILE = "alpha.safetensors"


class Timer:
    def __init__(self, metrics: MetricsWriter):
        self.timings: dict[str, float] = {}
        self.metrics = metrics

    @contextlib.contextmanager
    def stage(self, name: str):
        log.info("== %s", name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            self.timings[name] = self.timings.get(name, 0.0) + seconds
            self.metrics.write("timing", stage=name, seconds=seconds)


def sparsifier_kwargs(cfg: DictConfig) -> dict:
    kwargs = {k: v for k, v in plain(cfg.sparsifier).items() if k != "name"}
    return {"sparsity": cfg.sparsity, **kwargs}


def is_done(run_dir: Path, chash: str) -> bool:
    previous = read_json(Path(run_dir) / RESULTS)
    return bool(previous and previous.get("status") == "ok" and previous.get("config_hash") == chash)


def _guard_run_dir(run_dir: Path, chash: str) -> None:
    """Never overwrite a finished run of a *different* config in the same folder."""
    previous = read_json(run_dir / RESULTS)
    if previous and previous.get("config_hash") not in (None, chash) and previous.get("status") == "ok":
        raise FileExistsError(
            f"{run_dir} already holds finished run {previous['config_hash']} of a different config; "
            f"choose another hydra.run.dir (or remove that folder)"
        )


def _ppl_data(tokenizer, corpus: str, cfg: DictConfig):
    from spon_exp.data.corpora import token_blocks, token_stream

    p = cfg.eval.ppl
    if p.protocol == "chunks":
        return token_blocks(tokenizer, corpus, "evaluation", p.seq_len, p.max_sequences)
    stream = token_stream(tokenizer, corpus, "evaluation")
    return stream[: p.max_tokens] if p.max_tokens else stream


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run one experiment into ``run_dir``; always leaves a complete results.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    chash = config_hash(cfg)
    _guard_run_dir(run_dir, chash)
    metrics = MetricsWriter(run_dir / METRICS)
    timer = Timer(metrics)
    results: dict = {
        "status": "running", "error": None, "config_hash": chash, "spon_exp_version": __version__,
        "started_at": datetime.now(timezone.utc).isoformat(), "finished_at": None,
        "model": {"path": cfg.model.path, "name": cfg.model.name, "dtype": cfg.model.dtype},
        "sparsifier": cfg.sparsifier.name, "spon_count": cfg.spon.count, "calib_corpus": cfg.calib.corpus,
        "seed": cfg.seed, "sweep_name": cfg.sweep_name,
        "sparsity": {"target": cfg.sparsity, "measured": None},
        "ppl": {}, "gap_closure": {}, "timings": timer.timings, "cache": {},
    }
    (run_dir / "error.txt").unlink(missing_ok=True)  # from an earlier, interrupted attempt
    write_json_atomic(run_dir / RESULTS, results)
    write_json_atomic(run_dir / ENV, environment())
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker = None
    ok = False
    try:
        t_total = time.perf_counter()
        validate(cfg)
        tracker = Tracker(cfg, chash, run_dir, plain(cfg))
        _run_stages(cfg, run_dir, results, timer, metrics, tracker)
        results["timings"]["total"] = time.perf_counter() - t_total
        results["status"] = "ok"
        ok = True
    except BaseException as e:  # noqa: BLE001 - record every failure, then re-raise
        results["status"] = "failed"
        results["error"] = f"{type(e).__name__}: {e}"
        (run_dir / "error.txt").write_text(traceback.format_exc())
        raise
    finally:
        results["finished_at"] = datetime.now(timezone.utc).isoformat()
        write_json_atomic(run_dir / RESULTS, results)
        if tracker is not None:
            tracker.finish(results, ok)
    return results


def _run_stages(cfg: DictConfig, run_dir: Path, results: dict, timer: Timer, metrics: MetricsWriter,
                tracker: Tracker) -> None:
    from safetensors.torch import load_file, save_file

    from spon_exp.data.corpora import token_blocks
    from spon_exp.evaluation.perplexity import PerplexityProtocol, gap_closure, perplexity
    from spon_exp.models.loading import load_model
    from spon_exp.sparsifiers import build_sparsifier
    from spon_exp.spon import Spon, dense_mode, export_checkpoint, fold_alpha, save_sparse_state
    from spon_exp.spon.fold import STATE_FILE, read_sparse_state

    zeroshot_tasks = list(cfg.eval.zeroshot.tasks)  # validated in validate(), before the model loads
    torch.manual_seed(cfg.seed)
    cache = Path(cfg.paths.cache)
    with timer.stage("load_model"):
        loaded = load_model(cfg.model.path, cfg.model.dtype, cfg.model.device, cfg.model.device_map)
    model, tokenizer = loaded.model, loaded.tokenizer
    dense_only = cfg.sparsifier.name == "dense"
    use_spon = not dense_only and cfg.spon.count > 0
    variants = [v for v in cfg.eval.variants if v == "dense" or (v == "sparse" and not dense_only)
                or (v == "spon" and use_spon)]

    with timer.stage("load_data"):
        calib = token_blocks(tokenizer, cfg.calib.corpus, "calibration", cfg.calib.seq_len, cfg.calib.num_sequences)
        if calib.shape[0] < cfg.calib.num_sequences:
            log.warning("Corpus %s has only %d calibration sequences of %d tokens (asked for %d)",
                        cfg.calib.corpus, calib.shape[0], cfg.calib.seq_len, cfg.calib.num_sequences)
        ppl_data = {c: _ppl_data(tokenizer, c, cfg) for c in cfg.eval.ppl.corpora}
    protocol = PerplexityProtocol(protocol=cfg.eval.ppl.protocol, seq_len=cfg.eval.ppl.seq_len,
                                  context=cfg.eval.ppl.context, window=cfg.eval.ppl.window,
                                  batch_size=cfg.eval.ppl.batch_size)
    ppl = results["ppl"] = {c: {} for c in ppl_data}

    sparsifier = spon = None
    if not dense_only:
        sparsifier = build_sparsifier(cfg.sparsifier.name, **sparsifier_kwargs(cfg)).attach(model)
        skey = sparsifier_key(cfg)
        state_dir = cache / "sparsifier" / skey
        with timer.stage("calibrate"):
            if (state_dir / STATE_FILE).exists():
                sparsifier.load_state_dict(read_sparse_state(state_dir)[1])
                results["cache"]["sparsifier"] = "hit"
            else:
                threshold_batches = calib[: cfg.calib.threshold_sequences].split(cfg.calib.batch_size)
                sparsifier.calibrate(model, threshold_batches)
                save_sparse_state(state_dir, sparsifier)
                results["cache"]["sparsifier"] = "miss"
        results["cache"]["sparsifier_key"] = skey

    def evaluate(variant: str) -> None:
        with timer.stage(f"eval_ppl_{variant}"):
            for i, (corpus, data) in enumerate(ppl_data.items()):
                measure = variant == "sparse" and i == 0
                with sparsifier.measuring() if measure else contextlib.nullcontext():
                    ppl[corpus][variant] = perplexity(model, data, protocol, desc=f"perplexity {corpus} ({variant})")
                if measure:
                    m = sparsifier.measured_sparsity()
                    results["sparsity"].update(measured=m["model"], per_layer=m["per_layer"], measured_on=corpus)
                metrics.write("ppl", corpus=corpus, variant=variant, value=ppl[corpus][variant])
                log.info("perplexity %s %s: %.3f", corpus, variant, ppl[corpus][variant])

    zeroshot = {}

    def evaluate_zeroshot(variant: str) -> None:
        if not zeroshot_tasks:
            return
        from spon_exp.evaluation.zeroshot import evaluate_zeroshot as run_lm_eval

        z = cfg.eval.zeroshot
        with timer.stage(f"eval_zeroshot_{variant}"):
            zeroshot[variant] = run_lm_eval(model, tokenizer, zeroshot_tasks, batch_size=z.batch_size,
                                            num_fewshot=z.num_fewshot, limit=z.limit, source=z.source)

    for variant in ("dense", "sparse"):
        if variant in variants:
            with dense_mode(sparsifier) if variant == "dense" else contextlib.nullcontext():
                evaluate(variant)
                evaluate_zeroshot(variant)

    biases = None
    if use_spon:
        spon = Spon(sparsifier, cfg.spon.count, cfg.spon.projections)
        akey = alpha_key(cfg)
        alpha_dir = cache / "alpha" / akey
        alpha_dir.mkdir(parents=True, exist_ok=True)
        results["cache"]["alpha_key"] = akey
        with timer.stage("train_alpha"):
            if (alpha_dir / ALPHA_FILE).exists():
                spon.load_alpha_state(load_file(str(alpha_dir / ALPHA_FILE)))
                results["cache"]["alpha"] = "hit"
                train_info = read_json(alpha_dir / "train.json") or {}
            else:
                results["cache"]["alpha"] = "miss"
                train_info = _train(cfg, model, sparsifier, spon, calib, alpha_dir, metrics, tracker)
                save_file(spon.alpha_state(), str(alpha_dir / (ALPHA_FILE + ".tmp")))
                (alpha_dir / (ALPHA_FILE + ".tmp")).replace(alpha_dir / ALPHA_FILE)
                write_json_atomic(alpha_dir / "train.json", train_info)
                (alpha_dir / "train.ckpt").unlink(missing_ok=True)
        results["spon"] = {"count": cfg.spon.count, "projections": cfg.spon.projections,
                           "num_parameters": spon.num_parameters(), **train_info}
        shutil.copyfile(alpha_dir / ALPHA_FILE, run_dir / ALPHA_FILE)
        with timer.stage("fold"):
            biases = fold_alpha(spon)
        if "spon" in variants:
            evaluate("spon")
            evaluate_zeroshot("spon")

    for corpus, values in ppl.items():
        g = gap_closure(values.get("dense"), values.get("sparse"), values.get("spon"))
        if g is not None:
            results["gap_closure"][corpus] = g
    if zeroshot:
        results["zeroshot"] = _zeroshot_summary(zeroshot)

    if sparsifier is not None and cfg.save_export:
        with timer.stage("export"):
            save_sparse_state(run_dir / "export", sparsifier, biases,
                              extra_meta={"model": cfg.model.path, "config_hash": results["config_hash"]})
            if cfg.save_checkpoint:
                results["checkpoint"] = str(export_checkpoint(model, tokenizer, run_dir / "export" / "checkpoint"))
    bad = [f"{c}/{v}" for c, vs in ppl.items() for v, x in vs.items() if not math.isfinite(x)]
    if bad:
        log.warning("Non-finite perplexity for %s", bad)


def _train(cfg, model, sparsifier, spon, calib, alpha_dir, metrics, tracker) -> dict:
    from spon_exp.spon import TrainConfig, train_alpha

    spon.initialise(cfg.spon.init, model, sparsifier, calib[: cfg.calib.threshold_sequences].split(cfg.calib.batch_size))
    if not cfg.spon.train or cfg.spon.steps == 0:
        return {"trained": False, "init": cfg.spon.init}
    s = cfg.spon
    tcfg = TrainConfig(lr=s.lr, steps=s.steps, epochs=s.epochs, batch_size=s.batch_size, weight_decay=s.weight_decay,
                       schedule=s.schedule, warmup_steps=s.warmup_steps, max_grad_norm=s.max_grad_norm,
                       gradient_checkpointing=s.gradient_checkpointing, logits_chunk_tokens=s.logits_chunk_tokens,
                       cache_teacher=s.cache_teacher,
                       seed=cfg.seed, checkpoint_every=s.checkpoint_every)

    def on_step(step: int, loss: float, lr: float) -> None:
        metrics.write("train", step=step, kl=loss, lr=lr)
        tracker.log({"train/kl": loss, "train/lr": lr}, step=step)

    result = train_alpha(model, sparsifier, spon, calib, tcfg, on_step=on_step, checkpoint_path=alpha_dir / "train.ckpt")
    return {"trained": True, "init": s.init, "steps": result.steps, "seconds": result.seconds,
            "resumed_from": result.resumed_from, "final_kl": result.losses[-1] if result.losses else None,
            "initial_kl": result.losses[0] if result.losses else None, "loss_curve": result.losses}


def _zeroshot_summary(per_variant: dict) -> dict:
    from spon_exp.evaluation.zeroshot import zeroshot_recovery

    out = {"variants": {}, "average": {}, "source": {}, "lm_eval_version": None}
    for variant, r in per_variant.items():
        out["variants"][variant] = {task: {**metrics, "paper_metric": r["paper_metric"][task]}
                                    for task, metrics in r["tasks"].items()}
        out["average"][variant] = r["average"]
        out["source"] = r.get("source", {})
        out["lm_eval_version"] = r.get("lm_eval_version")
        out["limit"] = r.get("limit")
    avg = out["average"]
    if {"dense", "sparse", "spon"} <= avg.keys():
        recovery = zeroshot_recovery(avg["dense"], avg["sparse"], avg["spon"])
        out["recovery"] = recovery if math.isfinite(recovery) else None  # undefined when sparse == dense
    return out


def summary_table(results: dict) -> str:
    """The short table printed at the end of a run."""
    lines = [f"spon-exp run {results['config_hash']}  [{results['status']}]",
             f"model {results['model']['name']}  sparsifier {results['sparsifier']}  "
             f"target sparsity {results['sparsity']['target']}  measured "
             + (f"{results['sparsity']['measured']:.3f}" if results["sparsity"].get("measured") is not None else "n/a"),
             f"{'corpus':<14}{'dense':>10}{'sparse':>10}{'+SPON':>10}{'gap closed':>12}"]
    for corpus, v in results["ppl"].items():
        def fmt(x):
            return f"{x:>10.3f}" if x is not None else f"{'-':>10}"
        g = results["gap_closure"].get(corpus)
        lines.append(f"{corpus:<14}{fmt(v.get('dense'))}{fmt(v.get('sparse'))}{fmt(v.get('spon'))}"
                     + (f"{g * 100:>11.1f}%" if g is not None else f"{'-':>12}"))
    zs = results.get("zeroshot")
    if zs:
        avg = zs["average"]
        lines.append("zero-shot avg  " + "  ".join(f"{k} {v:.4f}" for k, v in avg.items())
                     + (f"  recovery {zs['recovery'] * 100:.1f}%" if zs.get("recovery") is not None else ""))
    lines.append("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings"].items()))
    return "\n".join(lines)
