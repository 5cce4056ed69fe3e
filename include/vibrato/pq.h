/*
 * Product quantization (PQ) with 8-bit codes: k-means training, encode, decode, ADC tables, and ADC
 * scans with top-k selection. The archive tier uses it to pick candidates that are then re-ranked
 * exactly against the float32 vectors (CONTRACT.md D14).
 *
 * Shapes and layouts (faiss names: d = dim, m subspaces, dsub = d / m, ksub = 256):
 *   x          float32 (n, d) row-major; subvector j of row i is x[i*d + j*dsub .. + dsub)
 *   codebook   float32, layout (m, ksub, dsub): centroid (j, c) starts at float (j*ksub + c)*dsub
 *   codebook_t float32, layout (m, dsub, ksub): its transpose per subspace, used by the
 *              nearest-centroid kernels (one SIMD register holds one dimension of 8/16 centroids)
 *   codes      uint8 (n, m) row-major: code (i, j) is codes[i*m + j]
 *   table      float32 (m, ksub): table[j*ksub + c] = op(q_j, centroid (j, c)), op = dot or L2^2
 *
 * Contracts:
 *   - Fallible functions return VB_OK or a negative VB_E* code (common.h); nothing aborts or exits.
 *     Every allocation is checked and freed before return; callers own every output buffer.
 *   - All functions are reentrant and thread-safe: no globals are written, the ops tables are
 *     immutable. Functions that take `nthreads` start their own pthreads (parallel.h) and may be
 *     called with the GIL released.
 *   - Results never depend on `nthreads`: per-point work is independent, and every reduction
 *     (centroid sums, k-means++ totals, top-k merges) runs in a fixed order.
 *   - ADC scores are summed in float32 over j = 0..m-1 in order, in every ISA variant (the SIMD
 *     kernels add lane-wise without FMA), so scalar, AVX2 and AVX-512 scans agree bit for bit.
 *   - Training is deterministic for a given (data, seed, iters, sample, SIMD level). Different
 *     SIMD levels may round distances differently and so may break near-ties differently.
 *
 * Defects of v2.1's PQ deliberately not copied (CONTRACT.md D38; v2.1's PQ is CONTRACT.md R4): empty
 * clusters are re-seeded deterministically (never from an unseeded RNG), training uses a seeded
 * subsample instead of every row, the ADC lookup loop is SIMD, untrusted codebook bytes are fully
 * validated (no panics on D % m != 0 or m = 0), and ADC tables are inner products (our score).
 */
#pragma once

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "vibrato/common.h"
#include "vibrato/cpu.h"
#include "vibrato/crc32c.h"
#include "vibrato/distance.h"
#include "vibrato/heap.h"
#include "vibrato/parallel.h"

#define VB_PQ_NBITS 8
#define VB_PQ_KSUB 256
#define VB_PQ_MAX_DIM 65536u   /* cap on d for codebooks (and hence for untrusted headers) */
#define VB_PQ_MAX_ITERS 10000u /* cap on Lloyd iterations */
#define VB_PQ_MIN_TRAIN 256u   /* rows needed to train: one per centroid */
#define VB_PQ_MAX_SCAN_ROWS 0xFFFFFFFFu /* rows per ADC scan: top-k heaps hold uint32 rows (heap.h) */
#define VB_PQ_PLANE_BYTES (4u * VB_PQ_KSUB) /* table byte planes per subspace (the VBMI ADC kernel) */


/* ------------------------------------------------------------------------------------------------
 * Seeded RNG: splitmix64 (common.h) on a 64-bit state, so training reproduces across platforms and
 * numpy versions.
 */
typedef struct {
    uint64_t s;
} vb_pq_rng_t;

/* Uniform in [0, 1) with 53 random bits. */
static inline double vb_pq_rng_uniform(vb_pq_rng_t *r) {
    return (double)(vb_splitmix64(&r->s) >> 11) * (1.0 / 9007199254740992.0);
}

/* Uniform in [0, n) for n >= 1 (multiply-shift; bias below 2^-64 * n, irrelevant here). */
static inline size_t vb_pq_rng_below(vb_pq_rng_t *r, size_t n) {
    return (size_t)(((unsigned __int128)vb_splitmix64(&r->s) * (unsigned __int128)n) >> 64);
}

/* Independent streams derived from one user seed: stream 0 draws the subsample, stream j+1 trains
 * subspace j. */
static inline vb_pq_rng_t vb_pq_rng_stream(uint64_t seed, uint64_t stream) {
    vb_pq_rng_t r = {seed ^ (0xD1B54A32D192ED03ull * (stream + 1))};
    r.s = vb_splitmix64(&r.s);
    return r;
}

/* ------------------------------------------------------------------------------------------------
 * Kernels. Each SIMD level's variants live in include/vibrato/impl/pq_<level>.h; this section states
 * the contracts every variant keeps, and the tables below pick one set per level.
 *
 * nearest: the nearest centroid of one subvector. ct is one subspace of codebook_t: (dsub, ksub).
 *   Returns the index of the smallest squared L2 distance, the lowest index on ties; NaN distances
 *   never win and if no distance is below +inf the result is 0. *dist receives that distance.
 *   Distances are computed as sum_j (c_j - x_j)^2, never through |x|^2 - 2 x.c + |c|^2, so a vector
 *   equal to a centroid has distance exactly 0 and encodes to it.
 *
 * l2sq_cols: distances from one centroid c (dsub floats) to nb points stored column-major: xt (dsub,
 *   ld), point i is xt[t*ld + i] for t < dsub. out[i] = sum_t (xt[t*ld + i] - c[t])^2, summed in
 *   increasing t. The k-means++ pass uses it: one vector lane per point, so short subvectors
 *   (dsub = 4, 8) cost no horizontal sums, unlike a per-pair kernel.
 *
 * scores (ADC lookup-accumulate): out[i] = sum_{j=0..m-1} table[j*ksub + codes[i*m + j]] for i < n,
 *   summed in float32 in increasing j, so every variant returns bit-identical scores. `planes` is the
 *   table split into byte planes, layout (m, 4, ksub) uint8: planes[(j*4 + b)*ksub + c] is byte b
 *   (little-endian) of table[j*ksub + c] (vb_pq_table_planes). Only kernels whose ops entry has
 *   needs_planes = 1 read it; the others accept NULL. No kernel reads past row n - 1 of codes.
 */
