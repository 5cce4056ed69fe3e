/*
 * Product quantization (PQ) with 8-bit codes: k-means training, encode, decode, ADC tables, and ADC
 * scans with top-k selection. The archive tier uses it to pick candidates that are then re-ranked
 * exactly against the float32 vectors (CONTRACT.md D14).
 *
 * Shapes and layouts (faiss names: d = dim, m subspaces, dsub = d / m, ksub = 256):
 *   x          float32 (n, d) row-major; subvector j of row i is x[i*d + j*dsub .. + dsub)
 *   codebook   float32, layout (m, ksub, dsub): centroid (j, c) starts at float (j*ksub + c)*dsub
 *   codebook_t float32, layout (m, dsub, ksub): its transpose per subspace, used by the
 *              nearest-centroid kernels (one SIMD register holds one dimension of 8/16 centroids)
 *   codes      uint8 (n, m) row-major: code (i, j) is codes[i*m + j]
 *   table      float32 (m, ksub): table[j*ksub + c] = op(q_j, centroid (j, c)), op = dot or L2^2
 *
 * Contracts:
 *   - Fallible functions return VB_OK or a negative VB_E* code (common.h); nothing aborts or exits.
 *     Every allocation is checked and freed before return; callers own every output buffer.
 *   - All functions are reentrant and thread-safe: no globals are written, the ops tables are
 *     immutable. Functions that take `nthreads` start their own pthreads (parallel.h) and may be
 *     called with the GIL released.
 *   - Results never depend on `nthreads`: per-point work is independent, and every reduction
 *     (centroid sums, k-means++ totals, top-k merges) runs in a fixed order.
 *   - ADC scores are summed in float32 over j = 0..m-1 in order, in every ISA variant (the SIMD
 *     kernels add lane-wise without FMA), so scalar, AVX2 and AVX-512 scans agree bit for bit.
 *   - Training is deterministic for a given (data, seed, iters, sample, SIMD level). Different
 *     SIMD levels may round distances differently and so may break near-ties differently.
 *
 * Defects of v2.1's PQ deliberately not copied (CONTRACT.md D38; v2.1's PQ is CONTRACT.md R4): empty
 * clusters are re-seeded deterministically (never from an unseeded RNG), training uses a seeded
 * subsample instead of every row, the ADC lookup loop is SIMD, untrusted codebook bytes are fully
 * validated (no panics on D % m != 0 or m = 0), and ADC tables are inner products (our score).
 */
#pragma once

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "vibrato/common.h"
#include "vibrato/cpu.h"
#include "vibrato/crc32c.h"
#include "vibrato/distance.h"
#include "vibrato/parallel.h"

#define VB_PQ_NBITS 8
#define VB_PQ_KSUB 256
#define VB_PQ_MAX_DIM 65536u   /* cap on d for codebooks (and hence for untrusted headers) */
#define VB_PQ_MAX_ITERS 10000u /* cap on Lloyd iterations */
#define VB_PQ_MIN_TRAIN 256u   /* rows needed to train: one per centroid */

/* ------------------------------------------------------------------------------------------------
 * Seeded RNG: splitmix64. Small, fast and fully determined by its 64-bit state, so training
 * reproduces across platforms and numpy versions.
 */
typedef struct {
    uint64_t s;
} vb_pq_rng_t;

static inline uint64_t vb_pq_rng_next(vb_pq_rng_t *r) {
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [0, 1) with 53 random bits. */
static inline double vb_pq_rng_uniform(vb_pq_rng_t *r) {
    return (double)(vb_pq_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

/* Uniform in [0, n) for n >= 1 (multiply-shift; bias below 2^-64 * n, irrelevant here). */
static inline size_t vb_pq_rng_below(vb_pq_rng_t *r, size_t n) {
    return (size_t)(((unsigned __int128)vb_pq_rng_next(r) * (unsigned __int128)n) >> 64);
}

/* Independent streams derived from one user seed: stream 0 draws the subsample, stream j+1 trains
 * subspace j. */
static inline vb_pq_rng_t vb_pq_rng_stream(uint64_t seed, uint64_t stream) {
    vb_pq_rng_t r = {seed ^ (0xD1B54A32D192ED03ull * (stream + 1))};
    r.s = vb_pq_rng_next(&r);
    return r;
}

/* ------------------------------------------------------------------------------------------------
 * Nearest centroid of one subvector. ct is one subspace of codebook_t: (dsub, ksub). Returns the
 * index of the smallest squared L2 distance, the lowest index on ties; NaN distances never win and
 * if no distance is below +inf the result is 0. *dist receives that distance. Distances are
 * computed as sum_j (c_j - x_j)^2, never through |x|^2 - 2 x.c + |c|^2, so a vector equal to a
 * centroid has distance exactly 0 and encodes to it.
 */
typedef uint32_t (*vb_pq_nearest_fn)(const float *restrict x, const float *restrict ct, size_t dsub,
                                     float *restrict dist);

static uint32_t vb_pq_nearest_scalar(const float *restrict x, const float *restrict ct, size_t dsub,
                                     float *restrict dist) {
    float acc[VB_PQ_KSUB];
    for (size_t c = 0; c < VB_PQ_KSUB; c++) acc[c] = 0.f;
    for (size_t j = 0; j < dsub; j++) {
        const float xj = x[j];
        const float *restrict row = ct + j * VB_PQ_KSUB;
        for (size_t c = 0; c < VB_PQ_KSUB; c++) {
            float t = row[c] - xj;
            acc[c] += t * t;
        }
    }
    float best = INFINITY;
    uint32_t bi = 0;
    for (uint32_t c = 0; c < VB_PQ_KSUB; c++)
        if (acc[c] < best) {
            best = acc[c];
            bi = c;
        }
    *dist = best;
    return bi;
}

/* Lane-wise minima (value, index) reduced to the scalar kernel's answer: the smallest value, and
 * among equal values the lowest index (lanes that never improved on +inf still hold index 0). */
static inline uint32_t vb_pq_reduce_min(const float *v, const int32_t *idx, size_t lanes, float *dist) {
    float best = INFINITY;
    uint32_t bi = 0;
    for (size_t l = 0; l < lanes; l++)
        if (v[l] < best || (v[l] == best && (uint32_t)idx[l] < bi)) {
            best = v[l];
            bi = (uint32_t)idx[l];
        }
    *dist = best;
    return bi;
}

#if VB_X86_64
/* Merges two lane-wise (value, index) minima: keeps a's lane when a < b, or a == b with a lower index. */
VB_TARGET("avx2,fma")
static inline void vb_pq_merge_min8(__m256 *va, __m256i *ia, __m256 vb, __m256i ib) {
    __m256 lt = _mm256_cmp_ps(vb, *va, _CMP_LT_OQ);
    __m256 eq = _mm256_cmp_ps(vb, *va, _CMP_EQ_OQ);
    __m256 ilt = _mm256_castsi256_ps(_mm256_cmpgt_epi32(*ia, ib));
    __m256 take_b = _mm256_or_ps(lt, _mm256_and_ps(eq, ilt));
    *va = _mm256_blendv_ps(*va, vb, take_b);
    *ia = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(*ia), _mm256_castsi256_ps(ib), take_b));
}

/*
 * 32 centroids per step in four accumulators. Each accumulator folds into its own (min, index) chain,
 * so the four compare/blend chains run in parallel instead of serialising 32 folds; each chain sees
 * its centroids in increasing order with a strict <, and the merge prefers the lower index on ties.
 */
VB_TARGET("avx2,fma")
static uint32_t vb_pq_nearest_avx2(const float *restrict x, const float *restrict ct, size_t dsub,
                                   float *restrict dist) {
    __m256 bv0 = _mm256_set1_ps(INFINITY), bv1 = bv0, bv2 = bv0, bv3 = bv0;
    __m256i bi0 = _mm256_setzero_si256(), bi1 = bi0, bi2 = bi0, bi3 = bi0;
    __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i eight = _mm256_set1_epi32(8), thirty_two = _mm256_set1_epi32(32);
    for (size_t c = 0; c < VB_PQ_KSUB; c += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (size_t j = 0; j < dsub; j++) {
            const __m256 xj = _mm256_broadcast_ss(x + j);
            const float *row = ct + j * VB_PQ_KSUB + c;
            __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(row), xj);
            __m256 t1 = _mm256_sub_ps(_mm256_loadu_ps(row + 8), xj);
            __m256 t2 = _mm256_sub_ps(_mm256_loadu_ps(row + 16), xj);
            __m256 t3 = _mm256_sub_ps(_mm256_loadu_ps(row + 24), xj);
            a0 = _mm256_fmadd_ps(t0, t0, a0);
            a1 = _mm256_fmadd_ps(t1, t1, a1);
            a2 = _mm256_fmadd_ps(t2, t2, a2);
            a3 = _mm256_fmadd_ps(t3, t3, a3);
        }
        __m256i i1 = _mm256_add_epi32(idx, eight), i2 = _mm256_add_epi32(i1, eight), i3 = _mm256_add_epi32(i2, eight);
#define VB_PQ_FOLD8(a, bv, bi, i)                                                                     \
    do {                                                                                              \
        __m256 lt = _mm256_cmp_ps((a), (bv), _CMP_LT_OQ);                                             \
        (bv) = _mm256_blendv_ps((bv), (a), lt);                                                       \
        (bi) = _mm256_castps_si256(                                                                   \
            _mm256_blendv_ps(_mm256_castsi256_ps(bi), _mm256_castsi256_ps(i), lt));                   \
    } while (0)
        VB_PQ_FOLD8(a0, bv0, bi0, idx);
        VB_PQ_FOLD8(a1, bv1, bi1, i1);
        VB_PQ_FOLD8(a2, bv2, bi2, i2);
        VB_PQ_FOLD8(a3, bv3, bi3, i3);
#undef VB_PQ_FOLD8
        idx = _mm256_add_epi32(idx, thirty_two);
    }
    vb_pq_merge_min8(&bv0, &bi0, bv1, bi1);
    vb_pq_merge_min8(&bv2, &bi2, bv3, bi3);
    vb_pq_merge_min8(&bv0, &bi0, bv2, bi2);
    /* Lanes: min value, then the lowest index among lanes holding it (in registers: no store/reload). */
    __m256 m = _mm256_min_ps(bv0, _mm256_permute2f128_ps(bv0, bv0, 1));
    m = _mm256_min_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm256_min_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
    __m256i cand = _mm256_blendv_epi8(_mm256_set1_epi32(INT32_MAX), bi0,
                                      _mm256_castps_si256(_mm256_cmp_ps(bv0, m, _CMP_EQ_OQ)));
    __m256i ci = _mm256_min_epi32(cand, _mm256_permute2x128_si256(cand, cand, 1));
    ci = _mm256_min_epi32(ci, _mm256_shuffle_epi32(ci, _MM_SHUFFLE(1, 0, 3, 2)));
    ci = _mm256_min_epi32(ci, _mm256_shuffle_epi32(ci, _MM_SHUFFLE(2, 3, 0, 1)));
    float best = _mm256_cvtss_f32(m);
    int32_t bi = _mm256_cvtsi256_si32(ci);
    if (!(best < INFINITY)) { /* no finite distance: the scalar kernel answers 0 */
        *dist = best;
        return 0;
    }
    *dist = best;
    return (uint32_t)bi;
}

