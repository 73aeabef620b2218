"""One run's evaluation session: the model as it currently is (hooks as set) evaluated under
a variant's name (dense / sparse / spon), and what the paired intervals resample kept: each
corpus's per-block NLLs and each zero-shot task's per-document scores, per variant."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from spon_exp.sparsifiers.registry import sparsifier_options
from spon_exp.tracking.files import MetricsWriter
from spon_exp.tracking.store import write_atomic

log = logging.getLogger(__name__)


def _ppl_data(tokenizer, corpus: str, cfg: DictConfig):
    from spon_exp.data.corpora import token_blocks, token_stream

    p = cfg.eval.ppl
    if p.protocol == "chunks":
        return token_blocks(tokenizer, corpus, p.split, p.seq_len, p.max_sequences)
    stream = token_stream(tokenizer, corpus, p.split)
    return stream[: p.max_tokens] if p.max_tokens else stream


class Evaluation:
    """Evaluates the model as it currently is (hooks as set) under a variant's name, and keeps
    what the paired intervals resample: each corpus's per-block NLLs and each zero-shot task's
    per-document scores, per variant."""

    def __init__(self, cfg: DictConfig, model, tokenizer, timer, metrics: MetricsWriter):
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
        from spon_exp.evaluation.gap import gap_closure
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

def _zeroshot_summary(per_variant: dict, boot) -> dict:
    from spon_exp.evaluation.uncertainty import zeroshot_intervals
    from spon_exp.evaluation.gap import zeroshot_recovery

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
        out["recovery"] = zeroshot_recovery(avg["dense"], avg["sparse"], avg["spon"])  # None: sparse == dense
    items = {v: {t: torch.tensor(s, dtype=torch.float64) for t, s in (r.get("item_scores") or {}).items()}
             for v, r in per_variant.items()}
    if all(items.values()):
        intervals = zeroshot_intervals(items, boot)
        out.update(ci=intervals["ci"], average_ci=intervals["average_ci"])
        if out.get("recovery") is not None:
            out["recovery_ci"] = intervals["recovery_ci"]
    return out