typedef uint32_t (*vb_pq_nearest_fn)(const float *restrict x, const float *restrict ct, size_t dsub,
                                     float *restrict dist);
typedef void (*vb_pq_l2sq_cols_fn)(float *restrict out, const float *restrict xt, size_t ld, size_t dsub,
                                   const float *restrict c, size_t nb);
typedef void (*vb_pq_scores_fn)(float *restrict out, const float *restrict table, const uint8_t *restrict planes,
                                size_t m, const uint8_t *restrict codes, size_t n);

#include "vibrato/impl/pq_scalar.h"
#include "vibrato/impl/pq_avx2.h"
#include "vibrato/impl/pq_avx512.h"
#include "vibrato/impl/pq_avx512vbmi.h"

static inline void vb_pq_table_planes(uint8_t *restrict planes, const float *restrict table, size_t m) {
    for (size_t j = 0; j < m; j++) {
        uint8_t *p = planes + j * VB_PQ_PLANE_BYTES;
        for (size_t c = 0; c < VB_PQ_KSUB; c++) {
            uint32_t u;
            memcpy(&u, table + j * VB_PQ_KSUB + c, 4);
            p[c] = (uint8_t)u;
            p[VB_PQ_KSUB + c] = (uint8_t)(u >> 8);
            p[2 * VB_PQ_KSUB + c] = (uint8_t)(u >> 16);
            p[3 * VB_PQ_KSUB + c] = (uint8_t)(u >> 24);
        }
    }
}

/* ------------------------------------------------------------------------------------------------
 * Kernel tables, one per SIMD level. `dist` is the distance ops table of the same level (distance.h).
 */
typedef struct vb_pq_ops {
    int level;        /* vb_simd_level_t this table belongs to */
    const char *name; /* the level's name: "scalar", "neon", "avx2", "avx512", "avx512vbmi" */
    int needs_planes; /* scores() reads the byte planes (vb_pq_table_planes) */
    const vb_distance_ops_t *dist;
    vb_pq_nearest_fn nearest;
    vb_pq_l2sq_cols_fn l2sq_cols;
    vb_pq_scores_fn scores;
} vb_pq_ops_t;

static const vb_pq_ops_t vb_pq_ops_scalar = {VB_SIMD_SCALAR, "scalar", 0, &vb_ops_scalar, vb_pq_nearest_scalar,
                                             vb_pq_l2sq_cols_scalar, vb_pq_adc_scores_scalar};
#if VB_X86_64
static const vb_pq_ops_t vb_pq_ops_avx2 = {VB_SIMD_AVX2, "avx2", 0, &vb_ops_avx2, vb_pq_nearest_avx2,
                                           vb_pq_l2sq_cols_avx2, vb_pq_adc_scores_avx2};
static const vb_pq_ops_t vb_pq_ops_avx512 = {VB_SIMD_AVX512, "avx512", 0, &vb_ops_avx512, vb_pq_nearest_avx512,
                                             vb_pq_l2sq_cols_avx512, vb_pq_adc_scores_avx512};
static const vb_pq_ops_t vb_pq_ops_avx512vbmi = {VB_SIMD_AVX512VBMI, "avx512vbmi", 1, &vb_ops_avx512,
                                                 vb_pq_nearest_avx512, vb_pq_l2sq_cols_avx512,
                                                 vb_pq_adc_scores_avx512vbmi};
#endif
#if VB_AARCH64
/* NEON: the portable PQ loops (the compiler vectorises them) and the NEON distance kernels for ADC tables. */
static const vb_pq_ops_t vb_pq_ops_neon = {VB_SIMD_NEON, "neon", 0, &vb_ops_neon, vb_pq_nearest_scalar,
                                           vb_pq_l2sq_cols_scalar, vb_pq_adc_scores_scalar};
#endif

/* The table for a SIMD level, selected as vb_distance_ops_for does: a level this build has no table
 * for falls to the next lower one (AVX512VBMI -> AVX512 -> AVX2 -> scalar). The caller must not ask
 * for more than vb_cpu_max_level(). */
static inline const vb_pq_ops_t *vb_pq_ops_for(int level) {
#if VB_X86_64
    if (level >= VB_SIMD_AVX512VBMI) return &vb_pq_ops_avx512vbmi;
    if (level >= VB_SIMD_AVX512) return &vb_pq_ops_avx512;
    if (level >= VB_SIMD_AVX2) return &vb_pq_ops_avx2;
#endif
#if VB_AARCH64
    if (level >= VB_SIMD_NEON) return &vb_pq_ops_neon;
#endif
    (void)level;
    return &vb_pq_ops_scalar;
}

/* ------------------------------------------------------------------------------------------------
 * Small helpers.
 */

/* Checks d, m: 1 <= m <= d <= VB_PQ_MAX_DIM and m divides d. */
static inline int vb_pq_check_shape(size_t dim, size_t m) {
    if (dim == 0 || dim > VB_PQ_MAX_DIM || m == 0 || m > dim || dim % m != 0) return VB_EINVAL;
    return VB_OK;
}

/* codebook (m, ksub, dsub) -> codebook_t (m, dsub, ksub). Both hold ksub * dim floats. */
static inline void vb_pq_transpose(const float *restrict codebook, size_t dim, size_t m,
                                   float *restrict codebook_t) {
    const size_t dsub = dim / m;
    for (size_t j = 0; j < m; j++) {
        const float *src = codebook + j * VB_PQ_KSUB * dsub;
        float *dst = codebook_t + j * VB_PQ_KSUB * dsub;
        for (size_t c = 0; c < VB_PQ_KSUB; c++)
            for (size_t t = 0; t < dsub; t++) dst[t * VB_PQ_KSUB + c] = src[c * dsub + t];
    }
}

static inline int vb_pq_isfinite_f32(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return (u & 0x7F800000u) != 0x7F800000u;
}

