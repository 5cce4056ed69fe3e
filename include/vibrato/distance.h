/*
 * Distance kernels for float32 vectors with run-time ISA dispatch.
 *
 * Metrics: inner product (the similarity every index uses) and squared L2 (PQ training/encoding).
 * Shapes follow faiss: x is one vector of d floats, y is ny rows of d floats (row-major, size ny * d).
 * Memory may be unaligned. Callers pick an ops table once (vb_distance_ops_for) and call through it
 * inside their loops: dispatch once per batch, never per pair. All functions are thread-safe and
 * allocation-free; the tables are immutable.
 */
#pragma once

#include <float.h>

#include "vibrato/common.h"
#include "vibrato/cpu.h"
#include "vibrato/impl/distance_scalar.h"
#include "vibrato/impl/distance_avx2.h"
#include "vibrato/impl/distance_avx512.h"
#include "vibrato/impl/distance_neon.h"
#include "vibrato/parallel.h"

typedef float (*vb_pair_fn)(const float *restrict a, const float *restrict b, size_t d);
/* out[j] = op(x, y + j*d) for j < ny */
typedef void (*vb_ny_fn)(float *restrict out, const float *restrict x, const float *restrict y, size_t d, size_t ny);
/* out[j] = op(x, y + ids[j]*d) for j < n; ids must already be checked to lie in [0, rows(y)) */
typedef void (*vb_ids_fn)(float *restrict out, const float *restrict x, const float *restrict y, size_t d,
                          const int64_t *restrict ids, size_t n);
typedef void (*vb_ids32_fn)(float *restrict out, const float *restrict x, const float *restrict y, size_t d,
                            const uint32_t *restrict ids, size_t n);
/* out[j] = qscale * scale[ids[j]] * (q . codes row ids[j]): the approximate inner products of the
 * int8 scan codes (vb_sq8_encode) with a query prepared by vb_sq8_query (q int16, qscale); ids must
 * already be checked to lie in [0, rows(codes)) */
typedef void (*vb_sq8_ids32_fn)(float *restrict out, const int16_t *restrict q, float qscale,
                                const int8_t *restrict codes, const float *restrict scale, size_t d,
                                const uint32_t *restrict ids, size_t n);
/* out[j] = qscale * scale[j] * (q . codes row j) for j < ny */
typedef void (*vb_sq8_ny_fn)(float *restrict out, const int16_t *restrict q, float qscale,
                             const int8_t *restrict codes, const float *restrict scale, size_t d, size_t ny);

typedef struct vb_distance_ops {
    int level; /* vb_simd_level_t actually used by this table */
    vb_pair_fn dot;
    vb_pair_fn l2sq;
    vb_ny_fn dot_ny;
    vb_ny_fn l2sq_ny;
    vb_ids_fn dot_ids;
    vb_ids_fn l2sq_ids;
    vb_ids32_fn dot_ids32;
    vb_sq8_ids32_fn dot_sq8_ids32;
    vb_sq8_ny_fn dot_sq8_ny;
} vb_distance_ops_t;

/* How far ahead the by-id loops prefetch rows (in rows). */
#define VB_PREFETCH_AHEAD 4
/* The int8 rows are a quarter the size: more of them in flight (measured: 16 beat 4 and 8 on
 * scattered rows of a 100k x 128 array). */
#define VB_SQ8_PREFETCH_AHEAD 16

/* Prefetch the first cache lines of a row: enough for d <= 64; longer rows stream after that. */
static inline void vb_prefetch_row(const float *row, size_t d) {
    VB_PREFETCH(row);
    if (d > 16) VB_PREFETCH(row + 16);
    if (d > 32) VB_PREFETCH(row + 32);
    if (d > 48) VB_PREFETCH(row + 48);
}

/*
 * Batch loops over a pair kernel. A four-rows-per-query-load variant (faiss's fvec_*_batch_4) was
 * measured and dropped: out of cache it ran at 42 ns/row against 17.5 ns/row for this plain loop
 * (100k x 128, AVX2), and in cache it was no faster.
 */