VB_TARGET("avx512f")
static inline void vb_pq_merge_min16(__m512 *va, __m512i *ia, __m512 vb, __m512i ib) {
    __mmask16 take_b = _mm512_cmp_ps_mask(vb, *va, _CMP_LT_OQ) |
                       (_mm512_cmp_ps_mask(vb, *va, _CMP_EQ_OQ) & _mm512_cmpgt_epi32_mask(*ia, ib));
    *va = _mm512_mask_mov_ps(*va, take_b, vb);
    *ia = _mm512_mask_mov_epi32(*ia, take_b, ib);
}

/* AVX-512: 64 centroids per step, four (min, index) chains as in the AVX2 kernel. */
VB_TARGET("avx512f")
static uint32_t vb_pq_nearest_avx512(const float *restrict x, const float *restrict ct, size_t dsub,
                                     float *restrict dist) {
    __m512 bv0 = _mm512_set1_ps(INFINITY), bv1 = bv0, bv2 = bv0, bv3 = bv0;
    __m512i bi0 = _mm512_setzero_si512(), bi1 = bi0, bi2 = bi0, bi3 = bi0;
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i sixteen = _mm512_set1_epi32(16), sixty_four = _mm512_set1_epi32(64);
    for (size_t c = 0; c < VB_PQ_KSUB; c += 64) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        for (size_t j = 0; j < dsub; j++) {
            const __m512 xj = _mm512_set1_ps(x[j]);
            const float *row = ct + j * VB_PQ_KSUB + c;
            __m512 t0 = _mm512_sub_ps(_mm512_loadu_ps(row), xj);
            __m512 t1 = _mm512_sub_ps(_mm512_loadu_ps(row + 16), xj);
            __m512 t2 = _mm512_sub_ps(_mm512_loadu_ps(row + 32), xj);
            __m512 t3 = _mm512_sub_ps(_mm512_loadu_ps(row + 48), xj);
            a0 = _mm512_fmadd_ps(t0, t0, a0);
            a1 = _mm512_fmadd_ps(t1, t1, a1);
            a2 = _mm512_fmadd_ps(t2, t2, a2);
            a3 = _mm512_fmadd_ps(t3, t3, a3);
        }
        __m512i i1 = _mm512_add_epi32(idx, sixteen), i2 = _mm512_add_epi32(i1, sixteen);
        __m512i i3 = _mm512_add_epi32(i2, sixteen);
#define VB_PQ_FOLD16(a, bv, bi, i)                                                                    \
    do {                                                                                              \
        __mmask16 lt = _mm512_cmp_ps_mask((a), (bv), _CMP_LT_OQ);                                     \
        (bv) = _mm512_mask_mov_ps((bv), lt, (a));                                                     \
        (bi) = _mm512_mask_mov_epi32((bi), lt, (i));                                                  \
    } while (0)
        VB_PQ_FOLD16(a0, bv0, bi0, idx);
        VB_PQ_FOLD16(a1, bv1, bi1, i1);
        VB_PQ_FOLD16(a2, bv2, bi2, i2);
        VB_PQ_FOLD16(a3, bv3, bi3, i3);
#undef VB_PQ_FOLD16
        idx = _mm512_add_epi32(idx, sixty_four);
    }
    vb_pq_merge_min16(&bv0, &bi0, bv1, bi1);
    vb_pq_merge_min16(&bv2, &bi2, bv3, bi3);
    vb_pq_merge_min16(&bv0, &bi0, bv2, bi2);
    float best = _mm512_reduce_min_ps(bv0);
    __mmask16 at = _mm512_cmp_ps_mask(bv0, _mm512_set1_ps(best), _CMP_EQ_OQ);
    int32_t bi = _mm512_mask_reduce_min_epi32(at, bi0);
    *dist = best;
    if (!(best < INFINITY)) return 0; /* no finite distance: the scalar kernel answers 0 */
    return (uint32_t)bi;
}
#endif

/* ------------------------------------------------------------------------------------------------
 * Distances from one centroid c (dsub floats) to nb points stored column-major: xt (dsub, ld), point i
 * is xt[t*ld + i] for t < dsub. out[i] = sum_t (xt[t*ld + i] - c[t])^2, summed in increasing t. The
 * k-means++ pass uses it: one vector lane per point, so short subvectors (dsub = 4, 8) cost no
 * horizontal sums, unlike a per-pair kernel.
 */
typedef void (*vb_pq_l2sq_cols_fn)(float *restrict out, const float *restrict xt, size_t ld, size_t dsub,
                                   const float *restrict c, size_t nb);

static void vb_pq_l2sq_cols_scalar(float *restrict out, const float *restrict xt, size_t ld, size_t dsub,
                                   const float *restrict c, size_t nb) {
    for (size_t i = 0; i < nb; i++) out[i] = 0.f;
    for (size_t t = 0; t < dsub; t++) {
        const float ct = c[t];
        const float *restrict col = xt + t * ld;
        for (size_t i = 0; i < nb; i++) {
            float v = col[i] - ct;
            out[i] += v * v;
        }
    }
}

#if VB_X86_64
VB_TARGET("avx2,fma")
static void vb_pq_l2sq_cols_avx2(float *restrict out, const float *restrict xt, size_t ld, size_t dsub,
                                 const float *restrict c, size_t nb) {
    size_t i = 0;
    for (; i + 16 <= nb; i += 16) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (size_t t = 0; t < dsub; t++) {
            const __m256 ct = _mm256_broadcast_ss(c + t);
            const float *col = xt + t * ld + i;
            __m256 v0 = _mm256_sub_ps(_mm256_loadu_ps(col), ct);
            __m256 v1 = _mm256_sub_ps(_mm256_loadu_ps(col + 8), ct);
            a0 = _mm256_fmadd_ps(v0, v0, a0);
            a1 = _mm256_fmadd_ps(v1, v1, a1);
        }
        _mm256_storeu_ps(out + i, a0);
        _mm256_storeu_ps(out + i + 8, a1);
    }
    if (i < nb) vb_pq_l2sq_cols_scalar(out + i, xt + i, ld, dsub, c, nb - i);
}

VB_TARGET("avx512f")
static void vb_pq_l2sq_cols_avx512(float *restrict out, const float *restrict xt, size_t ld, size_t dsub,
                                   const float *restrict c, size_t nb) {
    for (size_t i = 0; i < nb; i += 32) {
        size_t r = nb - i;
        __mmask16 k0 = r >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << r) - 1u);
        __mmask16 k1 = r >= 32 ? (__mmask16)0xFFFF : r > 16 ? (__mmask16)((1u << (r - 16)) - 1u) : (__mmask16)0;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (size_t t = 0; t < dsub; t++) {
            const __m512 ct = _mm512_set1_ps(c[t]);
            const float *col = xt + t * ld + i;
            __m512 v0 = _mm512_sub_ps(_mm512_maskz_loadu_ps(k0, col), ct);
            __m512 v1 = _mm512_sub_ps(_mm512_maskz_loadu_ps(k1, col + 16), ct);
            a0 = _mm512_fmadd_ps(v0, v0, a0);
            a1 = _mm512_fmadd_ps(v1, v1, a1);
        }
        _mm512_mask_storeu_ps(out + i, k0, a0);
        _mm512_mask_storeu_ps(out + i + 16, k1, a1);
    }
}
#endif

/* ------------------------------------------------------------------------------------------------
 * ADC lookup-accumulate: out[i] = sum_{j=0..m-1} table[j*ksub + codes[i*m + j]] for i < n, summed in
 * float32 in increasing j, so every variant returns bit-identical scores.
 *
 * `planes` is the table split into byte planes, layout (m, 4, ksub) uint8: planes[(j*4 + b)*ksub + c]
 * is byte b (little-endian) of table[j*ksub + c] (vb_pq_table_planes). Only kernels whose ops entry
 * has needs_planes = 1 read it; the others accept NULL.
 */
typedef void (*vb_pq_scores_fn)(float *restrict out, const float *restrict table, const uint8_t *restrict planes,
                                size_t m, const uint8_t *restrict codes, size_t n);

#define VB_PQ_PLANE_BYTES (4u * VB_PQ_KSUB) /* bytes of planes per subspace */

static inline void vb_pq_table_planes(uint8_t *restrict planes, const float *restrict table, size_t m) {
    for (size_t j = 0; j < m; j++) {
        uint8_t *p = planes + j * VB_PQ_PLANE_BYTES;
        for (size_t c = 0; c < VB_PQ_KSUB; c++) {
            uint32_t u;
            memcpy(&u, table + j * VB_PQ_KSUB + c, 4);
            p[c] = (uint8_t)u;
            p[VB_PQ_KSUB + c] = (uint8_t)(u >> 8);
            p[2 * VB_PQ_KSUB + c] = (uint8_t)(u >> 16);
            p[3 * VB_PQ_KSUB + c] = (uint8_t)(u >> 24);
        }
    }
}

static inline float vb_pq_score_row(const float *restrict table, size_t m, const uint8_t *restrict c) {
    float s = 0.f;
    for (size_t j = 0; j < m; j++) s += table[j * VB_PQ_KSUB + c[j]];
    return s;
}

/* The scalar reference. Two rows per step give the out-of-order core two independent add chains. */
static void vb_pq_adc_scores_scalar(float *restrict out, const float *restrict table,
                                    const uint8_t *restrict planes, size_t m, const uint8_t *restrict codes,
                                    size_t n) {
    (void)planes;
    size_t i = 0;
    for (; i + 2 <= n; i += 2) {
        const uint8_t *c0 = codes + i * m, *c1 = c0 + m;
        float s0 = 0.f, s1 = 0.f;
        for (size_t j = 0; j < m; j++) {
            const float *t = table + j * VB_PQ_KSUB;
            s0 += t[c0[j]];
            s1 += t[c1[j]];
        }
        out[i] = s0;
        out[i + 1] = s1;
    }
    for (; i < n; i++) out[i] = vb_pq_score_row(table, m, codes + i * m);
}

#if VB_X86_64
/*
 * AVX2 gathers: 16 rows per step in two 8-lane accumulators. One 32-bit gather fetches codes j..j+3 of
 * 8 rows (offsets r*m + j, always inside row r because j + 4 <= m), then four float gathers look the
 * codes up in table rows j..j+3. Subspaces past the last multiple of 4 load their codes one byte at
 * a time (never reading past a row, so a codes array that ends at a page boundary is safe).
 * Measured on Zen 4, a gather costs ~1.1 cycles per element against ~0.8 for scalar loads, so this
 * kernel is slower than the scalar loop there (perf/RESULTS_pq.md); Intel cores gather faster.
 */
