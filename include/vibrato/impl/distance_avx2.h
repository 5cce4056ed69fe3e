/*
 * This is a PRIVATE header: include "vibrato/distance.h" instead.
 *
 * AVX2 + FMA kernels. Every function carries target("avx2,fma") so the extension is built without
 * -mavx2 and still runs on any x86-64; distance.h only hands these out after CPU detection.
 * Loads are unaligned; the d % 8 tail uses masked loads (no scalar tail, no read past the end).
 */
#pragma once

#include "vibrato/common.h"

#if VB_X86_64
#include <immintrin.h>

/* 8 x -1 followed by 8 x 0: loading 8 ints at offset (8 - r) gives a mask of the first r lanes. */
static const int32_t vb_avx2_mask_table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

VB_TARGET("avx2,fma") static inline __m256i vb_avx2_tail_mask(size_t r) {
    return _mm256_loadu_si256((const __m256i *)(vb_avx2_mask_table + 8 - r));
}

VB_TARGET("avx2,fma") static inline float vb_hsum256(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    s = _mm_add_ss(s, sh);
    return _mm_cvtss_f32(s);
}

VB_TARGET("avx2,fma") static float vb_dot_f32_avx2(const float *restrict a, const float *restrict b, size_t d) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 32 <= d; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= d; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    if (i < d) {
        __m256i m = vb_avx2_tail_mask(d - i);
        s1 = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, m), _mm256_maskload_ps(b + i, m), s1);
    }
    return vb_hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

VB_TARGET("avx2,fma") static float vb_l2sq_f32_avx2(const float *restrict a, const float *restrict b, size_t d) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 32 <= d; i += 32) {
        __m256 t0 = _mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
        __m256 t1 = _mm256_sub_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8));
        __m256 t2 = _mm256_sub_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16));
        __m256 t3 = _mm256_sub_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24));
        s0 = _mm256_fmadd_ps(t0, t0, s0);
        s1 = _mm256_fmadd_ps(t1, t1, s1);
        s2 = _mm256_fmadd_ps(t2, t2, s2);
        s3 = _mm256_fmadd_ps(t3, t3, s3);
    }
    for (; i + 8 <= d; i += 8) {
        __m256 t = _mm256_sub_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
        s0 = _mm256_fmadd_ps(t, t, s0);
    }
    if (i < d) {
        __m256i m = vb_avx2_tail_mask(d - i);
        __m256 t = _mm256_sub_ps(_mm256_maskload_ps(a + i, m), _mm256_maskload_ps(b + i, m));
        s1 = _mm256_fmadd_ps(t, t, s1);
    }
    return vb_hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

/* int16 query . int8 row (vb_sq8_query): 16 codes widened to 16 bits per step, multiplied in pairs
 * (vpmaddwd) into 8 int32 sums. */
VB_TARGET("avx2,fma") static VB_ALWAYS_INLINE int32_t vb_dot_sq8_avx2(const int16_t *restrict q, const int8_t *restrict c, size_t d) {
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    size_t i = 0;
#define VB_SQ8_16(off)                                                                                        \
    _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(q + i + (off))),                                   \
                      _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + i + (off)))))
    for (; i + 32 <= d; i += 32) {
        s0 = _mm256_add_epi32(s0, VB_SQ8_16(0));
        s1 = _mm256_add_epi32(s1, VB_SQ8_16(16));
    }
    if (i + 16 <= d) {
        s0 = _mm256_add_epi32(s0, VB_SQ8_16(0));
        i += 16;
    }
#undef VB_SQ8_16
    __m256i t = _mm256_add_epi32(s0, s1);
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(1, 0, 3, 2)));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(2, 3, 0, 1)));
    int32_t s = _mm_cvtsi128_si32(h);
    for (; i < d; i++) s += (int32_t)q[i] * c[i];
    return s;
}

VB_TARGET("avx2,fma") static VB_ALWAYS_INLINE void vb_dot_sq8_x4_avx2(const int16_t *restrict q, const int8_t *c0,
                                                                     const int8_t *c1, const int8_t *c2,
                                                                     const int8_t *c3, size_t d, int32_t *out) {
    out[0] = vb_dot_sq8_avx2(q, c0, d);
    out[1] = vb_dot_sq8_avx2(q, c1, d);
    out[2] = vb_dot_sq8_avx2(q, c2, d);
    out[3] = vb_dot_sq8_avx2(q, c3, d);
}

#endif /* VB_X86_64 */
