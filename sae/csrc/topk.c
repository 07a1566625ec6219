/* Each row's k largest entries of a float32 matrix, with the row read once from memory. sae/native.py builds
 * this and calls it, and sae/kernels.py:topk_rows says when. It exists because torch has no top-k that reads a
 * long row only once. Its own two-pass top-k reads the 64 MB product of a harvest batch twice and launches
 * five ops, and that was a tenth of the harvest's CPU time.
 *
 * The row is cut into blocks of BLK contiguous entries.
 * - Pass 1 takes each block's max.
 * - A value t is then chosen with at least k block maxima >= t, close above the k-th largest of them. A
 *   histogram of the maxima over NBIN even bins narrows to the bin holding the k-th largest, and so on.
 * - So at least k entries are >= t, and no entry < t is among the row's k largest.
 * - Pass 2, over the row still in cache, visits only the blocks whose max reaches t. It appends their entries
 *   >= t to a buffer. A full buffer is cut back to its k largest by quickselect, and t rises to the k-th of them.
 * - The buffer's k largest at the end are the row's k largest. Among equal values any may be taken, as
 *   torch.topk does.
 * A row holding NaN, or a block max of +-inf, is left to torch: the call returns nonzero and writes nothing
 * that counts. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define BLK 32
#define NBIN 64

/* moves the k largest of v[0, n) (with their indices) to the front, in any order: Hoare quickselect */
static void keep_largest(float *v, int64_t *ix, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        float p = v[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > p) i++;
            while (v[j] < p) j--;
            if (i <= j) {
                float tv = v[i]; v[i] = v[j]; v[j] = tv;
                int64_t ti = ix[i]; ix[i] = ix[j]; ix[j] = ti;
                i++; j--;
            }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

typedef struct { float *v; int64_t *ix; int64_t cnt, cap, k; float t; } Buf;

static void push(Buf *b, float v, int64_t j) {
    b->v[b->cnt] = v;
    b->ix[b->cnt++] = j;
    if (b->cnt < b->cap) return;
    keep_largest(b->v, b->ix, b->cnt, b->k);
    b->cnt = b->k;
    b->t = b->v[0];
    for (int64_t i = 1; i < b->k; i++) b->t = b->v[i] < b->t ? b->v[i] : b->t;
}

#if defined(__AVX2__)
static float block_max(const float *p, __m256 *nan) {
    __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8), c = _mm256_loadu_ps(p + 16),
           d = _mm256_loadu_ps(p + 24);
    *nan = _mm256_or_ps(*nan, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q), _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
    __m256 m = _mm256_max_ps(_mm256_max_ps(a, b), _mm256_max_ps(c, d));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
}

/* appends the block's entries >= t, found by one compare per 8 and a walk over the set bits */
static void take_block(Buf *b, const float *p, int64_t j0) {
    __m256 t = _mm256_set1_ps(b->t);
    uint32_t m = 0;
    for (int q = 0; q < 4; q++)
        m |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + 8 * q), t, _CMP_GE_OQ)) << (8 * q);
    for (; m; m &= m - 1) {
        int e = __builtin_ctz(m);
        if (p[e] >= b->t) push(b, p[e], j0 + e);   /* t may have risen within the block */
    }
}
#else
static float block_max(const float *p, int *nan) {
    float m = p[0];
    for (int e = 0; e < BLK; e++) { *nan |= p[e] != p[e]; m = p[e] > m ? p[e] : m; }
    return m;
}

static void take_block(Buf *b, const float *p, int64_t j0) {
    for (int e = 0; e < BLK; e++)
        if (p[e] >= b->t) push(b, p[e], j0 + e);
}
#endif

static int64_t bin_of(float m, float lo, float scale) {
    float f = (m - lo) * scale;
    return f > 0 ? (f < NBIN - 1 ? (int64_t)f : NBIN - 1) : 0;
}

/* t with at least k of mx[0, nb) >= t, near the k-th largest: needs nb >= k and finite mx, whose smallest and
 * largest are lo and hi. Each level keeps the maxima in [lo, hi], all those above hi counted in `above`, and
 * narrows to the one bin that holds the k-th largest (the bins are monotone in the value, so every bin above
 * holds larger maxima only). */
static float threshold(const float *mx, int64_t nb, int64_t k, float lo, float hi) {
    int64_t above = 0;
    for (int level = 0; level < 3 && hi > lo; level++) {
        int64_t cnt[NBIN] = {0};
        float scale = NBIN / (hi - lo);
        for (int64_t i = 0; i < nb; i++)
            if (mx[i] >= lo && mx[i] <= hi) cnt[bin_of(mx[i], lo, scale)]++;
        int64_t b = NBIN - 1;
        while (above + cnt[b] < k) above += cnt[b--];
        float nlo = hi, nhi = lo;
        for (int64_t i = 0; i < nb; i++)
            if (mx[i] >= lo && mx[i] <= hi && bin_of(mx[i], lo, scale) == b) {
                nlo = mx[i] < nlo ? mx[i] : nlo;
                nhi = mx[i] > nhi ? mx[i] : nhi;
            }
        lo = nlo, hi = nhi;
        if (cnt[b] <= 8) break;
    }
    return lo;
}

/* x [N, n] row-major -> out [N, k]: the indices of each row's k largest entries; needs 0 < k <= n. Returns
 * nonzero when a row held NaN or an infinite block max, and then `out` is not the answer. */
int topk_rows_f32(const float *x, int64_t N, int64_t n, int64_t k, int64_t *out, int threads) {
    const int64_t nb = n / BLK, cap = 4 * k + 1;
    int bad = 0;
#pragma omp parallel num_threads(threads) reduction(| : bad)
    {
        float *mx = malloc((nb + 1) * sizeof(float)), *v = malloc(cap * sizeof(float));
        int64_t *ix = malloc(cap * sizeof(int64_t));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < N; r++) {
            const float *row = x + r * n;
#if defined(__AVX2__)
            __m256 nan = _mm256_setzero_ps();
#else
            int nan = 0;
#endif
            float lo = INFINITY, hi = -INFINITY;
            for (int64_t i = 0; i < nb; i++) {
                mx[i] = block_max(row + i * BLK, &nan);
                lo = mx[i] < lo ? mx[i] : lo;
                hi = mx[i] > hi ? mx[i] : hi;
            }
            for (int64_t j = nb * BLK; j < n; j++) bad |= row[j] != row[j];
#if defined(__AVX2__)
            bad |= _mm256_movemask_ps(nan) != 0;
#else
            bad |= nan;
#endif
            if (nb && (isinf(lo) || isinf(hi))) bad = 1;
            if (bad) continue;
            Buf b = {v, ix, 0, cap, k, nb >= k ? threshold(mx, nb, k, lo, hi) : -INFINITY};
            for (int64_t i = 0; i < nb; i++)
                if (mx[i] >= b.t) take_block(&b, row + i * BLK, i * BLK);
            for (int64_t j = nb * BLK; j < n; j++)
                if (row[j] >= b.t) push(&b, row[j], j);
            if (b.cnt > k) keep_largest(b.v, b.ix, b.cnt, k);
            memcpy(out + r * k, b.ix, k * sizeof(int64_t));
        }
        free(mx), free(v), free(ix);
    }
    return bad;
}