VB_TARGET("avx2,fma")
static void vb_pq_adc_scores_avx2(float *restrict out, const float *restrict table, const uint8_t *restrict planes,
                                  size_t m, const uint8_t *restrict codes, size_t n) {
    const int mi = (int)m;
    const __m256i off = _mm256_setr_epi32(0, mi, 2 * mi, 3 * mi, 4 * mi, 5 * mi, 6 * mi, 7 * mi);
    const __m256i lo8 = _mm256_set1_epi32(0xFF);
    const size_t m4 = m & ~(size_t)3;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const uint8_t *b0 = codes + i * m, *b1 = b0 + 8 * m;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        size_t j = 0;
        for (; j < m4; j += 4) {
            __m256i w0 = _mm256_i32gather_epi32((const int *)(b0 + j), off, 1);
            __m256i w1 = _mm256_i32gather_epi32((const int *)(b1 + j), off, 1);
            const float *t = table + j * VB_PQ_KSUB;
            acc0 = _mm256_add_ps(acc0, _mm256_i32gather_ps(t, _mm256_and_si256(w0, lo8), 4));
            acc1 = _mm256_add_ps(acc1, _mm256_i32gather_ps(t, _mm256_and_si256(w1, lo8), 4));
            t += VB_PQ_KSUB;
            acc0 = _mm256_add_ps(acc0, _mm256_i32gather_ps(t, _mm256_and_si256(_mm256_srli_epi32(w0, 8), lo8), 4));
            acc1 = _mm256_add_ps(acc1, _mm256_i32gather_ps(t, _mm256_and_si256(_mm256_srli_epi32(w1, 8), lo8), 4));
            t += VB_PQ_KSUB;
            acc0 = _mm256_add_ps(acc0, _mm256_i32gather_ps(t, _mm256_and_si256(_mm256_srli_epi32(w0, 16), lo8), 4));
            acc1 = _mm256_add_ps(acc1, _mm256_i32gather_ps(t, _mm256_and_si256(_mm256_srli_epi32(w1, 16), lo8), 4));
            t += VB_PQ_KSUB;
            acc0 = _mm256_add_ps(acc0, _mm256_i32gather_ps(t, _mm256_srli_epi32(w0, 24), 4));
            acc1 = _mm256_add_ps(acc1, _mm256_i32gather_ps(t, _mm256_srli_epi32(w1, 24), 4));
        }
        for (; j < m; j++) {
            const uint8_t *p0 = b0 + j, *p1 = b1 + j;
            __m256i c0 = _mm256_setr_epi32(p0[0], p0[m], p0[2 * m], p0[3 * m], p0[4 * m], p0[5 * m], p0[6 * m],
                                           p0[7 * m]);
            __m256i c1 = _mm256_setr_epi32(p1[0], p1[m], p1[2 * m], p1[3 * m], p1[4 * m], p1[5 * m], p1[6 * m],
                                           p1[7 * m]);
            const float *t = table + j * VB_PQ_KSUB;
            acc0 = _mm256_add_ps(acc0, _mm256_i32gather_ps(t, c0, 4));
            acc1 = _mm256_add_ps(acc1, _mm256_i32gather_ps(t, c1, 4));
        }
        _mm256_storeu_ps(out + i, acc0);
        _mm256_storeu_ps(out + i + 8, acc1);
    }
    vb_pq_adc_scores_scalar(out + i, table, planes, m, codes + i * m, n - i);
}

/* AVX-512F gathers: the same scheme with 16-lane gathers, 32 rows per step (CPUs without VBMI). */
VB_TARGET("avx512f")
static void vb_pq_adc_scores_avx512(float *restrict out, const float *restrict table,
                                    const uint8_t *restrict planes, size_t m, const uint8_t *restrict codes,
                                    size_t n) {
    const int mi = (int)m;
    const __m512i off = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(mi));
    const __m512i lo8 = _mm512_set1_epi32(0xFF);
    const size_t m4 = m & ~(size_t)3;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const uint8_t *b0 = codes + i * m, *b1 = b0 + 16 * m;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        size_t j = 0;
        for (; j < m4; j += 4) {
            __m512i w0 = _mm512_i32gather_epi32(off, (const void *)(b0 + j), 1);
            __m512i w1 = _mm512_i32gather_epi32(off, (const void *)(b1 + j), 1);
            const float *t = table + j * VB_PQ_KSUB;
            acc0 = _mm512_add_ps(acc0, _mm512_i32gather_ps(_mm512_and_si512(w0, lo8), t, 4));
            acc1 = _mm512_add_ps(acc1, _mm512_i32gather_ps(_mm512_and_si512(w1, lo8), t, 4));
            t += VB_PQ_KSUB;
            acc0 = _mm512_add_ps(acc0, _mm512_i32gather_ps(_mm512_and_si512(_mm512_srli_epi32(w0, 8), lo8), t, 4));
            acc1 = _mm512_add_ps(acc1, _mm512_i32gather_ps(_mm512_and_si512(_mm512_srli_epi32(w1, 8), lo8), t, 4));
            t += VB_PQ_KSUB;
            acc0 = _mm512_add_ps(acc0, _mm512_i32gather_ps(_mm512_and_si512(_mm512_srli_epi32(w0, 16), lo8), t, 4));
            acc1 = _mm512_add_ps(acc1, _mm512_i32gather_ps(_mm512_and_si512(_mm512_srli_epi32(w1, 16), lo8), t, 4));
            t += VB_PQ_KSUB;
            acc0 = _mm512_add_ps(acc0, _mm512_i32gather_ps(_mm512_srli_epi32(w0, 24), t, 4));
            acc1 = _mm512_add_ps(acc1, _mm512_i32gather_ps(_mm512_srli_epi32(w1, 24), t, 4));
        }
        for (; j < m; j++) {
            int32_t c[32];
            for (size_t r = 0; r < 32; r++) c[r] = b0[r * m + j];
            const float *t = table + j * VB_PQ_KSUB;
            acc0 = _mm512_add_ps(acc0, _mm512_i32gather_ps(_mm512_loadu_si512((const void *)c), t, 4));
            acc1 = _mm512_add_ps(acc1, _mm512_i32gather_ps(_mm512_loadu_si512((const void *)(c + 16)), t, 4));
        }
        _mm512_storeu_ps(out + i, acc0);
        _mm512_storeu_ps(out + i + 16, acc1);
    }
    vb_pq_adc_scores_scalar(out + i, table, planes, m, codes + i * m, n - i);
}

#define VB_PQ_TARGET_VBMI VB_TARGET("avx512f,avx512bw,avx512vbmi")

/*
 * Codes j0..j0+15 of 64 rows (row r at codes + r*m), transposed to ct[jj*64 + r] (jj < 16). Loads the
 * rows as 16 registers of 4 rows x 16 codes, regroups each register with one vpermb into 16 dwords
 * (dword jj = code jj of its 4 rows), then transposes the 16 x 16 dword matrix (unpack 32, unpack 64,
 * two 128-bit shuffles: 64 shuffles for 1 KiB). Reads exactly bytes [j0, j0 + 16) of each row.
 */
VB_PQ_TARGET_VBMI
static inline void vb_pq_transpose_codes_64x16(uint8_t *restrict ct, const uint8_t *restrict codes, size_t m) {
    /* dst byte d = 4*jj + k <- src byte 16*k + jj (row k of the register, code jj) */
    static const uint8_t sel[64] = {0,  16, 32, 48, 1,  17, 33, 49, 2,  18, 34, 50, 3,  19, 35, 51,
                                    4,  20, 36, 52, 5,  21, 37, 53, 6,  22, 38, 54, 7,  23, 39, 55,
                                    8,  24, 40, 56, 9,  25, 41, 57, 10, 26, 42, 58, 11, 27, 43, 59,
                                    12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};
    const __m512i perm = _mm512_loadu_si512((const void *)sel);
    __m512i y[16], t[16];
    for (size_t i = 0; i < 16; i++) {
        const uint8_t *r = codes + 4 * i * m;
        __m512i z;
        if (m == 16) {
            z = _mm512_loadu_si512((const void *)r);
        } else {
            z = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)r));
            z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(r + m)), 1);
            z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(r + 2 * m)), 2);
            z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(r + 3 * m)), 3);
        }
        y[i] = _mm512_permutexvar_epi8(perm, z);
    }
    /* y[i] dword jj = code jj of rows 4i..4i+3; want out[jj] dword i = y[i] dword jj. */
    for (size_t p = 0; p < 8; p++) {
        t[2 * p] = _mm512_unpacklo_epi32(y[2 * p], y[2 * p + 1]);
        t[2 * p + 1] = _mm512_unpackhi_epi32(y[2 * p], y[2 * p + 1]);
    }
    for (size_t q = 0; q < 4; q++) {
        y[4 * q + 0] = _mm512_unpacklo_epi64(t[4 * q + 0], t[4 * q + 2]);
        y[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q + 0], t[4 * q + 2]);
        y[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
        y[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
    }
    /* y[4q + s], 128-bit lane L: column 4L + s for rows 4q..4q+3 (as dwords of 4 codes). */
    for (size_t s = 0; s < 4; s++) {
        __m512i v0 = _mm512_shuffle_i32x4(y[s], y[4 + s], 0x44);
        __m512i v1 = _mm512_shuffle_i32x4(y[8 + s], y[12 + s], 0x44);
        __m512i w0 = _mm512_shuffle_i32x4(y[s], y[4 + s], 0xEE);
        __m512i w1 = _mm512_shuffle_i32x4(y[8 + s], y[12 + s], 0xEE);
        _mm512_storeu_si512((void *)(ct + (0 + s) * 64), _mm512_shuffle_i32x4(v0, v1, 0x88));
        _mm512_storeu_si512((void *)(ct + (4 + s) * 64), _mm512_shuffle_i32x4(v0, v1, 0xDD));
        _mm512_storeu_si512((void *)(ct + (8 + s) * 64), _mm512_shuffle_i32x4(w0, w1, 0x88));
        _mm512_storeu_si512((void *)(ct + (12 + s) * 64), _mm512_shuffle_i32x4(w0, w1, 0xDD));
    }
}

/* Codes j0..j0+7 of 64 rows -> ct[jj*64 + r]. Eight registers of 8 rows x 8 codes (qword loads,
 * gathered when the row stride m is not 8), one vpermb each (qword jj = code jj of the 8 rows), then an
 * 8 x 8 qword transpose. Reads exactly bytes [j0, j0 + 8) of each row. */
