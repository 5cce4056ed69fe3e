/*
 * This is a PRIVATE header: include "vibrato/pq.h" instead.
 *
 * AVX-512F PQ kernels (target("avx512f")): nearest centroid and column distances with 16 lanes, and
 * ADC by 16-lane gathers, the lookup kernel of the AVX512 level (CPUs without VBMI, or VIBRATO_SIMD=avx512).
 */
#pragma once

#include "vibrato/common.h"
#include "vibrato/impl/pq_scalar.h"

#if VB_X86_64
#include <immintrin.h>

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

#endif /* VB_X86_64 */