/* Nearest centroid through the distance ops (one l2sq call per centroid). Kept as the "pairwise"
 * alternative for benchmarks; the blocked nearest kernels above are the default. c is one subspace
 * of the codebook, (ksub, dsub). */
static inline uint32_t vb_pq_nearest_pairwise(const vb_distance_ops_t *ops, const float *restrict x,
                                              const float *restrict c, size_t dsub, float *restrict dist) {
    float d[VB_PQ_KSUB];
    ops->l2sq_ny(d, x, c, dsub, VB_PQ_KSUB);
    return vb_argmin_f32(d, VB_PQ_KSUB, dist);
}

/* ------------------------------------------------------------------------------------------------
 * Training.
 */
typedef struct {
    size_t rows_used;   /* size of the training sample */
    size_t iterations;  /* Lloyd iterations run, summed over subspaces (early stop on convergence) */
    size_t reseeded;    /* empty clusters re-seeded, summed over subspaces */
    size_t bad_row;     /* on VB_EINVAL from non-finite input: the first offending row of x */
    double inertia;     /* sum over subspaces and sample rows of the squared distance to the centroid
                           in the last assignment step (before the last centroid update) */
} vb_pq_train_stats_t;

/* Per-worker scratch for one subspace at a time. ns = sample rows. */
typedef struct {
    float *ct;       /* (dsub, ksub) transposed centroids of the subspace being trained */
    float *xt;       /* (dsub, ns) the subspace's sample, column-major, for the k-means++ pass */
    float *dist;     /* (ns) distance of each point to its assigned centroid */
    float *min_d;    /* (ns) k-means++: distance to the nearest chosen centroid */
    double *bsum;    /* (ceil(ns / VB_PQ_BLOCK)) k-means++: per-block sums of min_d */
    uint8_t *assign; /* (ns) assigned centroid */
    double *sums;    /* (ksub, dsub) centroid sums */
    size_t *counts;  /* (ksub) cluster sizes */
} vb_pq_ws_t;

#define VB_PQ_BLOCK 256 /* points per k-means++ update block (its sum is one deterministic unit) */

static void vb_pq_ws_free(vb_pq_ws_t *w) {
    free(w->ct);
    free(w->xt);
    free(w->dist);
    free(w->min_d);
    free(w->bsum);
    free(w->assign);
    free(w->sums);
    free(w->counts);
    memset(w, 0, sizeof(*w));
}

static int vb_pq_ws_alloc(vb_pq_ws_t *w, size_t ns, size_t dsub) {
    memset(w, 0, sizeof(*w));
    size_t nblocks = (ns + VB_PQ_BLOCK - 1) / VB_PQ_BLOCK;
    w->ct = (float *)malloc(VB_PQ_KSUB * dsub * sizeof(float));
    w->xt = (float *)malloc(ns * dsub * sizeof(float));
    w->dist = (float *)malloc(ns * sizeof(float));
    w->min_d = (float *)malloc(ns * sizeof(float));
    w->bsum = (double *)malloc(nblocks * sizeof(double));
    w->assign = (uint8_t *)malloc(ns);
    w->sums = (double *)malloc(VB_PQ_KSUB * dsub * sizeof(double));
    w->counts = (size_t *)malloc(VB_PQ_KSUB * sizeof(size_t));
    if (!w->ct || !w->xt || !w->dist || !w->min_d || !w->bsum || !w->assign || !w->sums || !w->counts) {
        vb_pq_ws_free(w);
        return VB_ENOMEM;
    }
    return VB_OK;
}

typedef struct {
    const vb_pq_ops_t *ops;
    const float *xs;   /* (ns, dsub) the subspace's sample, contiguous */
    size_t ns, dsub;
    const float *cent; /* k-means++: the newly chosen centroid (dsub) */
    const float *ct;   /* assignment: (dsub, ksub) */
    vb_pq_ws_t *w;
    atomic_size_t changed;
} vb_pq_sub_task_t;

/* k-means++ update over blocks [b, e): min_d = min(min_d, |x - cent|^2), bsum[block] = its sum. */
static int vb_pq_kpp_update_task(void *p, size_t tid, size_t b, size_t e) {
    vb_pq_sub_task_t *t = (vb_pq_sub_task_t *)p;
    (void)tid;
    float tmp[VB_PQ_BLOCK];
    for (size_t blk = b; blk < e; blk++) {
        size_t i0 = blk * VB_PQ_BLOCK;
        size_t nb = t->ns - i0 < VB_PQ_BLOCK ? t->ns - i0 : VB_PQ_BLOCK;
        t->ops->l2sq_cols(tmp, t->w->xt + i0, t->ns, t->dsub, t->cent, nb);
        float *md = t->w->min_d + i0;
        double s0 = 0, s1 = 0;
        size_t i = 0;
        for (; i + 2 <= nb; i += 2) {
            float v0 = tmp[i] < md[i] ? tmp[i] : md[i];
            float v1 = tmp[i + 1] < md[i + 1] ? tmp[i + 1] : md[i + 1];
            md[i] = v0;
            md[i + 1] = v1;
            s0 += v0;
            s1 += v1;
        }
        if (i < nb) {
            float v0 = tmp[i] < md[i] ? tmp[i] : md[i];
            md[i] = v0;
            s0 += v0;
        }
        t->w->bsum[blk] = s0 + s1;
    }
    return VB_OK;
}

/* Assignment over points [b, e): nearest centroid, its distance, and how many assignments changed. */
static int vb_pq_assign_task(void *p, size_t tid, size_t b, size_t e) {
    vb_pq_sub_task_t *t = (vb_pq_sub_task_t *)p;
    (void)tid;
    vb_pq_nearest_fn nearest = t->ops->nearest;
    size_t changed = 0;
    uint8_t *assign = t->w->assign;
    float *dist = t->w->dist;
    for (size_t i = b; i < e; i++) {
        uint8_t a = (uint8_t)nearest(t->xs + i * t->dsub, t->ct, t->dsub, &dist[i]);
        changed += a != assign[i];
        assign[i] = a;
    }
    atomic_fetch_add_explicit(&t->changed, changed, memory_order_relaxed);
    return VB_OK;
}

