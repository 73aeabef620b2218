"""Batch-1 sparse decode matvec that skips the weight columns of zeroed inputs.

For a single decode token the input of a sparsified projection has many exact zeros
(TEAL-style masking). ``y = W @ x + b`` then only needs the columns ``W[:, i]`` with
``x_i != 0``. Storing the weight transposed and contiguous (``weight_t = W.T.contiguous()``,
shape ``[in, out]``) turns each needed column into one contiguous row of ``weight_t``, so
the kernel streams only the kept rows from memory: on a memory-bound CPU matvec the time
falls roughly with the fraction of kept inputs.

The kernel is ``sparse_matvec.c`` beside this module, compiled with the system C compiler at
first use and loaded with :mod:`ctypes` (no pybind / torch headers, so the build is one short C
compile rather than a ``torch.utils.cpp_extension`` build), through
:mod:`spon_exp.kernels.cbuild`: cached under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``), keyed by a hash of the source, flags and compiler. It is built
for generic x86-64 / the host architecture without ``-march=native``; the inner loop is also
compiled for AVX2+FMA via a GCC target attribute and picked at run time, so a cache shared
between machines with different CPUs stays safe. Its FMA rule (fused; the ordered kernel calls
``fmaf`` itself) is stated at the top of the ``.c`` file and in :mod:`~spon_exp.kernels.cbuild`.
Threads come from OpenMP; the library links ``libgomp.so.1``, which resolves to the copy torch
has already loaded, so the kernel and torch share one thread pool.

Two ways to split the work between ``T`` threads:

* **output split** (mode 0): thread ``t`` owns a contiguous slice of the outputs and walks
  all kept rows over its slice. No reduction; the accumulator slice stays in L1/L2.
* **split-K** (mode 1): the kept rows are divided between threads, each accumulates a full
  private output vector, then the partial vectors are summed.

``mode="auto"`` uses split-K with more than one thread unless the output is longer than
:data:`SPLIT_K_MAX_OUT` (a per-thread accumulator of that size no longer sits comfortably in
L2), where it uses output split: with split-K every thread streams whole contiguous rows,
where output split has every thread read a slice of the same rows. The two compared by shape:
``python benchmarks/perf/sparse_matvec.py --modes output,split_k --shapes 4096x1024,4096x14336``
(figures in ``benchmarks/RESULTS.md``). ``autotune(...)`` measures both on a given shape and
pins the winner for that shape.

A third, **ordered** kernel (``mode="ordered"``, the decode default) gives up split-K for
exactness: each output is summed over the kept inputs in index order with chained FMAs
(threads split the outputs), so it is bit-identical to ``mode="ordered_dense"``, the same
sum with the zero inputs multiplied in, i.e. the masked-dense product in a fixed order. Its
speed against ``auto``: ``benchmarks/perf/sparse_matvec.py`` (figures in ``benchmarks/RESULTS.md``).

If no compiler is available or compilation fails, everything falls back to dense
``F.linear`` with one logged warning.

This is the CPU backend of the ``spon_exp::sparse_linear`` op (:mod:`spon_exp.kernels.ops`),
which the decode path calls.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time

import torch
import torch.nn.functional as F

from spon_exp.kernels import cbuild

log = logging.getLogger(__name__)

__all__ = [
    "sparse_matvec",
    "kernel_available",
    "kernel_info",
    "choose_mode",
    "autotune",
    "SPLIT_K_MAX_OUT",
]

#: ``mode="auto"`` uses split-K (with >1 thread) up to this many output features.
SPLIT_K_MAX_OUT = 65536

_MODES = {"output": 0, "split_k": 1}
#: Ordered modes (value: skip zero inputs?). ``"ordered"`` skips the zeros, ``"ordered_dense"``
#: multiplies every input in the same order: the bit-exact masked-dense reference.
_ORDERED = {"ordered": 1, "ordered_dense": 0}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_info: dict = {}
_load_attempted = False
_warned: set[str] = set()
_mode_overrides: dict[tuple[int, int, int], int] = {}


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def _load() -> ctypes.CDLL | None:
    """Compile (first use) and load the kernel; ``None`` if that is impossible."""
    global _lib, _load_attempted, _lib_info
    if _load_attempted:
        return _lib
    with _lock:
        if _load_attempted:
            return _lib
        try:
            lib, _lib_info = cbuild.build(cbuild.SPARSE_MATVEC)
            fn = lib.spon_sparse_matvec_f32
            fn.restype = ctypes.c_int64
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 2
            lib.spon_ordered_matvec_f32.restype = ctypes.c_int64
            lib.spon_ordered_matvec_f32.argtypes = fn.argtypes
            lib.spon_get_isa.restype = ctypes.c_int
            lib.spon_openmp.restype = ctypes.c_int
            lib.spon_set_isa.argtypes = [ctypes.c_int]
            _lib_info["isa"] = "avx2+fma" if lib.spon_get_isa() else "generic"
            _lib_info["openmp"] = bool(lib.spon_openmp())
            if not _lib_info["openmp"]:
                _warn_once("noomp", "sparse_matvec: built without OpenMP; the kernel is single-threaded")
            _lib = lib
        except Exception as e:
            _warn_once(
                "build",
                "sparse_matvec: could not build the sparse kernel, falling back to dense "
                "F.linear: %s", e,
            )
            _lib = None
        _load_attempted = True
        return _lib


def kernel_available() -> bool:
    """True if the compiled sparse kernel can be used (compiles it on first call)."""
    return _load() is not None


def kernel_info() -> dict:
    """Where the compiled kernel lives, how it was built, which ISA path it uses."""
    _load()
    return dict(_lib_info)


def choose_mode(in_features: int, out_features: int, num_threads: int | None = None) -> str:
    """The split strategy ``mode="auto"`` uses for this shape: ``"output"`` or ``"split_k"``."""
    nt = num_threads or torch.get_num_threads()
    pinned = _mode_overrides.get((in_features, out_features, nt))
    if pinned is not None:
        return "output" if pinned == 0 else "split_k"
    if nt > 1 and out_features <= SPLIT_K_MAX_OUT:
        return "split_k"
    return "output"


def _as_vector(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.numel() != in_features:
        raise ValueError(
            f"sparse_matvec expects a single input vector of {in_features} entries, got shape "
            f"{tuple(x.shape)}"
        )
    return x.reshape(in_features).contiguous()


def _kernel_ok(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if weight_t.dim() != 2:
        return False
    tensors = [x, weight_t] + ([bias] if bias is not None else [])
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if not weight_t.is_contiguous():
        _warn_once(
            "noncontig",
            "sparse_matvec: weight_t is not contiguous (store W.T.contiguous()); using dense",
        )
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # the kernel has no backward
    return True


def sparse_matvec(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    mode: str = "auto",
    num_threads: int | None = None,
) -> torch.Tensor:
    """``W @ x + b`` for one input vector, touching only rows of ``weight_t`` with ``x_i != 0``.

    Args:
        x: ``[in]`` or ``[1, in]`` (any shape with ``in`` elements); exact zeros are skipped.
        weight_t: ``W.T`` stored contiguous, shape ``[in, out]``.
        bias: optional ``[out]``.
        mode: ``"auto"``, ``"output"`` (output split), ``"split_k"``, or the ordered pair:
            ``"ordered"`` accumulates each output over the kept inputs in index order (one FMA
            each) and ``"ordered_dense"`` does the same over every input, zeros included;
            the two are bit-identical, so ``"ordered_dense"`` is the exact masked-dense
            reference of ``"ordered"`` (``"output"`` / ``"split_k"`` group rows for speed and
            agree with dense to float rounding only).
        num_threads: threads to use (default ``torch.get_num_threads()``).

    Returns:
        ``[out]`` if ``x`` is 1-D, else ``x.shape[:-1] + (out,)``.

    Float32 CPU tensors use the compiled kernel; anything else (other dtypes, CUDA, tensors
    that need grad, a failed build) is computed densely with ``F.linear`` (same result).
    """
    if weight_t.dim() != 2:
        raise ValueError(f"weight_t must be 2-D [in, out], got shape {tuple(weight_t.shape)}")
    in_features, out_features = weight_t.shape
    out_shape = (out_features,) if x.dim() <= 1 else (*x.shape[:-1], out_features)
    xv = _as_vector(x, in_features)
    if bias is not None and bias.numel() != out_features:
        raise ValueError(f"bias has {bias.numel()} entries, expected {out_features}")

    lib = _load() if _kernel_ok(x, weight_t, bias) else None
    if lib is None:
        return F.linear(xv, weight_t.t(), bias).reshape(out_shape)

    nt = int(num_threads or torch.get_num_threads())
    if mode == "auto":
        mode = choose_mode(in_features, out_features, nt)
    if mode not in _MODES and mode not in _ORDERED:
        raise ValueError(f"mode must be one of auto, {', '.join([*_MODES, *_ORDERED])}; got {mode!r}")
    b = bias.reshape(out_features).contiguous() if bias is not None else None
    y = torch.empty(out_features, dtype=torch.float32)
    fn, flag = ((lib.spon_ordered_matvec_f32, _ORDERED[mode]) if mode in _ORDERED
                else (lib.spon_sparse_matvec_f32, _MODES[mode]))
    nk = fn(xv.data_ptr(), weight_t.data_ptr(), b.data_ptr() if b is not None else None,
            y.data_ptr(), in_features, out_features, flag, nt)
    if nk < 0:
        raise MemoryError("sparse_matvec: allocation failed in the kernel")
    return y.reshape(out_shape)


def autotune(
    in_features: int,
    out_features: int,
    sparsity: float = 0.5,
    *,
    num_threads: int | None = None,
    repeats: int = 7,
) -> str:
    """Time both split strategies on a random ``[in, out]`` problem and pin the faster one.

    Later ``mode="auto"`` calls with this shape and thread count use the winner. Returns
    ``"output"`` or ``"split_k"`` (the heuristic if the kernel is unavailable).
    """
    nt = int(num_threads or torch.get_num_threads())
    if _load() is None:
        return choose_mode(in_features, out_features, nt)
    g = torch.Generator().manual_seed(0)
    wt = torch.randn(in_features, out_features, generator=g)
    x = torch.randn(in_features, generator=g)
    x[torch.rand(in_features, generator=g) < sparsity] = 0
    times = {m: [] for m in _MODES}
    for r in range(repeats + 1):
        for m in _MODES:  # interleaved, so load changes hit both equally
            t0 = time.perf_counter()
            sparse_matvec(x, wt, mode=m, num_threads=nt)
            if r:
                times[m].append(time.perf_counter() - t0)
    best = min(times, key=lambda m: sorted(times[m])[len(times[m]) // 2])
    _mode_overrides[(in_features, out_features, nt)] = _MODES[best]
    return best
