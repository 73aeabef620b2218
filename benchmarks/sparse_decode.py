"""End-to-end greedy decoding, batch 1, on the packaged model: dense vs sparse.

Measured side by side in one run (same prompt, same number of tokens):
  - dense:         no hooks, plain nn.Linear
  - masked dense:  TEAL hooks zero inputs, nn.Linear still multiplies every column
  - sparse kernel: TEAL hooks + spon_exp.kernels.decode (skips the columns of zeroed inputs)
and checks that the sparse kernel emits exactly the masked-dense tokens.

    python benchmarks/sparse_decode.py [--sparsity 0.5 --new-tokens 64 --repeats 3]
"""

from __future__ import annotations

import argparse
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

OUT = Path(__file__).parent / "results" / "sparse_decode.json"


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
               pad_token_id=tok.eos_token_id)

    def decode():
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, **gen)
        return out, args.new_tokens / (time.perf_counter() - t0)

    results = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
               "kernel": kernel_info(), "new_tokens": args.new_tokens, "runs": []}
    decode()  # warm-up
    print(f"{'sparsity':>8}{'dense tok/s':>14}{'masked tok/s':>14}{'sparse tok/s':>14}{'sparse/dense':>14}{'same tokens':>13}")
    for s in args.sparsity:
        sp = build_sparsifier("teal", sparsity=s).attach(model)
        sp.calibrate(model, calib.split(4))
        speeds = {"dense": [], "masked": [], "sparse": []}
        outputs = {}
        for _ in range(args.repeats):  # interleaved, so load drift hits all three alike
            with sp.disabled():
                outputs["dense"], v = decode()
            speeds["dense"].append(v)
            outputs["masked"], v = decode()
            speeds["masked"].append(v)
            enable_sparse_decode(sp)
            outputs["sparse"], v = decode()
            speeds["sparse"].append(v)
            disable_sparse_decode(sp)
        sp.detach()
        med = {k: statistics.median(v) for k, v in speeds.items()}
        same = torch.equal(outputs["sparse"], outputs["masked"])
        row = {"sparsity": s, "tokens_per_s": med, "all": speeds, "sparse_over_dense": med["sparse"] / med["dense"],
               "sparse_over_masked": med["sparse"] / med["masked"], "identical_tokens_to_masked": same}
        results["runs"].append(row)
        print(f"{s:>8.2f}{med['dense']:>14.2f}{med['masked']:>14.2f}{med['sparse']:>14.2f}"
              f"{row['sparse_over_dense']:>14.2f}{str(same):>13}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
