"""Framework overhead on the packaged model (batch 4 x 512 tokens, CPU by default).

Prints, measured side by side in one run:
  - sparse forward (hooks on, masks computed) / dense forward          target <= 1.10
  - folded sparse+SPON forward / sparse forward                        target <= 1.02
  - one alpha training step (teacher fwd + student fwd + backward)
    / dense forward                                                    target <= 3.0
    and the same step with the teacher's hidden states reused, as train_alpha does for a
    sequence it has drawn before (spon.cache_teacher)
  - peak resident memory of the training process                      target <= 6 GB
and writes the numbers to benchmarks/results/overhead.json.

    python benchmarks/perf/overhead.py [--batch 4 --seq-len 512 --repeats 5]

Forward timings interleave dense / sparse / folded repeats and report medians, so drift of
the machine's load hits all three alike. Training runs in a subprocess so its peak RSS is
its own (model + activations), not the forward benchmark's.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from spon_exp.models.loading import load_model
from spon_exp.sparsifiers import build_sparsifier
from spon_exp.spon import Spon, TrainConfig, fold_alpha
from spon_exp.spon.alpha import dense_mode
from spon_exp.models.head import final_hidden
from spon_exp.spon.train import kl_loss

OUT = Path(__file__).resolve().parents[1] / "results" / "overhead.json"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def setup(batch: int, seq_len: int):
    lm = load_model()
    model = lm.model
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    sp = build_sparsifier("teal", sparsity=0.5, calibration_context="dense").attach(model)
    sp.calibrate(model, ids[:2].split(1))
    return model, sp, ids


def forward_benchmark(args) -> dict:
    model, sp, ids = setup(args.batch, args.seq_len)

    @torch.no_grad()
    def fwd():
        model(input_ids=ids, use_cache=False)

    spon = Spon(sp, 1)
    with torch.no_grad():
        for a in spon.alphas.values():
            a.normal_(std=0.01)
    fwd()  # warm-up
    times = {"dense": [], "sparse": [], "sparse_spon_hooks": []}
    for _ in range(args.repeats):
        with dense_mode(sp, spon):
            times["dense"].append(timed(fwd))
        with spon.disabled():
            times["sparse"].append(timed(fwd))
        times["sparse_spon_hooks"].append(timed(fwd))
    fold_alpha(spon)
    times["folded"] = []
    for _ in range(args.repeats):
        times["folded"].append(timed(fwd))  # biases folded: the plain sparse path + bias add
    med = {k: statistics.median(v) for k, v in times.items() if v}
    return {"seconds": med, "all": times,
            "sparse_over_dense": med["sparse"] / med["dense"],
            "folded_over_sparse": med["folded"] / med["sparse"],
            "unfolded_spon_over_sparse": med["sparse_spon_hooks"] / med["sparse"]}


def train_benchmark(args) -> dict:
    model, sp, ids = setup(args.batch, args.seq_len)
    spon = Spon(sp, 1)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(spon.alphas.values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    cfg = TrainConfig()

    cached = {}

    def step(reuse_teacher: bool = False):
        if reuse_teacher and "h" in cached:
            teacher = cached["h"]  # what train_alpha does for a sequence it has drawn before
        else:
            with torch.no_grad(), dense_mode(sp, spon):
                teacher = cached["h"] = final_hidden(model, ids)
        loss = kl_loss(model, final_hidden(model, ids), teacher, cfg.logits_chunk_tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def dense_fwd():
        with dense_mode(sp, spon):
            model(input_ids=ids, use_cache=False)

    step()
    dense_fwd()
    steps, reuse, fwds = [], [], []
    for _ in range(args.repeats):
        fwds.append(timed(dense_fwd))
        steps.append(timed(step))
        reuse.append(timed(lambda: step(reuse_teacher=True)))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fwd = statistics.median(fwds)
    return {"step_seconds": statistics.median(steps), "dense_forward_seconds": fwd,
            "step_over_dense_forward": statistics.median(steps) / fwd,
            "cached_teacher_step_seconds": statistics.median(reuse),
            "cached_teacher_step_over_dense_forward": statistics.median(reuse) / fwd,
            "peak_rss_gb": peak_kb / 1024**2, "all_steps": steps, "all_cached_teacher_steps": reuse,
            "all_forwards": fwds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part", choices=["all", "forward", "train"], default="all")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    if args.part == "forward":
        print(json.dumps(forward_benchmark(args)))
        return
    if args.part == "train":
        print(json.dumps(train_benchmark(args)))
        return

    def sub(part):
        cmd = [sys.executable, __file__, "--part", part, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        return json.loads(out)

    fwd, train = sub("forward"), sub("train")
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "threads": torch.get_num_threads()},
              "batch": args.batch, "seq_len": args.seq_len, "forward": fwd, "train": train}
    rows = [
        ("sparse fwd / dense fwd", fwd["sparse_over_dense"], "<= 1.10"),
        ("folded sparse+SPON fwd / sparse fwd", fwd["folded_over_sparse"], "<= 1.02"),
        ("(unfolded SPON hooks / sparse fwd)", fwd["unfolded_spon_over_sparse"], "info"),
        ("alpha train step / dense fwd", train["step_over_dense_forward"], "<= 3.0"),
        ("(same, teacher hidden states reused)", train["cached_teacher_step_over_dense_forward"], "info"),
        ("peak RSS during training (GB)", train["peak_rss_gb"], "<= 6"),
    ]
    print(f"batch {args.batch} x {args.seq_len} tokens, {torch.get_num_threads()} threads")
    print(f"dense forward {fwd['seconds']['dense']:.3f} s, train step {train['step_seconds']:.3f} s")
    for name, value, target in rows:
        print(f"{name:<40}{value:>8.3f}   target {target}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