VB_PQ_TARGET_VBMI
static inline void vb_pq_transpose_codes_64x8(uint8_t *restrict ct, const uint8_t *restrict codes, size_t m) {
    static const uint8_t sel[64] = {0, 8,  16, 24, 32, 40, 48, 56, 1, 9,  17, 25, 33, 41, 49, 57,
                                    2, 10, 18, 26, 34, 42, 50, 58, 3, 11, 19, 27, 35, 43, 51, 59,
                                    4, 12, 20, 28, 36, 44, 52, 60, 5, 13, 21, 29, 37, 45, 53, 61,
                                    6, 14, 22, 30, 38, 46, 54, 62, 7, 15, 23, 31, 39, 47, 55, 63};
    const __m512i perm = _mm512_loadu_si512((const void *)sel);
    const long long mm = (long long)m;
    const __m512i off = _mm512_setr_epi64(0, mm, 2 * mm, 3 * mm, 4 * mm, 5 * mm, 6 * mm, 7 * mm);
    __m512i y[8], t[8];
    for (size_t i = 0; i < 8; i++) {
        const uint8_t *r = codes + 8 * i * m;
        __m512i z = m == 8 ? _mm512_loadu_si512((const void *)r) : _mm512_i64gather_epi64(off, (const void *)r, 1);
        y[i] = _mm512_permutexvar_epi8(perm, z);
    }
    /* y[i] qword jj = code jj of rows 8i..8i+7; want out[jj] qword i = y[i] qword jj. */
    for (size_t p = 0; p < 4; p++) {
        t[2 * p] = _mm512_unpacklo_epi64(y[2 * p], y[2 * p + 1]);     /* lane L: col 2L of rows 2p, 2p+1 */
        t[2 * p + 1] = _mm512_unpackhi_epi64(y[2 * p], y[2 * p + 1]); /* lane L: col 2L+1 */
    }
    for (size_t s = 0; s < 2; s++) {
        /* t[2p + s] lane L = column 2L + s of register rows 2p, 2p+1 */
        __m512i v0 = _mm512_shuffle_i64x2(t[s], t[2 + s], 0x44), v1 = _mm512_shuffle_i64x2(t[4 + s], t[6 + s], 0x44);
        __m512i w0 = _mm512_shuffle_i64x2(t[s], t[2 + s], 0xEE), w1 = _mm512_shuffle_i64x2(t[4 + s], t[6 + s], 0xEE);
        _mm512_storeu_si512((void *)(ct + (0 + s) * 64), _mm512_shuffle_i64x2(v0, v1, 0x88));
        _mm512_storeu_si512((void *)(ct + (2 + s) * 64), _mm512_shuffle_i64x2(v0, v1, 0xDD));
        _mm512_storeu_si512((void *)(ct + (4 + s) * 64), _mm512_shuffle_i64x2(w0, w1, 0x88));
        _mm512_storeu_si512((void *)(ct + (6 + s) * 64), _mm512_shuffle_i64x2(w0, w1, 0xDD));
    }
}

/* Codes j0..j0+3 of 64 rows -> ct[jj*64 + r]. Four dword gathers of 16 rows x 4 codes, one vpermb each
 * (128-bit lane jj = code jj of the 16 rows), then a 4 x 4 transpose of 128-bit lanes. */
VB_PQ_TARGET_VBMI
static inline void vb_pq_transpose_codes_64x4(uint8_t *restrict ct, const uint8_t *restrict codes, size_t m) {
    static const uint8_t sel[64] = {0, 4, 8,  12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60,
                                    1, 5, 9,  13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61,
                                    2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54, 58, 62,
                                    3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55, 59, 63};
    const __m512i perm = _mm512_loadu_si512((const void *)sel);
    const __m512i off = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32((int)m));
    __m512i y[4];
    for (size_t i = 0; i < 4; i++)
        y[i] = _mm512_permutexvar_epi8(perm, _mm512_i32gather_epi32(off, (const void *)(codes + 16 * i * m), 1));
    __m512i v0 = _mm512_shuffle_i32x4(y[0], y[1], 0x44), v1 = _mm512_shuffle_i32x4(y[2], y[3], 0x44);
    __m512i w0 = _mm512_shuffle_i32x4(y[0], y[1], 0xEE), w1 = _mm512_shuffle_i32x4(y[2], y[3], 0xEE);
    _mm512_storeu_si512((void *)(ct + 0 * 64), _mm512_shuffle_i32x4(v0, v1, 0x88));
    _mm512_storeu_si512((void *)(ct + 1 * 64), _mm512_shuffle_i32x4(v0, v1, 0xDD));
    _mm512_storeu_si512((void *)(ct + 2 * 64), _mm512_shuffle_i32x4(w0, w1, 0x88));
    _mm512_storeu_si512((void *)(ct + 3 * 64), _mm512_shuffle_i32x4(w0, w1, 0xDD));
}

/*
 * AVX-512 VBMI byte-plane lookups: 64 rows per step with no gathers. Subspace j's table row is held as
 * four byte planes (4 x 256 bytes, 16 registers' worth, read from L1); vpermi2b looks up 64 codes in a
 * 128-byte half-plane, so one plane costs two vpermi2b and a blend on the code's top bit. The four
 * looked-up byte vectors interleave (unpack 8, unpack 16) back into the exact float32 table values,
 * which are added in increasing j: the scores equal the scalar kernel's bit for bit. Codes are
 * transposed in registers 16, 8 or 4 subspaces at a time (the last m % 4 byte by byte).
 * Needs AVX512F + AVX512BW + AVX512_VBMI (Ice Lake / Zen 4 and later).
 */
VB_PQ_TARGET_VBMI
static void vb_pq_adc_scores_avx512vbmi(float *restrict out, const float *restrict table,
                                        const uint8_t *restrict planes, size_t m, const uint8_t *restrict codes,
                                        size_t n) {
    uint8_t ct[16 * 64];
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const uint8_t *blk = codes + i * m;
        /* acc0 lane L holds rows 16L+0..3, acc1 rows 16L+4..7, acc2 16L+8..11, acc3 16L+12..15. */
        __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
        for (size_t j0 = 0; j0 < m; j0 += 16) {
            const size_t g = m - j0 < 16 ? m - j0 : 16;
            if (g == 16) {
                vb_pq_transpose_codes_64x16(ct, blk + j0, m);
            } else { /* the last g < 16 subspaces: groups of 8 and 4, then single bytes */
                size_t jj = 0;
                if (g - jj >= 8) {
                    vb_pq_transpose_codes_64x8(ct, blk + j0, m);
                    jj += 8;
                }
                if (g - jj >= 4) {
                    vb_pq_transpose_codes_64x4(ct + jj * 64, blk + j0 + jj, m);
                    jj += 4;
                }
                for (; jj < g; jj++)
                    for (size_t r = 0; r < 64; r++) ct[jj * 64 + r] = blk[r * m + j0 + jj];
            }
            for (size_t jj = 0; jj < g; jj++) {
                const uint8_t *pl = planes + (j0 + jj) * VB_PQ_PLANE_BYTES;
                const __m512i c = _mm512_loadu_si512((const void *)(ct + jj * 64));
                const __mmask64 hi = _mm512_movepi8_mask(c); /* code >= 128 */
                __m512i b[4];
                for (size_t p = 0; p < 4; p++) {
                    const uint8_t *q = pl + p * VB_PQ_KSUB;
                    __m512i lo = _mm512_permutex2var_epi8(_mm512_loadu_si512((const void *)q), c,
                                                          _mm512_loadu_si512((const void *)(q + 64)));
                    __m512i up = _mm512_permutex2var_epi8(_mm512_loadu_si512((const void *)(q + 128)), c,
                                                          _mm512_loadu_si512((const void *)(q + 192)));
                    b[p] = _mm512_mask_blend_epi8(hi, lo, up);
                }
                __m512i t0 = _mm512_unpacklo_epi8(b[0], b[1]), t1 = _mm512_unpackhi_epi8(b[0], b[1]);
                __m512i t2 = _mm512_unpacklo_epi8(b[2], b[3]), t3 = _mm512_unpackhi_epi8(b[2], b[3]);
                acc0 = _mm512_add_ps(acc0, _mm512_castsi512_ps(_mm512_unpacklo_epi16(t0, t2)));
                acc1 = _mm512_add_ps(acc1, _mm512_castsi512_ps(_mm512_unpackhi_epi16(t0, t2)));
                acc2 = _mm512_add_ps(acc2, _mm512_castsi512_ps(_mm512_unpacklo_epi16(t1, t3)));
                acc3 = _mm512_add_ps(acc3, _mm512_castsi512_ps(_mm512_unpackhi_epi16(t1, t3)));
            }
        }
        /* Back to row order: rows 16L..16L+15 = lane L of acc0, acc1, acc2, acc3. */
        __m512 a = _mm512_shuffle_f32x4(acc0, acc1, 0x44), bb = _mm512_shuffle_f32x4(acc2, acc3, 0x44);
        __m512 c2 = _mm512_shuffle_f32x4(acc0, acc1, 0xEE), d = _mm512_shuffle_f32x4(acc2, acc3, 0xEE);
        _mm512_storeu_ps(out + i, _mm512_shuffle_f32x4(a, bb, 0x88));
        _mm512_storeu_ps(out + i + 16, _mm512_shuffle_f32x4(a, bb, 0xDD));
        _mm512_storeu_ps(out + i + 32, _mm512_shuffle_f32x4(c2, d, 0x88));
        _mm512_storeu_ps(out + i + 48, _mm512_shuffle_f32x4(c2, d, 0xDD));
    }
    vb_pq_adc_scores_scalar(out + i, table, planes, m, codes + i * m, n - i);
}
#endif

/* ------------------------------------------------------------------------------------------------
 * Kernel tables. `dist` is the distance ops table of the same level (distance.h).
 */
typedef enum {
    VB_PQ_KERNEL_SCALAR = 0,
    VB_PQ_KERNEL_AVX2 = 1,        /* AVX2 + FMA; ADC by gathers */
    VB_PQ_KERNEL_AVX512 = 2,      /* AVX-512F; ADC by gathers */
    VB_PQ_KERNEL_AVX512VBMI = 3,  /* AVX-512F/BW/VBMI; ADC by byte-plane permutes */
    VB_PQ_KERNEL_NEON = 4,        /* aarch64: portable PQ loops + NEON distance kernels */
    VB_PQ_KERNEL_COUNT = 5,
} vb_pq_kernel_t;

typedef struct vb_pq_ops {
    int level;        /* vb_simd_level_t this table belongs to */
    int kernel;       /* vb_pq_kernel_t */
    const char *name; /* "scalar", "avx2", "avx512", "avx512vbmi", "neon" */
    int needs_planes; /* scores() reads the byte planes (vb_pq_table_planes) */
    const vb_distance_ops_t *dist;
    vb_pq_nearest_fn nearest;
    vb_pq_l2sq_cols_fn l2sq_cols;
    vb_pq_scores_fn scores;
} vb_pq_ops_t;

static const vb_pq_ops_t vb_pq_ops_scalar = {VB_SIMD_SCALAR, VB_PQ_KERNEL_SCALAR, "scalar", 0, &vb_ops_scalar,
                                             vb_pq_nearest_scalar, vb_pq_l2sq_cols_scalar, vb_pq_adc_scores_scalar};
