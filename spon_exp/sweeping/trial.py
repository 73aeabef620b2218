"""One trial of a recipe search (``search.seeds``, ``sweeps/tune_spon*.yaml``): the config
run once per seed, and the mean gap closure the sweeper maximises."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from omegaconf import DictConfig, open_dict

from spon_exp.runner import run
from spon_exp.sweeping.study import TRIAL_FILE
from spon_exp.tracking.files import RESULTS, read_json, write_json_atomic
from spon_exp.tracking.identity import RunIdentity
from spon_exp.tracking.run_folder import is_done

log = logging.getLogger(__name__)


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
                error = f"seed {seed} failed: {' '.join(str(e).split())}"
                write_json_atomic(trial_dir / TRIAL_FILE, {"status": "failed", "error": error, "seeds": runs,
                                                           "overrides": overrides})
                raise TrialFailed(error) from e
        gap = (results.get("gap_closure") or {}).get(corpus)
        runs[str(seed)] = {"gap_closure": gap, "ppl": (results.get("ppl") or {}).get(corpus),
                           "config_hash": results.get("config_hash")}
        if gap is None or not math.isfinite(gap):
            error = f"seed {seed}: no finite gap closure on {corpus} ({gap}); the trial failed"
            write_json_atomic(trial_dir / TRIAL_FILE, {"status": "failed", "error": error, "seeds": runs,
                                                       "overrides": overrides})
            raise TrialFailed(error)
        values.append(gap)
    objective = sum(values) / len(values)
    write_json_atomic(trial_dir / TRIAL_FILE, {"status": "ok", "objective": objective, "metric": f"gap_closure/{corpus}",
                                               "split": cfg.eval.ppl.split, "seeds": runs, "overrides": overrides})
    log.info("trial: mean gap closure on %s (%s split) over seeds %s: %.4f", corpus, cfg.eval.ppl.split, seeds,
             objective)
    return objective
