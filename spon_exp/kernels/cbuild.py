"""Compile a small C source with the system compiler at first use and load it with ctypes.

The library is cached under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)
in ``<name>/<name>_<hash>.so``, the hash covering the source, flags, compiler and machine, so
a changed source or compiler rebuilds and concurrent builders never see a partial file. It is
built with OpenMP when the compiler supports it (the library then links ``libgomp.so.1``,
the copy torch has already loaded, so the kernel shares torch's thread pool), else without.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

BASE_FLAGS = ["-O3", "-std=gnu11", "-ffp-contract=fast", "-fPIC", "-shared", "-fno-math-errno"]


def cache_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "torch_extensions"


def compiler() -> str | None:
    """``$CC``, else the first of gcc / cc / clang on the PATH."""
    cc = os.environ.get("CC")
    for cand in ([cc] if cc else []) + ["gcc", "cc", "clang"]:
        path = shutil.which(cand)
        if path:
            return path
    return None


def compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else cc
    except Exception:  # pragma: no cover - exotic compilers
        return cc


def compile_source(cc: str, source: str, flags: list[str], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        src = Path(tmp) / f"{dest.stem}.c"
        src.write_text(source)
        tmp_so = Path(tmp) / dest.name
        proc = subprocess.run([cc, *flags, str(src), "-o", str(tmp_so)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} {' '.join(flags)} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp_so, dest)  # atomic


def avx2_flags() -> list[str]:
    """``["-mavx2"]`` where torch dispatches to AVX2 or AVX-512 on this CPU (so the CPU has
    AVX2; ``ATEN_CPU_CAPABILITY=default`` turns it off), else nothing. No ``-mfma``: with
    ``-ffp-contract=fast`` it would fuse multiply-adds and change a kernel's rounding."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return ["-mavx2"] if capability in ("AVX2", "AVX512") else []


def build(name: str, source: str, extra_flags: list[str] | None = None) -> tuple[ctypes.CDLL, dict]:
    """Compile (or reuse the cached build of) ``source`` and load it; raises with the
    compiler's message when no build works, or when ``SPON_EXP_DISABLE_SPARSE_KERNEL=1``
    switches the C kernels off. ``extra_flags`` (e.g. :func:`avx2_flags`) are part of the
    cache key, so machines with other CPUs sharing a cache build their own. Returns the
    library and how it was built."""
    if os.environ.get("SPON_EXP_DISABLE_SPARSE_KERNEL", "") not in ("", "0"):
        raise RuntimeError("disabled by SPON_EXP_DISABLE_SPARSE_KERNEL")
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    cid = compiler_id(cc)
    errors = []
    for omp in (True, False):
        flags = BASE_FLAGS + list(extra_flags or []) + (["-fopenmp"] if omp else [])
        key = hashlib.sha256("\0".join([source, " ".join(flags), cid, platform.machine()]).encode()).hexdigest()[:16]
        so = cache_root() / name / f"{name}_{key}.so"
        try:
            t0 = time.perf_counter()
            built = not so.exists()
            if built:
                compile_source(cc, source, flags, so)
            lib = ctypes.CDLL(str(so))
            return lib, {"path": str(so), "compiler": cid, "flags": flags, "built": built,
                         "build_s": time.perf_counter() - t0, "openmp": omp}
        except Exception as e:  # try again without OpenMP
            errors.append(str(e))
    raise RuntimeError("; ".join(errors))
