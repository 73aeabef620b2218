"""Tune SPON's training settings on the packaged model: one calibration, many alpha runs.

Every setting tried is appended to benchmarks/results/spon_tuning.jsonl with its
perplexities and gap closure, so the chosen defaults are backed by a record.

    python benchmarks/quality/tune_spon.py --sparsity 0.5 --grid default
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from spon_exp.data.corpora import token_blocks
from spon_exp.evaluation.perplexity import PerplexityProtocol, gap_closure, perplexity
from spon_exp.models.loading import load_model
from spon_exp.sparsifiers import build_sparsifier
from spon_exp.spon import Spon, TrainConfig, dense_mode, train_alpha

GRIDS = {
    # name: list of (init, TrainConfig kwargs, projections)
    "default": [
        ("mean_dropped", None, "all"),
        ("zero", dict(lr=1e-4, steps=60, batch_size=1), "all"),
        ("zero", dict(lr=3e-4, steps=150, batch_size=1), "all"),
        ("mean_dropped", dict(lr=3e-4, steps=150, batch_size=1), "all"),
        ("zero", dict(lr=1e-3, steps=150, batch_size=4, schedule="cosine", warmup_steps=10), "all"),
        ("zero", dict(lr=3e-4, steps=150, batch_size=4, schedule="cosine", warmup_steps=10), "all"),
    ],
    "round2": [
        ("zero", dict(lr=3e-4, steps=300, batch_size=1), "all"),
        ("zero", dict(lr=5e-4, steps=200, batch_size=1, schedule="cosine", warmup_steps=10), "all"),
        ("zero", dict(lr=3e-4, steps=150, batch_size=1), "down_proj"),
    ],
    # round 3 runs with --num-sequences 256: 150 steps then never revisit a sequence
    "round3": [
        ("zero", dict(lr=3e-4, steps=150, batch_size=1), "all"),
        ("zero", dict(lr=1e-3, steps=150, batch_size=1, schedule="cosine", warmup_steps=10), "all"),
        ("zero", dict(lr=5e-4, steps=150, batch_size=1, schedule="cosine", warmup_steps=10), "all"),
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--grid", default="default")
    parser.add_argument("--only", type=int, nargs="*", help="indices of grid entries to run")
    parser.add_argument("--train-seq-len", type=int, default=256)
    parser.add_argument("--num-sequences", type=int, default=64)
    parser.add_argument("--eval-sequences", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "spon_tuning.jsonl"))
    args = parser.parse_args()

    lm = load_model()
    model, tok = lm.model, lm.tokenizer
    calib = token_blocks(tok, "wikipedia", "calibration", args.train_seq_len, args.num_sequences)
    evaluation = token_blocks(tok, "wikipedia", "evaluation", 256, args.eval_sequences)
    protocol = PerplexityProtocol(seq_len=256, batch_size=8)
    sp = build_sparsifier("teal", sparsity=args.sparsity).attach(model)
    sp.calibrate(model, calib[:16].split(4))
    with dense_mode(sp):
        dense = perplexity(model, evaluation, protocol)
    sparse = perplexity(model, evaluation, protocol)
    print(f"dense {dense:.3f} sparse {sparse:.3f}", flush=True)
    entries = GRIDS[args.grid]
    for i, (init, train_kwargs, projections) in enumerate(entries):
        if args.only and i not in args.only:
            continue
        torch.manual_seed(0)
        spon = Spon(sp, 1, projections)
        t0 = time.perf_counter()
        spon.initialise(init, model, sp, calib[:16].split(4))
        result = None
        if train_kwargs:
            result = train_alpha(model, sp, spon, calib, TrainConfig(**train_kwargs))
        seconds = time.perf_counter() - t0
        ppl = perplexity(model, evaluation, protocol)
        record = {"sparsity": args.sparsity, "init": init, "train": train_kwargs, "projections": projections,
                  "train_seq_len": args.train_seq_len, "num_sequences": args.num_sequences,
                  "eval_sequences": args.eval_sequences, "dense": dense, "sparse": sparse, "spon": ppl,
                  "gap_closure": gap_closure(dense, sparse, ppl), "seconds": seconds,
                  "final_kl": result.losses[-1] if result else None,
                  "mean_kl_last10": sum(result.losses[-10:]) / len(result.losses[-10:]) if result else None}
        print(json.dumps(record), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
        spon.detach()


if __name__ == "__main__":
    main()
