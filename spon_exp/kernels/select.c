/* Per-row top-k masks and threshold splits on the CPU (spon_exp/kernels/select.py).

   spon_topk_mask_f32        the `keep` largest |x|*c per row: mask and/or masked product, counted
   spon_threshold_split_f32  kept = x where |x|*c > tau, rest = x - kept, counted

   FMA rule: NONE. Built with -ffp-contract=off (cbuild.py, TOPK_SELECT), plus -mavx2 (never
   -mfma) where torch dispatches to AVX2. A score is one float multiply, fabsf(x) * c, rounded
   once as torch rounds x.abs() * c, so the masks equal torch's bit for bit; nothing here may
   be fused with another operation.

   OpenMP is optional: the pragmas go through OMP(...), which is empty without -fopenmp. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* OMP(omp parallel) is #pragma omp parallel under -fopenmp and nothing without it */
#ifdef _OPENMP
#define OMP(directive) _Pragma(#directive)
#else
#define OMP(directive)
#endif

/* float bits, read through a type that may alias a float (branchless selects vectorise) */
typedef uint32_t __attribute__((may_alias)) fbits_t;

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }

#define KEY_SHIFT 19  /* a key keeps the exponent and 4 mantissa bits: 16 bins per octave */
#define KEY_BINS 256  /* 16 octaves below the row's largest score; the last bin holds the rest */
_Static_assert(KEY_BINS <= 256, "keys are bytes");

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

/* The k-th largest (k in [1, m]) of the few scores of a bin, NaN-free: the one with fewer than
   k scores above it and at least k at or above it. The counts are branch-free (they vectorise);
   a quickselect's data-dependent branches mispredict on every partition step of so few values. */
static float kth_largest_few(const float* a, int64_t m, int64_t k) {
    for (int64_t i = 0; i < m; i++) {
        int32_t above = 0, at_or_above = 0;
        for (int64_t j = 0; j < m; j++) { above += a[j] > a[i]; at_or_above += a[j] >= a[i]; }
        if (above < k && k <= at_or_above) return a[i];
    }
    return a[0];  /* not reached: some score is the k-th largest */
}

#define FEW 64  /* a bin of at most this many scores is finished by kth_largest_few */

/* The k-th largest of n non-negative scores whose largest is `top`. For non-negative floats the
   bit pattern orders like the value, so a score's key -- how many 1/16 octaves it lies below the
   largest -- orders the scores in bins of width 2^(1/16). A histogram of the keys (four
   interleaved copies, so equal keys in a row do not wait on each other) finds the bin holding the
   k-th largest; a pass collects that bin's few scores, and their k-th largest is the answer. */
static float kth_largest_keyed(const float* s, float top, float* work, uint8_t* key, uint32_t* hist,
                               int64_t n, int64_t k) {
    uint32_t top_key = bits_of(top) >> KEY_SHIFT;
    memset(hist, 0, sizeof(uint32_t) * KEY_BINS * 4);
    for (int64_t i = 0; i < n; i++) {
        uint32_t d = top_key - (bits_of(s[i]) >> KEY_SHIFT);  /* wraps for NaN: the last bin */
        key[i] = (uint8_t)(d < KEY_BINS - 1 ? d : KEY_BINS - 1);
    }
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        hist[key[i]]++; hist[KEY_BINS + key[i + 1]]++; hist[2 * KEY_BINS + key[i + 2]]++; hist[3 * KEY_BINS + key[i + 3]]++;
    }
    for (; i < n; i++) hist[key[i]]++;
    int64_t need = k;
    int bin = 0;
    for (; bin < KEY_BINS - 1; bin++) {
        int64_t h = (int64_t)hist[bin] + hist[KEY_BINS + bin] + hist[2 * KEY_BINS + bin] + hist[3 * KEY_BINS + bin];
        if (h >= need) break;
        need -= h;
    }
    int64_t m = 0;
    i = 0;
#if defined(__SSE2__)  /* sixteen keys per compare; only the matches are visited */
    const __m128i want = _mm_set1_epi8((char)bin);
    for (; i + 16 <= n; i += 16) {
        unsigned hit = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i*)(key + i)), want));
        while (hit) { work[m++] = s[i + __builtin_ctz(hit)]; hit &= hit - 1; }
    }
