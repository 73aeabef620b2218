"""Dense ``F.linear`` vs the sparse matvec kernels (``spon_exp.kernels``): fp32 CPU, or bf16 CUDA.

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

``--device cuda`` times the CUDA backend of ``spon_exp::sparse_linear`` (the Triton GEMV)
against dense ``F.linear`` (cuBLAS) in bf16 at Llama-3-8B's projection shapes, batch 1 and 4:

    python benchmarks/perf/sparse_matvec.py --device cuda        # -> benchmarks/results/sparse_matvec_cuda.json

Each variant is captured in a CUDA graph of ``--calls-per-graph`` calls (launch overhead
out of the way, as in a graph-captured decode step) that cycles through enough copies of the
weights to exceed the L2 cache several times over (every call streams its weights from
HBM, as in a real model); graph replays of all variants are interleaved and the medians of
the per-call times compared. Every token of a batch gets its own zeros (the smallest
``sparsity`` of its entries), so at batch 4 the kernel reads the union of the kept inputs:
``union_density`` in the JSON is the share of weight rows it reads. ``triton_no_skip`` is
the same kernel reading every row (its bit-identical masked-dense reference).
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


CUDA_SHAPES = "4096x14336,14336x4096,4096x4096,4096x1024"  # gate/up, down, q/o, k/v of Llama-3-8B


def make_batch(tokens: int, n: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """``tokens`` inputs, each with its own smallest-magnitude ``sparsity`` share zeroed."""
    return torch.stack([make_input(n, sparsity, gen) for _ in range(tokens)])


def graph_timer(fn, copies: int, calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` calls ``fn(i)``, ``i`` cycling through the weight copies."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles here, not in the capture)
        for i in range(min(copies, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(calls):
            fn(j % copies)
    return graph


def run_cuda(args) -> dict:
    from spon_exp.kernels import sparse_linear
    from spon_exp.kernels.triton_gemv import launch_config

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(device)
    l2_bytes = getattr(props, "L2_cache_size", 64 * 2**20)
    print(f"torch {torch.__version__}, {props.name}, {props.multi_processor_count} SMs, L2 {l2_bytes / 2**20:.0f} MiB, "
          f"{args.dtype}, CUDA graphs of {args.calls_per_graph} calls")
    gen = torch.Generator().manual_seed(args.seed)
    batches = [int(b) for b in args.batch.split(",")]
    rows = []
    t_start = time.perf_counter()
    for fin, fout in parse_shapes(args.shapes):
        weight = (torch.randn(fout, fin, generator=gen) / fin ** 0.5).to(device, dtype)
        copies = max(2, -(-args.rotate_l2 * l2_bytes // (weight.numel() * weight.element_size())))
        weights = [weight] + [torch.randn_like(weight) / fin ** 0.5 for _ in range(copies - 1)]
        weights_t = [w.t().contiguous() for w in weights]
        for tokens in batches:
            for s in [float(v) for v in args.sparsities.split(",")]:
                x = make_batch(tokens, fin, s, gen).to(device, dtype)
                fns = {
                    "dense": lambda i: F.linear(x, weights[i]),
                    "sparse": lambda i: sparse_linear(x, weights_t[i], None, "ordered"),
                    "triton_no_skip": lambda i: sparse_linear(x, weights_t[i], None, "ordered_dense"),
                }
                graphs = {k: graph_timer(fn, copies, args.calls_per_graph) for k, fn in fns.items()}
                times: dict[str, list[float]] = {k: [] for k in fns}
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                for r in range(args.warmup + args.repeats):
                    for k, graph in graphs.items():  # interleaved
                        start.record()
                        graph.replay()
                        end.record()
                        end.synchronize()
                        if r >= args.warmup:
                            times[k].append(start.elapsed_time(end) / args.calls_per_graph)  # ms per call
                del graphs
                ref = F.linear(x.double(), weight.double())
                sparse_out = sparse_linear(x, weights_t[0], None, "ordered")
                med = {k: statistics.median(v) for k, v in times.items()}
                union = (x != 0).any(0).float().mean().item()
                weight_bytes = fin * fout * weight.element_size()
                row = {
                    "in": fin, "out": fout, "tokens": tokens, "sparsity": s,
                    "measured_sparsity": (x == 0).float().mean().item(), "union_density": union,
                    "launch": launch_config(tokens, fin, fout, 4 * props.multi_processor_count),
                    "weight_copies": copies,
                    **{f"{k}_ms": v for k, v in med.items()},
                    **{f"{k}_ms_p25_p75": [statistics.quantiles(times[k], n=4)[i] for i in (0, 2)] for k in times},
                    "speedup": med["dense"] / med["sparse"],
                    "sparsity_gain": med["triton_no_skip"] / med["sparse"],
                    "dense_GBps": weight_bytes / med["dense"] / 1e6,
                    "sparse_GBps_of_rows_read": union * weight_bytes / med["sparse"] / 1e6,
                    "sparse_max_abs_err_vs_fp64": (sparse_out.double() - ref).abs().max().item(),
                    "dense_max_abs_err_vs_fp64": (F.linear(x, weight).double() - ref).abs().max().item(),
                    "skip_bit_identical_to_no_skip": bool(torch.equal(
                        sparse_out, sparse_linear(x, weights_t[0], None, "ordered_dense"))),
                }
                rows.append(row)

    print("\n| in→out | tokens | sparsity | rows read | dense ms | sparse ms | speed-up | no-skip ms | sparsity gain | dense GB/s | bit-identical |")
    print("|" + "---|" * 11)
    for r in rows:
        print(f"| {r['in']}→{r['out']} | {r['tokens']} | {r['sparsity']:.0%} | {r['union_density']:.0%} | "
              f"{r['dense_ms'] * 1e3:.1f} µs | {r['sparse_ms'] * 1e3:.1f} µs | {r['speedup']:.2f}× | "
              f"{r['triton_no_skip_ms'] * 1e3:.1f} µs | {r['sparsity_gain']:.2f}× | {r['dense_GBps']:.0f} | "
              f"{r['skip_bit_identical_to_no_skip']} |")
    elapsed = time.perf_counter() - t_start
    print(f"\nmedians of {args.repeats} interleaved graph replays after {args.warmup} warm-up; {elapsed:.0f} s")
    return {
        "benchmark": "sparse_matvec", "device": "cuda", "gpu": props.name,
        "multiprocessors": props.multi_processor_count, "l2_bytes": l2_bytes,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _triton_version(),
        "dtype": args.dtype, "calls_per_graph": args.calls_per_graph, "repeats": args.repeats,
        "warmup": args.warmup, "elapsed_s": elapsed, "rows": rows,
    }


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def write(result: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shapes", default=None,
                   help="comma-separated in x out (default: Llama-3-8B up/gate and down on the CPU, "
                        f"{CUDA_SHAPES} on CUDA)")
    p.add_argument("--sparsities", default="0,0.4,0.5,0.6,0.7")
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--modes", default="auto,ordered",
                   help="sparse variants to time: any of auto,output,split_k,ordered,ordered_dense")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", default="1,4", help="CUDA: tokens per call")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"), help="CUDA: weight and input dtype")
    p.add_argument("--calls-per-graph", type=int, default=50, help="CUDA: calls captured in one timed graph")
    p.add_argument("--rotate-l2", type=int, default=4, help="CUDA: weight copies cycled through, in L2 sizes")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/sparse_matvec[_cuda].json)")
    args = p.parse_args(argv)

    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda needs a CUDA GPU (torch.cuda.is_available() is False)")
        args.shapes = args.shapes or CUDA_SHAPES
        args.repeats = args.repeats if args.repeats != p.get_default("repeats") else 30
        result = run_cuda(args)
        write(result, args.out or str(OUT.with_name("sparse_matvec_cuda.json")))
        return result
    args.shapes = args.shapes or "4096x14336,14336x4096"

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
    write(result, args.out or str(OUT))
    return result


if __name__ == "__main__":
    main()
