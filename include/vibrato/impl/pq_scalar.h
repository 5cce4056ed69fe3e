/*
 * This is a PRIVATE header: include "vibrato/pq.h" instead (it defines VB_PQ_KSUB first).
 *
 * Portable PQ kernels: nearest centroid, column distances for k-means++, ADC lookup-accumulate. They
 * are the reference every SIMD variant is tested against, the fallback below AVX2, the tails of the
 * SIMD kernels, and (vectorised by the compiler) the NEON level's PQ loops. Contracts: pq.h.
 */
#pragma once

#include <math.h>

#include "vibrato/common.h"

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

static uint32_t vb_pq_nearest_scalar(const float *restrict x, const float *restrict ct, size_t dsub,
                                     float *restrict dist) {
    float acc[VB_PQ_KSUB];
    vb_pq_l2sq_cols_scalar(acc, ct, VB_PQ_KSUB, dsub, x, VB_PQ_KSUB);  /* ct is (dsub, KSUB): columns */
    return vb_argmin_f32(acc, VB_PQ_KSUB, dist);
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
