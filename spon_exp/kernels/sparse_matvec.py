"""Batch-1 sparse decode matvec that skips the weight columns of zeroed inputs.

For a single decode token the input of a sparsified projection has many exact zeros
(TEAL-style masking). ``y = W @ x + b`` then only needs the columns ``W[:, i]`` with
``x_i != 0``. Storing the weight transposed and contiguous (``weight_t = W.T.contiguous()``,
shape ``[in, out]``) turns each needed column into one contiguous row of ``weight_t``, so
the kernel streams only the kept rows from memory: on a memory-bound CPU matvec the time
falls roughly with the fraction of kept inputs.

The kernel is a small C file compiled with the system C compiler at first use and loaded
with :mod:`ctypes` (no pybind / torch headers, so it compiles in a small fraction of the time
a ``torch.utils.cpp_extension.load_inline`` build of the same loop takes), through
:mod:`spon_exp.kernels.cbuild`: cached under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``), keyed by a hash of the source, flags and compiler. It is built for generic x86-64 /
the host architecture without ``-march=native``; the inner loop is also compiled for
AVX2+FMA via a GCC target attribute and picked at run time, so a cache shared between
machines with different CPUs stays safe. Threads come from OpenMP; the library links
``libgomp.so.1``, which resolves to the copy torch has already loaded, so the kernel and
torch share one thread pool.

Two ways to split the work between ``T`` threads:

* **output split** (mode 0): thread ``t`` owns a contiguous slice of the outputs and walks
  all kept rows over its slice. No reduction; the accumulator slice stays in L1/L2.
* **split-K** (mode 1): the kept rows are divided between threads, each accumulates a full
  private output vector, then the partial vectors are summed.

``mode="auto"`` uses split-K with more than one thread unless the output is longer than
:data:`SPLIT_K_MAX_OUT` (a per-thread accumulator of that size no longer sits comfortably in
L2), where it uses output split. On a multi-core CPU split-K measured as fast or faster at
Llama-3-8B's shapes and clearly faster at short outputs, the two tying only at very long
outputs (``python benchmarks/perf/sparse_matvec.py --modes output,split_k --shapes 4096x1024,4096x14336``):
every thread streams whole contiguous rows, where output split has both threads read halves
of the same rows. ``autotune(...)`` measures both on a given shape and pins the winner for
that shape.

A third, **ordered** kernel (``mode="ordered"``, the decode default) gives up split-K for
exactness: each output is summed over the kept inputs in index order with chained FMAs
(threads split the outputs), so it is bit-identical to ``mode="ordered_dense"``, the same
sum with the zero inputs multiplied in, i.e. the masked-dense product in a fixed order. Its
speed against ``auto``: ``benchmarks/results/sparse_matvec.json`` (README, "Benchmarks").

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

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Walk the kept rows k of W (length ldw) over outputs o0..o1, four rows per pass (one
   load/store of y per four rows of W), then the remaining rows one by one. UPDATE4 and
   UPDATE1 give the new y[j] from the rows' weights w0..w3[j] and inputs a0..a3. The j loop
   has independent iterations, so -O3 vectorises it without any fast-math flag. */
#define SPON_ROWS_LOOP(UPDATE4, UPDATE1)                                       \
  int64_t k = 0;                                                               \
  for (; k + 4 <= nk; k += 4) {                                                \
    const float* __restrict__ w0 = W + idx[k] * ldw;                           \
    const float* __restrict__ w1 = W + idx[k + 1] * ldw;                       \
    const float* __restrict__ w2 = W + idx[k + 2] * ldw;                       \
    const float* __restrict__ w3 = W + idx[k + 3] * ldw;                       \
    const float a0 = val[k], a1 = val[k + 1], a2 = val[k + 2], a3 = val[k + 3]; \
    for (int64_t j = o0; j < o1; ++j) y[j] = UPDATE4;                          \
  }                                                                            \
  for (; k < nk; ++k) {                                                        \
    const float* __restrict__ w0 = W + idx[k] * ldw;                           \
    const float a0 = val[k];                                                   \
    for (int64_t j = o0; j < o1; ++j) y[j] = UPDATE1;                          \
  }

/* y[o0:o1] += sum_k val[k] * W[idx[k], o0:o1], four products summed pairwise per pass. */
#define SPON_AXPY_BODY                                                         \
  SPON_ROWS_LOOP(y[j] + ((a0 * w0[j] + a1 * w1[j]) + (a2 * w2[j] + a3 * w3[j])), \
                 y[j] + a0 * w0[j])

#if defined(__x86_64__) || defined(__i386__)
#define SPON_HAVE_X86 1
__attribute__((target("avx2,fma"))) static void axpy_rows_avx2(
    float* __restrict__ y, const float* __restrict__ W, int64_t ldw,
    const int64_t* __restrict__ idx, const float* __restrict__ val, int64_t nk,
    int64_t o0, int64_t o1) {
  SPON_AXPY_BODY
}
#endif

static void axpy_rows_generic(
    float* __restrict__ y, const float* __restrict__ W, int64_t ldw,
    const int64_t* __restrict__ idx, const float* __restrict__ val, int64_t nk,
    int64_t o0, int64_t o1) {
  SPON_AXPY_BODY
}

int spon_has_avx2_fma(void) {
#ifdef SPON_HAVE_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return 0;
#endif
}

static int spon_isa = -1; /* -1 unknown, 0 generic, 1 avx2+fma */

static void axpy_rows(float* y, const float* W, int64_t ldw, const int64_t* idx,
                      const float* val, int64_t nk, int64_t o0, int64_t o1) {
#ifdef SPON_HAVE_X86
  if (spon_isa == 1) { axpy_rows_avx2(y, W, ldw, idx, val, nk, o0, o1); return; }
#endif
  axpy_rows_generic(y, W, ldw, idx, val, nk, o0, o1);
}

int spon_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

/* isa: -1 = detect, 0 = force generic, 1 = allow avx2 (if the CPU has it). */
void spon_set_isa(int isa) {
  int has = spon_has_avx2_fma();
  spon_isa = (isa < 0) ? has : (isa && has);
}

int spon_get_isa(void) {
  if (spon_isa < 0) spon_set_isa(-1);
  return spon_isa;
}

/* The inputs to multiply in (all, or only the nonzero ones when skip_zeros): their indices and
   values in increasing index order, in freshly allocated arrays. Returns how many, or -1 on
   allocation failure. Also settles the ISA on first use. */
static int64_t gather_inputs(const float* x, int64_t in, int skip_zeros, int64_t** idx_out,
                             float** val_out) {
  if (spon_isa < 0) spon_set_isa(-1);
  int64_t* idx = (int64_t*)malloc(sizeof(int64_t) * (size_t)(in > 0 ? in : 1));
  float* val = (float*)malloc(sizeof(float) * (size_t)(in > 0 ? in : 1));
  if (!idx || !val) { free(idx); free(val); return -1; }
  int64_t nk = 0;
  for (int64_t i = 0; i < in; ++i) {
    const float v = x[i];
    if (!skip_zeros || v != 0.0f) { idx[nk] = i; val[nk] = v; ++nk; }
  }
  *idx_out = idx;
  *val_out = val;
  return nk;
}

/* y[out] = W^T-stored matvec: y = sum_{i: x_i != 0} x_i * Wt[i, :] (+ bias).
   Wt is [in, out] row-major contiguous. mode 0 = output split, 1 = split-K.
   Returns the number of kept (nonzero) inputs, or -1 on allocation failure. */
int64_t spon_sparse_matvec_f32(const float* x, const float* Wt, const float* bias,
                               float* y, int64_t in, int64_t out, int mode,
                               int nthreads) {
  int64_t* idx;
  float* val;
  const int64_t nk = gather_inputs(x, in, 1, &idx, &val);
  if (nk < 0) return -1;
  if (bias) memcpy(y, bias, sizeof(float) * (size_t)out);
  else memset(y, 0, sizeof(float) * (size_t)out);
  if (nk == 0 || out == 0) { free(idx); free(val); return nk; }

  int64_t nt = nthreads > 0 ? nthreads : 1;
#ifndef _OPENMP
  nt = 1;
#endif
  if (nk * out < ((int64_t)1 << 16)) nt = 1; /* tiny: threading costs more than it saves */

  if (nt <= 1) {
    axpy_rows(y, Wt, out, idx, val, nk, 0, out);
  } else if (mode == 0) {
    int64_t chunk = (out + nt - 1) / nt;
    chunk = (chunk + 15) / 16 * 16; /* 64-byte slices */
#ifdef _OPENMP
#pragma omp parallel
#endif
    {
      int64_t tid = 0, nth = 1;
#ifdef _OPENMP
      tid = omp_get_thread_num();
      nth = omp_get_num_threads();
#endif
      for (int64_t t = tid; t < nt; t += nth) {
        int64_t o0 = t * chunk, o1 = o0 + chunk < out ? o0 + chunk : out;
        if (o0 < o1) axpy_rows(y, Wt, out, idx, val, nk, o0, o1);
      }
    }
  } else {
    if (nt > nk) nt = nk;
    float* scratch = (float*)calloc((size_t)(nt - 1) * (size_t)out, sizeof(float));
    if (!scratch) { free(idx); free(val); return -1; }
    const int64_t kchunk = (nk + nt - 1) / nt;
#ifdef _OPENMP
#pragma omp parallel
#endif
    {
      int64_t tid = 0, nth = 1;
#ifdef _OPENMP
      tid = omp_get_thread_num();
      nth = omp_get_num_threads();
#endif
      for (int64_t t = tid; t < nt; t += nth) {
        int64_t k0 = t * kchunk, k1 = k0 + kchunk < nk ? k0 + kchunk : nk;
        float* acc = t == 0 ? y : scratch + (t - 1) * out;
        if (k0 < k1) axpy_rows(acc, Wt, out, idx + k0, val + k0, k1 - k0, 0, out);
      }
#ifdef _OPENMP
#pragma omp barrier
#endif
      int64_t ochunk = (out + nth - 1) / nth;
      ochunk = (ochunk + 15) / 16 * 16;
      int64_t o0 = tid * ochunk, o1 = o0 + ochunk < out ? o0 + ochunk : out;
      for (int64_t s = 0; s + 1 < nt; ++s) {
        const float* sp = scratch + s * out;
        for (int64_t j = o0; j < o1; ++j) y[j] += sp[j];
      }
    }
    free(scratch);
  }
  free(idx);
  free(val);
  return nk;
}

/* Ordered matvec: every output is accumulated over the inputs in increasing index order,
   one fused multiply-add per input, y_j = fma(x_i, Wt[i, j], y_j), starting from 0, with the
   bias added at the end. Four rows per pass as a chain of FMAs (one load/store of y per four
   rows, the order unchanged). With skip_zeros = 1 the zero inputs are skipped; with 0 they
   are multiplied in. fma(0, w, y) == y for every finite w, so the two results are
   bit-identical: this is the masked-dense product computed in one fixed order, and skipping
   the zeros provably changes nothing. Threads split the outputs only (no split-K), so the
   order never depends on the thread count. */
#define SPON_ORDERED_BODY                                                      \
  for (int64_t j = o0; j < o1; ++j) y[j] = 0.0f;                               \
  SPON_ROWS_LOOP(__builtin_fmaf(a3, w3[j], __builtin_fmaf(a2, w2[j],           \
                   __builtin_fmaf(a1, w1[j], __builtin_fmaf(a0, w0[j], y[j])))), \
                 __builtin_fmaf(a0, w0[j], y[j]))                              \
  if (bias)                                                                    \
    for (int64_t j = o0; j < o1; ++j) y[j] += bias[j];

#ifdef SPON_HAVE_X86
__attribute__((target("avx2,fma"))) static void ordered_rows_avx2(
    float* __restrict__ y, const float* __restrict__ W, int64_t ldw,
    const int64_t* __restrict__ idx, const float* __restrict__ val, int64_t nk,
    const float* __restrict__ bias, int64_t o0, int64_t o1) {
  SPON_ORDERED_BODY
}
#endif

static void ordered_rows_generic(
    float* __restrict__ y, const float* __restrict__ W, int64_t ldw,
    const int64_t* __restrict__ idx, const float* __restrict__ val, int64_t nk,
    const float* __restrict__ bias, int64_t o0, int64_t o1) {
  SPON_ORDERED_BODY
}

int64_t spon_ordered_matvec_f32(const float* x, const float* Wt, const float* bias,
                                float* y, int64_t in, int64_t out, int skip_zeros,
                                int nthreads) {
  int64_t* idx;
  float* val;
  const int64_t nk = gather_inputs(x, in, skip_zeros, &idx, &val);
  if (nk < 0) return -1;
  int64_t nt = nthreads > 0 ? nthreads : 1;
#ifndef _OPENMP
  nt = 1;
#endif
  if (nk * out < ((int64_t)1 << 16)) nt = 1;
  int64_t chunk = (out + nt - 1) / nt;
  chunk = (chunk + 15) / 16 * 16; /* 64-byte slices */
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads((int)nt)
#endif
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t o0 = t * chunk, o1 = o0 + chunk < out ? o0 + chunk : out;
    if (o0 >= o1) continue;
#ifdef SPON_HAVE_X86
    if (spon_isa == 1) { ordered_rows_avx2(y, Wt, out, idx, val, nk, bias, o0, o1); continue; }
#endif
    ordered_rows_generic(y, Wt, out, idx, val, nk, bias, o0, o1);
  }
  free(idx);
  free(val);
  return nk;
}
"""

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
            lib, _lib_info = cbuild.build("spon_exp_sparse_matvec", _C_SOURCE)
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