/* Picks a point with probability proportional to min_d (k-means++ D^2 sampling). Always returns a
 * point with min_d > 0 when the total is positive; a uniform point otherwise. */
static size_t vb_pq_kpp_pick(const vb_pq_ws_t *w, size_t ns, vb_pq_rng_t *rng) {
    size_t nblocks = (ns + VB_PQ_BLOCK - 1) / VB_PQ_BLOCK;
    double total = 0;
    for (size_t b = 0; b < nblocks; b++) total += w->bsum[b];
    if (!(total > 0)) return vb_pq_rng_below(rng, ns);
    double target = vb_pq_rng_uniform(rng) * total, run = 0;
    for (size_t b = 0; b < nblocks; b++) {
        if (run + w->bsum[b] < target) {
            run += w->bsum[b];
            continue;
        }
        size_t i0 = b * VB_PQ_BLOCK, i1 = i0 + VB_PQ_BLOCK < ns ? i0 + VB_PQ_BLOCK : ns, last = SIZE_MAX;
        for (size_t i = i0; i < i1; i++) {
            if (w->min_d[i] > 0) {
                last = i;
                run += w->min_d[i];
                if (run >= target) return i;
            }
        }
        if (last != SIZE_MAX) return last; /* rounding: the block sum and the running sum differ */
        break;
    }
    for (size_t i = ns; i-- > 0;) /* rounding pushed the target past the end: take the last candidate */
        if (w->min_d[i] > 0) return i;
    return vb_pq_rng_below(rng, ns);
}

/* k-means (k-means++ init, then Lloyd) on one subspace: xs (ns, dsub) -> cent (ksub, dsub). */
static int vb_pq_kmeans_subspace(const vb_pq_ops_t *ops, const float *restrict xs, size_t ns, size_t dsub,
                                 size_t iters, vb_pq_rng_t rng, const float *restrict init, vb_pq_ws_t *w,
                                 size_t nthreads, float *restrict cent, vb_pq_train_stats_t *st) {
    const size_t nblocks = (ns + VB_PQ_BLOCK - 1) / VB_PQ_BLOCK;
    const size_t row_bytes = dsub * sizeof(float);
    vb_pq_sub_task_t task;
    memset(&task, 0, sizeof(task));
    task.ops = ops;
    task.xs = xs;
    task.ns = ns;
    task.dsub = dsub;
    task.w = w;
    /* Thread start-up costs ~tens of microseconds: only split the k-means++ pass when it is large. */
    size_t kpp_threads = ns * dsub >= (1u << 18) ? nthreads : 1;
    int rc;

    if (init) { /* warm start from given centroids */
        memcpy(cent, init, VB_PQ_KSUB * row_bytes);
    } else { /* k-means++ initialisation */
        for (size_t i = 0; i < ns; i++) {
            w->min_d[i] = INFINITY;
            for (size_t t = 0; t < dsub; t++) w->xt[t * ns + i] = xs[i * dsub + t];
        }
        size_t pick = vb_pq_rng_below(&rng, ns);
        for (size_t c = 0; c < VB_PQ_KSUB; c++) {
            memcpy(cent + c * dsub, xs + pick * dsub, row_bytes);
            if (c + 1 == VB_PQ_KSUB) break;
            task.cent = cent + c * dsub;
            if ((rc = vb_parallel_for(nblocks, kpp_threads, 8, vb_pq_kpp_update_task, &task)) != VB_OK) return rc;
            pick = vb_pq_kpp_pick(w, ns, &rng);
        }
    }

    /* Lloyd iterations. */
    memset(w->assign, 0, ns);
    int reseeded_last = 0;
    for (size_t it = 0; it < iters; it++) {
        for (size_t c = 0; c < VB_PQ_KSUB; c++)
            for (size_t t = 0; t < dsub; t++) w->ct[t * VB_PQ_KSUB + c] = cent[c * dsub + t];
        task.ct = w->ct;
        atomic_store(&task.changed, 0);
        if ((rc = vb_parallel_for(ns, nthreads, 2048, vb_pq_assign_task, &task)) != VB_OK) return rc;
        st->iterations++;
        /* Unchanged assignment: the centroids are already the means of this partition. */
        if (it > 0 && atomic_load(&task.changed) == 0 && !reseeded_last) break;

        memset(w->sums, 0, VB_PQ_KSUB * dsub * sizeof(double));
        memset(w->counts, 0, VB_PQ_KSUB * sizeof(size_t));
        for (size_t i = 0; i < ns; i++) {
            size_t a = w->assign[i];
            w->counts[a]++;
            double *s = w->sums + a * dsub;
            const float *x = xs + i * dsub;
            for (size_t t = 0; t < dsub; t++) s[t] += x[t];
        }
        for (size_t c = 0; c < VB_PQ_KSUB; c++) {
            if (!w->counts[c]) continue;
            double inv = 1.0 / (double)w->counts[c];
            for (size_t t = 0; t < dsub; t++) cent[c * dsub + t] = (float)(w->sums[c * dsub + t] * inv);
        }
        /* Empty clusters take the point farthest from its centroid among clusters of two or more
         * (lowest row on ties): deterministic, no RNG involved. A cluster stays empty only when every
         * remaining point already sits on its centroid. */
        reseeded_last = 0;
        for (size_t c = 0; c < VB_PQ_KSUB; c++) {
            if (w->counts[c]) continue;
            float best = 0.f;
            size_t bi = SIZE_MAX;
            for (size_t i = 0; i < ns; i++)
                if (w->dist[i] > best && w->counts[w->assign[i]] >= 2) {
                    best = w->dist[i];
                    bi = i;
                }
            if (bi == SIZE_MAX) continue;
            memcpy(cent + c * dsub, xs + bi * dsub, row_bytes);
            w->counts[w->assign[bi]]--;
            w->counts[c] = 1;
            w->assign[bi] = (uint8_t)c;
            w->dist[bi] = -1.f; /* taken */
            st->reseeded++;
            reseeded_last = 1;
        }
    }
    double inertia = 0;
    if (iters)
        for (size_t i = 0; i < ns; i++) inertia += w->dist[i] > 0 ? w->dist[i] : 0;
    st->inertia += inertia;
    return VB_OK;
}

