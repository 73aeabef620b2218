"""Does folding α into the biases change the model? Parametrised bias vs an output hook.

Packaged SmolLM2-135M, TEAL 50 %, α trained ``--steps`` steps, ``--eval-blocks`` x 256
evaluation tokens, per dtype:

- ``parametrised`` (spon-exp): α enters the layer's own linear call as the bias ``b + W·Σα``;
  compare the model before and after ``fold_alpha``;
- ``output_hook`` (the previous implementation, for reference): the same α added to each
  layer's output by a forward hook (``F.linear(x, W, b) + W·Σα``), compared with the folded
  model.

Prints perplexity before / after folding, max |Δlogit| and argmax agreement, and writes
``benchmarks/results/fold_exactness.json``.

    python benchmarks/perf/fold_exactness.py --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from spon_exp.data.corpora import token_blocks
from spon_exp.models.loading import load_model
from spon_exp.sparsifiers import build_sparsifier
from spon_exp.spon import Spon, TrainConfig, fold_alpha, train_alpha

RESULTS = Path(__file__).resolve().parents[1] / "results" / "fold_exactness.json"


@torch.no_grad()
def logits_and_ppl(model, blocks: torch.Tensor) -> tuple[torch.Tensor, float]:
    logits = torch.cat([model(b).logits.float() for b in blocks.split(4)])
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:].flatten())
    return logits, math.exp(float(nll))


def compare(before: tuple[torch.Tensor, float], after: tuple[torch.Tensor, float]) -> dict:
    (a, ppl_a), (b, ppl_b) = before, after
    return {"ppl_before_fold": ppl_a, "ppl_after_fold": ppl_b,
            "max_abs_logit_diff": float((a - b).abs().max()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).double().mean())}


def one_dtype(dtype: str, steps: int, eval_blocks: int) -> dict:
    lm = load_model(dtype=dtype)
    model, tok = lm.model, lm.tokenizer
    calib = token_blocks(tok, "wikipedia", "calibration", 256, 64)
    evaluation = token_blocks(tok, "wikipedia", "evaluation", 256, eval_blocks)
    sp = build_sparsifier("teal", sparsity=0.5).attach(model)
    sp.calibrate(model, calib[:16].split(4))
    spon = Spon(sp, 1)
    train_alpha(model, sp, spon, calib, TrainConfig(lr=3e-4, steps=steps))
    alpha = {k: v.detach().clone() for k, v in spon.alpha_state().items()}

    # the previous mechanism: same alpha, added to the output by a forward hook
    hook_spon = spon
    with hook_spon.disabled():
        hooks = [p.module.register_forward_hook(lambda m, a, out, p=p: out + hook_spon.offset(p))
                 for p in hook_spon.projections]
        output_hook = logits_and_ppl(model, evaluation)
        for h in hooks:
            h.remove()
    parametrised = logits_and_ppl(model, evaluation)
    fold_alpha(spon)
    folded = logits_and_ppl(model, evaluation)
    return {"alpha_norm": float(sum(a.norm() ** 2 for a in alpha.values()) ** 0.5),
            "parametrised": compare(parametrised, folded), "output_hook": compare(output_hook, folded)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-blocks", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    out = {"steps": args.steps, "eval_tokens": f"{args.eval_blocks} x 256", "dtypes": {}}
    for dtype in args.dtypes:
        out["dtypes"][dtype] = r = one_dtype(dtype, args.steps, args.eval_blocks)
        for mechanism in ("parametrised", "output_hook"):
            c = r[mechanism]
            print(f"{dtype:>9} {mechanism:>13}: ppl {c['ppl_before_fold']:.3f} -> folded {c['ppl_after_fold']:.3f}, "
                  f"max |dlogit| {c['max_abs_logit_diff']:.3g}, argmax agreement {c['argmax_agreement'] * 100:.1f} %")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
