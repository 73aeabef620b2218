"""Per-row top-k masks on the CPU in one pass: score, select, compare.

WINA's and LaRoSA's masks keep, per token, the ``keep`` entries of highest score
``|x_i|·c_i`` (``c`` a per-column scale, e.g. WINA's column norms, or none). In PyTorch that
is a score tensor, a ``kthvalue`` (which copies its input), a comparison and, for exact-k
ties, a count: on a CPU the selection alone costs about as much as the projection's matmul
on a 135M model. This kernel does it all per row in cache: the scores into a scratch row; the
``keep``-th largest, found inside a narrow window around the previous row's cut (scaled by the
row's mean score; one counting pass checks the window holds it, then only its few scores are
selected), or else by a radix histogram of the scores' top bits and a quickselect on the one
bin that holds it; then the mask, written without branches (a 50 % branch per entry costs
more than the selection). Rows are split between OpenMP threads.

The scores are computed as ``fabsf(x) * c`` in float32, the same single rounding as
``x.float().abs() * c`` in torch, so the masks equal torch's. Ties at the cut: ``keep``
keeps every entry equal to the ``keep``-th largest; ``break`` keeps exactly ``keep``,
taking the tied entries of lowest index (``torch.topk`` picks among ties in no documented
order).

Float32 inputs only; anything else (and a machine without a C compiler, or
``SPON_EXP_DISABLE_SPARSE_KERNEL=1``) returns ``None`` and the caller uses torch.

``threshold_split_cpu`` is the threshold counterpart for R-Sparse: one pass writes the kept
part ``x·[|x|·c > τ]`` and the rest ``x − kept`` (the low-rank path's input), where torch
makes five temporaries.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import torch

from spon_exp.kernels import cbuild

log = logging.getLogger(__name__)

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define RADIX_BITS 11
#define RADIX_BINS (1 << RADIX_BITS)

/* float bits, read through a type that may alias a float (branchless selects vectorise) */
typedef uint32_t __attribute__((may_alias)) fbits_t;

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }

/* The k-th largest (k in [1, n]) of a[0..n), reordering a. Hoare-partition quickselect. */
static float kth_largest(float* a, int64_t n, int64_t k) {
    int64_t target = n - k, lo = 0, hi = n - 1;
    while (lo < hi) {
        float x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi];
        float pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) { float t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (target <= j) hi = j;
        else if (target >= i) lo = i;
        else return pivot;  /* a[j+1 .. i-1] all equal the pivot */
    }
    return a[target];
}

/* The k-th largest of n non-negative scores: a histogram of the top RADIX_BITS bits (for
   non-negative floats the bit pattern orders like the value) finds the bin holding it, then a
   quickselect runs on that bin's few entries only. */
static float kth_largest_radix(const float* s, float* work, uint32_t* hist, int64_t n, int64_t k) {
    memset(hist, 0, sizeof(uint32_t) * RADIX_BINS);
    for (int64_t i = 0; i < n; i++) hist[bits_of(s[i]) >> (32 - RADIX_BITS)]++;
    int64_t need = k;
    int bin = RADIX_BINS - 1;
    for (; bin > 0; bin--) {
        if ((int64_t)hist[bin] >= need) break;
        need -= hist[bin];
    }
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++)
        if ((int)(bits_of(s[i]) >> (32 - RADIX_BITS)) == bin) work[m++] = s[i];
    return kth_largest(work, m, need);
}

/* The k-th largest of s[0..n) guided by the previous row's cut: rows of one tensor have
   similar score distributions, so the cut relative to the row's mean score moves little from
   row to row. One counting pass over a window [lo, hi) around the guess tells whether the
   cut lies inside (fewer than k scores >= hi, at least k >= lo); then only the window's few
   scores are selected. Otherwise (first row, a jump) the radix selection runs; the window's
   width adapts to the misses. The result is the exact k-th largest either way. */
typedef struct { float ratio; float eps; int valid; } guess_t;

static float row_mean(const float* s, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += s[i + j];
    float total = 0;
    for (; i < n; i++) total += s[i];
    for (int j = 0; j < 8; j++) total += acc[j];
    return total / (float)n;
}

static float kth_largest_guided(const float* s, float* work, uint32_t* hist, int64_t n, int64_t k, guess_t* g) {
    float mean = row_mean(s, n);
    int usable = mean > 0 && isfinite(mean);
    if (g->valid && usable) {
        float center = g->ratio * mean;
        float lo = center * (1.0f - g->eps), hi = center * (1.0f + g->eps);
        int32_t c_lo = 0, c_hi = 0;
        for (int64_t i = 0; i < n; i++) { c_lo += s[i] >= lo; c_hi += s[i] >= hi; }
        if (c_hi < k && k <= c_lo) {
            int64_t m = 0;
            for (int64_t i = 0; i < n; i++) { work[m] = s[i]; m += (s[i] >= lo) & (s[i] < hi); }
            float cut = kth_largest(work, m, k - c_hi);
            if (8 * m > n && g->eps > 1e-3f) g->eps *= 0.7f;  /* a wide window: narrow it */
            g->ratio = cut / mean;
            return cut;
        }
        g->eps = g->eps < 0.5f ? 2.0f * g->eps : 1.0f;  /* a miss: widen (eps 1 brackets every cut) */
    }
    float cut = kth_largest_radix(s, work, hist, n, k);
    if (usable) { g->ratio = cut / mean; g->valid = 1; if (g->eps <= 0) g->eps = 0.05f; }
    return cut;
}

/* mask[r, i] = score[r, i] among the `keep` largest of row r, score = |x| * scale (scale may be NULL).
   ties: 0 keep every score equal to the cut, 1 exactly `keep` (lowest indices first). */
int spon_topk_mask_f32(const float* x, const float* scale, int64_t rows, int64_t width, int64_t keep,
                       int ties, uint8_t* mask, float* out, int64_t* kept_total) {
    int failed = 0;
    int64_t kept_all = 0;
    #pragma omp parallel
    {
        float* score = (float*)malloc(sizeof(float) * width);
        float* work = (float*)malloc(sizeof(float) * width);
        uint32_t* hist = (uint32_t*)malloc(sizeof(uint32_t) * RADIX_BINS);
        guess_t guess = {0.0f, 0.0f, 0};
        if (!score || !work || !hist) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static) reduction(+:kept_all)
        for (int64_t r = 0; r < rows; r++) {
            if (!score || !work || !hist) continue;
            const float* xr = x + r * width;
            if (scale) for (int64_t i = 0; i < width; i++) score[i] = fabsf(xr[i]) * scale[i];
            else for (int64_t i = 0; i < width; i++) score[i] = fabsf(xr[i]);
            float cut = kth_largest_guided(score, work, hist, width, keep, &guess);
            int32_t kept = 0;
            for (int64_t i = 0; i < width; i++) kept += score[i] >= cut;
            int exact = ties != 0 && kept > keep;  /* ties at the cut: keep the lowest-index ones */
            int32_t equal_left = keep;
            if (exact) for (int64_t i = 0; i < width; i++) equal_left -= score[i] > cut;
            if (mask) {
                uint8_t* m = mask + r * width;
                if (!exact) for (int64_t i = 0; i < width; i++) m[i] = score[i] >= cut;
                else for (int64_t i = 0; i < width; i++) {
                    uint8_t on = score[i] > cut;
                    if (!on && score[i] == cut && equal_left > 0) { on = 1; equal_left--; }
                    m[i] = on;
                }
            }
            if (out) {
                float* o = out + r * width;
                if (!exact) {  /* x's bits or +0, without a branch (a 50 % branch mispredicts per entry) */
                    const fbits_t* xb = (const fbits_t*)xr;
                    fbits_t* ob = (fbits_t*)o;
                    for (int64_t i = 0; i < width; i++) ob[i] = xb[i] & (0u - (uint32_t)(score[i] >= cut));
                }
                else {
                    int32_t left = keep;
                    for (int64_t i = 0; i < width; i++) left -= score[i] > cut;
                    for (int64_t i = 0; i < width; i++) {
                        int on = score[i] > cut;
                        if (!on && score[i] == cut && left > 0) { on = 1; left--; }
                        o[i] = on ? xr[i] : 0.0f;
                    }
                }
            }
            kept_all += exact ? keep : kept;
        }
        free(score);
        free(work);
        free(hist);
    }
    if (kept_total) *kept_total = kept_all;
    return failed;
}

/* kept = x where |x| * scale > tau else 0; rest = x - kept (rest may be NULL). */
void spon_threshold_split_f32(const float* x, const float* scale, int64_t rows, int64_t width, float tau,
                              float* kept, float* rest, int64_t* kept_total) {
    int64_t kept_all = 0;
    #pragma omp parallel for schedule(static) reduction(+:kept_all)
    for (int64_t r = 0; r < rows; r++) {
        const float* xr = x + r * width;
        fbits_t* k = (fbits_t*)(kept + r * width);
        fbits_t* z = rest ? (fbits_t*)(rest + r * width) : 0;
        const fbits_t* xb = (const fbits_t*)xr;
        int32_t n = 0;
        for (int64_t i = 0; i < width; i++) {  /* branchless: x's bits or +0 on each side */
            float s = scale ? fabsf(xr[i]) * scale[i] : fabsf(xr[i]);
            uint32_t on = 0u - (uint32_t)(s > tau);
            k[i] = xb[i] & on;
            if (z) z[i] = xb[i] & ~on;
            n += on & 1u;
        }
        kept_all += n;
    }
    if (kept_total) *kept_total = kept_all;
}
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                lib, _ = cbuild.build("spon_exp_topk_select", _C_SOURCE)
                fn = lib.spon_topk_mask_f32
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
                lib.spon_threshold_split_f32.restype = None
                lib.spon_threshold_split_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                         ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
                                                         ctypes.c_void_p, ctypes.c_void_p]
                _lib = lib
            except Exception as e:  # noqa: BLE001 - torch does the selection instead
                log.warning("top-k selection kernel unavailable, using torch: %s", e)
                _lib = None
            _tried = True
    return _lib


def available() -> bool:
    return _load() is not None


def _kernel_for(x: torch.Tensor, scale: torch.Tensor | None, writes_product: bool) -> ctypes.CDLL | None:
    """The loaded kernels if they apply to ``x`` (a float32 CPU tensor, ``scale`` none or the
    same), else ``None``; a kernel that writes the masked product does not apply where
    autograd needs that product (torch computes it then, carrying the gradient)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    if scale is not None and (scale.dtype != torch.float32 or scale.device.type != "cpu"):
        return None
    if writes_product and x.requires_grad and torch.is_grad_enabled():
        return None
    return _load()