typedef struct {
    const vb_pq_ops_t *ops;
    const float *sub; /* (m, ns, dsub) the sample, subspace-major */
    size_t ns, dsub, iters;
    uint64_t seed;
    const float *init;         /* (m, ksub, dsub) warm start, or NULL for k-means++ */
    vb_pq_ws_t *ws;            /* one per worker */
    vb_pq_train_stats_t *stats; /* one per subspace */
    float *codebook;
} vb_pq_train_task_t;

static int vb_pq_train_subspace_task(void *p, size_t tid, size_t b, size_t e) {
    vb_pq_train_task_t *t = (vb_pq_train_task_t *)p;
    for (size_t j = b; j < e; j++) {
        int rc = vb_pq_kmeans_subspace(t->ops, t->sub + j * t->ns * t->dsub, t->ns, t->dsub, t->iters,
                                       vb_pq_rng_stream(t->seed, j + 1),
                                       t->init ? t->init + j * VB_PQ_KSUB * t->dsub : NULL, &t->ws[tid], 1,
                                       t->codebook + j * VB_PQ_KSUB * t->dsub, &t->stats[j]);
        if (rc != VB_OK) return rc;
    }
    return VB_OK;
}

/*
 * Trains a codebook (m, ksub, dsub) on x (n, d).
 *
 * The sample is min(n, sample) rows chosen uniformly without replacement by the seeded RNG
 * (selection sampling, rows kept in increasing order); every row when n <= sample. Each subspace runs
 * k-means++ (or starts from `init`, a (m, ksub, dsub) codebook, when not NULL; it may alias nothing
 * else) and then at most `iters` Lloyd iterations (stopping early when no assignment changes), with
 * its own RNG stream derived from `seed`. With m >= 2 * nthreads the subspaces are spread over
 * the threads; otherwise each subspace's assignment and k-means++ passes are. Either way the result is
 * identical for any nthreads.
 *
 * Errors: VB_EINVAL for a bad shape, n or sample below VB_PQ_MIN_TRAIN, iters above VB_PQ_MAX_ITERS,
 * or a non-finite value in a sampled row (stats->bad_row names it); VB_ENOMEM; VB_ETHREAD.
 * stats may be NULL. Memory: about sample * d * 4 bytes, plus (4 * dsub + 14) bytes per sample row per
 * worker.
 */
static inline int vb_pq_train(const vb_pq_ops_t *ops, const float *restrict x, size_t n, size_t dim, size_t m,
                              size_t iters, uint64_t seed, size_t sample, const float *restrict init,
                              size_t nthreads, float *restrict codebook, vb_pq_train_stats_t *stats) {
    vb_pq_train_stats_t dummy;
    if (!stats) stats = &dummy;
    memset(stats, 0, sizeof(*stats));
    stats->bad_row = SIZE_MAX;
    if (vb_pq_check_shape(dim, m) != VB_OK || n < VB_PQ_MIN_TRAIN || sample < VB_PQ_MIN_TRAIN ||
        iters > VB_PQ_MAX_ITERS)
        return VB_EINVAL;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > VB_MAX_THREADS) nthreads = VB_MAX_THREADS;
    const size_t dsub = dim / m;
    const size_t ns = n < sample ? n : sample;
    size_t sub_floats;
    if (vb_mul_overflow(ns, dim, &sub_floats) || sub_floats > SIZE_MAX / sizeof(float)) return VB_ENOMEM;

    float *sub = (float *)malloc(sub_floats * sizeof(float));
    vb_pq_train_stats_t *per = (vb_pq_train_stats_t *)calloc(m, sizeof(vb_pq_train_stats_t));
    const int outer = m >= 2 * nthreads || nthreads == 1;
    const size_t nws = outer ? nthreads : 1;
    vb_pq_ws_t *ws = (vb_pq_ws_t *)calloc(nws, sizeof(vb_pq_ws_t));
    int rc = VB_OK;
    if (!sub || !per || !ws) {
        rc = VB_ENOMEM;
        goto done;
    }
    for (size_t t = 0; t < nws; t++)
        if ((rc = vb_pq_ws_alloc(&ws[t], ns, dsub)) != VB_OK) goto done;

    /* Draw the sample (Knuth's selection sampling: exactly ns rows, in order) and scatter it
     * subspace-major, checking that every value is finite. */
    {
        vb_pq_rng_t rng = vb_pq_rng_stream(seed, 0);
        size_t taken = 0;
        for (size_t r = 0; r < n && taken < ns; r++) {
            if (ns < n && (double)(n - r) * vb_pq_rng_uniform(&rng) >= (double)(ns - taken)) continue;
            const float *row = x + r * dim;
            for (size_t t = 0; t < dim; t++)
                if (!vb_pq_isfinite_f32(row[t])) {
                    stats->bad_row = r;
                    rc = VB_EINVAL;
                    goto done;
                }
            for (size_t j = 0; j < m; j++)
                memcpy(sub + (j * ns + taken) * dsub, row + j * dsub, dsub * sizeof(float));
            taken++;
        }
        if (taken != ns) { /* cannot happen: selection sampling always completes */
            rc = VB_EINVAL;
            goto done;
        }
    }

    if (outer) {
        vb_pq_train_task_t task = {ops, sub, ns, dsub, iters, seed, init, ws, per, codebook};
        rc = vb_parallel_for(m, nthreads, 1, vb_pq_train_subspace_task, &task);
    } else {
        for (size_t j = 0; j < m && rc == VB_OK; j++)
            rc = vb_pq_kmeans_subspace(ops, sub + j * ns * dsub, ns, dsub, iters, vb_pq_rng_stream(seed, j + 1),
                                       init ? init + j * VB_PQ_KSUB * dsub : NULL, &ws[0], nthreads,
                                       codebook + j * VB_PQ_KSUB * dsub, &per[j]);
    }
    if (rc == VB_OK) {
        stats->rows_used = ns;
        for (size_t j = 0; j < m; j++) {
            stats->iterations += per[j].iterations;
            stats->reseeded += per[j].reseeded;
            stats->inertia += per[j].inertia;
        }
    }
