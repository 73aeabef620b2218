"""End-to-end greedy decoding, batch 1, on the packaged model: dense vs sparse.

Measured side by side in one run (same prompt, same number of tokens, repeats interleaved):
  - dense:          no hooks, plain nn.Linear
  - masked:         TEAL hooks zero inputs, nn.Linear (MKL) still multiplies every column
  - sparse:         TEAL hooks + the "auto" kernel (rows grouped, split-K between threads)
  - ordered:        TEAL hooks + the ordered kernel (each output summed over kept inputs in
                    order; the default of enable_sparse_decode)
  - ordered_dense:  the same ordered sum over every input, zeros included (masked dense)

Token identity: ``ordered`` must emit exactly the tokens (and logits, bit for bit) of
``ordered_dense``, the masked-dense reference computed in the same order. ``sparse`` and
``masked`` agree only to float rounding; a threshold sparsifier turns
one rounding difference at an input sitting on the threshold into a different mask, and the
greedy sequences can part after a few tokens: the first position where they differ is
reported.

    python benchmarks/perf/sparse_decode.py [--sparsity 0.5 0.7 --new-tokens 64 --repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from spon_exp.data.corpora import token_blocks
from spon_exp.kernels.decode import disable_sparse_decode, enable_sparse_decode
from spon_exp.kernels.sparse_matvec import kernel_info
from spon_exp.models.loading import load_model
from spon_exp.sparsifiers import build_sparsifier

OUT = Path(__file__).resolve().parents[1] / "results" / "sparse_decode.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()

    lm = load_model()
    model, tok = lm.model, lm.tokenizer
    calib = token_blocks(tok, "wikipedia", "calibration", 256, 8)
    prompt = token_blocks(tok, "wikipedia", "evaluation", args.prompt_tokens, 1)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)

    def decode():
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, **gen)
        return out, args.new_tokens / (time.perf_counter() - t0)

    def first_difference(a, b):
        diff = (a.sequences[0] != b.sequences[0]).nonzero()
        return None if len(diff) == 0 else int(diff[0]) - prompt.shape[1]

    variants = ("dense", "masked", "sparse", "ordered", "ordered_dense")
    results = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
               "kernel": kernel_info(), "new_tokens": args.new_tokens, "runs": []}
    decode()  # warm-up
    print(f"{'sparsity':>8}" + "".join(f"{v + ' tok/s':>21}" for v in variants)
          + f"{'sparse/dense':>14}{'ordered/dense':>15}{'ordered==ref':>14}{'sparse vs masked':>18}")
    for s in args.sparsity:
        sp = build_sparsifier("teal", sparsity=s).attach(model)
        sp.calibrate(model, calib.split(4))
        speeds = {v: [] for v in variants}
        outputs = {}
        for _ in range(args.repeats):  # interleaved, so load drift hits all alike
            for v in variants:
                if v in ("sparse", "ordered", "ordered_dense"):
                    enable_sparse_decode(sp, mode="auto" if v == "sparse" else v)
                with sp.disabled() if v == "dense" else contextlib.nullcontext():
                    outputs[v], tps = decode()
                disable_sparse_decode(sp)
                speeds[v].append(tps)
        sp.detach()
        med = {k: statistics.median(v) for k, v in speeds.items()}
        same = torch.equal(outputs["ordered"].sequences, outputs["ordered_dense"].sequences) and all(
            torch.equal(a, b) for a, b in zip(outputs["ordered"].logits, outputs["ordered_dense"].logits))
        part = first_difference(outputs["sparse"], outputs["masked"])
        row = {"sparsity": s, "tokens_per_s": med, "all": speeds, "sparse_over_dense": med["sparse"] / med["dense"],
               "sparse_over_masked": med["sparse"] / med["masked"], "ordered_over_dense": med["ordered"] / med["dense"],
               "ordered_identical_to_ordered_dense": same,
               "sparse_vs_masked_first_different_token": part,
               "identical_tokens_to_masked": part is None}
        results["runs"].append(row)
        print(f"{s:>8.2f}" + "".join(f"{med[v]:>21.2f}" for v in variants)
              + f"{row['sparse_over_dense']:>14.2f}{row['ordered_over_dense']:>15.2f}{str(same):>14}"
              + f"{'same' if part is None else f'parts at {part}':>18}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