#define VB_DEFINE_NY_PAIR(name, pair, attr)                                                                   \
    attr static void name(float *restrict out, const float *restrict x, const float *restrict y, size_t d,     \
                          size_t ny) {                                                                        \
        for (size_t j = 0; j < ny; j++) out[j] = pair(x, y + j * d, d);                                       \
    }
#define VB_DEFINE_IDS(name, idtype, pair, attr)                                                               \
    attr static void name(float *restrict out, const float *restrict x, const float *restrict y, size_t d,     \
                          const idtype *restrict ids, size_t n) {                                             \
        for (size_t j = 0; j < n; j++) {                                                                      \
            if (j + VB_PREFETCH_AHEAD < n) vb_prefetch_row(y + (size_t)ids[j + VB_PREFETCH_AHEAD] * d, d);    \
            out[j] = pair(x, y + (size_t)ids[j] * d, d);                                                      \
        }                                                                                                     \
    }

#define VB_SQ8_PREFETCH_ROW(codes, ids, j, n, d)                                                              \
    if ((j) + VB_SQ8_PREFETCH_AHEAD < (n)) {                                                                  \
        const int8_t *row = (codes) + (size_t)(ids)[(j) + VB_SQ8_PREFETCH_AHEAD] * (d);                      \
        for (size_t b = 0; b < (d) && b < 256; b += 64) VB_PREFETCH(row + b);                                 \
    }
/* Four rows per step through x4 (the ISA's joint kernel), the last n % 4 one at a time. */
#define VB_DEFINE_SQ8_IDS(name, pair, x4, attr)                                                               \
    attr static void name(float *restrict out, const int16_t *restrict q, float qscale,                      \
                          const int8_t *restrict codes, const float *restrict scale, size_t d,               \
                          const uint32_t *restrict ids, size_t n) {                                          \
        size_t j = 0;                                                                                         \
        for (; j + 4 <= n; j += 4) {                                                                          \
            for (size_t t = 0; t < 4; t++) { VB_SQ8_PREFETCH_ROW(codes, ids, j + t, n, d) }                   \
            int32_t s[4];                                                                                     \
            x4(q, codes + (size_t)ids[j] * d, codes + (size_t)ids[j + 1] * d, codes + (size_t)ids[j + 2] * d, \
               codes + (size_t)ids[j + 3] * d, d, s);                                                         \
            for (size_t t = 0; t < 4; t++) out[j + t] = qscale * scale[ids[j + t]] * (float)s[t];             \
        }                                                                                                     \
        for (; j < n; j++) {                                                                                  \
            VB_SQ8_PREFETCH_ROW(codes, ids, j, n, d)                                                          \
            out[j] = qscale * scale[ids[j]] * (float)pair(q, codes + (size_t)ids[j] * d, d);                 \
        }                                                                                                     \
    }

#define VB_DEFINE_SQ8_NY(name, pair, attr)                                                                    \
    attr static void name(float *restrict out, const int16_t *restrict q, float qscale,                      \
                          const int8_t *restrict codes, const float *restrict scale, size_t d, size_t ny) {  \
        for (size_t j = 0; j < ny; j++) out[j] = qscale * scale[j] * (float)pair(q, codes + j * d, d);        \
    }

/* The derived kernels of one ISA (from its pair kernels vb_dot_f32_<isa>, vb_l2sq_f32_<isa>) and its
 * ops table vb_ops_<isa>. */
