/* Batch-1 sparse decode matvec over a transposed weight (spon_exp/kernels/sparse_matvec.py).

   y = sum over the inputs i with x_i != 0 of x_i * Wt[i, :] (+ bias), Wt = W^T stored [in, out]
   row-major, so each kept input's weight column is one contiguous row. Two families:
     spon_sparse_matvec_f32   rows grouped four at a time, threads split the outputs (mode 0)
                              or the kept rows (mode 1, split-K); equal to dense to float
                              rounding only.
     spon_ordered_matvec_f32  every output accumulated over the inputs in index order with one
                              fma per input; skipping the zero inputs or multiplying them in
                              gives bit-identical results (fma(0, w, y) == y).

   FMA rule: FUSED. Built with -ffp-contract=fast (cbuild.py, SPARSE_MATVEC). The ordered
   kernel calls __builtin_fmaf explicitly, so its rounding never depends on the flags or on
   the ISA path. The grouped kernels let the compiler contract their multiply-adds: the
   AVX2+FMA clones below (target attribute, picked at run time) fuse them; the generic clones
   fuse only where the base ISA has FMA (e.g. aarch64), not on plain x86-64. No -march or
   -mfma on the command line, so a cache shared between machines with other CPUs stays safe.

   OpenMP is optional: the pragmas go through OMP(...), which is empty without -fopenmp, and
   then one thread does all the work. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#define OMP(directive) _Pragma(#directive)
#define THREAD_ID() omp_get_thread_num()
#define THREAD_COUNT() omp_get_num_threads()
#else
#define OMP(directive)
#define THREAD_ID() 0
#define THREAD_COUNT() 1
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
    OMP(omp parallel)
    {
      const int64_t tid = THREAD_ID(), nth = THREAD_COUNT();
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
    OMP(omp parallel)
    {
      const int64_t tid = THREAD_ID(), nth = THREAD_COUNT();
      for (int64_t t = tid; t < nt; t += nth) {
        int64_t k0 = t * kchunk, k1 = k0 + kchunk < nk ? k0 + kchunk : nk;
        float* acc = t == 0 ? y : scratch + (t - 1) * out;
        if (k0 < k1) axpy_rows(acc, Wt, out, idx + k0, val + k0, k1 - k0, 0, out);
      }
      OMP(omp barrier)
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
  OMP(omp parallel for schedule(static) num_threads((int)nt))
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
