"""The one build helper of the C kernels: compile a ``.c`` file of this package with the system
compiler at first use and load it with ctypes.

Each kernel is a :class:`Kernel` in :data:`KERNELS`: its source file (shipped as package data
beside this module), its library name and its own flags. The flags carry the kernel's FMA
rule, one per kernel, which the top comment of its ``.c`` file explains:

- ``sparse_matvec.c`` (:data:`SPARSE_MATVEC`), **fused**: ``-ffp-contract=fast``. The ordered
  kernel calls ``fmaf`` explicitly (one rounding per input, whatever the flags); the grouped
  kernels' AVX2+FMA clones (a target attribute, picked at run time) let the compiler fuse
  their multiply-adds.
- ``select.c`` (:data:`TOPK_SELECT`), **none**: ``-ffp-contract=off``, and ``-mavx2`` but
  never ``-mfma`` where the CPU has AVX2. A score is one multiply rounded once, as torch
  rounds it, so the masks equal torch's bit for bit.

The library is cached under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)
in ``<name>/<name>_<hash>.so``, the hash covering the source, flags, compiler and machine, so
a changed source or compiler rebuilds and concurrent builders never see a partial file. It is
built with OpenMP when the compiler supports it (the library then links ``libgomp.so.1``,
the copy torch has already loaded, so the kernel shares torch's thread pool), else without.
``SPON_EXP_DISABLE_SPARSE_KERNEL=1`` switches every C kernel off (callers then use torch).
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
from dataclasses import dataclass
from pathlib import Path

#: Flags every kernel is built with; a kernel's own flags (:attr:`Kernel.flags`) follow them.
BASE_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-fno-math-errno"]
#: What :func:`check_warnings` adds: every kernel must compile cleanly under it.
WARNING_FLAGS = ["-Wall", "-Wextra", "-Werror"]
SOURCE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Kernel:
    """A C kernel: ``source`` (a file of this package), the library it builds to, its flags."""

    source: str
    library: str
    #: the kernel's FMA rule as compiler flags (``-ffp-contract=...``), documented in its source
    flags: tuple[str, ...]
    #: also ``-mavx2`` where the CPU has AVX2 (:func:`avx2_flags`); never ``-mfma``
    avx2: bool = False

    @property
    def path(self) -> Path:
        return SOURCE_DIR / self.source

    def text(self) -> str:
        return self.path.read_text()

    def flag_list(self, *, portable: bool = False) -> list[str]:
        """The kernel's own flags; ``portable`` leaves out the CPU-dependent ones (``-mavx2``)."""
        return [*self.flags, *(avx2_flags() if self.avx2 and not portable else [])]


SPARSE_MATVEC = Kernel("sparse_matvec.c", "spon_exp_sparse_matvec", ("-ffp-contract=fast",))
TOPK_SELECT = Kernel("select.c", "spon_exp_topk_select", ("-ffp-contract=off",), avx2=True)
KERNELS = (SPARSE_MATVEC, TOPK_SELECT)


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


def compile_source(cc: str, source: Path, flags: list[str], dest: Path) -> None:
    """``cc flags source -o dest``, written to a temporary file and moved into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tmp_so = Path(tmp) / dest.name
        proc = subprocess.run([cc, *flags, str(source), "-o", str(tmp_so)], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} {' '.join(flags)} {source.name} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp_so, dest)  # atomic


def avx2_flags() -> list[str]:
    """``["-mavx2"]`` where torch dispatches to AVX2 or AVX-512 on this CPU (so the CPU has
    AVX2; ``ATEN_CPU_CAPABILITY=default`` turns it off), else nothing. Never ``-mfma``: a
    kernel that takes these flags is one whose rounding must not change (FMA rule: none)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return ["-mavx2"] if capability in ("AVX2", "AVX512") else []


def build(kernel: Kernel, *, portable: bool = False) -> tuple[ctypes.CDLL, dict]:
    """Compile (or reuse the cached build of) ``kernel`` and load it; raises with the
    compiler's message when no build works, or when ``SPON_EXP_DISABLE_SPARSE_KERNEL=1``
    switches the C kernels off. The flags are part of the cache key, so machines with other
    CPUs sharing a cache build their own; ``portable`` builds without the CPU-dependent ones.
    Returns the library and how it was built."""
    if os.environ.get("SPON_EXP_DISABLE_SPARSE_KERNEL", "") not in ("", "0"):
        raise RuntimeError("disabled by SPON_EXP_DISABLE_SPARSE_KERNEL")
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    cid = compiler_id(cc)
    source = kernel.text()
    errors = []
    for omp in (True, False):
        flags = BASE_FLAGS + kernel.flag_list(portable=portable) + (["-fopenmp"] if omp else [])
        key = hashlib.sha256("\0".join([source, " ".join(flags), cid, platform.machine()]).encode()).hexdigest()[:16]
        so = cache_root() / kernel.library / f"{kernel.library}_{key}.so"
        try:
            t0 = time.perf_counter()
            built = not so.exists()
            if built:
                compile_source(cc, kernel.path, flags, so)
            lib = ctypes.CDLL(str(so))
            return lib, {"path": str(so), "compiler": cid, "flags": flags, "built": built,
                         "build_s": time.perf_counter() - t0, "openmp": omp}
        except Exception as e:  # try again without OpenMP
            errors.append(str(e))
    raise RuntimeError("; ".join(errors))


def check_warnings(kernel: Kernel, cc: str, *, openmp: bool, dest: Path) -> subprocess.CompletedProcess:
    """Compile ``kernel`` with its build flags and :data:`WARNING_FLAGS` into ``dest`` (nothing
    cached, nothing loaded); the finished process, whose ``returncode`` says whether it was clean."""
    flags = BASE_FLAGS + kernel.flag_list() + (["-fopenmp"] if openmp else []) + WARNING_FLAGS
    return subprocess.run([cc, *flags, str(kernel.path), "-o", str(dest)], capture_output=True, text=True,
                          timeout=300)
