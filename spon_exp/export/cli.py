"""``spon-exp-export RUN_DIR [--out DIR] [--push-to-hub REPO]``: a run as a Hugging Face
folder that plain transformers loads (``trust_remote_code=True``) and runs sparse."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="spon-exp-export",
        description="Export a finished spon-exp run as a Hugging Face folder that runs sparse without spon-exp.")
    parser.add_argument("run_dir", help="the run folder (holds results.json, config.yaml, export/)")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/hf_export); must be empty, new, or an "
                                      "earlier export of the same run (then it is replaced)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this hub repository "
                                                              "(needs HF_TOKEN or `hf auth login`)")
    parser.add_argument("--public", action="store_true", help="create the hub repository public (default private)")
    parser.add_argument("--device", default="cpu", help="device for loading and the logit check (default cpu)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip loading the export back to compare its logits (saves a second copy in memory)")
    parser.add_argument("--verbose", action="store_true", help="tracebacks for errors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # other libraries: warnings only
    logging.getLogger("spon_exp").setLevel(logging.INFO)

    from spon_exp.export import ExportError, export_run
    from spon_exp.models.loading import ModelNotFoundError
    from spon_exp.tracking.disk import one_line_errors

    code, out = one_line_errors("spon-exp-export", (ExportError, ModelNotFoundError), args.run_dir, args.verbose,
                                lambda: export_run(args.run_dir, args.out, device=args.device,
                                                   push_to_hub=args.push_to_hub, private=not args.public,
                                                   check=not args.no_check))
    if code:
        return code
    print(f"export: {out}")
    if args.push_to_hub:
        print(f"pushed: https://huggingface.co/{args.push_to_hub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