#if VB_X86_64
static const vb_pq_ops_t vb_pq_ops_avx2 = {VB_SIMD_AVX2, VB_PQ_KERNEL_AVX2, "avx2", 0, &vb_ops_avx2,
                                           vb_pq_nearest_avx2, vb_pq_l2sq_cols_avx2, vb_pq_adc_scores_avx2};
static const vb_pq_ops_t vb_pq_ops_avx512 = {VB_SIMD_AVX512, VB_PQ_KERNEL_AVX512, "avx512", 0, &vb_ops_avx512,
                                             vb_pq_nearest_avx512, vb_pq_l2sq_cols_avx512,
                                             vb_pq_adc_scores_avx512};
static const vb_pq_ops_t vb_pq_ops_avx512vbmi = {VB_SIMD_AVX512, VB_PQ_KERNEL_AVX512VBMI, "avx512vbmi", 1,
                                                 &vb_ops_avx512, vb_pq_nearest_avx512, vb_pq_l2sq_cols_avx512,
                                                 vb_pq_adc_scores_avx512vbmi};
#endif
#if VB_AARCH64
static const vb_pq_ops_t vb_pq_ops_neon = {VB_SIMD_NEON, VB_PQ_KERNEL_NEON, "neon", 0, &vb_ops_neon,
                                           vb_pq_nearest_scalar, vb_pq_l2sq_cols_scalar, vb_pq_adc_scores_scalar};
#endif

/* Whether this CPU runs the VBMI kernel (AVX-512 level plus the BW and VBMI extensions). */
static inline int vb_pq_cpu_has_vbmi(void) {
#if VB_X86_64
    if (vb_cpu_max_level() < VB_SIMD_AVX512) return 0;
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi");
#else
    return 0;
#endif
}

/* One specific kernel table, or NULL when this build or CPU cannot run it (tests and benchmarks). */
static inline const vb_pq_ops_t *vb_pq_ops_kernel(int kernel) {
    switch (kernel) {
    case VB_PQ_KERNEL_SCALAR: return &vb_pq_ops_scalar;
#if VB_X86_64
    case VB_PQ_KERNEL_AVX2: return vb_cpu_max_level() >= VB_SIMD_AVX2 ? &vb_pq_ops_avx2 : NULL;
    case VB_PQ_KERNEL_AVX512: return vb_cpu_max_level() >= VB_SIMD_AVX512 ? &vb_pq_ops_avx512 : NULL;
    case VB_PQ_KERNEL_AVX512VBMI: return vb_pq_cpu_has_vbmi() ? &vb_pq_ops_avx512vbmi : NULL;
#endif
#if VB_AARCH64
    case VB_PQ_KERNEL_NEON: return &vb_pq_ops_neon;
#endif
    default: return NULL;
    }
}

/* The table for a SIMD level, selected the same way as vb_distance_ops_for: a level this build
 * cannot run falls to the next lower one. At the AVX-512 level, CPUs with VBMI get the byte-plane ADC
 * kernel. The caller must not ask for more than vb_cpu_max_level(). NEON uses the portable kernels
 * for the PQ loops (the compiler vectorises them) and the NEON distance kernels for ADC tables. */
static inline const vb_pq_ops_t *vb_pq_ops_for(int level) {
#if VB_X86_64
    if (level >= VB_SIMD_AVX512) return vb_pq_cpu_has_vbmi() ? &vb_pq_ops_avx512vbmi : &vb_pq_ops_avx512;
    if (level >= VB_SIMD_AVX2) return &vb_pq_ops_avx2;
#endif
#if VB_AARCH64
    if (level >= VB_SIMD_NEON) return &vb_pq_ops_neon;
#endif
    (void)level;
    return &vb_pq_ops_scalar;
}

/* ------------------------------------------------------------------------------------------------
 * Small helpers.
 */

/* Checks d, m: 1 <= m <= d <= VB_PQ_MAX_DIM and m divides d. */
static inline int vb_pq_check_shape(size_t dim, size_t m) {
    if (dim == 0 || dim > VB_PQ_MAX_DIM || m == 0 || m > dim || dim % m != 0) return VB_EINVAL;
    return VB_OK;
}

/* codebook (m, ksub, dsub) -> codebook_t (m, dsub, ksub). Both hold ksub * dim floats. */
static inline void vb_pq_transpose(const float *restrict codebook, size_t dim, size_t m,
                                   float *restrict codebook_t) {
    const size_t dsub = dim / m;
    for (size_t j = 0; j < m; j++) {
        const float *src = codebook + j * VB_PQ_KSUB * dsub;
        float *dst = codebook_t + j * VB_PQ_KSUB * dsub;
        for (size_t c = 0; c < VB_PQ_KSUB; c++)
            for (size_t t = 0; t < dsub; t++) dst[t * VB_PQ_KSUB + c] = src[c * dsub + t];
    }
}

static inline int vb_pq_isfinite_f32(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return (u & 0x7F800000u) != 0x7F800000u;
}

/* Nearest centroid through the distance ops (one l2sq call per centroid). Kept as the "pairwise"
 * alternative for benchmarks; the blocked nearest kernels above are the default. c is one subspace
 * of the codebook, (ksub, dsub). */
static inline uint32_t vb_pq_nearest_pairwise(const vb_distance_ops_t *ops, const float *restrict x,
                                              const float *restrict c, size_t dsub, float *restrict dist) {
    float d[VB_PQ_KSUB];
    ops->l2sq_ny(d, x, c, dsub, VB_PQ_KSUB);
    float best = INFINITY;
    uint32_t bi = 0;
    for (uint32_t i = 0; i < VB_PQ_KSUB; i++)
        if (d[i] < best) {
            best = d[i];
            bi = i;
        }
    *dist = best;
    return bi;
}

/* ------------------------------------------------------------------------------------------------
 * Training.
 */
typedef struct {
    size_t rows_used;   /* size of the training sample */
    size_t iterations;  /* Lloyd iterations run, summed over subspaces (early stop on convergence) */
    size_t reseeded;    /* empty clusters re-seeded, summed over subspaces */
    size_t bad_row;     /* on VB_EINVAL from non-finite input: the first offending row of x */
    double inertia;     /* sum over subspaces and sample rows of the squared distance to the centroid
                           in the last assignment step (before the last centroid update) */
} vb_pq_train_stats_t;

/* Per-worker scratch for one subspace at a time. ns = sample rows. */
typedef struct {
    float *ct;       /* (dsub, ksub) transposed centroids of the subspace being trained */
    float *xt;       /* (dsub, ns) the subspace's sample, column-major, for the k-means++ pass */
    float *dist;     /* (ns) distance of each point to its assigned centroid */
    float *min_d;    /* (ns) k-means++: distance to the nearest chosen centroid */
    double *bsum;    /* (ceil(ns / VB_PQ_BLOCK)) k-means++: per-block sums of min_d */
    uint8_t *assign; /* (ns) assigned centroid */
    double *sums;    /* (ksub, dsub) centroid sums */
    size_t *counts;  /* (ksub) cluster sizes */
} vb_pq_ws_t;

#define VB_PQ_BLOCK 256 /* points per k-means++ update block (its sum is one deterministic unit) */

static void vb_pq_ws_free(vb_pq_ws_t *w) {
    free(w->ct);
    free(w->xt);
    free(w->dist);
    free(w->min_d);
    free(w->bsum);
    free(w->assign);
    free(w->sums);
    free(w->counts);
    memset(w, 0, sizeof(*w));
}

static int vb_pq_ws_alloc(vb_pq_ws_t *w, size_t ns, size_t dsub) {
    memset(w, 0, sizeof(*w));
    size_t nblocks = (ns + VB_PQ_BLOCK - 1) / VB_PQ_BLOCK;
    w->ct = (float *)malloc(VB_PQ_KSUB * dsub * sizeof(float));
    w->xt = (float *)malloc(ns * dsub * sizeof(float));
    w->dist = (float *)malloc(ns * sizeof(float));
    w->min_d = (float *)malloc(ns * sizeof(float));
    w->bsum = (double *)malloc(nblocks * sizeof(double));
    w->assign = (uint8_t *)malloc(ns);
    w->sums = (double *)malloc(VB_PQ_KSUB * dsub * sizeof(double));
    w->counts = (size_t *)malloc(VB_PQ_KSUB * sizeof(size_t));
    if (!w->ct || !w->xt || !w->dist || !w->min_d || !w->bsum || !w->assign || !w->sums || !w->counts) {
        vb_pq_ws_free(w);
        return VB_ENOMEM;
    }
    return VB_OK;
}

typedef struct {
    const vb_pq_ops_t *ops;
    const float *xs;   /* (ns, dsub) the subspace's sample, contiguous */
    size_t ns, dsub;
    const float *cent; /* k-means++: the newly chosen centroid (dsub) */
    const float *ct;   /* assignment: (dsub, ksub) */
    vb_pq_ws_t *w;
    atomic_size_t changed;
} vb_pq_sub_task_t;

/* k-means++ update over blocks [b, e): min_d = min(min_d, |x - cent|^2), bsum[block] = its sum. */
static int vb_pq_kpp_update_task(void *p, size_t tid, size_t b, size_t e) {
    vb_pq_sub_task_t *t = (vb_pq_sub_task_t *)p;
    (void)tid;
    float tmp[VB_PQ_BLOCK];
    for (size_t blk = b; blk < e; blk++) {
        size_t i0 = blk * VB_PQ_BLOCK;
        size_t nb = t->ns - i0 < VB_PQ_BLOCK ? t->ns - i0 : VB_PQ_BLOCK;
        t->ops->l2sq_cols(tmp, t->w->xt + i0, t->ns, t->dsub, t->cent, nb);
        float *md = t->w->min_d + i0;
        double s0 = 0, s1 = 0;
        size_t i = 0;
        for (; i + 2 <= nb; i += 2) {
            float v0 = tmp[i] < md[i] ? tmp[i] : md[i];
            float v1 = tmp[i + 1] < md[i + 1] ? tmp[i + 1] : md[i + 1];
            md[i] = v0;
            md[i + 1] = v1;
            s0 += v0;
            s1 += v1;
        }
        if (i < nb) {
            float v0 = tmp[i] < md[i] ? tmp[i] : md[i];
            md[i] = v0;
            s0 += v0;
        }
        t->w->bsum[blk] = s0 + s1;
    }
    return VB_OK;
}

/* Assignment over points [b, e): nearest centroid, its distance, and how many assignments changed. */
static int vb_pq_assign_task(void *p, size_t tid, size_t b, size_t e) {
    vb_pq_sub_task_t *t = (vb_pq_sub_task_t *)p;
    (void)tid;
    vb_pq_nearest_fn nearest = t->ops->nearest;
    size_t changed = 0;
    uint8_t *assign = t->w->assign;
    float *dist = t->w->dist;
    for (size_t i = b; i < e; i++) {
        uint8_t a = (uint8_t)nearest(t->xs + i * t->dsub, t->ct, t->dsub, &dist[i]);
        changed += a != assign[i];
        assign[i] = a;
    }
    atomic_fetch_add_explicit(&t->changed, changed, memory_order_relaxed);
    return VB_OK;
}