#define VB_DEFINE_OPS(isa, level, attr)                                                                       \
    VB_DEFINE_NY_PAIR(vb_dot_ny_f32_##isa, vb_dot_f32_##isa, attr)                                            \
    VB_DEFINE_NY_PAIR(vb_l2sq_ny_f32_##isa, vb_l2sq_f32_##isa, attr)                                          \
    VB_DEFINE_IDS(vb_dot_ids_f32_##isa, int64_t, vb_dot_f32_##isa, attr)                                      \
    VB_DEFINE_IDS(vb_l2sq_ids_f32_##isa, int64_t, vb_l2sq_f32_##isa, attr)                                    \
    VB_DEFINE_IDS(vb_dot_ids32_f32_##isa, uint32_t, vb_dot_f32_##isa, attr)                                   \
    VB_DEFINE_SQ8_IDS(vb_dot_sq8_ids32_##isa, vb_dot_sq8_##isa, vb_dot_sq8_x4_##isa, attr)                                         \
    VB_DEFINE_SQ8_NY(vb_dot_sq8_ny_##isa, vb_dot_sq8_##isa, attr)                                             \
    static const vb_distance_ops_t vb_ops_##isa = {                                                           \
        level,                   vb_dot_f32_##isa,       vb_l2sq_f32_##isa,       vb_dot_ny_f32_##isa,        \
        vb_l2sq_ny_f32_##isa,    vb_dot_ids_f32_##isa,   vb_l2sq_ids_f32_##isa,   vb_dot_ids32_f32_##isa,     \
        vb_dot_sq8_ids32_##isa,  vb_dot_sq8_ny_##isa,                                                         \
    };

VB_DEFINE_OPS(scalar, VB_SIMD_SCALAR, )
#if VB_X86_64
VB_DEFINE_OPS(avx2, VB_SIMD_AVX2, VB_TARGET("avx2,fma"))
VB_DEFINE_OPS(avx512, VB_SIMD_AVX512, VB_TARGET("avx512f,avx512bw"))
#endif
#if VB_AARCH64
VB_DEFINE_OPS(neon, VB_SIMD_NEON, )
#endif

/*
 * The ops table for a level. A level this build or CPU cannot run falls through to the next lower
 * one (AVX512 -> AVX2 -> scalar), as faiss's with_selected_simd_levels does; check ->level for
 * what was chosen. The caller is responsible for not asking for more than vb_cpu_max_level().
 */
static inline const vb_distance_ops_t *vb_distance_ops_for(int level) {
#if VB_X86_64
    if (level >= VB_SIMD_AVX512) return &vb_ops_avx512;
    if (level >= VB_SIMD_AVX2) return &vb_ops_avx2;
#endif
#if VB_AARCH64
    if (level >= VB_SIMD_NEON) return &vb_ops_neon;
#endif
    (void)level;
    return &vb_ops_scalar;
}

/*
 * Many-to-many: out (nq, ny) row-major, out[i*ny + j] = op(x_i, y_j). Blocked over y so a block of
 * rows stays in L2 while every query passes over it. metric: 0 = inner product, 1 = squared L2.
 */
#define VB_MATRIX_BLOCK_BYTES (128u * 1024u)
static inline void vb_distance_matrix(const vb_distance_ops_t *ops, int metric, float *restrict out,
                                      const float *restrict x, size_t nq, const float *restrict y, size_t ny,
                                      size_t d) {
    vb_ny_fn fn = metric == 0 ? ops->dot_ny : ops->l2sq_ny;
    size_t row_bytes = d * sizeof(float);
    size_t block = row_bytes ? VB_MATRIX_BLOCK_BYTES / row_bytes : ny;
    if (block < 16) block = 16;
    for (size_t j0 = 0; j0 < ny; j0 += block) {
        size_t nb = ny - j0 < block ? ny - j0 : block;
        for (size_t i = 0; i < nq; i++) fn(out + i * ny + j0, x + i * d, y + j0 * d, d, nb);
    }
}

/*
 * Multi-threaded versions for large inputs (the GIL is released around them). Rows (for one-to-many)
 * or queries (for many-to-many) are split in chunks across nthreads; results are identical to the
 * single-threaded call because each output element is computed by exactly one kernel call.
 */
typedef struct {
    const vb_distance_ops_t *ops;
    int metric;
    float *out;
    const float *x, *y;
    size_t d, ny;
    const int64_t *ids;
} vb_dist_task_t;

static int vb_dist_ny_task(void *p, size_t tid, size_t b, size_t e) {
    vb_dist_task_t *t = (vb_dist_task_t *)p;
    (void)tid;
    if (t->ids) {
        vb_ids_fn fn = t->metric == 0 ? t->ops->dot_ids : t->ops->l2sq_ids;
        fn(t->out + b, t->x, t->y, t->d, t->ids + b, e - b);
    } else {
        vb_ny_fn fn = t->metric == 0 ? t->ops->dot_ny : t->ops->l2sq_ny;
        fn(t->out + b, t->x, t->y + b * t->d, t->d, e - b);
    }
    return VB_OK;
}

/* out[j] = op(x, row j) over ny rows (ids == NULL) or over rows ids[0..ny). */
static inline int vb_distance_many(const vb_distance_ops_t *ops, int metric, float *restrict out,
                                   const float *restrict x, const float *restrict y, size_t d, size_t ny,
                                   const int64_t *ids, size_t nthreads) {
    vb_dist_task_t t = {ops, metric, out, x, y, d, ny, ids};
    return vb_parallel_for(ny, nthreads, 8192, vb_dist_ny_task, &t);
}

static int vb_dist_matrix_task(void *p, size_t tid, size_t b, size_t e) {
    vb_dist_task_t *t = (vb_dist_task_t *)p;
    (void)tid;
    vb_distance_matrix(t->ops, t->metric, t->out + b * t->ny, t->x + b * t->d, e - b, t->y, t->ny, t->d);
    return VB_OK;
}

static inline int vb_distance_matrix_mt(const vb_distance_ops_t *ops, int metric, float *restrict out,
                                        const float *restrict x, size_t nq, const float *restrict y, size_t ny,
                                        size_t d, size_t nthreads) {
    vb_dist_task_t t = {ops, metric, out, x, y, d, ny, NULL};
    return vb_parallel_for(nq, nthreads, 16, vb_dist_matrix_task, &t);
}

/*
 * Scalar quantisation for exact scans of many rows: row r becomes codes[r*d .. r*d + d) int8 in
 * [-127, 127] and scale[r] = max|x_r| / 127, so x_r ~ scale[r] * codes_r and an inner product costs
 * a quarter of the memory traffic. The rounding error per component is at most scale/2; callers
 * rescore the best candidates on the float vectors. A row with a non-finite or zero maximum gets
 * scale 0 (its approximate score is 0): the segment reader does not check vectors for finiteness.
 */
static inline void vb_sq8_encode(const float *restrict x, size_t n, size_t d, int8_t *restrict codes,
                                 float *restrict scale) {
    for (size_t r = 0; r < n; r++) {
        const float *row = x + r * d;
        int8_t *out = codes + r * d;
        float amax = 0.f;
        int finite = 1;
        for (size_t i = 0; i < d; i++) {
            float a = fabsf(row[i]);
            finite &= a <= FLT_MAX; /* false for inf and NaN */
            amax = a > amax ? a : amax;
        }
        if (!finite || !(amax > 0.f)) {
            memset(out, 0, d);
            scale[r] = 0.f;
            continue;
        }
        float inv = 127.f / amax;
        for (size_t i = 0; i < d; i++) {
            float v = nearbyintf(row[i] * inv);
            out[i] = (int8_t)(v > 127.f ? 127.f : v < -127.f ? -127.f : v);
        }
        scale[r] = amax / 127.f;
    }
}

/*
 * The query side of the int8 kernels: q16[i] = round(q[i] / qscale) with |q16| <= qmax, so q ~
 * qscale * q16 to 1 part in 2 * qmax (negligible next to the codes' own rounding) and the kernels sum
 * exact int16 * int8 products in int32. qmax keeps d * 128 * qmax below 2^31, so no sum can overflow
 * whatever the codes. Returns qscale (0 for a zero or non-finite query: every score is then 0).
 */
static inline float vb_sq8_query(const float *restrict q, size_t d, int16_t *restrict q16) {
    float amax = 0.f;
    int finite = 1;
    for (size_t i = 0; i < d; i++) {
        float a = fabsf(q[i]);
        finite &= a <= FLT_MAX;
        amax = a > amax ? a : amax;
    }
    /* 128, not 127: a code read from a file may be -128 */
    size_t bound = d ? (size_t)INT32_MAX / (128u * d) : 32767u;
    float qmax = (float)(bound < 32767u ? bound : 32767u);
    if (!finite || !(amax > 0.f) || qmax < 1.f) {
        memset(q16, 0, d * sizeof(int16_t));
        return 0.f;
    }
    float inv = qmax / amax;
    for (size_t i = 0; i < d; i++) {
        float v = nearbyintf(q[i] * inv);
        q16[i] = (int16_t)(v > qmax ? qmax : v < -qmax ? -qmax : v);
    }
    return amax / qmax;
}
