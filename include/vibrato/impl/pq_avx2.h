/*
 * This is a PRIVATE header: include "vibrato/pq.h" instead.
 *
 * AVX2 + FMA PQ kernels. Every function carries target("avx2,fma"), so the extension is built without
 * -mavx2 and still runs on any x86-64; pq.h hands them out only at the AVX2 level or above (the one
 * dispatch of cpu.h / vibrato._native.cpu). Tails go to the scalar kernels (impl/pq_scalar.h).
 */
#pragma once

#include "vibrato/common.h"
#include "vibrato/impl/pq_scalar.h"

#if VB_X86_64
#include <immintrin.h>

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

#endif /* VB_X86_64 */
