"""Dense ``F.linear`` vs the sparse batch-1 matvec kernel (``spon_exp.kernels``), fp32 CPU.

Dense and sparse are timed side by side in one run: every repeat times the dense call and
then each sparse variant on the same input, so a change in machine load hits all of them
alike; the table reports medians after warm-up, and the speed-up is dense / sparse. The
kernel is also timed on the same input with no zeros ("kernel 0 %"), so that
``sparsity gain`` = kernel(no zeros) / kernel(sparse) separates the effect of skipping rows
from the kernel simply streaming memory faster than torch's dense gemv.

2-thread timings are only meaningful on an otherwise idle machine: while other processes
keep both cores busy, every 2-thread parallel region (torch's and this kernel's) waits for
a scheduler tick now and then, as long as a matvec of these shapes. On a shared box,
``chrt -f 10 python benchmarks/perf/sparse_matvec.py`` (real-time priority, needs
CAP_SYS_NICE) gives numbers close to an idle machine; the JSON records the load average
and the scheduling policy.

    python benchmarks/perf/sparse_matvec.py                      # Llama-3-8B MLP shapes
    python benchmarks/perf/sparse_matvec.py --modes auto,output,split_k,ordered --repeats 100

``ordered`` is the kernel whose result is bit-identical to the masked-dense product taken
in the same order (``ordered_dense``): what exact-token sparse decoding uses.

Writes the results as JSON (default ``benchmarks/results/sparse_matvec.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from spon_exp.kernels import choose_mode, kernel_available, kernel_info, sparse_matvec

OUT = Path(__file__).resolve().parents[1] / "results" / "sparse_matvec.json"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        a, b = item.lower().replace("->", "x").split("x")
        shapes.append((int(a), int(b)))
    return shapes


def make_input(n: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian input with exactly ``round(sparsity * n)`` smallest-magnitude entries zeroed."""
    x = torch.randn(n, generator=gen)
    k = round(sparsity * n)
    if k:
        x[torch.argsort(x.abs())[:k]] = 0.0
    return x


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sched_policy() -> str:
    try:
        pol = os.sched_getscheduler(0)
    except (AttributeError, OSError):
        return "unknown"
    names = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_FIFO", "SCHED_RR", "SCHED_BATCH",
                                         "SCHED_IDLE") if hasattr(os, n)}
    return names.get(pol, str(pol))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x14336,14336x4096",
                   help="comma-separated in x out (default: Llama-3-8B up/gate and down)")
    p.add_argument("--sparsities", default="0,0.4,0.5,0.6,0.7")
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--modes", default="auto,ordered",
                   help="sparse variants to time: any of auto,output,split_k,ordered,ordered_dense")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not kernel_available():
        print("WARNING: sparse kernel unavailable; 'sparse' below is the dense fallback")
    info = kernel_info()
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}, "
          f"kernel isa={info.get('isa')} openmp={info.get('openmp')}, "
          f"loadavg {load_before[0]:.2f}, scheduler {sched_policy()}")

    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    t_start = time.perf_counter()
    for fin, fout in parse_shapes(args.shapes):
        w = torch.randn(fout, fin, generator=gen)
        wt = w.t().contiguous()
        auto_mode = choose_mode(fin, fout, args.threads)
        for s in [float(v) for v in args.sparsities.split(",")]:
            x_full = torch.randn(fin, generator=gen)
            x = make_input(fin, s, gen)
            ref = F.linear(x, w)
            fns = {"dense": lambda: F.linear(x, w)}
            for m in modes:
                fns[m] = lambda m=m: sparse_matvec(x, wt, mode=m, num_threads=args.threads)
            fns["kernel_no_zeros"] = lambda: sparse_matvec(x_full, wt, num_threads=args.threads)
            times: dict[str, list[float]] = {k: [] for k in fns}
            for r in range(args.warmup + args.repeats):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                    if r >= args.warmup:
                        times[k].append(dt)
            med = {k: statistics.median(v) for k, v in times.items()}
            best = {k: min(v) for k, v in times.items()}
            errs = {m: (sparse_matvec(x, wt, mode=m) - ref).abs().max().item() for m in modes}
            row = {
                "in": fin, "out": fout, "sparsity": s,
                "measured_sparsity": (x == 0).float().mean().item(),
                "auto_mode": auto_mode,
                "dense_ms": med["dense"] * 1e3,
                "dense_min_ms": best["dense"] * 1e3,
                "kernel_no_zeros_ms": med["kernel_no_zeros"] * 1e3,
                "dense_ms_p25_p75": [statistics.quantiles(times["dense"], n=4)[i] * 1e3
                                     for i in (0, 2)],
            }
            for m in modes:
                row[f"{m}_ms"] = med[m] * 1e3
                row[f"{m}_speedup"] = med["dense"] / med[m]
                row[f"{m}_min_ms"] = best[m] * 1e3
                row[f"{m}_speedup_min"] = best["dense"] / best[m]
                row[f"{m}_sparsity_gain"] = med["kernel_no_zeros"] / med[m]
                row[f"{m}_max_abs_err"] = errs[m]
            rows.append(row)

    load_after = os.getloadavg()
    header = "| in→out | sparsity | dense ms | kernel 0 % ms | " + " | ".join(
        f"{m} ms | {m} speed-up | {m} speed-up (min) | {m} sparsity gain" for m in modes) + " |"
    print()
    print(header)
    print("|" + "---|" * (4 + 4 * len(modes)))
    for r in rows:
        cells = [f"{r['in']}→{r['out']}", f"{r['sparsity']:.0%}", f"{r['dense_ms']:.2f}",
                 f"{r['kernel_no_zeros_ms']:.2f}"]
        for m in modes:
            label = f"{r[f'{m}_ms']:.2f}" + (f" ({r['auto_mode']})" if m == "auto" else "")
            cells += [label, f"{r[f'{m}_speedup']:.2f}×", f"{r[f'{m}_speedup_min']:.2f}×",
                      f"{r[f'{m}_sparsity_gain']:.2f}×"]
        print("| " + " | ".join(cells) + " |")
    elapsed = time.perf_counter() - t_start
    print(f"\nms and speed-up: medians of {args.repeats} interleaved repeats after "
          f"{args.warmup} warm-up; (min): ratio of the fastest repeats; "
          f"{elapsed:.0f} s; loadavg before/after {load_before[0]:.2f}/{load_after[0]:.2f}")

    result = {
        "benchmark": "sparse_matvec",
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "kernel": info,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "modes": modes,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "sched_policy": sched_policy(),
        "elapsed_s": elapsed,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