/* Picks a point with probability proportional to min_d (k-means++ D^2 sampling). Always returns a
 * point with min_d > 0 when the total is positive; a uniform point otherwise. */
static size_t vb_pq_kpp_pick(const vb_pq_ws_t *w, size_t ns, vb_pq_rng_t *rng) {
    size_t nblocks = (ns + VB_PQ_BLOCK - 1) / VB_PQ_BLOCK;
    double total = 0;
    for (size_t b = 0; b < nblocks; b++) total += w->bsum[b];
    if (!(total > 0)) return vb_pq_rng_below(rng, ns);
    double target = vb_pq_rng_uniform(rng) * total, run = 0;
    for (size_t b = 0; b < nblocks; b++) {
        if (run + w->bsum[b] < target) {
            run += w->bsum[b];
            continue;
        }
        size_t i0 = b * VB_PQ_BLOCK, i1 = i0 + VB_PQ_BLOCK < ns ? i0 + VB_PQ_BLOCK : ns, last = SIZE_MAX;
        for (size_t i = i0; i < i1; i++) {
            if (w->min_d[i] > 0) {
                last = i;
                run += w->min_d[i];
                if (run >= target) return i;
            }
        }
        if (last != SIZE_MAX) return last; /* rounding: the block sum and the running sum differ */
        break;
    }
    for (size_t i = ns; i-- > 0;) /* rounding pushed the target past the end: take the last candidate */
        if (w->min_d[i] > 0) return i;
    return vb_pq_rng_below(rng, ns);
}

/* k-means (k-means++ init, then Lloyd) on one subspace: xs (ns, dsub) -> cent (ksub, dsub). */
static int vb_pq_kmeans_subspace(const vb_pq_ops_t *ops, const float *restrict xs, size_t ns, size_t dsub,
                                 size_t iters, vb_pq_rng_t rng, const float *restrict init, vb_pq_ws_t *w,
                                 size_t nthreads, float *restrict cent, vb_pq_train_stats_t *st) {
    const size_t nblocks = (ns + VB_PQ_BLOCK - 1) / VB_PQ_BLOCK;
    const size_t row_bytes = dsub * sizeof(float);
    vb_pq_sub_task_t task;
    memset(&task, 0, sizeof(task));
    task.ops = ops;
    task.xs = xs;
    task.ns = ns;
    task.dsub = dsub;
    task.w = w;
    /* Thread start-up costs ~tens of microseconds: only split the k-means++ pass when it is large. */
    size_t kpp_threads = ns * dsub >= (1u << 18) ? nthreads : 1;
    int rc;

    if (init) { /* warm start from given centroids */
        memcpy(cent, init, VB_PQ_KSUB * row_bytes);
    } else { /* k-means++ initialisation */
        for (size_t i = 0; i < ns; i++) {
            w->min_d[i] = INFINITY;
            for (size_t t = 0; t < dsub; t++) w->xt[t * ns + i] = xs[i * dsub + t];
        }
        size_t pick = vb_pq_rng_below(&rng, ns);
        for (size_t c = 0; c < VB_PQ_KSUB; c++) {
            memcpy(cent + c * dsub, xs + pick * dsub, row_bytes);
            if (c + 1 == VB_PQ_KSUB) break;
            task.cent = cent + c * dsub;
            if ((rc = vb_parallel_for(nblocks, kpp_threads, 8, vb_pq_kpp_update_task, &task)) != VB_OK) return rc;
            pick = vb_pq_kpp_pick(w, ns, &rng);
        }
    }

    /* Lloyd iterations. */
    memset(w->assign, 0, ns);
    int reseeded_last = 0;
    for (size_t it = 0; it < iters; it++) {
        for (size_t c = 0; c < VB_PQ_KSUB; c++)
            for (size_t t = 0; t < dsub; t++) w->ct[t * VB_PQ_KSUB + c] = cent[c * dsub + t];
        task.ct = w->ct;
        atomic_store(&task.changed, 0);
        if ((rc = vb_parallel_for(ns, nthreads, 2048, vb_pq_assign_task, &task)) != VB_OK) return rc;
        st->iterations++;
        /* Unchanged assignment: the centroids are already the means of this partition. */
        if (it > 0 && atomic_load(&task.changed) == 0 && !reseeded_last) break;

        memset(w->sums, 0, VB_PQ_KSUB * dsub * sizeof(double));
        memset(w->counts, 0, VB_PQ_KSUB * sizeof(size_t));
        for (size_t i = 0; i < ns; i++) {
            size_t a = w->assign[i];
            w->counts[a]++;
            double *s = w->sums + a * dsub;
            const float *x = xs + i * dsub;
            for (size_t t = 0; t < dsub; t++) s[t] += x[t];
        }
        for (size_t c = 0; c < VB_PQ_KSUB; c++) {
            if (!w->counts[c]) continue;
            double inv = 1.0 / (double)w->counts[c];
            for (size_t t = 0; t < dsub; t++) cent[c * dsub + t] = (float)(w->sums[c * dsub + t] * inv);
        }
        /* Empty clusters take the point farthest from its centroid among clusters of two or more
         * (lowest row on ties): deterministic, no RNG involved. A cluster stays empty only when every
         * remaining point already sits on its centroid. */
        reseeded_last = 0;
        for (size_t c = 0; c < VB_PQ_KSUB; c++) {
            if (w->counts[c]) continue;
            float best = 0.f;
            size_t bi = SIZE_MAX;
            for (size_t i = 0; i < ns; i++)
                if (w->dist[i] > best && w->counts[w->assign[i]] >= 2) {
                    best = w->dist[i];
                    bi = i;
                }
            if (bi == SIZE_MAX) continue;
            memcpy(cent + c * dsub, xs + bi * dsub, row_bytes);
            w->counts[w->assign[bi]]--;
            w->counts[c] = 1;
            w->assign[bi] = (uint8_t)c;
            w->dist[bi] = -1.f; /* taken */
            st->reseeded++;
            reseeded_last = 1;
        }
    }
    double inertia = 0;
    if (iters)
        for (size_t i = 0; i < ns; i++) inertia += w->dist[i] > 0 ? w->dist[i] : 0;
    st->inertia += inertia;
    return VB_OK;
}

typedef struct {
    const vb_pq_ops_t *ops;
    const float *sub; /* (m, ns, dsub) the sample, subspace-major */
    size_t ns, dsub, iters;
    uint64_t seed;
    const float *init;         /* (m, ksub, dsub) warm start, or NULL for k-means++ */
    vb_pq_ws_t *ws;            /* one per worker */
    vb_pq_train_stats_t *stats; /* one per subspace */
    float *codebook;
} vb_pq_train_task_t;

static int vb_pq_train_subspace_task(void *p, size_t tid, size_t b, size_t e) {
    vb_pq_train_task_t *t = (vb_pq_train_task_t *)p;
    for (size_t j = b; j < e; j++) {
        int rc = vb_pq_kmeans_subspace(t->ops, t->sub + j * t->ns * t->dsub, t->ns, t->dsub, t->iters,
                                       vb_pq_rng_stream(t->seed, j + 1),
                                       t->init ? t->init + j * VB_PQ_KSUB * t->dsub : NULL, &t->ws[tid], 1,
                                       t->codebook + j * VB_PQ_KSUB * t->dsub, &t->stats[j]);
        if (rc != VB_OK) return rc;
    }
    return VB_OK;
}

/*
 * Trains a codebook (m, ksub, dsub) on x (n, d).
 *
 * The sample is min(n, sample) rows chosen uniformly without replacement by the seeded RNG
 * (selection sampling, rows kept in increasing order); every row when n <= sample. Each subspace runs
 * k-means++ (or starts from `init`, a (m, ksub, dsub) codebook, when not NULL; it may alias nothing
 * else) and then at most `iters` Lloyd iterations (stopping early when no assignment changes), with
 * its own RNG stream derived from `seed`. With m >= 2 * nthreads the subspaces are spread over
 * the threads; otherwise each subspace's assignment and k-means++ passes are. Either way the result is
 * identical for any nthreads.
 *
 * Errors: VB_EINVAL for a bad shape, n or sample below VB_PQ_MIN_TRAIN, iters above VB_PQ_MAX_ITERS,
 * or a non-finite value in a sampled row (stats->bad_row names it); VB_ENOMEM; VB_ETHREAD.
 * stats may be NULL. Memory: about sample * d * 4 bytes, plus (4 * dsub + 14) bytes per sample row per
 * worker.
 */
static inline int vb_pq_train(const vb_pq_ops_t *ops, const float *restrict x, size_t n, size_t dim, size_t m,
                              size_t iters, uint64_t seed, size_t sample, const float *restrict init,
                              size_t nthreads, float *restrict codebook, vb_pq_train_stats_t *stats) {
    vb_pq_train_stats_t dummy;
    if (!stats) stats = &dummy;
    memset(stats, 0, sizeof(*stats));
    stats->bad_row = SIZE_MAX;
    if (vb_pq_check_shape(dim, m) != VB_OK || n < VB_PQ_MIN_TRAIN || sample < VB_PQ_MIN_TRAIN ||
        iters > VB_PQ_MAX_ITERS)
        return VB_EINVAL;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 256) nthreads = 256;
    const size_t dsub = dim / m;
    const size_t ns = n < sample ? n : sample;
    size_t sub_floats;
    if (vb_mul_overflow(ns, dim, &sub_floats) || sub_floats > SIZE_MAX / sizeof(float)) return VB_ENOMEM;

    float *sub = (float *)malloc(sub_floats * sizeof(float));
    vb_pq_train_stats_t *per = (vb_pq_train_stats_t *)calloc(m, sizeof(vb_pq_train_stats_t));
    const int outer = m >= 2 * nthreads || nthreads == 1;
    const size_t nws = outer ? nthreads : 1;
    vb_pq_ws_t *ws = (vb_pq_ws_t *)calloc(nws, sizeof(vb_pq_ws_t));
    int rc = VB_OK;
    if (!sub || !per || !ws) {
        rc = VB_ENOMEM;
        goto done;
    }
    for (size_t t = 0; t < nws; t++)
        if ((rc = vb_pq_ws_alloc(&ws[t], ns, dsub)) != VB_OK) goto done;

    /* Draw the sample (Knuth's selection sampling: exactly ns rows, in order) and scatter it
     * subspace-major, checking that every value is finite. */
    {
        vb_pq_rng_t rng = vb_pq_rng_stream(seed, 0);
        size_t taken = 0;
        for (size_t r = 0; r < n && taken < ns; r++) {
            if (ns < n && (double)(n - r) * vb_pq_rng_uniform(&rng) >= (double)(ns - taken)) continue;
            const float *row = x + r * dim;
            for (size_t t = 0; t < dim; t++)
                if (!vb_pq_isfinite_f32(row[t])) {
                    stats->bad_row = r;
                    rc = VB_EINVAL;
                    goto done;
                }
            for (size_t j = 0; j < m; j++)
                memcpy(sub + (j * ns + taken) * dsub, row + j * dsub, dsub * sizeof(float));
            taken++;
        }
        if (taken != ns) { /* cannot happen: selection sampling always completes */
            rc = VB_EINVAL;
            goto done;
        }
    }

    if (outer) {
        vb_pq_train_task_t task = {ops, sub, ns, dsub, iters, seed, init, ws, per, codebook};
        rc = vb_parallel_for(m, nthreads, 1, vb_pq_train_subspace_task, &task);
    } else {
        for (size_t j = 0; j < m && rc == VB_OK; j++)
            rc = vb_pq_kmeans_subspace(ops, sub + j * ns * dsub, ns, dsub, iters, vb_pq_rng_stream(seed, j + 1),
                                       init ? init + j * VB_PQ_KSUB * dsub : NULL, &ws[0], nthreads,
                                       codebook + j * VB_PQ_KSUB * dsub, &per[j]);
    }
    if (rc == VB_OK) {
        stats->rows_used = ns;
        for (size_t j = 0; j < m; j++) {
            stats->iterations += per[j].iterations;
            stats->reseeded += per[j].reseeded;
            stats->inertia += per[j].inertia;
        }
    }
