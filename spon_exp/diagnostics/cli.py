"""``spon-exp-diagnose RUN_DIR``: the paper's Figure-1 statistic, hidden-state drift, the α KL
curve and measured sparsity per projection of a finished run, as PNGs + JSON in
``RUN_DIR/diagnostics/`` (and in the run's W&B run when it used W&B)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spon-exp-diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run folder (holds results.json, config.yaml, export/, alpha.safetensors)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="longest sequence, in tokens (default: 2048, or the model's context if shorter)")
    parser.add_argument("--sequences", type=int, default=4, help="evaluation sequences of that length (default 4)")
    parser.add_argument("--device", default="cpu", help="device for the forward passes (default cpu)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to the run's W&B run")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for errors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # other libraries: warnings only
    logging.getLogger("spon_exp").setLevel(logging.INFO)

    from spon_exp.data.corpora import CorpusError
    from spon_exp.diagnostics import DiagnoseError, diagnose
    from spon_exp.models.loading import ModelNotFoundError
    from spon_exp.tracking.disk import one_line_errors

    code, d = one_line_errors("spon-exp-diagnose", (DiagnoseError, ModelNotFoundError, CorpusError), args.run_dir,
                              args.verbose, lambda: diagnose(args.run_dir, args.max_length, args.sequences, args.device,
                                                             log_to_wandb=not args.no_wandb))
    if code:
        return code
    print(summary(d))
    return 0


def summary(d: dict) -> str:
    """Drift at the first, middle and last layer, the always-kept fraction at the longest
    length, and where the files are."""
    lines = [f"diagnostics of run {d['run']['config_hash']} ({d['data']['sequences']} x {d['data']['max_length']} "
             f"tokens of {d['data']['corpus']})"]
    for v, x in d["drift"].items():
        if v == "dense":
            continue
        n = len(x["layer"])
        picks = sorted({0, (n - 1) // 2, n - 1})
        lines.append(f"drift {v:<6} " + "  ".join(
            f"layer {x['layer'][i]}: rel L2 {x['rel_l2'][i]:.4f}, cos {x['cosine'][i]:.4f}" for i in picks))
    f1 = d["figure1"]
    if f1["average"]:
        lines.append(f"always-kept channels at {f1['length'][-1]} tokens (mean over layers and sites): "
                     + ", ".join(f"{v} {c[-1]:.4f}" for v, c in f1["average"].items()))
    lines += [f"{name}: {path}" for name, path in d["plots"].items()]
    if d.get("wandb"):
        lines.append(f"W&B: logged to run {d['wandb']['id']} ({d['wandb']['mode']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
