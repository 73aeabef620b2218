"""What a run's numbers depend on beyond the package versions: the CPU (model, the vector
instructions its kernels may use) and the GPU.

A thresholded model is chaotic: a relative 1e-6 change of its thresholds moves its perplexity
by about a percent (docs/evaluation.md, "Numerical sensitivity"). Two CPUs whose kernels round the last bits
differently (another instruction set, another blocking, another thread count) therefore give
another sparse and +SPON perplexity from the same lock and seed, while the dense figure agrees.
``env.json`` records these so that a figure can be reproduced bit for bit on the same kind of
machine, and so that a difference can be traced to the machine (docs/seeds-and-comparisons.md,
"What reproduces bit for bit").
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: The instruction-set extensions that change which kernels torch and oneDNN / MKL pick
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, set[str]]:
    """The model name and the feature flags of the first processor listed (Linux)."""
    model, flags = None, set()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """``{"model", "isa", "torch_capability", "logical_cores"}``: the CPU's model name, which of
    :data:`ISA_FLAGS` it has, the vector capability torch dispatches its CPU kernels on
    (``AVX2``, ``AVX512``, ...), and the logical cores the run could see."""
    model, flags = _cpuinfo(cpuinfo)
    out = {"model": model or platform.processor() or platform.machine() or None,
           "isa": [f for f in ISA_FLAGS if f in flags],
           "torch_capability": None,
           "logical_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    try:
        import torch

        out["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        pass
    return out


def gpu_info() -> dict | None:
    """``{"devices": [names], "cuda": version}`` where CUDA is available, else None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return {"devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "cuda": torch.version.cuda}