done:
    if (ws)
        for (size_t t = 0; t < nws; t++) vb_pq_ws_free(&ws[t]);
    free(ws);
    free(per);
    free(sub);
    return rc;
}

/* ------------------------------------------------------------------------------------------------
 * Encode / decode.
 */
typedef struct {
    const vb_pq_ops_t *ops;
    const float *codebook, *codebook_t, *x;
    size_t dim, m, dsub;
    uint8_t *codes;
    int pairwise;
} vb_pq_encode_task_t;

/* Points are taken in blocks and each block is swept subspace by subspace, so one subspace's
 * transposed codebook (ksub * dsub floats, 8 KiB for dsub = 8) stays in L1 across the block instead of
 * streaming all m codebooks (ksub * d floats) from L2 for every point. */
#define VB_PQ_ENCODE_BLOCK 64

static int vb_pq_encode_task(void *p, size_t tid, size_t b, size_t e) {
    vb_pq_encode_task_t *t = (vb_pq_encode_task_t *)p;
    (void)tid;
    const size_t dim = t->dim, m = t->m, dsub = t->dsub, csz = VB_PQ_KSUB * dsub;
    float dist;
    for (size_t i0 = b; i0 < e; i0 += VB_PQ_ENCODE_BLOCK) {
        const size_t i1 = e - i0 < VB_PQ_ENCODE_BLOCK ? e : i0 + VB_PQ_ENCODE_BLOCK;
        for (size_t j = 0; j < m; j++) {
            const float *xj = t->x + j * dsub;
            uint8_t *cj = t->codes + j;
            if (t->pairwise) {
                const float *cb = t->codebook + j * csz;
                for (size_t i = i0; i < i1; i++)
                    cj[i * m] = (uint8_t)vb_pq_nearest_pairwise(t->ops->dist, xj + i * dim, cb, dsub, &dist);
            } else {
                const float *cb = t->codebook_t + j * csz;
                vb_pq_nearest_fn nearest = t->ops->nearest;
                for (size_t i = i0; i < i1; i++) cj[i * m] = (uint8_t)nearest(xj + i * dim, cb, dsub, &dist);
            }
        }
    }
    return VB_OK;
}

/*
 * codes (n, m) = nearest centroid per subspace of each row of x (n, d), by squared L2, lowest index on
 * ties (a NaN subvector encodes to 0). pairwise = 1 uses one distance-ops call per centroid instead of
 * the blocked kernel (benchmarks only). Allocates a transposed codebook (ksub * d floats) per call.
 * Errors: VB_EINVAL (shape), VB_ENOMEM, VB_ETHREAD.
 */
static inline int vb_pq_encode(const vb_pq_ops_t *ops, const float *restrict codebook, size_t dim, size_t m,
                               const float *restrict x, size_t n, uint8_t *restrict codes, size_t nthreads,
                               int pairwise) {
    if (vb_pq_check_shape(dim, m) != VB_OK) return VB_EINVAL;
    if (n == 0) return VB_OK;
    float *ct = (float *)malloc(VB_PQ_KSUB * dim * sizeof(float));
    if (!ct) return VB_ENOMEM;
    vb_pq_transpose(codebook, dim, m, ct);
    vb_pq_encode_task_t t = {ops, codebook, ct, x, dim, m, dim / m, codes, pairwise};
    int rc = vb_parallel_for(n, nthreads, 512, vb_pq_encode_task, &t);
    free(ct);
    return rc;
}

/* out (n, d) = concatenated centroids of each row of codes (n, m). Cannot fail for valid shapes. */
static inline void vb_pq_decode(const float *restrict codebook, size_t dim, size_t m,
                                const uint8_t *restrict codes, size_t n, float *restrict out) {
    const size_t dsub = dim / m;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < m; j++)
            memcpy(out + i * dim + j * dsub, codebook + (j * VB_PQ_KSUB + codes[i * m + j]) * dsub,
                   dsub * sizeof(float));
}

/* ------------------------------------------------------------------------------------------------
 * ADC table and scan.
 */

/* table (m, ksub): metric 0 = inner product dot(q_j, centroid), 1 = squared L2. q has d floats. */
static inline void vb_pq_adc_table(const vb_pq_ops_t *ops, int metric, const float *restrict codebook, size_t dim,
                                   size_t m, const float *restrict q, float *restrict table) {
    const size_t dsub = dim / m;
    vb_ny_fn fn = metric == 0 ? ops->dist->dot_ny : ops->dist->l2sq_ny;
    for (size_t j = 0; j < m; j++)
        fn(table + j * VB_PQ_KSUB, q + j * dsub, codebook + j * VB_PQ_KSUB * dsub, dsub, VB_PQ_KSUB);
}

/* Top-k heap: a binary min-heap whose root is the worst kept hit. "Better" = higher score, then
 * lower row; scores are never NaN inside (NaN is stored as -inf). */
typedef struct {
    float *score;
    int64_t *row;
    size_t size, cap;
} vb_pq_heap_t;

static inline int vb_pq_worse(float sa, int64_t ra, float sb, int64_t rb) {
    return sa < sb || (sa == sb && ra > rb);
}

static inline void vb_pq_heap_sift_down(vb_pq_heap_t *h, size_t i) {
    float s = h->score[i];
    int64_t r = h->row[i];
    for (;;) {
        size_t l = 2 * i + 1, w = i;
        if (l >= h->size) break;
        w = l;
        if (l + 1 < h->size && vb_pq_worse(h->score[l + 1], h->row[l + 1], h->score[l], h->row[l])) w = l + 1;
        if (!vb_pq_worse(h->score[w], h->row[w], s, r)) break;
        h->score[i] = h->score[w];
        h->row[i] = h->row[w];
        i = w;
    }
    h->score[i] = s;
    h->row[i] = r;
}

/* Offers (s, r). Rows arrive in increasing order per heap, so once the heap is full an equal score
 * is never better than the root: the strict > test is exact. */
static inline void vb_pq_heap_offer(vb_pq_heap_t *h, float s, int64_t r) {
    if (s != s) s = -INFINITY;
    if (h->size < h->cap) {
        size_t i = h->size++;
        while (i > 0) {
            size_t p = (i - 1) / 2;
            if (!vb_pq_worse(s, r, h->score[p], h->row[p])) break;
            h->score[i] = h->score[p];
            h->row[i] = h->row[p];
            i = p;
        }
        h->score[i] = s;
        h->row[i] = r;
    } else if (s > h->score[0]) {
        h->score[0] = s;
        h->row[0] = r;
        vb_pq_heap_sift_down(h, 0);
    }
}

typedef struct {
    const vb_pq_ops_t *ops;
    const float *table;
    const uint8_t *planes; /* byte planes of table when ops->needs_planes, else NULL */
    size_t m;
    const uint8_t *codes, *allowed;
    vb_pq_heap_t *heaps; /* one per worker */
} vb_pq_scan_task_t;

#define VB_PQ_SCAN_BLOCK 256 /* rows scored per kernel call */

/* Counts the nonzero bytes of a bool mask. */
static inline size_t vb_pq_count_true(const uint8_t *restrict a, size_t n) {
    size_t c = 0;
    for (size_t i = 0; i < n; i++) c += a[i] != 0;
    return c;
}

static int vb_pq_scan_task(void *p, size_t tid, size_t b, size_t e) {
    vb_pq_scan_task_t *t = (vb_pq_scan_task_t *)p;
    vb_pq_heap_t *h = &t->heaps[tid];
    const size_t m = t->m;
    float sc[VB_PQ_SCAN_BLOCK];
    for (size_t i0 = b; i0 < e; i0 += VB_PQ_SCAN_BLOCK) {
        const size_t nb = e - i0 < VB_PQ_SCAN_BLOCK ? e - i0 : VB_PQ_SCAN_BLOCK;
        const uint8_t *codes = t->codes + i0 * m;
        if (t->allowed) {
            const uint8_t *al = t->allowed + i0;
            size_t na = vb_pq_count_true(al, nb);
            if (na == 0) continue;
            if (na * 8 < nb) { /* sparse: score only the allowed rows (same sums as the kernels) */
                for (size_t r = 0; r < nb; r++)
                    if (al[r]) vb_pq_heap_offer(h, vb_pq_score_row(t->table, m, codes + r * m), (int64_t)(i0 + r));
                continue;
            }
            t->ops->scores(sc, t->table, t->planes, m, codes, nb);
            for (size_t r = 0; r < nb; r++)
                if (al[r]) vb_pq_heap_offer(h, sc[r], (int64_t)(i0 + r));
            continue;
        }
        t->ops->scores(sc, t->table, t->planes, m, codes, nb);
        size_t r = 0;
        for (; r < nb && h->size < h->cap; r++) vb_pq_heap_offer(h, sc[r], (int64_t)(i0 + r));
        float thr = h->size ? h->score[0] : -INFINITY;
        for (; r < nb; r++)
            if (sc[r] > thr) {
                vb_pq_heap_offer(h, sc[r], (int64_t)(i0 + r));
                thr = h->score[0];
            }
    }
    return VB_OK;
}

typedef struct {
    float score;
    int64_t row;
} vb_pq_hit_t;

static int vb_pq_hit_cmp(const void *a, const void *b) {
    const vb_pq_hit_t *x = (const vb_pq_hit_t *)a, *y = (const vb_pq_hit_t *)b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return (x->row > y->row) - (x->row < y->row);
}

/* out[i] = ADC score of row i of codes (n, m), every row (the lookup-accumulate kernel alone; tests
 * and benchmarks). Errors: VB_EINVAL (m == 0 or m > VB_PQ_MAX_DIM), VB_ENOMEM. */
