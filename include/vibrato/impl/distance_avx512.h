/*
 * This is a PRIVATE header: include "vibrato/distance.h" instead.
 *
 * AVX-512F kernels: 16 lanes, four accumulators, and a masked load for the d % 16 tail.
 */
#pragma once

#include "vibrato/common.h"

#if VB_X86_64
#include <immintrin.h>

VB_TARGET("avx512f") static inline __mmask16 vb_avx512_tail_mask(size_t r) {
    return (__mmask16)((1u << r) - 1u);
}

VB_TARGET("avx512f") static float vb_dot_f32_avx512(const float *restrict a, const float *restrict b, size_t d) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    __m512 s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 64 <= d; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i + 16 <= d; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    if (i < d) {
        __mmask16 m = vb_avx512_tail_mask(d - i);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

VB_TARGET("avx512f") static float vb_l2sq_f32_avx512(const float *restrict a, const float *restrict b, size_t d) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    __m512 s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 64 <= d; i += 64) {
        __m512 t0 = _mm512_sub_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
        __m512 t1 = _mm512_sub_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16));
        __m512 t2 = _mm512_sub_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32));
        __m512 t3 = _mm512_sub_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48));
        s0 = _mm512_fmadd_ps(t0, t0, s0);
        s1 = _mm512_fmadd_ps(t1, t1, s1);
        s2 = _mm512_fmadd_ps(t2, t2, s2);
        s3 = _mm512_fmadd_ps(t3, t3, s3);
    }
    for (; i + 16 <= d; i += 16) {
        __m512 t = _mm512_sub_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
        s0 = _mm512_fmadd_ps(t, t, s0);
    }
    if (i < d) {
        __mmask16 m = vb_avx512_tail_mask(d - i);
        __m512 t = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i));
        s1 = _mm512_fmadd_ps(t, t, s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

/* int16 query . int8 row (the scan codes, vb_sq8_query): 32 codes widened to 16 bits per step and
 * multiplied in pairs (vpmaddwd) into 16 int32 sums; no float conversion per code. */
VB_TARGET("avx512f,avx512bw") static VB_ALWAYS_INLINE int32_t vb_dot_sq8_avx512(const int16_t *restrict q, const int8_t *restrict c,
                                                               size_t d) {
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    size_t i = 0;
#define VB_SQ8_32(off)                                                                                        \
    _mm512_madd_epi16(_mm512_loadu_si512((const void *)(q + i + (off))),                                      \
                      _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(c + i + (off)))))
    for (; i + 64 <= d; i += 64) {
        s0 = _mm512_add_epi32(s0, VB_SQ8_32(0));
        s1 = _mm512_add_epi32(s1, VB_SQ8_32(32));
    }
    if (i + 32 <= d) {
        s0 = _mm512_add_epi32(s0, VB_SQ8_32(0));
        i += 32;
    }
#undef VB_SQ8_32
    int32_t s = _mm512_reduce_add_epi32(_mm512_add_epi32(s0, s1));
    for (; i < d; i++) s += (int32_t)q[i] * c[i];
    return s;
}

/* vb_dot_sq8_avx512 of four rows at once: each 32-code step loads the query once, and the four sums
 * are reduced together (two unpack rounds and two halvings, instead of a full horizontal reduction
 * per row: the reduction was most of a 128-d row's instructions). Sums are exact in int32 either way,
 * so the order of the additions does not matter. d not a multiple of 32 takes the one-row kernel. */
VB_TARGET("avx512f,avx512bw") static VB_ALWAYS_INLINE void vb_dot_sq8_x4_avx512(const int16_t *restrict q,
                                                                               const int8_t *c0, const int8_t *c1,
                                                                               const int8_t *c2, const int8_t *c3,
                                                                               size_t d, int32_t *out) {
    if (d % 32) {
        out[0] = vb_dot_sq8_avx512(q, c0, d);
        out[1] = vb_dot_sq8_avx512(q, c1, d);
        out[2] = vb_dot_sq8_avx512(q, c2, d);
        out[3] = vb_dot_sq8_avx512(q, c3, d);
        return;
    }
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
#define VB_SQ8_ROW(c) _mm512_madd_epi16(qv, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)((c) + i))))
    for (size_t i = 0; i < d; i += 32) {
        __m512i qv = _mm512_loadu_si512((const void *)(q + i));
        a0 = _mm512_add_epi32(a0, VB_SQ8_ROW(c0));
        a1 = _mm512_add_epi32(a1, VB_SQ8_ROW(c1));
        a2 = _mm512_add_epi32(a2, VB_SQ8_ROW(c2));
        a3 = _mm512_add_epi32(a3, VB_SQ8_ROW(c3));
    }
#undef VB_SQ8_ROW
    /* per 128-bit lane: [a0 a1 a0 a1] pair sums, then [a0 a1 a2 a3]; then the four lanes added */
    __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
    __m256i v = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
    __m128i w = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storeu_si128((__m128i *)out, w);
}

#endif /* VB_X86_64 */
