/*
 * This is a PRIVATE header: include "vibrato/distance.h" instead.
 *
 * NEON kernels (baseline on aarch64, compiled without a run-time check). Four 4-lane accumulators.
 */
#pragma once

#include "vibrato/common.h"

#if VB_AARCH64
#include <arm_neon.h>

static float vb_dot_f32_neon(const float *restrict a, const float *restrict b, size_t d) {
    float32x4_t s0 = vdupq_n_f32(0.f), s1 = vdupq_n_f32(0.f), s2 = vdupq_n_f32(0.f), s3 = vdupq_n_f32(0.f);
    size_t i = 0;
    for (; i + 16 <= d; i += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= d; i += 4) s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

static float vb_l2sq_f32_neon(const float *restrict a, const float *restrict b, size_t d) {
    float32x4_t s0 = vdupq_n_f32(0.f), s1 = vdupq_n_f32(0.f), s2 = vdupq_n_f32(0.f), s3 = vdupq_n_f32(0.f);
    size_t i = 0;
    for (; i + 16 <= d; i += 16) {
        float32x4_t t0 = vsubq_f32(vld1q_f32(a + i), vld1q_f32(b + i));
        float32x4_t t1 = vsubq_f32(vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        float32x4_t t2 = vsubq_f32(vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        float32x4_t t3 = vsubq_f32(vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
        s0 = vfmaq_f32(s0, t0, t0);
        s1 = vfmaq_f32(s1, t1, t1);
        s2 = vfmaq_f32(s2, t2, t2);
        s3 = vfmaq_f32(s3, t3, t3);
    }
    for (; i + 4 <= d; i += 4) {
        float32x4_t t = vsubq_f32(vld1q_f32(a + i), vld1q_f32(b + i));
        s0 = vfmaq_f32(s0, t, t);
    }
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < d; i++) {
        float t = a[i] - b[i];
        s += t * t;
    }
    return s;
}
/* The int8 scan codes use the scalar kernel, which the compiler vectorises for NEON. */
#define vb_dot_sq8_neon vb_dot_sq8_scalar
#define vb_dot_sq8_x4_neon vb_dot_sq8_x4_scalar

#endif /* VB_AARCH64 */