static inline int vb_pq_adc_scores(const vb_pq_ops_t *ops, const float *restrict table, size_t m,
                                   const uint8_t *restrict codes, size_t n, float *restrict out) {
    if (m == 0 || m > VB_PQ_MAX_DIM) return VB_EINVAL;
    uint8_t *planes = NULL;
    if (ops->needs_planes) {
        if (!(planes = (uint8_t *)malloc(m * VB_PQ_PLANE_BYTES))) return VB_ENOMEM;
        vb_pq_table_planes(planes, table, m);
    }
    ops->scores(out, table, planes, m, codes, n);
    free(planes);
    return VB_OK;
}

/*
 * Top-k ADC scan: scores every row i of codes (n, m) (only rows with allowed[i] != 0 when allowed is
 * not NULL) as sum_j table[j*ksub + codes[i*m + j]] and writes the k' = min(k, eligible rows) best to
 * out_rows / out_scores (capacity min(k, n) each), highest score first, lower row first on equal
 * scores; *out_k = k'. codes may be read-only (an mmap view). The result is independent of nthreads.
 * Errors: VB_EINVAL (k == 0 or m == 0), VB_ENOMEM, VB_ETHREAD.
 */
static inline int vb_pq_adc_scan(const vb_pq_ops_t *ops, const float *restrict table, size_t m,
                                 const uint8_t *restrict codes, size_t n, const uint8_t *restrict allowed, size_t k,
                                 size_t nthreads, int64_t *restrict out_rows, float *restrict out_scores,
                                 size_t *out_k) {
    *out_k = 0;
    if (k == 0 || m == 0) return VB_EINVAL;
    if (n == 0) return VB_OK;
    if (m > VB_PQ_MAX_DIM) return VB_EINVAL;
    const size_t cap = k < n ? k : n;
    const size_t grain = 16 * VB_PQ_SCAN_BLOCK;
    if (nthreads < 1) nthreads = 1;
    size_t useful = (n + grain - 1) / grain;
    if (nthreads > useful) nthreads = useful;
    if (nthreads > 256) nthreads = 256;
    size_t total;
    if (vb_mul_overflow(cap, nthreads, &total) || total > SIZE_MAX / sizeof(vb_pq_hit_t)) return VB_ENOMEM;

    vb_pq_heap_t *heaps = (vb_pq_heap_t *)calloc(nthreads, sizeof(vb_pq_heap_t));
    float *hs = (float *)malloc(total * sizeof(float));
    int64_t *hr = (int64_t *)malloc(total * sizeof(int64_t));
    uint8_t *planes = ops->needs_planes ? (uint8_t *)malloc(m * VB_PQ_PLANE_BYTES) : NULL;
    vb_pq_hit_t *all = NULL;
    vb_pq_scan_task_t task = {ops, table, planes, m, codes, allowed, heaps};
    size_t got = 0, a = 0, kk;
    int rc = VB_OK;
    if (!heaps || !hs || !hr || (ops->needs_planes && !planes)) {
        rc = VB_ENOMEM;
        goto done;
    }
    if (planes) vb_pq_table_planes(planes, table, m);
    for (size_t t = 0; t < nthreads; t++) {
        heaps[t].score = hs + t * cap;
        heaps[t].row = hr + t * cap;
        heaps[t].cap = cap;
    }
    if ((rc = vb_parallel_for(n, nthreads, grain, vb_pq_scan_task, &task)) != VB_OK) goto done;

    for (size_t t = 0; t < nthreads; t++) got += heaps[t].size;
    all = (vb_pq_hit_t *)malloc((got ? got : 1) * sizeof(vb_pq_hit_t));
    if (!all) {
        rc = VB_ENOMEM;
        goto done;
    }
    for (size_t t = 0; t < nthreads; t++)
        for (size_t i = 0; i < heaps[t].size; i++) {
            all[a].score = heaps[t].score[i];
            all[a].row = heaps[t].row[i];
            a++;
        }
    qsort(all, got, sizeof(vb_pq_hit_t), vb_pq_hit_cmp);
    kk = got < cap ? got : cap;
    for (size_t i = 0; i < kk; i++) {
        out_rows[i] = all[i].row;
        out_scores[i] = all[i].score;
    }
    *out_k = kk;
done:
    free(all);
    free(planes);
    free(hr);
    free(hs);
    free(heaps);
    return rc;
}

/* ------------------------------------------------------------------------------------------------
 * Serialisation. Little-endian, fixed layout:
 *
 *   offset  size  field
 *        0     4  magic "VBPQ"
 *        4     4  u32 format version (1)
 *        8     4  u32 dim             1 <= dim <= VB_PQ_MAX_DIM
 *       12     4  u32 m               1 <= m <= dim, dim % m == 0
 *       16     4  u32 nbits           8
 *       20     4  u32 ksub            256 (= 1 << nbits)
 *       24     8  u64 payload bytes   = ksub * dim * 4
 *       32     P  float32 codebook, layout (m, ksub, dsub), every value finite
 *   32 + P     4  u32 CRC32C of bytes [0, 32 + P)
 *
 * The total length must be exactly 36 + P: a parser never trusts a length it has not compared with
 * the buffer, so no allocation is ever larger than the input.
 */
#define VB_PQ_MAGIC "VBPQ"
#define VB_PQ_VERSION 1u
#define VB_PQ_HEADER_BYTES 32u

typedef struct {
    uint32_t version, dim, m, nbits, ksub;
    uint64_t payload_bytes;
    const uint8_t *payload; /* points into the parsed buffer (unaligned: copy with memcpy) */
} vb_pq_header_t;

static inline uint32_t vb_pq_rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t vb_pq_rd64(const uint8_t *p) { return (uint64_t)vb_pq_rd32(p) | (uint64_t)vb_pq_rd32(p + 4) << 32; }
static inline void vb_pq_wr32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}
static inline void vb_pq_wr64(uint8_t *p, uint64_t v) {
    vb_pq_wr32(p, (uint32_t)v);
    vb_pq_wr32(p + 4, (uint32_t)(v >> 32));
}

/* Bytes needed to serialise a codebook of dimension dim (0 if dim is out of range). */
static inline size_t vb_pq_serialized_bytes(size_t dim) {
    if (dim == 0 || dim > VB_PQ_MAX_DIM) return 0;
    return VB_PQ_HEADER_BYTES + (size_t)VB_PQ_KSUB * dim * sizeof(float) + 4;
}

/* Writes the codebook (m, ksub, dsub) into out (exactly vb_pq_serialized_bytes(dim) bytes). Float
 * bytes are copied as-is: little-endian hosts only, as everywhere in Vibrato. crc_hw: pass
 * vb_cpu_has_sse42(); vb_crc32c_init_tables() must have run. */
static inline int vb_pq_serialize(uint8_t *restrict out, size_t out_len, size_t dim, size_t m,
                                  const float *restrict codebook, int crc_hw) {
    if (vb_pq_check_shape(dim, m) != VB_OK || out_len != vb_pq_serialized_bytes(dim)) return VB_EINVAL;
    size_t payload = (size_t)VB_PQ_KSUB * dim * sizeof(float);
    memcpy(out, VB_PQ_MAGIC, 4);
    vb_pq_wr32(out + 4, VB_PQ_VERSION);
    vb_pq_wr32(out + 8, (uint32_t)dim);
    vb_pq_wr32(out + 12, (uint32_t)m);
    vb_pq_wr32(out + 16, VB_PQ_NBITS);
    vb_pq_wr32(out + 20, VB_PQ_KSUB);
    vb_pq_wr64(out + 24, (uint64_t)payload);
    memcpy(out + VB_PQ_HEADER_BYTES, codebook, payload);
    vb_pq_wr32(out + VB_PQ_HEADER_BYTES + payload, vb_crc32c(0, out, VB_PQ_HEADER_BYTES + payload, crc_hw));
    return VB_OK;
}

/*
 * Validates an untrusted serialised codebook. On success fills *hdr (payload points into buf) and
 * returns VB_OK; otherwise returns VB_ECORRUPT and sets *why to a static message. Every field is
 * range-checked before it is used in arithmetic, the length must match exactly, the CRC must match,
 * and every float must be finite. Reads only [buf, buf + len).
 */
static inline int vb_pq_parse(const uint8_t *restrict buf, size_t len, vb_pq_header_t *hdr, const char **why,
                              int crc_hw) {
    static const char *msg_short = "buffer is shorter than the 32-byte PQ header";
    memset(hdr, 0, sizeof(*hdr));
    *why = NULL;
#define VB_PQ_FAIL(m)                                                                                 \
    do {                                                                                              \
        *why = (m);                                                                                   \
        return VB_ECORRUPT;                                                                           \
    } while (0)
    if (!buf || len < VB_PQ_HEADER_BYTES) VB_PQ_FAIL(msg_short);
    if (memcmp(buf, VB_PQ_MAGIC, 4) != 0) VB_PQ_FAIL("bad magic: not a Vibrato PQ codebook");
    hdr->version = vb_pq_rd32(buf + 4);
    hdr->dim = vb_pq_rd32(buf + 8);
    hdr->m = vb_pq_rd32(buf + 12);
    hdr->nbits = vb_pq_rd32(buf + 16);
    hdr->ksub = vb_pq_rd32(buf + 20);
    hdr->payload_bytes = vb_pq_rd64(buf + 24);
    if (hdr->version != VB_PQ_VERSION) VB_PQ_FAIL("unsupported PQ format version");
    if (hdr->nbits != VB_PQ_NBITS) VB_PQ_FAIL("unsupported nbits (only 8 is supported)");
    if (hdr->ksub != VB_PQ_KSUB) VB_PQ_FAIL("ksub does not match nbits (expected 256)");
    if (hdr->dim == 0 || hdr->dim > VB_PQ_MAX_DIM) VB_PQ_FAIL("dim out of range [1, 65536]");
    if (hdr->m == 0 || hdr->m > hdr->dim) VB_PQ_FAIL("m out of range [1, dim]");
    if (hdr->dim % hdr->m != 0) VB_PQ_FAIL("m does not divide dim");
    const uint64_t want_payload = (uint64_t)VB_PQ_KSUB * hdr->dim * sizeof(float);
    if (hdr->payload_bytes != want_payload) VB_PQ_FAIL("payload length does not match ksub * dim * 4");
    if (len != vb_pq_serialized_bytes(hdr->dim)) VB_PQ_FAIL("buffer length does not match the header (truncated or trailing bytes)");
    const size_t payload = (size_t)want_payload;
    uint32_t crc = vb_crc32c(0, buf, VB_PQ_HEADER_BYTES + payload, crc_hw);
    if (crc != vb_pq_rd32(buf + VB_PQ_HEADER_BYTES + payload)) VB_PQ_FAIL("checksum mismatch (CRC32C)");
    const uint8_t *p = buf + VB_PQ_HEADER_BYTES;
    for (size_t i = 0; i < payload; i += 4)
        if ((vb_pq_rd32(p + i) & 0x7F800000u) == 0x7F800000u) VB_PQ_FAIL("codebook contains a non-finite value");
    hdr->payload = p;
    return VB_OK;
#undef VB_PQ_FAIL
}
