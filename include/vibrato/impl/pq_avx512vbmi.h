/*
 * This is a PRIVATE header: include "vibrato/pq.h" instead (it defines VB_PQ_PLANE_BYTES first).
 *
 * The ADC lookup kernel of the AVX512VBMI level: byte-plane permutes instead of gathers. The other PQ
 * kernels of that level are the AVX-512F ones (impl/pq_avx512.h).
 */
#pragma once

#include "vibrato/common.h"
#include "vibrato/impl/pq_scalar.h"

#if VB_X86_64
#include <immintrin.h>

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

#endif /* VB_X86_64 */