done:
    if (ws)
        for (size_t t = 0; t < nws; t++) vb_pq_ws_free(&ws[t]);
    free(ws);
    free(per);
    free(sub);
    return rc;
}

/* ------------------------------------------------------------------------------------------------
 * Encode / decode.
 */
typedef struct {
    const vb_pq_ops_t *ops;
    const float *codebook, *codebook_t, *x;
    size_t dim, m, dsub;
    uint8_t *codes;
    int pairwise;
} vb_pq_encode_task_t;

/* Points are taken in blocks and each block is swept subspace by subspace, so one subspace's
 * transposed codebook (ksub * dsub floats, 8 KiB for dsub = 8) stays in L1 across the block instead of
 * streaming all m codebooks (ksub * d floats) from L2 for every point. */
#define VB_PQ_ENCODE_BLOCK 64

static int vb_pq_encode_task(void *p, size_t tid, size_t b, size_t e) {
    vb_pq_encode_task_t *t = (vb_pq_encode_task_t *)p;
    (void)tid;
    const size_t dim = t->dim, m = t->m, dsub = t->dsub, csz = VB_PQ_KSUB * dsub;
    float dist;
    for (size_t i0 = b; i0 < e; i0 += VB_PQ_ENCODE_BLOCK) {
        const size_t i1 = e - i0 < VB_PQ_ENCODE_BLOCK ? e : i0 + VB_PQ_ENCODE_BLOCK;
        for (size_t j = 0; j < m; j++) {
            const float *xj = t->x + j * dsub;
            uint8_t *cj = t->codes + j;
            if (t->pairwise) {
                const float *cb = t->codebook + j * csz;
                for (size_t i = i0; i < i1; i++)
                    cj[i * m] = (uint8_t)vb_pq_nearest_pairwise(t->ops->dist, xj + i * dim, cb, dsub, &dist);
            } else {
                const float *cb = t->codebook_t + j * csz;
                vb_pq_nearest_fn nearest = t->ops->nearest;
                for (size_t i = i0; i < i1; i++) cj[i * m] = (uint8_t)nearest(xj + i * dim, cb, dsub, &dist);
            }
        }
    }
    return VB_OK;
}

/*
 * codes (n, m) = nearest centroid per subspace of each row of x (n, d), by squared L2, lowest index on
 * ties (a NaN subvector encodes to 0). pairwise = 1 uses one distance-ops call per centroid instead of
 * the blocked kernel (benchmarks only). Allocates a transposed codebook (ksub * d floats) per call.
 * Errors: VB_EINVAL (shape), VB_ENOMEM, VB_ETHREAD.
 */
static inline int vb_pq_encode(const vb_pq_ops_t *ops, const float *restrict codebook, size_t dim, size_t m,
                               const float *restrict x, size_t n, uint8_t *restrict codes, size_t nthreads,
                               int pairwise) {
    if (vb_pq_check_shape(dim, m) != VB_OK) return VB_EINVAL;
    if (n == 0) return VB_OK;
    float *ct = (float *)malloc(VB_PQ_KSUB * dim * sizeof(float));
    if (!ct) return VB_ENOMEM;
    vb_pq_transpose(codebook, dim, m, ct);
    vb_pq_encode_task_t t = {ops, codebook, ct, x, dim, m, dim / m, codes, pairwise};
    int rc = vb_parallel_for(n, nthreads, 512, vb_pq_encode_task, &t);
    free(ct);
    return rc;
}

/* out (n, d) = concatenated centroids of each row of codes (n, m). Cannot fail for valid shapes. */
static inline void vb_pq_decode(const float *restrict codebook, size_t dim, size_t m,
                                const uint8_t *restrict codes, size_t n, float *restrict out) {
    const size_t dsub = dim / m;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < m; j++)
            memcpy(out + i * dim + j * dsub, codebook + (j * VB_PQ_KSUB + codes[i * m + j]) * dsub,
                   dsub * sizeof(float));
}

/* ------------------------------------------------------------------------------------------------
 * ADC table and scan.
 */

/* table (m, ksub): metric 0 = inner product dot(q_j, centroid), 1 = squared L2. q has d floats. */
static inline void vb_pq_adc_table(const vb_pq_ops_t *ops, int metric, const float *restrict codebook, size_t dim,
                                   size_t m, const float *restrict q, float *restrict table) {
    const size_t dsub = dim / m;
    vb_ny_fn fn = metric == 0 ? ops->dist->dot_ny : ops->dist->l2sq_ny;
    for (size_t j = 0; j < m; j++)
        fn(table + j * VB_PQ_KSUB, q + j * dsub, codebook + j * VB_PQ_KSUB * dsub, dsub, VB_PQ_KSUB);
}

/* A worker's top-k: a bounded max-heap (heap.h) of (-score, row), its worst kept hit at [0]. Better =
 * higher score, then lower row. NaN scores are kept as -inf (key +inf). */
typedef struct {
    vb_pair_t *top;
    size_t n;
} vb_pq_topk_t;

static inline void vb_pq_offer(vb_pq_topk_t *t, size_t k, float s, size_t row) {
    vb_pair_t p = {s == s ? -s : INFINITY, (uint32_t)row};
    vb_topk_offer(t->top, &t->n, k, p);
}

typedef struct {
    const vb_pq_ops_t *ops;
    const float *table;
    const uint8_t *planes; /* byte planes of table when ops->needs_planes, else NULL */
    size_t m, k;
    const uint8_t *codes, *allowed;
    vb_pq_topk_t *heaps; /* one per worker */
} vb_pq_scan_task_t;

#define VB_PQ_SCAN_BLOCK 256 /* rows scored per kernel call */

/* Counts the nonzero bytes of a bool mask. */
static inline size_t vb_pq_count_true(const uint8_t *restrict a, size_t n) {
    size_t c = 0;
    for (size_t i = 0; i < n; i++) c += a[i] != 0;
    return c;
}