#endif
    for (; i < n; i++) { work[m] = s[i]; m += key[i] == bin; }
    /* the last bin also holds NaN (its key wraps): the quickselect handles that one */
    return m <= FEW && bin < KEY_BINS - 1 ? kth_largest_few(work, m, need) : kth_largest(work, m, need);
}

/* score[i] = |x[i]| * scale[i] (scale may be NULL); returns the largest score (NaN ignored). */
static float score_row(const float* x, const float* scale, float* score, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) {
            float v = scale ? fabsf(x[i + j]) * scale[i + j] : fabsf(x[i + j]);
            score[i + j] = v;
            acc[j] = v > acc[j] ? v : acc[j];
        }
    float top = 0;
    for (; i < n; i++) {
        float v = scale ? fabsf(x[i]) * scale[i] : fabsf(x[i]);
        score[i] = v;
        top = v > top ? v : top;
    }
    for (int j = 0; j < 8; j++) top = acc[j] > top ? acc[j] : top;
    return top;
}

/* mask[r, i] = score[r, i] among the `keep` largest of row r, score = |x| * scale (scale may be NULL).
   ties: 0 keep every score equal to the cut, 1 exactly `keep` (lowest indices first). */
int spon_topk_mask_f32(const float* x, const float* scale, int64_t rows, int64_t width, int64_t keep,
                       int ties, uint8_t* mask, float* out, int64_t* kept_total) {
    int failed = 0;
    int64_t kept_all = 0;
    OMP(omp parallel)
    {
        float* score = (float*)malloc(sizeof(float) * width);
        float* work = (float*)malloc(sizeof(float) * width);
        uint8_t* key = (uint8_t*)malloc(width);
        uint32_t* hist = (uint32_t*)malloc(sizeof(uint32_t) * KEY_BINS * 4);
        if (!score || !work || !key || !hist) {
            OMP(omp atomic write)
            failed = 1;
        }
        OMP(omp for schedule(static) reduction(+:kept_all))
        for (int64_t r = 0; r < rows; r++) {
            if (!score || !work || !key || !hist) continue;
            const float* xr = x + r * width;
            float top = score_row(xr, scale, score, width);
            float cut = kth_largest_keyed(score, top, work, key, hist, width, keep);
            /* every score >= the cut, written without a branch (kept or not is unpredictable
               entry by entry) and counted in the same pass: x's bits or +0, and the mask */
            int32_t kept = 0;
            uint8_t* m = mask ? mask + r * width : 0;
            fbits_t* ob = out ? (fbits_t*)(out + r * width) : 0;
            const fbits_t* xb = (const fbits_t*)xr;
            if (ob && m) for (int64_t i = 0; i < width; i++) {
                uint32_t on = score[i] >= cut; ob[i] = xb[i] & (0u - on); m[i] = (uint8_t)on; kept += on;
            }
            else if (ob) for (int64_t i = 0; i < width; i++) {
                uint32_t on = score[i] >= cut; ob[i] = xb[i] & (0u - on); kept += on;
            }
            else if (m) for (int64_t i = 0; i < width; i++) { uint8_t on = score[i] >= cut; m[i] = on; kept += on; }
            else for (int64_t i = 0; i < width; i++) kept += score[i] >= cut;
            int exact = ties != 0 && kept > keep;
            if (exact) {  /* ties at the cut and exactly `keep` wanted: the lowest-index tied ones */
                int32_t left = keep;
                for (int64_t i = 0; i < width; i++) left -= score[i] > cut;
                for (int64_t i = 0; i < width; i++) {
                    uint32_t on = score[i] > cut;
                    if (!on && score[i] == cut && left > 0) { on = 1; left--; }
                    if (m) m[i] = (uint8_t)on;
                    if (ob) ob[i] = xb[i] & (0u - on);
                }
            }
            kept_all += exact ? keep : kept;
        }
        free(score);
        free(work);
        free(key);
        free(hist);
    }
    if (kept_total) *kept_total = kept_all;
    return failed;
}

/* kept = x where |x| * scale > tau else 0; rest = x - kept (rest may be NULL). */
void spon_threshold_split_f32(const float* x, const float* scale, int64_t rows, int64_t width, float tau,
                              float* kept, float* rest, int64_t* kept_total) {
    int64_t kept_all = 0;
    OMP(omp parallel for schedule(static) reduction(+:kept_all))
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