def _call(x: torch.Tensor, keep: int, ties: str, scale: torch.Tensor | None, mask: torch.Tensor | None,
          out: torch.Tensor | None) -> int:
    lib = _load()
    rows = x.detach().reshape(-1, x.shape[-1]).contiguous()
    scale = scale.contiguous() if scale is not None else None
    kept = ctypes.c_int64(0)
    if lib.spon_topk_mask_f32(rows.data_ptr(), scale.data_ptr() if scale is not None else None, rows.shape[0],
                              rows.shape[1], keep, 0 if ties == "keep" else 1,
                              mask.data_ptr() if mask is not None else None,
                              out.data_ptr() if out is not None else None, ctypes.byref(kept)):
        raise MemoryError("top-k selection kernel could not allocate its scratch rows")
    return kept.value


def topk_mask_cpu(x: torch.Tensor, keep: int, ties: str, scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean mask of the ``keep`` largest ``|x|·scale`` per row (last dimension), or ``None``
    when the kernel does not apply (not a float32 CPU tensor, ``keep`` outside ``(0, width)``,
    no kernel)."""
    if not 0 < keep < x.shape[-1] or _kernel_for(x, scale, writes_product=False) is None:
        return None
    mask = torch.empty(x.shape, dtype=torch.bool)
    _call(x, keep, ties, scale, mask, None)
    return mask


def topk_sparsify_cpu(x: torch.Tensor, keep: int, ties: str,
                      scale: torch.Tensor | None = None) -> tuple[torch.Tensor, int] | None:
    """``(x with all but the kept entries zeroed, number kept)`` in one pass, without a mask
    tensor; ``None`` where the kernel does not apply or autograd needs the product (then
    ``x * mask`` in torch carries the gradient)."""
    if not 0 < keep < x.shape[-1] or _kernel_for(x, scale, writes_product=True) is None:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    return out, _call(x, keep, ties, scale, None, out)


def threshold_split_cpu(x: torch.Tensor, tau: float, scale: torch.Tensor | None = None,
                        rest: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
    """``(kept, rest, number kept)`` with ``kept = x·[|x|·scale > tau]`` and ``rest = x − kept``
    in one pass; ``None`` where it does not apply (as :func:`topk_sparsify_cpu`). The score is
    ``fabsf(x)·scale`` in float32 and compared with ``tau`` as a float32, as torch compares a
    float32 score tensor with a Python float."""
    lib = _kernel_for(x, scale, writes_product=True)
    if lib is None:
        return None
    rows = x.detach().reshape(-1, x.shape[-1]).contiguous()
    kept_out = torch.empty(x.shape, dtype=x.dtype)
    rest_out = torch.empty(x.shape, dtype=x.dtype) if rest else None
    count = ctypes.c_int64(0)
    scale = scale.contiguous() if scale is not None else None
    lib.spon_threshold_split_f32(rows.data_ptr(), scale.data_ptr() if scale is not None else None, rows.shape[0],
                                 rows.shape[1], tau, kept_out.data_ptr(),
                                 rest_out.data_ptr() if rest_out is not None else None, ctypes.byref(count))
    return kept_out, rest_out, count.value