static int vb_pq_scan_task(void *p, size_t tid, size_t b, size_t e) {
    vb_pq_scan_task_t *t = (vb_pq_scan_task_t *)p;
    vb_pq_topk_t *h = &t->heaps[tid];
    const size_t m = t->m, k = t->k;
    float sc[VB_PQ_SCAN_BLOCK];
    for (size_t i0 = b; i0 < e; i0 += VB_PQ_SCAN_BLOCK) {
        const size_t nb = e - i0 < VB_PQ_SCAN_BLOCK ? e - i0 : VB_PQ_SCAN_BLOCK;
        const uint8_t *codes = t->codes + i0 * m;
        if (t->allowed) {
            const uint8_t *al = t->allowed + i0;
            size_t na = vb_pq_count_true(al, nb);
            if (na == 0) continue;
            if (na * 8 < nb) { /* sparse: score only the allowed rows (same sums as the kernels) */
                for (size_t r = 0; r < nb; r++)
                    if (al[r]) vb_pq_offer(h, k, vb_pq_score_row(t->table, m, codes + r * m), i0 + r);
                continue;
            }
            t->ops->scores(sc, t->table, t->planes, m, codes, nb);
            for (size_t r = 0; r < nb; r++)
                if (al[r]) vb_pq_offer(h, k, sc[r], i0 + r);
            continue;
        }
        t->ops->scores(sc, t->table, t->planes, m, codes, nb);
        size_t r = 0;
        for (; r < nb && h->n < k; r++) vb_pq_offer(h, k, sc[r], i0 + r);
        /* Full: rows arrive in increasing order, so a score equal to the worst kept one never enters
         * and the strict > test is exact. */
        float thr = h->n ? -h->top[0].d : -INFINITY;
        for (; r < nb; r++)
            if (sc[r] > thr) {
                vb_pq_offer(h, k, sc[r], i0 + r);
                thr = -h->top[0].d;
            }
    }
    return VB_OK;
}

/* out[i] = ADC score of row i of codes (n, m), every row (the lookup-accumulate kernel alone; tests
 * and benchmarks). Errors: VB_EINVAL (m == 0 or m > VB_PQ_MAX_DIM), VB_ENOMEM. */
static inline int vb_pq_adc_scores(const vb_pq_ops_t *ops, const float *restrict table, size_t m,
                                   const uint8_t *restrict codes, size_t n, float *restrict out) {
    if (m == 0 || m > VB_PQ_MAX_DIM) return VB_EINVAL;
    uint8_t *planes = NULL;
    if (ops->needs_planes) {
        if (!(planes = (uint8_t *)malloc(m * VB_PQ_PLANE_BYTES))) return VB_ENOMEM;
        vb_pq_table_planes(planes, table, m);
    }
    ops->scores(out, table, planes, m, codes, n);
    free(planes);
    return VB_OK;
}

/*
 * Top-k ADC scan: scores every row i of codes (n, m) (only rows with allowed[i] != 0 when allowed is
 * not NULL) as sum_j table[j*ksub + codes[i*m + j]] and writes the k' = min(k, eligible rows) best to
 * out_rows / out_scores (capacity min(k, n) each), highest score first, lower row first on equal
 * scores; *out_k = k'. codes may be read-only (an mmap view). The result is independent of nthreads.
 * Errors: VB_EINVAL (k == 0, m == 0, or n above VB_PQ_MAX_SCAN_ROWS), VB_ENOMEM, VB_ETHREAD.
 */
static inline int vb_pq_adc_scan(const vb_pq_ops_t *ops, const float *restrict table, size_t m,
                                 const uint8_t *restrict codes, size_t n, const uint8_t *restrict allowed, size_t k,
                                 size_t nthreads, int64_t *restrict out_rows, float *restrict out_scores,
                                 size_t *out_k) {
    *out_k = 0;
    if (k == 0 || m == 0) return VB_EINVAL;
    if (n == 0) return VB_OK;
    if (m > VB_PQ_MAX_DIM || n > VB_PQ_MAX_SCAN_ROWS) return VB_EINVAL;
    const size_t cap = k < n ? k : n;
    const size_t grain = 16 * VB_PQ_SCAN_BLOCK;
    if (nthreads < 1) nthreads = 1;
    size_t useful = (n + grain - 1) / grain;
    if (nthreads > useful) nthreads = useful;
    if (nthreads > VB_MAX_THREADS) nthreads = VB_MAX_THREADS;
    size_t total;
    if (vb_mul_overflow(cap, nthreads, &total) || total > SIZE_MAX / sizeof(vb_pair_t)) return VB_ENOMEM;

    vb_pq_topk_t *heaps = (vb_pq_topk_t *)calloc(nthreads, sizeof(vb_pq_topk_t));
    vb_pair_t *pairs = (vb_pair_t *)malloc(total * sizeof(vb_pair_t));
    uint8_t *planes = ops->needs_planes ? (uint8_t *)malloc(m * VB_PQ_PLANE_BYTES) : NULL;
    vb_pq_scan_task_t task = {ops, table, planes, m, cap, codes, allowed, heaps};
    size_t got = 0, kk;
    int rc = VB_OK;
    if (!heaps || !pairs || (ops->needs_planes && !planes)) {
        rc = VB_ENOMEM;
        goto done;
    }
    if (planes) vb_pq_table_planes(planes, table, m);
    for (size_t t = 0; t < nthreads; t++) heaps[t].top = pairs + t * cap;
    if ((rc = vb_parallel_for(n, nthreads, grain, vb_pq_scan_task, &task)) != VB_OK) goto done;

    /* Merge: pack every worker's hits to the front of `pairs` and sort them in the heap order. */
    for (size_t t = 0; t < nthreads; t++) {
        memmove(pairs + got, heaps[t].top, heaps[t].n * sizeof(vb_pair_t));
        got += heaps[t].n;
    }
    qsort(pairs, got, sizeof(vb_pair_t), vb_pair_cmp);
    kk = got < cap ? got : cap;
    for (size_t i = 0; i < kk; i++) {
        out_rows[i] = pairs[i].id;
        out_scores[i] = -pairs[i].d;
    }
    *out_k = kk;
done:
    free(planes);
    free(pairs);
    free(heaps);
    return rc;
}

