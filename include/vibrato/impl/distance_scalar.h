/*
 * This is a PRIVATE header: include "vibrato/distance.h" instead.
 *
 * Portable scalar kernels. They are the test oracle for every SIMD variant and the fallback on CPUs
 * without AVX2/NEON. Four partial sums let the compiler vectorise and shorten the dependency chain.
 */
#pragma once

#include "vibrato/common.h"

static float vb_dot_f32_scalar(const float *restrict a, const float *restrict b, size_t d) {
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    size_t i = 0;
    for (; i + 4 <= d; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < d; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

static float vb_l2sq_f32_scalar(const float *restrict a, const float *restrict b, size_t d) {
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    size_t i = 0;
    for (; i + 4 <= d; i += 4) {
        float t0 = a[i] - b[i], t1 = a[i + 1] - b[i + 1];
        float t2 = a[i + 2] - b[i + 2], t3 = a[i + 3] - b[i + 3];
        s0 += t0 * t0;
        s1 += t1 * t1;
        s2 += t2 * t2;
        s3 += t3 * t3;
    }
    for (; i < d; i++) {
        float t = a[i] - b[i];
        s0 += t * t;
    }
    return (s0 + s1) + (s2 + s3);
}

/* Inner product of an int16 query (vb_sq8_query) with one int8 row (the scalar-quantised scan codes,
 * vb_sq8_encode), exact in int32; the caller scales it back to float. */
static VB_ALWAYS_INLINE int32_t vb_dot_sq8_scalar(const int16_t *restrict q, const int8_t *restrict c, size_t d) {
    int32_t s0 = 0, s1 = 0;
    size_t i = 0;
    for (; i + 2 <= d; i += 2) {
        s0 += (int32_t)q[i] * c[i];
        s1 += (int32_t)q[i + 1] * c[i + 1];
    }
    if (i < d) s0 += (int32_t)q[i] * c[i];
    return s0 + s1;
}

/* vb_dot_sq8 of four rows at once (the ISAs with a joint reduction override it). */
static VB_ALWAYS_INLINE void vb_dot_sq8_x4_scalar(const int16_t *restrict q, const int8_t *c0, const int8_t *c1,
                                                  const int8_t *c2, const int8_t *c3, size_t d, int32_t *out) {
    out[0] = vb_dot_sq8_scalar(q, c0, d);
    out[1] = vb_dot_sq8_scalar(q, c1, d);
    out[2] = vb_dot_sq8_scalar(q, c2, d);
    out[3] = vb_dot_sq8_scalar(q, c3, d);
}
