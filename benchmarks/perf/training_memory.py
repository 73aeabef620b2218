"""Scale notes: memory of SPON α training against model size, sequence length and vocabulary.

1. Measures exactly the bytes autograd saves for the student's backward
   (``memory_model.saved_activation_bytes``, beside this script) on tiny Llama models of several widths,
   fits ``bytes = tokens x layers x 4 B x (a·H + b·I + c)``, and checks the fit on the packaged
   SmolLM2-135M at two sequence lengths (a model it was not fitted on).
2. Runs a few real training steps of the packaged model in a subprocess and compares the rise
   of its resident memory during training (high-water mark reset after calibration, Linux)
   with the estimate of the training parts (weights excluded).
3. Extrapolates every part (weights once, α + AdamW state, saved activations, the chunked
   KL's three [chunk, vocab] buffers, teacher cache) to Llama-3-8B and Llama-3-70B, bf16, one
   2048-token sequence, with and without gradient checkpointing.

    python benchmarks/perf/training_memory.py [--rss-batch 1 --rss-seq-len 512]

Writes benchmarks/results/training_memory.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch

from spon_exp.models.loading import load_model, tiny_random_config
from spon_exp.sparsifiers import build_sparsifier
from spon_exp.spon import Spon, TrainConfig, train_alpha

# the script's folder is on sys.path when it runs, so its sibling module imports by name
from memory_model import estimate_training_memory, fit_activation_coefficients, saved_activation_bytes

OUT = Path(__file__).resolve().parents[1] / "results" / "training_memory.json"
GB = 1024**3

# Public configs (hidden, intermediate, layers, vocab, parameters)
TARGETS = {
    "Llama-3-8B": dict(hidden=4096, intermediate=14336, layers=32, vocab=128256, params=8.03e9),
    "Llama-3-70B": dict(hidden=8192, intermediate=28672, layers=80, vocab=128256, params=70.6e9),
}


def sparse_student(model: torch.nn.Module, calib: torch.Tensor):
    sp = build_sparsifier("teal", sparsity=0.5, calibration_context="dense").attach(model)
    sp.calibrate(model, [calib])
    for p in model.parameters():
        p.requires_grad_(False)
    spon = Spon(sp, 1)
    for a in spon.alphas.values():
        a.requires_grad_(True)
    return sp, spon


def measure(model, hidden, intermediate, layers, vocab, seq_len, batch=1) -> dict:
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    return {"hidden": hidden, "intermediate": intermediate, "layers": layers, "vocab": vocab,
            "tokens": batch * seq_len, "seq_len": seq_len, "bytes": saved_activation_bytes(model, ids)}


def tiny_samples() -> list[dict]:
    from transformers import AutoModelForCausalLM

    samples = []
    for hidden, inter in [(64, 128), (64, 512), (128, 256), (128, 1024), (256, 512), (256, 2048)]:
        for seq_len in (64, 128):
            cfg = tiny_random_config("llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg).eval()
            sparse_student(model, torch.randint(0, 512, (2, 64)))
            samples.append({"model": f"tiny H{hidden} I{inter}", **measure(model, hidden, inter, 2, 512, seq_len)})
    return samples


def current_rss() -> int:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_child(batch: int, seq_len: int) -> None:
    """Train a few steps of the packaged model; print RSS after loading and at the peak."""
    lm = load_model()
    model = lm.model
    ids = torch.randint(0, model.config.vocab_size, (batch * 2, seq_len), generator=torch.Generator().manual_seed(0))
    sp, spon = sparse_student(model, ids[:1])  # calibration's own peak comes before the reset below
    gc.collect()
    base = current_rss()  # model resident (calibration touched every weight), thresholds set
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (Linux)
    train_alpha(model, sp, spon, ids, TrainConfig(steps=2, batch_size=batch))
    peak = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    print(json.dumps({"rss_before_training": base, "rss_peak": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rss-batch", type=int, default=1)
    parser.add_argument("--rss-seq-len", type=int, default=512)
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_batch, args.rss_seq_len)
        return

    samples = tiny_samples()
    coef = fit_activation_coefficients(samples)
    print(f"saved activations per token and layer = 4 B x ({coef[0]:.2f}·H + {coef[1]:.2f}·I + {coef[2]:.1f})"
          f"   (fit on {len(samples)} tiny Llama configurations)")

    lm = load_model()
    model, c = lm.model, lm.model.config
    sparse_student(model, torch.randint(0, c.vocab_size, (1, 64)))
    shape = dict(hidden=c.hidden_size, intermediate=c.intermediate_size, layers=c.num_hidden_layers, vocab=c.vocab_size)
    checks = []
    for seq_len in (256, 512):
        m = measure(model, seq_len=seq_len, **shape)
        est = estimate_training_memory(params=0, batch=1, seq_len=seq_len, coefficients=coef, **shape).activations
        checks.append({"model": "SmolLM2-135M", **m, "estimate": est, "estimate_over_measured": est / m["bytes"]})
        print(f"SmolLM2-135M seq {seq_len}: saved activations measured {m['bytes'] / 2**20:.1f} MiB, "
              f"estimate {est / 2**20:.1f} MiB ({est / m['bytes']:.3f}x)")
    params = sum(p.numel() for p in model.parameters())
    del model, lm

    out = subprocess.run([sys.executable, __file__, "--rss-child", "--rss-batch", str(args.rss_batch),
                          "--rss-seq-len", str(args.rss_seq_len)], capture_output=True, text=True, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    est = estimate_training_memory(params=params, batch=args.rss_batch, seq_len=args.rss_seq_len, coefficients=coef,
                                   cached_sequences=args.rss_batch * 2, **shape)
    above_load = rss["rss_peak"] - rss["rss_before_training"]
    predicted = est.total - est.weights
    rss_check = {"batch": args.rss_batch, "seq_len": args.rss_seq_len, **rss, "peak_above_before_training": above_load,
                 "estimate_without_weights": predicted, "estimate": est.to_dict()}
    print(f"SmolLM2-135M training {args.rss_batch}x{args.rss_seq_len}: peak RSS {rss['rss_peak'] / GB:.2f} GB, "
          f"{above_load / GB:.2f} GB above the calibrated model before training; estimate of the training parts {predicted / GB:.2f} GB")

    extrapolation = {}
    print(f"\n{'model':<13}{'ckpt':>6}{'weights':>9}{'alpha+Adam':>12}{'activations':>13}{'KL chunk':>10}"
          f"{'total GB':>10}   (bf16 weights and activations, 1 x 2048 tokens, chunk 1024)")
    for name, t in TARGETS.items():
        for ckpt in (False, True):
            e = estimate_training_memory(batch=1, seq_len=2048, coefficients=coef, weight_bytes=2, activation_bytes=2,
                                         gradient_checkpointing=ckpt, **t)
            extrapolation[f"{name}{' checkpointing' if ckpt else ''}"] = e.to_dict()
            print(f"{name:<13}{'on' if ckpt else 'off':>6}{e.weights / GB:>9.1f}{e.alpha_state / GB:>12.2f}"
                  f"{e.activations / GB:>13.1f}{e.kl_chunk / GB:>10.2f}{e.total / GB:>10.1f}")

    result = {"coefficients": {"a_hidden": coef[0], "b_intermediate": coef[1], "c_constant": coef[2]},
              "tiny_samples": samples, "packaged_checks": checks, "rss_check": rss_check,
              "extrapolation_bytes": extrapolation}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