/* ------------------------------------------------------------------------------------------------
 * Serialisation. Little-endian, fixed layout:
 *
 *   offset  size  field
 *        0     4  magic "VBPQ"
 *        4     4  u32 format version (1)
 *        8     4  u32 dim             1 <= dim <= VB_PQ_MAX_DIM
 *       12     4  u32 m               1 <= m <= dim, dim % m == 0
 *       16     4  u32 nbits           8
 *       20     4  u32 ksub            256 (= 1 << nbits)
 *       24     8  u64 payload bytes   = ksub * dim * 4
 *       32     P  float32 codebook, layout (m, ksub, dsub), every value finite
 *   32 + P     4  u32 CRC32C of bytes [0, 32 + P)
 *
 * The total length must be exactly 36 + P: a parser never trusts a length it has not compared with
 * the buffer, so no allocation is ever larger than the input.
 */
#define VB_PQ_MAGIC "VBPQ"
#define VB_PQ_VERSION 1u
#define VB_PQ_HEADER_BYTES 32u

typedef struct {
    uint32_t version, dim, m, nbits, ksub;
    uint64_t payload_bytes;
    const uint8_t *payload; /* points into the parsed buffer (unaligned: copy with memcpy) */
} vb_pq_header_t;

/* Bytes needed to serialise a codebook of dimension dim (0 if dim is out of range). */
static inline size_t vb_pq_serialized_bytes(size_t dim) {
    if (dim == 0 || dim > VB_PQ_MAX_DIM) return 0;
    return VB_PQ_HEADER_BYTES + (size_t)VB_PQ_KSUB * dim * sizeof(float) + 4;
}

/* Writes the codebook (m, ksub, dsub) into out (exactly vb_pq_serialized_bytes(dim) bytes). Float
 * bytes are copied as-is: little-endian hosts only, as everywhere in Vibrato. vb_crc32c_init() must
 * have run. */
static inline int vb_pq_serialize(uint8_t *restrict out, size_t out_len, size_t dim, size_t m,
                                  const float *restrict codebook) {
    if (vb_pq_check_shape(dim, m) != VB_OK || out_len != vb_pq_serialized_bytes(dim)) return VB_EINVAL;
    size_t payload = (size_t)VB_PQ_KSUB * dim * sizeof(float);
    memcpy(out, VB_PQ_MAGIC, 4);
    vb_store_le32(out + 4, VB_PQ_VERSION);
    vb_store_le32(out + 8, (uint32_t)dim);
    vb_store_le32(out + 12, (uint32_t)m);
    vb_store_le32(out + 16, VB_PQ_NBITS);
    vb_store_le32(out + 20, VB_PQ_KSUB);
    vb_store_le64(out + 24, (uint64_t)payload);
    memcpy(out + VB_PQ_HEADER_BYTES, codebook, payload);
    vb_store_le32(out + VB_PQ_HEADER_BYTES + payload, vb_crc32c(0, out, VB_PQ_HEADER_BYTES + payload));
    return VB_OK;
}

/*
 * Validates an untrusted serialised codebook. On success fills *hdr (payload points into buf) and
 * returns VB_OK; otherwise returns VB_ECORRUPT and sets *why to a static message. Every field is
 * range-checked before it is used in arithmetic, the length must match exactly, the CRC must match,
 * and every float must be finite. Reads only [buf, buf + len).
 */
static inline int vb_pq_parse(const uint8_t *restrict buf, size_t len, vb_pq_header_t *hdr, const char **why) {
    static const char *msg_short = "buffer is shorter than the 32-byte PQ header";
    memset(hdr, 0, sizeof(*hdr));
    *why = NULL;
#define VB_PQ_FAIL(m)                                                                                 \
    do {                                                                                              \
        *why = (m);                                                                                   \
        return VB_ECORRUPT;                                                                           \
    } while (0)
    if (!buf || len < VB_PQ_HEADER_BYTES) VB_PQ_FAIL(msg_short);
    if (memcmp(buf, VB_PQ_MAGIC, 4) != 0) VB_PQ_FAIL("bad magic: not a Vibrato PQ codebook");
    hdr->version = vb_load_le32(buf + 4);
    hdr->dim = vb_load_le32(buf + 8);
    hdr->m = vb_load_le32(buf + 12);
    hdr->nbits = vb_load_le32(buf + 16);
    hdr->ksub = vb_load_le32(buf + 20);
    hdr->payload_bytes = vb_load_le64(buf + 24);
    if (hdr->version != VB_PQ_VERSION) VB_PQ_FAIL("unsupported PQ format version");
    if (hdr->nbits != VB_PQ_NBITS) VB_PQ_FAIL("unsupported nbits (only 8 is supported)");
    if (hdr->ksub != VB_PQ_KSUB) VB_PQ_FAIL("ksub does not match nbits (expected 256)");
    if (hdr->dim == 0 || hdr->dim > VB_PQ_MAX_DIM) VB_PQ_FAIL("dim out of range [1, 65536]");
    if (hdr->m == 0 || hdr->m > hdr->dim) VB_PQ_FAIL("m out of range [1, dim]");
    if (hdr->dim % hdr->m != 0) VB_PQ_FAIL("m does not divide dim");
    const uint64_t want_payload = (uint64_t)VB_PQ_KSUB * hdr->dim * sizeof(float);
    if (hdr->payload_bytes != want_payload) VB_PQ_FAIL("payload length does not match ksub * dim * 4");
    if (len != vb_pq_serialized_bytes(hdr->dim)) VB_PQ_FAIL("buffer length does not match the header (truncated or trailing bytes)");
    const size_t payload = (size_t)want_payload;
    uint32_t crc = vb_crc32c(0, buf, VB_PQ_HEADER_BYTES + payload);
    if (crc != vb_load_le32(buf + VB_PQ_HEADER_BYTES + payload)) VB_PQ_FAIL("checksum mismatch (CRC32C)");
    const uint8_t *p = buf + VB_PQ_HEADER_BYTES;
    for (size_t i = 0; i < payload; i += 4)
        if ((vb_load_le32(p + i) & 0x7F800000u) == 0x7F800000u) VB_PQ_FAIL("codebook contains a non-finite value");
    hdr->payload = p;
    return VB_OK;
#undef VB_PQ_FAIL
}
