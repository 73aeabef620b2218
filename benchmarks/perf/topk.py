"""Per-token top-k (WINA's and LaRoSA's masks) against the matmul it gates, side by side.

For each width (a real model's projection input widths) it times, on ``rows`` tokens:
- ``matmul``: the dense projection ``x @ W.T`` (width x width) the mask gates;
- ``torch``: ``x * mask`` with the mask from torch ops only (``kthvalue`` on a CPU, ``topk``
  on a GPU: :func:`~spon_exp.sparsifiers.scoring.topk_mask` of the score tensor);
- ``kernel``: the fused kernel (the C kernel on a CPU, the Triton kernel on a GPU);
and prints each as a share of the matmul, with the kernel's speed-up over torch. Medians of
interleaved repeats. JSON to ``benchmarks/results/select_<device>.json``.

    OMP_NUM_THREADS=1 python benchmarks/perf/topk.py                     # CPU, the packaged model's widths
    python benchmarks/perf/topk.py --device cuda --dtype bfloat16 --widths 4096 14336 --rows 2048 8192
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--widths", type=int, nargs="+", default=[576, 1536])
    ap.add_argument("--rows", type=int, nargs="+", default=[2048])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from spon_exp.sparsifiers import scoring

    dtype = getattr(torch, args.dtype)
    device = args.device
    if device == "cpu":
        from spon_exp.kernels.select import topk_sparsify_cpu as kernel_fn
    else:
        from spon_exp.kernels.triton_select import topk_sparsify as kernel_fn
    report = {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "sparsity": args.sparsity, "cases": []}
    g = torch.Generator().manual_seed(0)
    for rows in args.rows:
        for width in args.widths:
            # heavy-tailed rows of varying scale, like real activations
            x = (torch.randn(rows, width, generator=g) * torch.rand(width, generator=g).pow(3) * 4
                 * torch.rand(rows, 1, generator=g)).to(device=device, dtype=dtype)
            scale = (torch.rand(width, generator=g) + 0.5).to(device)
            w = torch.randn(width, width, generator=g).to(device=device, dtype=dtype)
            keep = scoring.keep_count(width, args.sparsity)
            paths = {
                "matmul": lambda: x @ w.T,
                "torch": lambda: x * scoring.topk_mask(x.float().abs() * scale, keep, "break").to(dtype),
                "kernel": lambda: kernel_fn(x, keep, "break", scale),
            }
            for fn in paths.values():  # warm-up (and the Triton compile)
                fn()
            samples = {name: [] for name in paths}
            for _ in range(args.repeats):
                for name, fn in paths.items():
                    samples[name].append(timed(fn, device))
            med = {name: statistics.median(v) for name, v in samples.items()}
            case = {"rows": rows, "width": width, **{f"{k}_s": v for k, v in med.items()},
                    "torch_over_matmul": med["torch"] / med["matmul"],
                    "kernel_over_matmul": med["kernel"] / med["matmul"],
                    "kernel_speedup_over_torch": med["torch"] / med["kernel"]}
            report["cases"].append(case)
            print(f"{rows:>6} x {width:<6} matmul {med['matmul'] * 1e3:8.3f} ms | torch top-k "
                  f"{case['torch_over_matmul']:.2f} x matmul | kernel {case['kernel_over_matmul']:.2f} x matmul "
                  f"({case['kernel_speedup_over_torch']:.1f}x faster than torch)", flush=True)
    out = args.out or RESULTS / f"topk_{device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
