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

#endif /* VB_X86_64 */
