/*
 * HNSW graph index for maximum inner product search over float32 vectors.
 *
 * Algorithm: Malkov & Yashunin, "Efficient and robust approximate nearest neighbor search using
 * Hierarchical Navigable Small World graphs" (https://arxiv.org/abs/1603.09320), laid out the way
 * hnswlib does it (https://github.com/nmslib/hnswlib/blob/master/hnswlib/hnswalg.h):
 *   - levels drawn as floor(-ln(U) / ln(M)), clamped to VB_HNSW_MAX_LEVEL;
 *   - M links per node on upper layers, M0 = 2M on layer 0;
 *   - neighbours chosen by the diversity heuristic (hnswlib's getNeighborsByHeuristic2);
 *   - greedy descent on the upper layers, beam search with ef on layer 0.
 * Score = inner product of the raw vectors (no normalisation); internally a distance d = -dot is
 * minimised, so "smaller is closer" everywhere in this file.
 *
 * Layout (all flat, internal ids are dense uint32 rows 0..n-1 in insertion order):
 *   x         (n, d) float32 row-major; owned (x_owned) or borrowed read-only (e.g. an mmap)
 *   links0    (cap, 1 + M0) uint32: links0[r*(1+M0)] = count, then count neighbour rows
 *   levels    (cap,) uint8 top level of each node
 *   up_links  (up_len,) uint32 blocks of (1 + M): count, then neighbour rows; node r's blocks (levels
 *             1..levels[r]) follow those of rows 0..r-1, so its offset is a prefix sum of the levels
 *   up_base   (cap/64 + 1,) uint64: that offset for every 64th row; the rest is summed from levels
 *             (<= 63 bytes, only on upper layers) instead of an 8-byte offset per row
 * links0, levels and up_links are owned, or borrowed read-only from a serialised graph (a segment
 * file's mapped section, so the graph stays file-backed memory: graph_borrowed); an add copies them
 * into owned memory first.
 * A node on level l >= 1 has a block there, and every neighbour listed on level l is itself on
 * level >= l (guaranteed by construction and checked when a graph is loaded), so searches never
 * bounds-check.
 *
 * Thread-safety: searches (vb_hnsw_search) only read the graph and may run from
 * any number of threads at once; each takes its scratch (visited list + heaps) from a mutex-guarded
 * pool. vb_hnsw_add must not run concurrently with anything else on the same index (the Python
 * wrapper enforces it); internally it may insert with several threads, using one spinlock per node
 * as hnswlib does with link_list_locks_: other nodes' lists are copied or rewritten under their
 * lock, and a node being inserted stays locked until it is linked on all its levels (see
 * vb_hnsw_insert).
 *
 * Errors: functions that can fail return VB_OK or a negative VB_E* code and never abort. Loaders of
 * untrusted bytes write a message (what failed, the bad value, the limit) into a caller buffer.
 */
#pragma once

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "vibrato/common.h"
#include "vibrato/crc32c.h"
#if defined(__x86_64__) && defined(__SSE2__)
#include <emmintrin.h>
#endif
#include "vibrato/distance.h"
#include "vibrato/heap.h"
#include "vibrato/parallel.h"
#include "vibrato/visited.h"

#define VB_HNSW_MAX_LEVEL 16          /* levels are clamped to this (a level of 16 needs M^16 nodes) */
#define VB_HNSW_MAX_DIM 4096
#define VB_HNSW_MAX_M 1024            /* M0 = 2M <= 2048 */
#define VB_HNSW_MAX_EF 65536          /* ef, ef_construction and k */
#define VB_HNSW_MAX_N 0xFFFFFFF0u     /* internal ids are uint32; 0xFFFFFFFF is "none" */
#define VB_HNSW_NONE 0xFFFFFFFFu

/* Search strategy override (tests and benchmarks); VB_HNSW_AUTO picks by the cost model below. */
#define VB_HNSW_AUTO 0
#define VB_HNSW_FORCE_GRAPH 1
#define VB_HNSW_FORCE_SCAN 2

/* ---------------------------------------------------------------------------------------------
 * Per-search scratch (one per thread at a time, from the index's pool).
 * ------------------------------------------------------------------------------------------- */

typedef struct vb_hnsw_ctx {
    vb_visited_t vis;
    vb_pair_t *cand; /* (cand_cap,) min-heap of candidates to expand */
    size_t cand_cap;
    vb_pair_t *top; /* (top_cap,) max-heap of the best results so far */
    size_t top_cap;
    vb_pair_t *sel; /* (sel_cap,) heuristic input, sorted ascending */
    vb_pair_t *out; /* (sel_cap,) heuristic output */
    size_t sel_cap;
    uint32_t *ids; /* (buf_cap,) row buffer: copied link lists, scan blocks */
    float *dist;   /* (buf_cap,) distance buffer for scan blocks */
    size_t buf_cap;
    int16_t q16[VB_HNSW_MAX_DIM]; /* the query for the int8 kernels (vb_sq8_query) */
} vb_hnsw_ctx_t;

static void *vb_hnsw_ctx_create(void) {
    vb_hnsw_ctx_t *c = (vb_hnsw_ctx_t *)calloc(1, sizeof(vb_hnsw_ctx_t));
    if (c) vb_visited_init(&c->vis);
    return c;
}

static void vb_hnsw_ctx_destroy(void *p) {
    vb_hnsw_ctx_t *c = (vb_hnsw_ctx_t *)p;
    if (!c) return;
    vb_visited_free(&c->vis);
    free(c->cand);
    free(c->top);
    free(c->sel);
    free(c->out);
    free(c->ids);
    free(c->dist);
    free(c);
}

static inline int vb_grow_pairs(vb_pair_t **p, size_t *cap, size_t want) {
    if (want <= *cap) return VB_OK;
    size_t bytes;
    if (vb_mul_overflow(want, sizeof(vb_pair_t), &bytes)) return VB_ENOMEM;
    vb_pair_t *q = (vb_pair_t *)realloc(*p, bytes);
    if (!q) return VB_ENOMEM;
    *p = q;
    *cap = want;
    return VB_OK;
}

#define VB_HNSW_SCAN_BLOCK 256 /* rows scored per kernel call in exact scans */
#ifndef VB_HNSW_DENSE_DIV
#define VB_HNSW_DENSE_DIV 4 /* a scan block with >= 1/4 of its rows allowed is scored contiguously */
#endif

/*
 * Size the scratch for n nodes, a beam of ef, link lists of up to m0 entries. The candidate heap
 * holds 2*ef + 2*m0 + 16; when it fills up, entries that can no longer be expanded are dropped
 * (vb_hnsw_cand_make_room), so a search without a filter never allocates after this call.
 */
static inline int vb_hnsw_ctx_reserve(vb_hnsw_ctx_t *c, size_t n, size_t ef, size_t m0) {
    if (vb_visited_reserve(&c->vis, n)) return VB_ENOMEM;
    size_t cand = 2 * ef + 2 * m0 + 16;
    if (vb_grow_pairs(&c->cand, &c->cand_cap, cand)) return VB_ENOMEM;
    if (vb_grow_pairs(&c->top, &c->top_cap, ef + 2)) return VB_ENOMEM;
    size_t sel = (ef > m0 ? ef : m0) + 2;
    size_t sel_cap = c->sel_cap;
    if (vb_grow_pairs(&c->sel, &sel_cap, sel)) return VB_ENOMEM;
    sel_cap = c->sel_cap;
    if (vb_grow_pairs(&c->out, &sel_cap, sel)) return VB_ENOMEM;
    c->sel_cap = sel_cap;
    size_t buf = m0 + 1 > VB_HNSW_SCAN_BLOCK ? m0 + 1 : VB_HNSW_SCAN_BLOCK;
    if (buf > c->buf_cap) {
        uint32_t *ids = (uint32_t *)realloc(c->ids, buf * sizeof(uint32_t));
        if (!ids) return VB_ENOMEM;
        c->ids = ids;
        float *dist = (float *)realloc(c->dist, buf * sizeof(float));
        if (!dist) return VB_ENOMEM;
        c->dist = dist;
        c->buf_cap = buf;
    }
    return VB_OK;
}

/*
 * The candidate heap is full: drop entries that cannot be expanded any more (d > worst, with the
 * result heap full, so the search would stop before reaching them). Without a filter every
 * candidate with d <= worst is also in the result heap, so at most ef + ties survive. With a
 * filter, disallowed candidates are not in the result heap and the heap may have to grow.
 */
static inline int vb_hnsw_cand_make_room(vb_hnsw_ctx_t *c, size_t *ncand, float worst, int full) {
    if (full) {
        size_t m = 0;
        for (size_t i = 0; i < *ncand; i++)
            if (c->cand[i].d <= worst) c->cand[m++] = c->cand[i];
        vb_minheap_heapify(c->cand, m);
        *ncand = m;
    }
    if (*ncand + 1 < c->cand_cap - c->cand_cap / 4) return VB_OK;
    return vb_grow_pairs(&c->cand, &c->cand_cap, c->cand_cap * 2);
}

/* ---------------------------------------------------------------------------------------------
 * The index.
 * ------------------------------------------------------------------------------------------- */

typedef struct vb_hnsw {
    /* parameters, fixed at init */
    size_t d;               /* dimension, 1..VB_HNSW_MAX_DIM */
    size_t M, M0;           /* max links on upper layers / layer 0 (M0 = 2M) */
    size_t ef_construction; /* beam width while inserting */
    double ml;              /* level multiplier 1/ln(M) */
    uint64_t rng;           /* splitmix64 state for level draws (advanced only by vb_hnsw_add) */

    /* graph; n rows are searchable, cap rows are allocated */
    size_t n, cap;
    const float *x;     /* (n, d): == x_owned, or a borrowed read-only array (never written) */
    float *x_owned;     /* (cap, d) or NULL when x is borrowed */
    uint32_t *links0;   /* (cap, 1 + M0) */
    uint8_t *levels;    /* (cap,) */
    uint64_t *up_base;  /* (cap / 64 + 1,) offset in up_links of rows 0, 64, 128, ... */
    uint32_t *up_links; /* (up_cap,) */
    int graph_borrowed; /* links0, levels and up_links point into the caller's graph bytes
                           (vb_hnsw_graph_read_checked) and are never written */
    size_t up_len, up_cap;
    uint32_t entry; /* entry point row, VB_HNSW_NONE while empty */
    int max_level;  /* level of the entry point */

    /* insertion */
    atomic_uchar *locks;   /* (cap,) one spinlock per node, used only by add (NULL while borrowed) */
    pthread_mutex_t ep_mu; /* guards entry/max_level during multi-threaded add */

    vb_pool_t pool; /* vb_hnsw_ctx_t scratch objects */

    /* int8 codes of the n rows (vb_hnsw_sq8_build): NULL until built, then published once and read
     * by exact scans and graph walks; dropped by vb_hnsw_add and vb_hnsw_free, which run alone */
    _Atomic(struct vb_hnsw_sq8 *) sq8;

    /* counters (relaxed atomics; for benchmarks and tests) */
    atomic_size_t n_graph, n_scan, n_fallback, n_dist, n_sq8, n_sq8_walk;
    atomic_uint rescore_ns; /* moving average of the ns an exact rescore of a beam row takes (adc walks) */
} vb_hnsw_t;

/* Scalar-quantised copy of the vectors (vb_sq8_encode): built into one anonymous mapping (scale
 * then codes; bytes > 0), or borrowed from a caller, e.g. a segment's mapped file (bytes == 0). */
typedef struct vb_hnsw_sq8 {
    const float *scale;  /* (n,) */
    const int8_t *codes; /* (n, d) */
    size_t n, bytes;
} vb_hnsw_sq8_t;

static inline const float *vb_hnsw_vec(const vb_hnsw_t *h, uint32_t r) { return h->x + (size_t)r * h->d; }

/* Offset in up_links of row r's level-1 block: its 64-row block's base plus the levels before it. */
static inline size_t vb_hnsw_up_off(const vb_hnsw_t *h, uint32_t r) {
    const uint8_t *lv = h->levels + (r & ~(uint32_t)63);
    unsigned s = 0;
    for (uint32_t i = 0; i < (r & 63u); i++) s += lv[i];
    return h->up_base[r >> 6] + (size_t)s * (1 + h->M);
}

static inline uint32_t *vb_hnsw_list(const vb_hnsw_t *h, uint32_t r, int level) {
    if (level == 0) return h->links0 + (size_t)r * (1 + h->M0);
    return h->up_links + vb_hnsw_up_off(h, r) + (size_t)(level - 1) * (1 + h->M);
}

static inline void vb_hnsw_lock(vb_hnsw_t *h, uint32_t r) {
    unsigned spins = 0;
    while (atomic_exchange_explicit(&h->locks[r], 1, memory_order_acquire)) {
        while (atomic_load_explicit(&h->locks[r], memory_order_relaxed))
            if (++spins % 64 == 0) sched_yield(); /* the holder may have been descheduled */
    }
}

static inline void vb_hnsw_unlock(vb_hnsw_t *h, uint32_t r) {
    atomic_store_explicit(&h->locks[r], 0, memory_order_release);
}

#ifndef VB_HNSW_PREFETCH_TAGS
#define VB_HNSW_PREFETCH_TAGS 1 /* prefetch the visited tags of the next candidate's neighbours */
#endif
#ifndef VB_HNSW_PREFETCH_ROWS
#define VB_HNSW_PREFETCH_ROWS 4 /* rows prefetched ahead while scoring a node's neighbours */
#endif

/* Prefetch a whole vector (up to 1 KiB of it). */
static inline void vb_hnsw_prefetch_vec(const float *p, size_t d) {
    const char *c = (const char *)p;
    size_t bytes = d * sizeof(float);
    if (bytes > 1024) bytes = 1024;
    for (size_t o = 0; o < bytes; o += 64) VB_PREFETCH(c + o);
}

static inline int vb_hnsw_check_params(size_t d, size_t M, size_t efc) {
    if (d < 1 || d > VB_HNSW_MAX_DIM) return VB_EINVAL;
    if (M < 2 || M > VB_HNSW_MAX_M) return VB_EINVAL;
    if (efc < 1 || efc > VB_HNSW_MAX_EF) return VB_EINVAL;
    return VB_OK;
}

/* Initialise an empty index. On failure h needs no vb_hnsw_free. */
static inline int vb_hnsw_init(vb_hnsw_t *h, size_t d, size_t M, size_t efc, uint64_t seed) {
    memset(h, 0, sizeof(*h));
    if (vb_hnsw_check_params(d, M, efc)) return VB_EINVAL;
    h->d = d;
    h->M = M;
    h->M0 = 2 * M;
    h->ef_construction = efc;
    h->ml = 1.0 / log((double)M);
    h->rng = seed;
    h->entry = VB_HNSW_NONE;
    h->max_level = 0;
    atomic_init(&h->n_graph, 0);
    atomic_init(&h->n_scan, 0);
    atomic_init(&h->n_fallback, 0);
    atomic_init(&h->n_dist, 0);
    atomic_init(&h->n_sq8, 0);
    atomic_init(&h->n_sq8_walk, 0);
    atomic_init(&h->sq8, NULL);
    atomic_init(&h->rescore_ns, 0);
    if (pthread_mutex_init(&h->ep_mu, NULL)) return VB_ENOMEM;
    if (vb_pool_init(&h->pool, vb_hnsw_ctx_create, vb_hnsw_ctx_destroy)) {
        pthread_mutex_destroy(&h->ep_mu);
        return VB_ENOMEM;
    }
    return VB_OK;
}

/* Drop the scan codes (no search may be running). */
static inline void vb_hnsw_sq8_drop(vb_hnsw_t *h) {
    vb_hnsw_sq8_t *s = atomic_exchange_explicit(&h->sq8, NULL, memory_order_acq_rel);
    if (!s) return;
    if (s->bytes) munmap((void *)s->scale, s->bytes);
    free(s);
}

/*
 * Build the int8 scan codes of the current rows (d + 4 bytes per row, in RAM; a no-op once built).
 * Safe while searches run: the codes are published with one atomic store, and a concurrent second
 * build frees its own copy. Must not overlap vb_hnsw_add.
 */
static inline int vb_hnsw_sq8_build(vb_hnsw_t *h) {
    if (atomic_load_explicit(&h->sq8, memory_order_acquire) || h->n == 0) return VB_OK;
    size_t n = h->n, d = h->d, bytes;
    if (vb_mul_overflow(n, d + sizeof(float), &bytes)) return VB_ENOMEM;
    vb_hnsw_sq8_t *s = (vb_hnsw_sq8_t *)calloc(1, sizeof(*s));
    if (!s) return VB_ENOMEM;
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        free(s);
        return VB_ENOMEM;
    }
#ifdef MADV_HUGEPAGE
    /* A filtered scan reads scattered rows: on 4 KiB pages nearly each one is a TLB miss (a 10%
     * filter over 100k x 128 scanned at 16 ns per row, 11 ns with huge pages). A hint only. */
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    s->scale = (const float *)p;
    s->codes = (const int8_t *)p + n * sizeof(float);
    s->n = n;
    s->bytes = bytes;
    vb_sq8_encode(h->x, n, d, (int8_t *)p + n * sizeof(float), (float *)p);
    vb_hnsw_sq8_t *none = NULL;
    if (!atomic_compare_exchange_strong_explicit(&h->sq8, &none, s, memory_order_acq_rel, memory_order_acquire)) {
        munmap(p, bytes);
        free(s);
    }
    return VB_OK;
}

/*
 * Use the caller's scan codes of the current rows, codes (n, d) and scale (n,) as vb_sq8_encode
 * writes them, read in place and never written or freed: the caller keeps them alive as long as
 * the index (hnsw.pyx holds a reference). scale must be finite and >= 0 (segment.h checks a file's);
 * any int8 code is in range for the kernels (vb_sq8_query). VB_EINVAL if codes exist already or n
 * does not match. Same concurrency rules as vb_hnsw_sq8_build.
 */
static inline int vb_hnsw_sq8_attach(vb_hnsw_t *h, const int8_t *codes, const float *scale, size_t n) {
    if (n != h->n || n == 0 || !codes || !scale) return VB_EINVAL;
    vb_hnsw_sq8_t *s = (vb_hnsw_sq8_t *)calloc(1, sizeof(*s));
    if (!s) return VB_ENOMEM;
    s->scale = scale;
    s->codes = codes;
    s->n = n;
    vb_hnsw_sq8_t *none = NULL;
    if (!atomic_compare_exchange_strong_explicit(&h->sq8, &none, s, memory_order_acq_rel, memory_order_acquire)) {
        free(s);
        return VB_EINVAL;
    }
    return VB_OK;
}

/* Whether the scan codes are built (for every current row). */
static inline int vb_hnsw_has_sq8(const vb_hnsw_t *h) {
    vb_hnsw_sq8_t *s = atomic_load_explicit(&((vb_hnsw_t *)h)->sq8, memory_order_acquire);
    return s != NULL && s->n == h->n;
}

/* Free everything the index owns (a borrowed x is left alone). No search may be running. */
static inline void vb_hnsw_free(vb_hnsw_t *h) {
    vb_hnsw_sq8_drop(h);
    free(h->x_owned);
    if (!h->graph_borrowed) {
        free(h->links0);
        free(h->levels);
        free(h->up_links);
    }
    free(h->up_base);
    free((void *)h->locks);
    vb_pool_destroy(&h->pool);
    pthread_mutex_destroy(&h->ep_mu);
    memset(h, 0, sizeof(*h));
    h->entry = VB_HNSW_NONE;
}

static inline int vb_realloc_n(void **p, size_t n, size_t size) {
    size_t bytes;
    if (vb_mul_overflow(n, size, &bytes)) return VB_ENOMEM;
    void *q = realloc(*p, bytes ? bytes : 1);
    if (!q) return VB_ENOMEM;
    *p = q;
    return VB_OK;
}

/*
 * Make room for `want` rows. A borrowed x is copied into an owned buffer first (adding to an index
 * over a read-only array copies it once). Existing rows are kept; new link rows are zeroed.
 */
static inline int vb_hnsw_reserve(vb_hnsw_t *h, size_t want) {
    if (want <= h->cap && h->x_owned && !h->graph_borrowed) return VB_OK;
    size_t cap = h->cap > want ? h->cap : want;
    if (want > h->cap) {
        size_t grown = h->cap + h->cap / 2;
        if (grown > cap) cap = grown;
        if (cap < 64) cap = 64;
        if (cap > VB_HNSW_MAX_N) cap = VB_HNSW_MAX_N;
    }
    size_t stride0 = 1 + h->M0, xsz;
    if (vb_mul_overflow(cap, h->d, &xsz)) return VB_ENOMEM;
    if (!h->x_owned) {
        float *xo = NULL;
        if (vb_realloc_n((void **)&xo, xsz, sizeof(float))) return VB_ENOMEM;
        if (h->n) memcpy(xo, h->x, h->n * h->d * sizeof(float));
        h->x_owned = xo;
        h->x = xo;
    } else if (cap > h->cap) {
        if (vb_realloc_n((void **)&h->x_owned, xsz, sizeof(float))) return VB_ENOMEM;
        h->x = h->x_owned;
    }
    if (h->graph_borrowed) { /* into owned memory before anything is written */
        uint32_t *lo = NULL, *uo = NULL;
        uint8_t *lv = NULL;
        void *lk = NULL;
        size_t up_cap = h->up_len ? h->up_len : 1;
        if (vb_realloc_n((void **)&lo, h->cap * stride0, sizeof(uint32_t)) || vb_realloc_n((void **)&lv, h->cap, 1) ||
            vb_realloc_n((void **)&uo, up_cap, sizeof(uint32_t)) || vb_realloc_n(&lk, h->cap, sizeof(atomic_uchar))) {
            free(lo), free(lv), free(uo), free(lk);
            return VB_ENOMEM;
        }
        memcpy(lo, h->links0, h->n * stride0 * sizeof(uint32_t));
        memcpy(lv, h->levels, h->n);
        if (h->up_len) memcpy(uo, h->up_links, h->up_len * sizeof(uint32_t));
        h->links0 = lo, h->levels = lv, h->up_links = uo, h->up_cap = up_cap;
        h->locks = (atomic_uchar *)lk;
        for (size_t i = 0; i < h->cap; i++) atomic_init(&h->locks[i], 0);
        h->graph_borrowed = 0;
    }
    if (cap > h->cap) {
        size_t l0;
        if (vb_mul_overflow(cap, stride0, &l0)) return VB_ENOMEM;
        if (vb_realloc_n((void **)&h->links0, l0, sizeof(uint32_t))) return VB_ENOMEM;
        memset(h->links0 + h->cap * stride0, 0, (cap - h->cap) * stride0 * sizeof(uint32_t));
        if (vb_realloc_n((void **)&h->levels, cap, 1)) return VB_ENOMEM;
        if (vb_realloc_n((void **)&h->up_base, cap / 64 + 1, sizeof(uint64_t))) return VB_ENOMEM;
        void *lk = (void *)h->locks;
        if (vb_realloc_n(&lk, cap, sizeof(atomic_uchar))) return VB_ENOMEM;
        h->locks = (atomic_uchar *)lk;
        for (size_t i = h->cap; i < cap; i++) atomic_init(&h->locks[i], 0);
        h->cap = cap;
    }
    return VB_OK;
}

/* floor(-ln(U) * mL) with U uniform in (0, 1] (never 0, so never infinite), clamped. */
static inline int vb_hnsw_draw_level(vb_hnsw_t *h) {
    double u = ((double)(vb_splitmix64(&h->rng) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    double l = -log(u) * h->ml;
    return l >= VB_HNSW_MAX_LEVEL ? VB_HNSW_MAX_LEVEL : (int)l;
}

/* ---------------------------------------------------------------------------------------------
 * Insertion.
 * ------------------------------------------------------------------------------------------- */

/*
 * Copy node r's list on `level` into buf (count returned). With `locked`, under r's spinlock, so
 * the count and the ids are one snapshot that no concurrent writer is seen half-way through;
 * without, straight from the graph. `own` is the row the calling thread is inserting (or
 * VB_HNSW_NONE): the thread already holds that lock (vb_hnsw_insert), so it does not take it again.
 */
static inline size_t vb_hnsw_read_list(vb_hnsw_t *h, uint32_t r, int level, int locked, uint32_t own,
                                       uint32_t *buf) {
    int lk = locked && r != own;
    if (lk) vb_hnsw_lock(h, r);
    const uint32_t *ln = vb_hnsw_list(h, r, level);
    size_t cnt = ln[0];
    memcpy(buf, ln + 1, cnt * sizeof(uint32_t));
    if (lk) vb_hnsw_unlock(h, r);
    return cnt;
}

/* Greedy walk on one upper layer from *cur (distance *curd) to a local minimum. */
static inline void vb_hnsw_greedy(vb_hnsw_t *h, vb_hnsw_ctx_t *c, const vb_distance_ops_t *ops,
                                  const float *restrict q, int level, int locked, uint32_t own, uint32_t *cur,
                                  float *curd) {
    int changed = 1;
    while (changed) {
        changed = 0;
        size_t cnt = vb_hnsw_read_list(h, *cur, level, locked, own, c->ids);
        for (size_t j = 0; j < cnt; j++) {
            uint32_t nb = c->ids[j];
            if (j + 1 < cnt) VB_PREFETCH(vb_hnsw_vec(h, c->ids[j + 1]));
            float dd = -ops->dot(q, vb_hnsw_vec(h, nb), h->d);
            if (dd < *curd) {
                *curd = dd;
                *cur = nb;
                changed = 1;
            }
        }
    }
}

/*
 * Beam search on any layer while building (hnswlib's searchBaseLayer). Leaves up to ef results in
 * c->top as a max-heap of *ntop entries. The scratch must be reserved for ef.
 */
static inline int vb_hnsw_search_layer_build(vb_hnsw_t *h, vb_hnsw_ctx_t *c, const vb_distance_ops_t *ops,
                                             const float *restrict q, uint32_t ep, float epd, int level,
                                             size_t ef, int locked, uint32_t own, size_t *ntop_out) {
    size_t ncand = 0, ntop = 0;
    vb_visited_next(&c->vis);
    vb_visited_test_set(&c->vis, ep);
    vb_pair_t e = {epd, ep};
    vb_minheap_push(c->cand, &ncand, e);
    vb_maxheap_push(c->top, &ntop, e);
    float worst = epd;
    while (ncand) {
        vb_pair_t cur = c->cand[0];
        if (cur.d > worst && ntop >= ef) break;
        vb_minheap_pop(c->cand, &ncand);
        size_t cnt = vb_hnsw_read_list(h, cur.id, level, locked, own, c->ids);
        for (size_t j = 0; j < cnt; j++) {
            uint32_t nb = c->ids[j];
            if (j + 1 < cnt) {
                VB_PREFETCH(c->vis.tags + c->ids[j + 1]);
                VB_PREFETCH(vb_hnsw_vec(h, c->ids[j + 1]));
            }
            if (vb_visited_test_set(&c->vis, nb)) continue;
            float dd = -ops->dot(q, vb_hnsw_vec(h, nb), h->d);
            if (ntop < ef || dd < worst) {
                if (ncand + 1 >= c->cand_cap && vb_hnsw_cand_make_room(c, &ncand, worst, ntop >= ef))
                    return VB_ENOMEM;
                vb_pair_t p = {dd, nb};
                vb_minheap_push(c->cand, &ncand, p);
                vb_maxheap_push(c->top, &ntop, p);
                if (ntop > ef) vb_maxheap_pop(c->top, &ntop);
                worst = c->top[0].d;
            }
        }
    }
    *ntop_out = ntop;
    return VB_OK;
}

/*
 * The diversity heuristic (hnswlib getNeighborsByHeuristic2): walk cand[0..nc) (d = distance to
 * the base node) in ascending order and keep c unless an already kept r is closer to c than the
 * base is (dist(c, r) < dist(c, base)); stop at m kept. Fewer than m candidates are all kept.
 * `cand` must be sorted ascending. Writes the kept ones to out and returns how many.
 */
static inline size_t vb_hnsw_select(const vb_hnsw_t *h, const vb_distance_ops_t *ops, const vb_pair_t *cand,
                                    size_t nc, size_t m, vb_pair_t *out) {
    if (nc <= m) {
        memcpy(out, cand, nc * sizeof(*cand));
        return nc;
    }
    size_t k = 0;
    for (size_t i = 0; i < nc && k < m; i++) {
        const float *cv = vb_hnsw_vec(h, cand[i].id);
        int good = 1;
        for (size_t j = 0; j < k; j++) {
            if (-ops->dot(cv, vb_hnsw_vec(h, out[j].id), h->d) < cand[i].d) {
                good = 0;
                break;
            }
        }
        if (good) out[k++] = cand[i];
    }
    return k;
}

/*
 * Link q into `level` with the selected neighbours sel[0..ns): q's list becomes sel, and q is
 * added to each neighbour's list, pruning a full list with the heuristic from that neighbour's
 * point of view (hnswlib mutuallyConnectNewElement). With `locked` the caller holds q's lock for
 * its whole insert, so q's list is written before any reverse edge makes q reachable on this level
 * and nobody else can have written to it; each neighbour's list is read, pruned (the candidates
 * include q) and rewritten under that neighbour's lock.
 */
static inline void vb_hnsw_connect(vb_hnsw_t *h, vb_hnsw_ctx_t *c, const vb_distance_ops_t *ops, uint32_t q,
                                   const vb_pair_t *sel, size_t ns, int level, int locked) {
    size_t mmax = level ? h->M : h->M0;
    uint32_t *ql = vb_hnsw_list(h, q, level);
    for (size_t i = 0; i < ns; i++) ql[1 + i] = sel[i].id;
    ql[0] = (uint32_t)ns;

    const float *qv = vb_hnsw_vec(h, q);
    for (size_t i = 0; i < ns; i++) {
        uint32_t s = sel[i].id;
        if (s == q) continue;
        if (locked) vb_hnsw_lock(h, s);
        uint32_t *sl = vb_hnsw_list(h, s, level);
        size_t cnt = sl[0];
        int present = 0;
        for (size_t j = 0; j < cnt; j++) present |= sl[1 + j] == q;
        if (!present) {
            if (cnt < mmax) {
                sl[1 + cnt] = q;
                sl[0] = (uint32_t)(cnt + 1);
            } else {
                const float *sv = vb_hnsw_vec(h, s);
                vb_pair_t *cand = c->sel;
                cand[0].d = -ops->dot(sv, qv, h->d);
                cand[0].id = q;
                for (size_t j = 0; j < cnt; j++) {
                    cand[1 + j].id = sl[1 + j];
                    cand[1 + j].d = -ops->dot(sv, vb_hnsw_vec(h, sl[1 + j]), h->d);
                }
                qsort(cand, cnt + 1, sizeof(*cand), vb_pair_cmp);
                size_t k = vb_hnsw_select(h, ops, cand, cnt + 1, mmax, c->out);
                for (size_t j = 0; j < k; j++) sl[1 + j] = c->out[j].id;
                for (size_t j = k; j < cnt; j++) sl[1 + j] = 0; /* keep graph_bytes canonical */
                sl[0] = (uint32_t)k;
            }
        }
        if (locked) vb_hnsw_unlock(h, s);
    }
}

/*
 * Insert row q (its vector, level and link blocks are in place) into the graph. `locked` is set
 * when other threads insert at the same time. The scratch must be reserved for n rows and
 * ef_construction.
 *
 * With `locked`, q's own spinlock is held from the start to the end of its insert, as hnswlib's
 * addPoint holds lock_el. q is linked top-down, so once it is linked on level l another thread
 * can reach it there and take it as its entry into level l-1 (or 0), where q's list is still
 * empty. Without the lock that thread's beam search would stop at q, link its own node only to q
 * and append itself to q's empty list, which q's connect then overwrote: the other node was left
 * with no in-edge (the unreachable clusters the crash matrix found). With the lock, that thread
 * waits until q is linked on every level. Waits cannot form a cycle: a thread waits for q only
 * after finding q through an edge that q's inserter wrote after its own search on that level, and
 * holds only its own node p, which it links on a level only after its search there; for q's
 * inserter to need p it would have to find an edge to p written before its own search ended.
 * Lock order: own node, then ep_mu, then at most one other node at a time (held only to copy or
 * rewrite its list).
 */
static inline int vb_hnsw_insert(vb_hnsw_t *h, vb_hnsw_ctx_t *c, const vb_distance_ops_t *ops, uint32_t q,
                                 int locked) {
    int L = h->levels[q];
    if (locked) {
        vb_hnsw_lock(h, q); /* uncontended: nothing links to q yet */
        pthread_mutex_lock(&h->ep_mu);
    }
    uint32_t ep = h->entry;
    int maxl = h->max_level;
    if (ep == VB_HNSW_NONE) {
        h->entry = q;
        h->max_level = L;
        if (locked) {
            pthread_mutex_unlock(&h->ep_mu);
            vb_hnsw_unlock(h, q);
        }
        return VB_OK;
    }
    /* A node that raises the top level keeps the lock for its whole insert, so only one such node
     * is in flight and the entry point moves to a fully linked node (hnswlib does the same). */
    int hold = locked && L > maxl;
    if (locked && !hold) pthread_mutex_unlock(&h->ep_mu);

    const float *qv = vb_hnsw_vec(h, q);
    float epd = -ops->dot(qv, vb_hnsw_vec(h, ep), h->d);
    for (int l = maxl; l > L; l--) vb_hnsw_greedy(h, c, ops, qv, l, locked, q, &ep, &epd);

    int rc = VB_OK;
    for (int l = (L < maxl ? L : maxl); l >= 0; l--) {
        size_t ntop;
        rc = vb_hnsw_search_layer_build(h, c, ops, qv, ep, epd, l, h->ef_construction, locked, q, &ntop);
        if (rc) break;
        vb_maxheap_drain_sorted(c->top, ntop, c->sel);
        size_t ns = vb_hnsw_select(h, ops, c->sel, ntop, h->M, c->out);
        /* c->out is reused by connect's pruning: keep the selection in c->top. */
        memcpy(c->top, c->out, ns * sizeof(vb_pair_t));
        ep = c->top[0].id;
        epd = c->top[0].d;
        vb_hnsw_connect(h, c, ops, q, c->top, ns, l, locked);
    }
    if (rc == VB_OK && L > maxl) {
        if (!locked) {
            h->entry = q;
            h->max_level = L;
        } else if (L > h->max_level) {
            h->entry = q;
            h->max_level = L;
        }
    }
    if (hold) pthread_mutex_unlock(&h->ep_mu);
    if (locked) vb_hnsw_unlock(h, q);
    return rc;
}

typedef struct {
    vb_hnsw_t *h;
    const vb_distance_ops_t *ops;
    size_t first; /* row of item 0 */
    int locked;
} vb_hnsw_add_task_t;

static int vb_hnsw_add_task(void *p, size_t tid, size_t b, size_t e) {
    vb_hnsw_add_task_t *t = (vb_hnsw_add_task_t *)p;
    (void)tid;
    vb_hnsw_ctx_t *c = (vb_hnsw_ctx_t *)vb_pool_get(&t->h->pool);
    if (!c) return VB_ENOMEM;
    int rc = vb_hnsw_ctx_reserve(c, t->h->cap, t->h->ef_construction, t->h->M0);
    for (size_t i = b; i < e && rc == VB_OK; i++) rc = vb_hnsw_insert(t->h, c, t->ops, (uint32_t)(t->first + i), t->locked);
    vb_pool_put(&t->h->pool, c);
    return rc;
}

/*
 * Append m rows of x_new (m, d) and link them. nthreads > 1 inserts in parallel (per-node locks;
 * the resulting graph then depends on thread timing). Levels are drawn in row order before any
 * insert, so with nthreads == 1 the graph depends only on the seed and the data.
 * On VB_ENOMEM before linking starts nothing changes; a failure while linking leaves every row
 * present and the graph valid (some new rows with fewer links).
 */
static inline int vb_hnsw_add(vb_hnsw_t *h, const float *restrict x_new, size_t m, size_t nthreads,
                              const vb_distance_ops_t *ops) {
    if (m == 0) return VB_OK;
    size_t n0 = h->n, n1;
    if (vb_add_overflow(n0, m, &n1) || n1 > VB_HNSW_MAX_N) return VB_EINVAL;
    vb_hnsw_sq8_drop(h); /* they would not cover the new rows */
    if (vb_hnsw_reserve(h, n1)) return VB_ENOMEM;

    /* Draw levels on a copy of the RNG so a failed allocation below leaves the state unchanged. */
    uint64_t rng = h->rng;
    size_t up_blocks = 0;
    for (size_t i = n0; i < n1; i++) {
        int L = vb_hnsw_draw_level(h);
        h->levels[i] = (uint8_t)L;
        up_blocks += (size_t)L;
    }
    size_t up_add, up_new;
    if (vb_mul_overflow(up_blocks, 1 + h->M, &up_add) || vb_add_overflow(h->up_len, up_add, &up_new)) {
        h->rng = rng;
        return VB_ENOMEM;
    }
    if (up_new > h->up_cap) {
        size_t cap = h->up_cap + h->up_cap / 2;
        if (cap < up_new) cap = up_new;
        if (vb_realloc_n((void **)&h->up_links, cap, sizeof(uint32_t))) {
            h->rng = rng;
            return VB_ENOMEM;
        }
        h->up_cap = cap;
    }
    for (size_t i = n0; i < n1; i++) {
        if ((i & 63) == 0) h->up_base[i >> 6] = h->up_len;
        size_t words = (size_t)h->levels[i] * (1 + h->M);
        memset(h->up_links + h->up_len, 0, words * sizeof(uint32_t)); /* counts 0; no stale bytes ever serialised */
        h->up_len += words;
        h->links0[i * (1 + h->M0)] = 0;
    }
    memcpy(h->x_owned + n0 * h->d, x_new, m * h->d * sizeof(float));
    h->n = n1; /* rows are reachable only once linked; nothing searches during add */

    vb_hnsw_add_task_t t = {h, ops, n0, nthreads > 1};
    size_t start = 0;
    if (h->entry == VB_HNSW_NONE) { /* the first node becomes the entry point before any thread runs */
        h->entry = (uint32_t)n0;
        h->max_level = h->levels[n0];
        start = 1;
    }
    if (start == m) return VB_OK;
    t.first = n0 + start;
    return vb_parallel_for(m - start, nthreads, 1, vb_hnsw_add_task, &t);
}

/* ---------------------------------------------------------------------------------------------
 * Search.
 * ------------------------------------------------------------------------------------------- */

/*
 * Traversal on product-quantisation codes (DiskANN's layout: codes in RAM, vectors on disk). With
 * one, the graph is walked with asymmetric distances from the query's lookup table and the codes,
 * so a step touches m bytes of codes instead of a d-float vector that may not be in the page cache;
 * the beam is widened to `rerank` and every row in it is rescored exactly against the vectors
 * (exact scores, exact order) before the top k are kept.
 *   lut    (m, 256) float32: lut[j*256 + c] = <q_j, centroid c of subspace j> for this query
 *   codes  (n, m) uint8 row-major
 */
typedef struct {
    const float *lut;
    const uint8_t *codes;
    size_t m;
    size_t rerank;
    /* Or the int8 codes of vb_hnsw_sq8_build (lut NULL, codes = sq8->codes, m = d): the walk's
     * distances are q16scale * scale[r] * (q16 . codes_r), scored by sq8_ids (vb_sq8_query). */
    const struct vb_hnsw_sq8 *sq8;
    vb_sq8_ids32_fn sq8_ids;
    const int16_t *q16;
    float q16scale;
} vb_hnsw_adc_t;

static inline float vb_hnsw_adc_dot(const vb_hnsw_adc_t *a, uint32_t r) {
    const uint8_t *restrict c = a->codes + (size_t)r * a->m;
    const float *restrict t = a->lut;
    float s0 = 0.f, s1 = 0.f;
    size_t j = 0;
    for (; j + 2 <= a->m; j += 2) {
        s0 += t[j * 256 + c[j]];
        s1 += t[(j + 1) * 256 + c[j + 1]];
    }
    if (j < a->m) s0 += t[j * 256 + c[j]];
    return s0 + s1;
}

/* Rescoring slower than this per row means its vectors come from the disk, not the page cache: the
 * beam's pages are then asked for all at once (MADV_WILLNEED) so the reads run concurrently. */
#ifndef VB_HNSW_WILLNEED_NS
#define VB_HNSW_WILLNEED_NS 4000u
#endif

static inline uint64_t vb_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Start reading the pages of [p, p + len) (a hint: errors are ignored, nothing waits). */
static inline void vb_willneed(const void *p, size_t len) {
    static size_t page;
    if (!page) {
        long ps = sysconf(_SC_PAGESIZE);
        page = ps > 0 ? (size_t)ps : 4096;
    }
    uintptr_t a = (uintptr_t)p & ~(uintptr_t)(page - 1);
    (void)madvise((void *)a, (uintptr_t)p + len - a, MADV_WILLNEED);
}

/* The traversal distance of row r: exact, or from its codes when adc is set. */
static inline float vb_hnsw_dist(const vb_hnsw_t *h, vb_pair_fn dot, const vb_hnsw_adc_t *adc,
                                 const float *restrict q, uint32_t r) {
    if (!adc) return -dot(q, vb_hnsw_vec(h, r), h->d);
    if (adc->sq8) {
        float s;
        adc->sq8_ids(&s, adc->q16, adc->q16scale, adc->sq8->codes, adc->sq8->scale, h->d, &r, 1);
        return -s;
    }
    return -vb_hnsw_adc_dot(adc, r);
}

/* Prefetch a row of codes (up to 256 bytes of it). */
static inline void vb_hnsw_prefetch_codes(const vb_hnsw_adc_t *adc, uint32_t r) {
    const uint8_t *p = adc->codes + (size_t)r * adc->m;
    for (size_t o = 0; o < adc->m && o < 256; o += 64) VB_PREFETCH(p + o);
}

static inline void vb_hnsw_prefetch_row(const vb_hnsw_t *h, const vb_hnsw_adc_t *adc, uint32_t r) {
    if (adc)
        vb_hnsw_prefetch_codes(adc, r);
    else
        vb_hnsw_prefetch_vec(vb_hnsw_vec(h, r), h->d);
}

/* Greedy descent from the entry point to layer 1's local minimum (no locks, no allocation). */
static inline uint32_t vb_hnsw_descend(const vb_hnsw_t *h, const vb_distance_ops_t *ops, const vb_hnsw_adc_t *adc,
                                       const float *restrict q, float *outd, size_t *ndist) {
    uint32_t cur = h->entry;
    float curd = vb_hnsw_dist(h, ops->dot, adc, q, cur);
    size_t nd = 1;
    for (int l = h->max_level; l >= 1; l--) {
        int changed = 1;
        while (changed) {
            changed = 0;
            const uint32_t *ln = vb_hnsw_list(h, cur, l);
            size_t cnt = ln[0];
            for (size_t j = 1; j <= cnt; j++) {
                if (j < cnt) vb_hnsw_prefetch_row(h, adc, ln[j + 1]);
                float dd = vb_hnsw_dist(h, ops->dot, adc, q, ln[j]);
                if (dd < curd) {
                    curd = dd;
                    cur = ln[j];
                    changed = 1;
                }
            }
            nd += cnt;
        }
    }
    *outd = curd;
    *ndist += nd;
    return cur;
}

/*
 * Beam search on layer 0 (hnswlib searchBaseLayerST). With `mask`, every node is traversed but only
 * rows with mask[r] != 0 enter the results; the search then runs until ef allowed rows are found
 * and no candidate is closer than the worst of them, which widens the beam as the filter gets
 * more selective. Leaves results in c->top (max-heap of *ntop). Returns VB_OK, 1 when more than
 * `budget` distances were computed (results incomplete), or VB_ENOMEM.
 */
static inline int vb_hnsw_search_layer0(const vb_hnsw_t *h, vb_hnsw_ctx_t *c, const vb_distance_ops_t *ops,
                                        const vb_hnsw_adc_t *adc, const float *restrict q, uint32_t ep, float epd, size_t ef,
                                        const uint8_t *mask, size_t budget, size_t *ntop_out, size_t *ndist) {
    const size_t d = h->d, stride = 1 + h->M0;
    const float *restrict x = h->x;
    const uint32_t *restrict links0 = h->links0;
    vb_pair_fn dot = ops->dot;
    vb_visited_next(&c->vis);
    uint16_t *restrict tags = c->vis.tags;
    const uint16_t tag = c->vis.epoch;
    size_t ncand = 0, ntop = 0, nd = 0;

    tags[ep] = tag;
    vb_pair_t e = {epd, ep};
    vb_minheap_push(c->cand, &ncand, e);
    if (!mask || mask[ep]) vb_maxheap_push(c->top, &ntop, e);
    float worst = ntop ? epd : INFINITY;
    int rc = VB_OK;

    while (ncand) {
        vb_pair_t cur = c->cand[0];
        if (cur.d > worst && ntop >= ef) break;
        vb_minheap_pop(c->cand, &ncand);
        const uint32_t *ln = links0 + (size_t)cur.id * stride;
        size_t cnt = ln[0];
#if VB_HNSW_PREFETCH_TAGS
        if (ncand) { /* the likely next node: its link list was prefetched when it was pushed */
            const uint32_t *nx = links0 + (size_t)c->cand[0].id * stride;
            size_t nc = nx[0];
            for (size_t j = 1; j <= nc; j++) VB_PREFETCH(tags + nx[j]);
        }
#endif
        /* Pass 1: mark and collect the unvisited neighbours; pass 2: score them with the next rows
         * prefetched, so no prefetch bandwidth goes to rows that were already scored. */
        uint32_t *restrict fresh = c->ids;
        size_t m = 0;
        for (size_t j = 1; j <= cnt; j++) {
            uint32_t nb = ln[j];
            if (tags[nb] == tag) continue;
            tags[nb] = tag;
            fresh[m++] = nb;
        }
        const float *batch = NULL; /* int8 codes: the neighbours scored in one kernel call */
        if (adc && adc->sq8) {
            adc->sq8_ids(c->dist, adc->q16, adc->q16scale, adc->sq8->codes, adc->sq8->scale, d, fresh, m);
            batch = c->dist;
        } else if (adc) { /* codes: m bytes a row, all prefetched at once */
            for (size_t j = 0; j < m; j++) vb_hnsw_prefetch_codes(adc, fresh[j]);
        } else {
            for (size_t j = 0; j < m && j < VB_HNSW_PREFETCH_ROWS; j++) vb_hnsw_prefetch_vec(x + (size_t)fresh[j] * d, d);
        }
        for (size_t j = 0; j < m; j++) {
            uint32_t nb = fresh[j];
            if (!adc && j + VB_HNSW_PREFETCH_ROWS < m)
                vb_hnsw_prefetch_vec(x + (size_t)fresh[j + VB_HNSW_PREFETCH_ROWS] * d, d);
            float dd = batch ? -batch[j] : vb_hnsw_dist(h, dot, adc, q, nb);
            if (ntop < ef || dd < worst) {
                if (VB_UNLIKELY(ncand + 1 >= c->cand_cap) &&
                    vb_hnsw_cand_make_room(c, &ncand, worst, ntop >= ef)) {
                    rc = VB_ENOMEM;
                    goto done;
                }
                vb_pair_t p = {dd, nb};
                vb_minheap_push(c->cand, &ncand, p);
                VB_PREFETCH(links0 + (size_t)nb * stride);
                if (!mask || mask[nb]) {
                    if (ntop < ef) {
                        vb_maxheap_push(c->top, &ntop, p);
                    } else {
                        vb_maxheap_replace_top(c->top, ntop, p);
                    }
                    if (ntop >= ef) worst = c->top[0].d;
                }
            }
        }
        nd += m;
        if (nd > budget) {
            rc = 1;
            break;
        }
    }
done:
    *ntop_out = ntop;
    *ndist += nd;
    return rc;
}

/* Keep the best k of a max-heap of n results and write them best first; pad to k with -1/-inf. */
static inline void vb_hnsw_emit(vb_pair_t *top, size_t n, size_t k, int64_t *rows, float *scores) {
    while (n > k) vb_maxheap_pop(top, &n);
    for (size_t i = n; i < k; i++) {
        rows[i] = -1;
        scores[i] = -INFINITY;
    }
    while (n) {
        rows[n - 1] = top[0].id;
        scores[n - 1] = -top[0].d;
        vb_maxheap_pop(top, &n);
    }
}

/* Whether any of v[0..16) >= t (false for NaN): -v <= worst, the test of vb_hnsw_offer, exactly, as
 * negation is. SSE2 is in every x86-64 CPU; elsewhere the compiler gets the plain loop. */
static inline int vb_any_at_least16(const float *v, float t) {
#if defined(VB_X86_64) && defined(__SSE2__)
    __m128 tt = _mm_set1_ps(t);
    __m128 a = _mm_or_ps(_mm_cmpge_ps(_mm_loadu_ps(v), tt), _mm_cmpge_ps(_mm_loadu_ps(v + 4), tt));
    __m128 b = _mm_or_ps(_mm_cmpge_ps(_mm_loadu_ps(v + 8), tt), _mm_cmpge_ps(_mm_loadu_ps(v + 12), tt));
    return _mm_movemask_ps(_mm_or_ps(a, b)) != 0;
#else
    int any = 0;
    for (int j = 0; j < 16; j++) any |= v[j] >= t;
    return any;
#endif
}

/* Offer a block of scored rows to a top-k max-heap. Once it is full, a row worse than its worst is
 * dropped on one compare against a register (most rows of a scan), not the tie-aware heap compare. */
static inline void vb_hnsw_offer(vb_pair_t *top, size_t *ntop, size_t k, const uint32_t *ids,
                                 const float *dots, size_t m) {
    size_t i = 0;
    for (; i < m && *ntop < k; i++) {
        vb_pair_t p = {-dots[i], ids[i]};
        vb_topk_offer(top, ntop, k, p);
    }
    if (i == m || k == 0) return;
    float worst = top[0].d;
    while (i < m) {
        /* 16 rows on one test (the compiler vectorises it): most rows of a scan are worse than the
         * heap's worst, and a compare and branch per row cost a fifth of a filtered scan (perf). A
         * NaN score is never taken (vb_pair_lt is false for it), so "not <=" skips it as well. */
        if (i + 16 <= m && !vb_any_at_least16(dots + i, -worst)) {
            i += 16;
            continue;
        }
        size_t e = i + 16 <= m ? i + 16 : m;
        for (; i < e; i++) {
            float d = -dots[i];
            if (!(d <= worst)) continue;
            vb_pair_t p = {d, ids[i]};
            if (vb_pair_lt(p, top[0])) {
                vb_maxheap_replace_top(top, *ntop, p);
                worst = top[0].d;
            }
        }
    }
}

/* One bit per byte of p[0..8): bit i set when p[i] != 0 (any value, not only 1). The nonzero test
 * leaves the high bit of each byte; the multiply gathers those eight bits into the top byte (the
 * partial products land on distinct bits, so nothing carries). */
static inline uint64_t vb_mask_bits8(const uint8_t *p) {
    const uint64_t lo7 = 0x7F7F7F7F7F7F7F7Full, hi = 0x8080808080808080ull;
    uint64_t w;
    memcpy(&w, p, 8);
    uint64_t nz = ((((w & lo7) + lo7) | w) & hi) >> 7;
    return (nz * 0x0102040810204080ull) >> 56;
}

/*
 * Rows r in [b, e) with mask[r] != 0, ascending, into out (at most cap of them; returns how many).
 * 64 mask bytes become one 64-bit word (vb_mask_bits8), then each allowed row costs a
 * count-trailing-zeros: no branch per byte (a 10% filter over 100k rows spent ~100 us in a byte
 * loop's mispredicted branches) and no stack round trip per word.
 */
static inline size_t vb_mask_collect(const uint8_t *restrict mask, size_t b, size_t e, uint32_t *restrict out,
                                     size_t cap) {
    size_t m = 0, r = b;
    while (r + 64 <= e && m < cap) {
        uint64_t bits = 0;
        for (int i = 0; i < 8; i++) bits |= vb_mask_bits8(mask + r + 8 * i) << (8 * i);
        while (bits && m < cap) {
            out[m++] = (uint32_t)(r + (size_t)__builtin_ctzll(bits));
            bits &= bits - 1;
        }
        if (bits) return m; /* full: the caller resumes after out[m - 1] */
        r += 64;
    }
    for (; r < e && m < cap; r++)
        if (mask[r]) out[m++] = (uint32_t)r;
    return m;
}

/*
 * Exact top-k by scanning every row (mask == NULL), the rows in `list` (the allowed rows,
 * ascending, list_len of them), or every row with mask[r] != 0. Uses the batch kernels: dot_ny
 * over contiguous blocks, dot_ids32 over gathered rows.
 */
static inline void vb_hnsw_scan(const vb_hnsw_t *h, vb_hnsw_ctx_t *c, const vb_distance_ops_t *ops,
                                const float *restrict q, size_t k, const uint8_t *mask, const uint32_t *list,
                                size_t list_len, int64_t *rows, float *scores) {
    size_t ntop = 0, n = h->n, d = h->d;
    uint32_t *ids = c->ids;
    float *dist = c->dist;
    if (list) {
        for (size_t b = 0; b < list_len; b += VB_HNSW_SCAN_BLOCK) {
            size_t m = list_len - b < VB_HNSW_SCAN_BLOCK ? list_len - b : VB_HNSW_SCAN_BLOCK;
            ops->dot_ids32(dist, q, h->x, d, list + b, m);
            vb_hnsw_offer(c->top, &ntop, k, list + b, dist, m);
        }
    } else if (!mask) {
        for (size_t b = 0; b < n; b += VB_HNSW_SCAN_BLOCK) {
            size_t m = n - b < VB_HNSW_SCAN_BLOCK ? n - b : VB_HNSW_SCAN_BLOCK;
            ops->dot_ny(dist, q, h->x + b * d, d, m);
            for (size_t i = 0; i < m; i++) ids[i] = (uint32_t)(b + i);
            vb_hnsw_offer(c->top, &ntop, k, ids, dist, m);
        }
    } else {
        /* Blocks of VB_HNSW_SCAN_BLOCK rows: a dense block is scored contiguously (the hardware
         * prefetcher streams it) and its allowed rows offered; a sparse one gathers its allowed rows. */
        for (size_t b = 0; b < n; b += VB_HNSW_SCAN_BLOCK) {
            size_t e = n - b < VB_HNSW_SCAN_BLOCK ? n : b + VB_HNSW_SCAN_BLOCK;
            size_t m = vb_mask_collect(mask, b, e, ids, VB_HNSW_SCAN_BLOCK);
            if (!m) continue;
            if (m * VB_HNSW_DENSE_DIV >= e - b) {
                ops->dot_ny(dist, q, h->x + b * d, d, e - b);
                /* compact in place: ids ascending and distinct, so ids[i] - b >= i is read before written */
                for (size_t i = 0; i < m; i++) dist[i] = dist[ids[i] - b];
            } else {
                ops->dot_ids32(dist, q, h->x, d, ids, m);
            }
            vb_hnsw_offer(c->top, &ntop, k, ids, dist, m);
        }
    }
    vb_hnsw_emit(c->top, ntop, k, rows, scores);
}

/*
 * The best `depth` allowed rows by their int8 codes (a masked scan like vb_hnsw_scan's, or over
 * `list`) into the c->top max-heap; returns how many it holds. vb_hnsw_rescore then scores them
 * exactly.
 */
/* Keep the `keep` least of p[0..n) by vb_pair_lt (distinct ids: a strict order) in p[0..keep), in
 * no particular order: quickselect with a median-of-three pivot. */
static inline void vb_pairs_keep_least(vb_pair_t *p, size_t n, size_t keep) {
    if (keep >= n) return;
    size_t lo = 0, hi = n; /* lo <= keep < hi; p[0..lo) < p[lo..n) and p[0..hi) < p[hi..n) */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        vb_pair_t t;
#define VB_SWAP_PAIRS(a, b) (t = p[a], p[a] = p[b], p[b] = t)
        if (vb_pair_lt(p[mid], p[lo])) VB_SWAP_PAIRS(mid, lo);
        if (vb_pair_lt(p[hi - 1], p[lo])) VB_SWAP_PAIRS(hi - 1, lo);
        if (vb_pair_lt(p[mid], p[hi - 1])) VB_SWAP_PAIRS(mid, hi - 1); /* p[hi - 1]: the median */
        vb_pair_t piv = p[hi - 1];
        size_t s = lo;
        /* branchless Lomuto: p[lo..s) < piv <= p[s..i); the swap is harmless when p[i] >= piv */
        for (size_t i = lo; i < hi - 1; i++) {
            size_t lt = (p[i].d < piv.d) | ((p[i].d == piv.d) & (p[i].id < piv.id));
            VB_SWAP_PAIRS(i, s);
            s += lt;
        }
        VB_SWAP_PAIRS(s, hi - 1);
#undef VB_SWAP_PAIRS
        if (s == keep) return;
        if (s < keep) lo = s + 1;
        else hi = s;
    }
}

/* The best `depth` of the offered rows (a scan on int8 codes: a segment's, vb_hnsw_scan_sq8, or a
 * hot chunk's, vb_sq8_topk), kept as a buffer of up to 2 * depth pairs and a threshold: a row scoring below the worst of a kept best `depth` cannot
 * enter, and a full buffer is cut back to its best `depth` by quickselect. A heap did the same with
 * a sift-down per entering row, whose coin-flip compares mispredicted (most of a filtered scan's
 * time outside the kernel, perf). Same rows kept: the best `depth` by (score, id) are unique. */
typedef struct {
    vb_pair_t *buf;
    size_t n, depth;
    float floor; /* rows below it cannot be among the best `depth` */
} vb_scan_keep_t;

static inline void vb_scan_keep_cut(vb_scan_keep_t *kp) {
    vb_pairs_keep_least(kp->buf, kp->n, kp->depth);
    kp->n = kp->depth;
    float worst = kp->buf[0].d;
    for (size_t i = 1; i < kp->n; i++) worst = kp->buf[i].d > worst ? kp->buf[i].d : worst;
    kp->floor = -worst;
}

static inline void vb_scan_keep_offer(vb_scan_keep_t *kp, const uint32_t *ids, const float *dots, size_t m) {
    for (size_t i = 0; i < m;) {
        if (i + 16 <= m && !vb_any_at_least16(dots + i, kp->floor)) {
            i += 16;
            continue;
        }
        size_t e = i + 16 <= m ? i + 16 : m;
        for (; i < e; i++) { /* written always, kept when it passes: no branch per row */
            kp->buf[kp->n].d = -dots[i];
            kp->buf[kp->n].id = ids[i];
            kp->n += dots[i] >= kp->floor;
            if (kp->n == 2 * kp->depth) vb_scan_keep_cut(kp);
        }
    }
}

static inline size_t vb_hnsw_scan_sq8(const vb_hnsw_t *h, vb_hnsw_ctx_t *c, const vb_distance_ops_t *ops,
                                      const vb_hnsw_sq8_t *sq, const float *restrict q, size_t depth,
                                      const uint8_t *mask, const uint32_t *list, size_t list_len) {
    size_t n = h->n, d = h->d;
    float qs = vb_sq8_query(q, d, c->q16);
    /* cand holds 2 * depth + 16 (vb_hnsw_ctx_reserve): room for the one write past a cut's trigger */
    vb_scan_keep_t kp = {c->cand, 0, depth, -INFINITY};
    if (list) {
        for (size_t b = 0; b < list_len; b += VB_HNSW_SCAN_BLOCK) {
            size_t m = list_len - b < VB_HNSW_SCAN_BLOCK ? list_len - b : VB_HNSW_SCAN_BLOCK;
            ops->dot_sq8_ids32(c->dist, c->q16, qs, sq->codes, sq->scale, d, list + b, m);
            vb_scan_keep_offer(&kp, list + b, c->dist, m);
        }
    } else {
        /* Full batches of allowed rows, not fixed row blocks: the kernel's prefetch runs ahead within
         * a batch, so a sparse block's few rows would each wait for memory. */
        for (size_t r = 0; r < n;) {
            size_t m = vb_mask_collect(mask, r, n, c->ids, VB_HNSW_SCAN_BLOCK);
            if (!m) break;
            r = m == VB_HNSW_SCAN_BLOCK ? (size_t)c->ids[m - 1] + 1 : n;
            ops->dot_sq8_ids32(c->dist, c->q16, qs, sq->codes, sq->scale, d, c->ids, m);
            vb_scan_keep_offer(&kp, c->ids, c->dist, m);
        }
    }
    if (kp.n > depth) vb_scan_keep_cut(&kp);
    memcpy(c->top, kp.buf, kp.n * sizeof(vb_pair_t)); /* vb_hnsw_rescore reads c->top, heaps in c->cand */
    return kp.n;
}

/* Rows rescored exactly after a scan on the int8 codes, per result asked for (at least the beam). */
#define VB_SQ8_RERANK_PER_K 8

/*
 * Cost model for filtered search, in "distance computations" (calibrated on 128-d unit vectors,
 * n = 20k..1M, M = 16; see perf/RESULTS_hnsw.md):
 *   graph  ~ VB_HNSW_COST_PER_EF * ef' / s + descent, where s = allowed / n and ef' the widened
 *            beam: to gather ef' allowed results the beam walks about ef'/s nodes;
 *   scan   ~ allowed / VB_HNSW_SCAN_SPEEDUP (a scan distance is cheaper than a graph one: rows
 *            are visited in order, no heaps, no visited list).
 * The graph runs with a budget equal to the scan's cost; if it overruns, the query finishes with
 * a scan, so a wrong estimate costs at most one scan extra.
 */
#define VB_HNSW_COST_PER_EF 12.0
#define VB_HNSW_SCAN_SPEEDUP 2.5

/* The beam used for a filter with selectivity s (0 < s < 1): ef widened as the filter tightens. */
static inline size_t vb_hnsw_filtered_ef(size_t ef, double s) {
    double w = 1.0 / sqrt(s);
    if (w > 2.0) w = 2.0;
    double e = (double)ef * w;
    return e > VB_HNSW_MAX_EF ? VB_HNSW_MAX_EF : (size_t)e;
}

/*
 * The exact top k of candidate rows cand[0..n) (chosen on codes) of x (rows of d floats): each
 * scored with ops->dot, kept in `heap` (room for k + 1 pairs) and written best first (ties to the
 * lower row), padded with -1 / -inf. Shared by the segment scans and walks on codes and by
 * vb_sq8_topk (hot chunks).
 */
static inline void vb_rescore_rows(const vb_distance_ops_t *ops, const float *restrict q, const float *x, size_t d,
                                   const vb_pair_t *cand, size_t n, size_t k, vb_pair_t *heap, int64_t *rows,
                                   float *scores) {
    size_t nk = 0;
    for (size_t i = 0; i < n; i++) VB_PREFETCH(x + (size_t)cand[i].id * d);
    for (size_t i = 0; i < n; i++) {
        vb_pair_t p = {-ops->dot(q, x + (size_t)cand[i].id * d, d), cand[i].id};
        vb_topk_offer(heap, &nk, k, p);
    }
    vb_hnsw_emit(heap, nk, k, rows, scores);
}

/*
 * Rescore the beam (c->top, ntop rows scored on codes) exactly and emit the best k. Its time per
 * row feeds h->rescore_ns; above VB_HNSW_WILLNEED_NS the rows' pages are requested up front.
 */
static inline void vb_hnsw_rescore(vb_hnsw_t *h, vb_hnsw_ctx_t *c, const vb_distance_ops_t *ops,
                                   const float *restrict q, size_t ntop, size_t k, int64_t *rows, float *scores) {
    size_t bytes = h->d * sizeof(float);
    uint64_t t0 = vb_now_ns();
    if (atomic_load_explicit(&h->rescore_ns, memory_order_relaxed) > VB_HNSW_WILLNEED_NS)
        for (size_t i = 0; i < ntop; i++) vb_willneed(vb_hnsw_vec(h, c->top[i].id), bytes);
    /* c->cand is free after the walk: the top-k heap */
    vb_rescore_rows(ops, q, h->x, h->d, c->top, ntop, k, c->cand, rows, scores);
    if (ntop) {
        uint64_t per = (vb_now_ns() - t0) / ntop;
        unsigned old = atomic_load_explicit(&h->rescore_ns, memory_order_relaxed);
        unsigned avg = (unsigned)((old * 7ull + (per > 1000000000u ? 1000000000u : per)) / 8);
        atomic_store_explicit(&h->rescore_ns, avg, memory_order_relaxed); /* racy by design: a hint */
    }
}

/*
 * Exact top k of all n rows of x (n, d), without a graph (a hot chunk's rows): ranked on their
 * int8 codes (vb_sq8_encode: codes (n, d), scale (n,)), the best `depth` (at least k, at most n)
 * rescored exactly by vb_rescore_rows. rows/scores (k,): best first, padded with -1 / -inf.
 */
static inline int vb_sq8_topk(const vb_distance_ops_t *ops, const float *restrict q, const int8_t *codes,
                              const float *scale, const float *x, size_t n, size_t d, size_t k, size_t depth,
                              int64_t *rows, float *scores) {
    if (depth < k) depth = k;
    if (depth > n) depth = n;
    /* one block: the kept rows (2 * depth pairs, vb_scan_keep_t) and the rescore heap (k + 1), a
     * batch's scores and rows, the int16 query */
    size_t npairs = 2 * depth + k + 1;
    void *block = malloc(npairs * sizeof(vb_pair_t) + VB_HNSW_SCAN_BLOCK * (sizeof(float) + sizeof(uint32_t)) +
                         (d ? d : 1) * sizeof(int16_t));
    if (!block) return VB_ENOMEM;
    vb_pair_t *kept = (vb_pair_t *)block;
    float *dist = (float *)(kept + npairs);
    uint32_t *ids = (uint32_t *)(dist + VB_HNSW_SCAN_BLOCK);
    int16_t *q16 = (int16_t *)(ids + VB_HNSW_SCAN_BLOCK);
    float qs = vb_sq8_query(q, d, q16);
    vb_scan_keep_t kp = {kept, 0, depth, -INFINITY};
    for (size_t b = 0; b < n; b += VB_HNSW_SCAN_BLOCK) {
        size_t m = n - b < VB_HNSW_SCAN_BLOCK ? n - b : VB_HNSW_SCAN_BLOCK;
        ops->dot_sq8_ny(dist, q16, qs, codes + b * d, scale + b, d, m);
        for (size_t i = 0; i < m; i++) ids[i] = (uint32_t)(b + i);
        vb_scan_keep_offer(&kp, ids, dist, m);
    }
    if (kp.n > depth) vb_scan_keep_cut(&kp);
    vb_rescore_rows(ops, q, x, d, kept, kp.n, k, kept + 2 * depth, rows, scores);
    free(block);
    return VB_OK;
}

/*
 * One query: top-k rows by inner product into rows[0..k) / scores[0..k), best first, padded with
 * -1 / -inf. mask (n,) and allowed (= number of nonzero mask entries) describe an optional filter;
 * list, if not NULL, holds exactly those `allowed` rows ascending (an exact scan then skips the mask).
 */
static inline int vb_hnsw_search_one(vb_hnsw_t *h, vb_hnsw_ctx_t *c, const vb_distance_ops_t *ops,
                                     const vb_hnsw_adc_t *adc, const float *restrict q, size_t k, size_t ef,
                                     const uint8_t *mask,
                                     size_t allowed, const uint32_t *list, int mode, int64_t *rows,
                                     float *scores) {
    size_t n = h->n;
    if (mask && allowed >= n) mask = NULL;
    if (n == 0 || k == 0 || (mask && allowed == 0)) {
        vb_hnsw_emit(c->top, 0, k, rows, scores);
        return VB_OK;
    }
    size_t efs = ef > k ? ef : k;
    size_t budget = SIZE_MAX;
    int scan = mode == VB_HNSW_FORCE_SCAN;
    if (mode == VB_HNSW_AUTO) {
        if (!mask) {
            scan = n <= efs; /* the beam would cover everything anyway */
        } else {
            double s = (double)allowed / (double)n;
            efs = vb_hnsw_filtered_ef(efs, s);
            double graph = VB_HNSW_COST_PER_EF * (double)efs / s + 64.0 * (h->max_level + 1);
            double scan_cost = (double)allowed / VB_HNSW_SCAN_SPEEDUP;
            scan = graph >= scan_cost;
            budget = (size_t)scan_cost;
        }
    } else if (mask && mode == VB_HNSW_FORCE_GRAPH) {
        efs = vb_hnsw_filtered_ef(efs, (double)allowed / (double)n);
    }
    if (adc && efs < adc->rerank) efs = adc->rerank; /* the beam is what gets rescored exactly */
    size_t nd = 0;
    vb_hnsw_adc_t walk;
    if (!scan && !adc) {
        /* With int8 codes built (by a segment's first filtered scan), the walk reads them: a quarter
         * of the memory per distance, ~17% faster at ef 64 on 100k x 128 with the int16-query kernel
         * (perf/README.md). The beam is rescored exactly, as an adc walk's is. */
        vb_hnsw_sq8_t *sq = atomic_load_explicit(&h->sq8, memory_order_acquire);
        if (sq && sq->n == n) {
            float qs = vb_sq8_query(q, h->d, c->q16);
            walk = (vb_hnsw_adc_t){NULL, (const uint8_t *)sq->codes, h->d, 0, sq, ops->dot_sq8_ids32, c->q16, qs};
            adc = &walk;
        }
    }
    if (!scan) {
        if (vb_hnsw_ctx_reserve(c, n, efs, h->M0)) return VB_ENOMEM;
        float epd;
        uint32_t ep = vb_hnsw_descend(h, ops, adc, q, &epd, &nd);
        size_t ntop;
        int rc = vb_hnsw_search_layer0(h, c, ops, adc, q, ep, epd, efs, mask, budget, &ntop, &nd);
        if (rc < 0) return rc;
        if (rc == 0) {
            if (adc) {
                vb_hnsw_rescore(h, c, ops, q, ntop, k, rows, scores);
                nd += ntop;
                if (adc == &walk) atomic_fetch_add_explicit(&h->n_sq8_walk, 1, memory_order_relaxed);
            } else {
                vb_hnsw_emit(c->top, ntop, k, rows, scores);
            }
            atomic_fetch_add_explicit(&h->n_graph, 1, memory_order_relaxed);
            atomic_fetch_add_explicit(&h->n_dist, nd, memory_order_relaxed);
            return VB_OK;
        }
        atomic_fetch_add_explicit(&h->n_fallback, 1, memory_order_relaxed);
    }
    /* A filtered scan of many rows reads the int8 codes when they are built (a quarter of the
     * memory traffic; vectors are read only for the rescored depth). Scores stay exact; only which
     * rows reach the rescore depends on the codes. */
    vb_hnsw_sq8_t *sq = mask ? atomic_load_explicit(&h->sq8, memory_order_acquire) : NULL;
    size_t depth = VB_SQ8_RERANK_PER_K * k > efs ? VB_SQ8_RERANK_PER_K * k : efs;
    if (depth > VB_HNSW_MAX_EF) depth = VB_HNSW_MAX_EF;
    if (sq && sq->n == n && allowed > 2 * depth) {
        if (vb_hnsw_ctx_reserve(c, n, depth, h->M0)) return VB_ENOMEM;
        size_t ntop = vb_hnsw_scan_sq8(h, c, ops, sq, q, depth, mask, list, allowed);
        vb_hnsw_rescore(h, c, ops, q, ntop, k, rows, scores);
        atomic_fetch_add_explicit(&h->n_scan, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&h->n_sq8, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&h->n_dist, nd + allowed + ntop, memory_order_relaxed);
        return VB_OK;
    }
    if (vb_hnsw_ctx_reserve(c, n, k, h->M0)) return VB_ENOMEM;
    vb_hnsw_scan(h, c, ops, q, k, mask, mask ? list : NULL, allowed, rows, scores);
    atomic_fetch_add_explicit(&h->n_scan, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->n_dist, nd + (mask ? allowed : n), memory_order_relaxed);
    return VB_OK;
}

typedef struct {
    vb_hnsw_t *h;
    const vb_distance_ops_t *ops;
    const float *q;
    const float *luts; /* (nq, adc.m, 256) with adc.codes, else NULL */
    vb_hnsw_adc_t adc;
    size_t k, ef, allowed;
    const uint8_t *mask;
    const uint32_t *list;
    int mode;
    int64_t *rows;
    float *scores;
} vb_hnsw_search_task_t;

static int vb_hnsw_search_task(void *p, size_t tid, size_t b, size_t e) {
    vb_hnsw_search_task_t *t = (vb_hnsw_search_task_t *)p;
    (void)tid;
    vb_hnsw_ctx_t *c = (vb_hnsw_ctx_t *)vb_pool_get(&t->h->pool);
    if (!c) return VB_ENOMEM;
    int rc = VB_OK;
    vb_hnsw_adc_t adc = t->adc;
    for (size_t i = b; i < e && rc == VB_OK; i++) {
        if (t->luts) adc.lut = t->luts + i * adc.m * 256;
        rc = vb_hnsw_search_one(t->h, c, t->ops, t->luts ? &adc : NULL, t->q + i * t->h->d, t->k, t->ef, t->mask,
                                t->allowed, t->list, t->mode, t->rows + i * t->k, t->scores + i * t->k);
    }
    vb_pool_put(&t->h->pool, c);
    return rc;
}

/*
 * Batch search: q (nq, d); rows/scores (nq, k). Queries are split across nthreads (each query runs
 * on one thread). mask (n,) or NULL; allowed = its nonzero count. luts (nq, pq_m, 256) and codes
 * (n, pq_m), or NULL: traverse on the codes and rescore a beam of max(ef, rerank) exactly (see
 * vb_hnsw_adc_t). Thread-safe against other searches; must not overlap vb_hnsw_add.
 */
static inline int vb_hnsw_search(vb_hnsw_t *h, const vb_distance_ops_t *ops, const float *restrict q, size_t nq,
                                 size_t k, size_t ef, const uint8_t *mask, size_t allowed, int mode,
                                 size_t nthreads, const float *luts, const uint8_t *codes, size_t pq_m,
                                 size_t rerank, const uint32_t *given, int64_t *rows, float *scores) {
    if (k > VB_HNSW_MAX_EF || ef < 1 || ef > VB_HNSW_MAX_EF) return VB_EINVAL;
    if (luts && (!codes || pq_m < 1 || rerank > VB_HNSW_MAX_EF)) return VB_EINVAL;
    if (mask && allowed > h->n) return VB_EINVAL;
    /* given: the mask's `allowed` rows, ascending, listed by the caller (a filter evaluation keeps
     * them); only their bounds are checked here, which is what memory safety needs. */
    if (given) {
        if (!mask) return VB_EINVAL;
        uint32_t top = 0;
        for (size_t i = 0; i < allowed; i++) top = given[i] > top ? given[i] : top;
        if (allowed && top >= h->n) return VB_EINVAL;
    }
    /* A sparse filter shared by several queries: list its rows once, so exact scans skip the mask. */
    uint32_t *list = NULL;
    if (!given && mask && nq > 1 && allowed && allowed * VB_HNSW_DENSE_DIV < h->n) {
        list = (uint32_t *)malloc(allowed * sizeof(uint32_t));
        if (!list) return VB_ENOMEM;
        if (vb_mask_collect(mask, 0, h->n, list, allowed) != allowed) { /* fewer rows set than `allowed` says */
            free(list);
            return VB_EINVAL;
        }
    }
    vb_hnsw_adc_t adc = {NULL, codes, pq_m, rerank};
    vb_hnsw_search_task_t t = {h, ops, q, luts, adc, k, ef, allowed, mask, given ? given : list, mode, rows, scores};
    int rc = vb_parallel_for(nq, nthreads, 4, vb_hnsw_search_task, &t);
    free(list);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Graph serialisation (no vectors). Little-endian, every field at a fixed offset:
 *
 *   0   8  magic "VBHNSWG1"
 *   8   4  u32 version = 1
 *   12  4  u32 header bytes = 64
 *   16  4  u32 d            20  4  u32 M            24  4  u32 M0 (= 2M)
 *   28  4  u32 ef_construction
 *   32  8  u64 n
 *   40  4  u32 entry point row (0xFFFFFFFF iff n == 0)
 *   44  4  u32 max level (= level of the entry point; 0 when empty)
 *   48  8  u64 upper blocks (= sum of the levels)
 *   56  8  u64 level RNG state (so adding to a loaded index draws what the original would)
 *   64     levels: n x u8, then zero padding to a multiple of 4
 *   ..     layer 0: n x (1 + M0) u32 (count, ids; slots past count are unspecified)
 *   ..     upper layers: blocks x (1 + M) u32, node by node, levels 1..L of each
 *   end-4  u32 CRC32C of every byte before it
 * ------------------------------------------------------------------------------------------- */

#define VB_HNSW_GRAPH_MAGIC "VBHNSWG1"
#define VB_HNSW_GRAPH_HEADER 64

static inline size_t vb_pad4(size_t n) { return (n + 3) & ~(size_t)3; }

/* Bytes of the serialised graph (fits: every part is already allocated in memory). */
static inline size_t vb_hnsw_graph_size(const vb_hnsw_t *h) {
    return VB_HNSW_GRAPH_HEADER + vb_pad4(h->n) + h->n * (1 + h->M0) * 4 + h->up_len * 4 + 4;
}

/* Serialise into out (exactly vb_hnsw_graph_size bytes). */
static inline int vb_hnsw_graph_write(const vb_hnsw_t *h, uint8_t *out, size_t len) {
    if (len != vb_hnsw_graph_size(h)) return VB_EINVAL;
    memset(out, 0, VB_HNSW_GRAPH_HEADER);
    memcpy(out, VB_HNSW_GRAPH_MAGIC, 8);
    vb_store_le32(out + 8, 1);
    vb_store_le32(out + 12, VB_HNSW_GRAPH_HEADER);
    vb_store_le32(out + 16, (uint32_t)h->d);
    vb_store_le32(out + 20, (uint32_t)h->M);
    vb_store_le32(out + 24, (uint32_t)h->M0);
    vb_store_le32(out + 28, (uint32_t)h->ef_construction);
    vb_store_le64(out + 32, h->n);
    vb_store_le32(out + 40, h->n ? h->entry : VB_HNSW_NONE);
    vb_store_le32(out + 44, h->n ? (uint32_t)h->max_level : 0);
    vb_store_le64(out + 48, h->up_len / (1 + h->M));
    vb_store_le64(out + 56, h->rng);
    uint8_t *p = out + VB_HNSW_GRAPH_HEADER;
    if (h->n) memcpy(p, h->levels, h->n);
    memset(p + h->n, 0, vb_pad4(h->n) - h->n);
    p += vb_pad4(h->n);
    size_t l0 = h->n * (1 + h->M0) * 4;
    if (l0) memcpy(p, h->links0, l0);
    p += l0;
    if (h->up_len) memcpy(p, h->up_links, h->up_len * 4);
    p += h->up_len * 4;
    vb_store_le32(p, vb_crc32c(0, out, len - 4));
    return VB_OK;
}

#define VB_FAIL(code, ...) return vb_fail(msg, msglen, (code), __VA_ARGS__)

/*
 * Validate a serialised graph and build an index over the borrowed vectors x (xn, xd) (read-only,
 * kept by pointer: the caller keeps them alive and unchanged for the index's lifetime).
 * Everything is checked before anything is allocated beyond what the blob's own size allows:
 * lengths against the bytes present (overflow-checked), the CRC, parameters, levels, every count
 * and every neighbour id (< n, and on level l a node that has level l), the entry point. After
 * this, search loops run without checks. On failure h is left zeroed (no vb_hnsw_free needed) and
 * msg says what failed. Returns VB_OK, VB_ECORRUPT, VB_EINVAL (vectors do not match) or VB_ENOMEM.
 */
static inline int vb_hnsw_graph_read_checked(vb_hnsw_t *h, const uint8_t *buf, size_t len, const float *x,
                                             size_t xn, size_t xd, int borrow_links, char *msg, size_t msglen) {
    memset(h, 0, sizeof(*h));
    h->entry = VB_HNSW_NONE;
    if (len < VB_HNSW_GRAPH_HEADER + 4)
        VB_FAIL(VB_ECORRUPT, "graph truncated: %zu bytes, the header alone needs %d", len, VB_HNSW_GRAPH_HEADER + 4);
    if (memcmp(buf, VB_HNSW_GRAPH_MAGIC, 8) != 0) VB_FAIL(VB_ECORRUPT, "not an HNSW graph: bad magic");
    uint32_t version = vb_load_le32(buf + 8), hdr = vb_load_le32(buf + 12);
    if (version != 1) VB_FAIL(VB_ECORRUPT, "unsupported graph version %u (this build reads 1)", version);
    if (hdr != VB_HNSW_GRAPH_HEADER)
        VB_FAIL(VB_ECORRUPT, "bad graph header size %u (expected %d)", hdr, VB_HNSW_GRAPH_HEADER);
    uint32_t d = vb_load_le32(buf + 16), M = vb_load_le32(buf + 20), M0 = vb_load_le32(buf + 24);
    uint32_t efc = vb_load_le32(buf + 28), entry = vb_load_le32(buf + 40), maxl = vb_load_le32(buf + 44);
    uint64_t n64 = vb_load_le64(buf + 32), blocks64 = vb_load_le64(buf + 48), rng = vb_load_le64(buf + 56);
    if (d < 1 || d > VB_HNSW_MAX_DIM) VB_FAIL(VB_ECORRUPT, "graph dimension %u out of range [1, %d]", d, VB_HNSW_MAX_DIM);
    if (M < 2 || M > VB_HNSW_MAX_M) VB_FAIL(VB_ECORRUPT, "graph M=%u out of range [2, %d]", M, VB_HNSW_MAX_M);
    if (M0 != 2 * M) VB_FAIL(VB_ECORRUPT, "graph M0=%u, expected 2*M=%u", M0, 2 * M);
    if (efc < 1 || efc > VB_HNSW_MAX_EF)
        VB_FAIL(VB_ECORRUPT, "graph ef_construction=%u out of range [1, %d]", efc, VB_HNSW_MAX_EF);
    if (n64 > VB_HNSW_MAX_N) VB_FAIL(VB_ECORRUPT, "graph node count %llu exceeds the limit %u",
                                     (unsigned long long)n64, VB_HNSW_MAX_N);
    /* Each node needs at least 1 + 4*(1+M0) bytes: bound n by the bytes present before any product. */
    size_t avail = len - VB_HNSW_GRAPH_HEADER - 4;
    if (n64 > avail / (1 + 4 * (1 + (size_t)M0)))
        VB_FAIL(VB_ECORRUPT, "graph node count %llu needs more than the %zu bytes present",
                (unsigned long long)n64, avail);
    size_t n = (size_t)n64;
    size_t stride0 = 1 + (size_t)M0, stride = 1 + (size_t)M;
    size_t l0_bytes = n * stride0 * 4; /* cannot overflow: bounded by avail above */
    if (vb_pad4(n) + l0_bytes > avail) VB_FAIL(VB_ECORRUPT, "graph truncated in layer 0");
    size_t rest = avail - vb_pad4(n) - l0_bytes;
    if (blocks64 > rest / (stride * 4) || blocks64 * stride * 4 != rest)
        VB_FAIL(VB_ECORRUPT, "graph size mismatch: %llu upper blocks of %zu bytes, but %zu bytes remain",
                (unsigned long long)blocks64, stride * 4, rest);
    size_t blocks = (size_t)blocks64;
    uint32_t crc_stored = vb_load_le32(buf + len - 4), crc = vb_crc32c(0, buf, len - 4);
    if (crc != crc_stored)
        VB_FAIL(VB_ECORRUPT, "graph checksum mismatch: stored 0x%08x, computed 0x%08x", crc_stored, crc);
    if (x == NULL && n) VB_FAIL(VB_EINVAL, "no vectors given for a graph of %zu nodes", n);
    if (xn != n || xd != d)
        VB_FAIL(VB_EINVAL, "vectors have shape (%zu, %zu) but the graph has %zu nodes of dimension %u", xn, xd, n, d);

    const uint8_t *lev = buf + VB_HNSW_GRAPH_HEADER;
    for (size_t i = n; i < vb_pad4(n); i++)
        if (lev[i]) VB_FAIL(VB_ECORRUPT, "graph padding byte %zu is not zero", i);
    size_t sum = 0;
    uint32_t top = 0;
    for (size_t i = 0; i < n; i++) {
        if (lev[i] > VB_HNSW_MAX_LEVEL)
            VB_FAIL(VB_ECORRUPT, "node %zu has level %u, above the limit %d", i, lev[i], VB_HNSW_MAX_LEVEL);
        sum += lev[i];
        if (lev[i] > top) top = lev[i];
    }
    if (sum != blocks) VB_FAIL(VB_ECORRUPT, "levels add up to %zu upper blocks, header says %zu", sum, blocks);
    if (n == 0) {
        if (entry != VB_HNSW_NONE || maxl != 0) VB_FAIL(VB_ECORRUPT, "empty graph with an entry point");
    } else {
        if (entry >= n) VB_FAIL(VB_ECORRUPT, "entry point %u out of range [0, %zu)", entry, n);
        if (maxl != top || lev[entry] != top)
            VB_FAIL(VB_ECORRUPT, "entry point %u has level %u, header max level %u, highest node level %u", entry,
                    lev[entry], maxl, top);
    }
    const uint8_t *l0 = lev + vb_pad4(n);
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = l0 + i * stride0 * 4;
        uint32_t cnt = vb_load_le32(p);
        if (cnt > M0) VB_FAIL(VB_ECORRUPT, "node %zu has %u links on layer 0, above M0=%u", i, cnt, M0);
        for (uint32_t j = 0; j < cnt; j++) {
            uint32_t nb = vb_load_le32(p + 4 + 4 * (size_t)j);
            if (nb >= n) VB_FAIL(VB_ECORRUPT, "node %zu links to %u on layer 0, out of range [0, %zu)", i, nb, n);
        }
    }
    const uint8_t *up = l0 + l0_bytes;
    size_t blk = 0;
    for (size_t i = 0; i < n; i++) {
        for (uint32_t l = 1; l <= lev[i]; l++, blk++) {
            const uint8_t *p = up + blk * stride * 4;
            uint32_t cnt = vb_load_le32(p);
            if (cnt > M) VB_FAIL(VB_ECORRUPT, "node %zu has %u links on layer %u, above M=%u", i, cnt, l, M);
            for (uint32_t j = 0; j < cnt; j++) {
                uint32_t nb = vb_load_le32(p + 4 + 4 * (size_t)j);
                if (nb >= n) VB_FAIL(VB_ECORRUPT, "node %zu links to %u on layer %u, out of range [0, %zu)", i, nb, l, n);
                if (lev[nb] < l)
                    VB_FAIL(VB_ECORRUPT, "node %zu links to %u on layer %u, but node %u only reaches level %u", i, nb,
                            l, nb, lev[nb]);
            }
        }
    }

    /* Valid: build the index. Allocations are bounded by the blob size checked above. */
    int rc = vb_hnsw_init(h, d, M, efc, rng);
    if (rc) VB_FAIL(VB_ENOMEM, "out of memory initialising the index");
    size_t cap = n ? n : 1;
    if (vb_realloc_n((void **)&h->up_base, cap / 64 + 1, 8)) {
        vb_hnsw_free(h);
        VB_FAIL(VB_ENOMEM, "out of memory loading a graph of %zu nodes", n);
    }
    /* The graph is used in place when asked and possible: little-endian host, 4-byte aligned (the
     * caller keeps buf alive and unchanged for the index's lifetime, as it does for x). Then only
     * up_base (a word per 64 rows) is allocated; the locks wait for an add. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (borrow_links && n && ((uintptr_t)l0 & 3u) == 0) {
        h->links0 = (uint32_t *)(uintptr_t)l0;
        h->levels = (uint8_t *)(uintptr_t)lev;
        h->up_links = (uint32_t *)(uintptr_t)up;
        h->graph_borrowed = 1;
    }
#else
    (void)borrow_links;
#endif
    if (!h->graph_borrowed) {
        void *lk = NULL;
        if (vb_realloc_n((void **)&h->links0, cap * stride0, 4) || vb_realloc_n((void **)&h->levels, cap, 1) ||
            vb_realloc_n((void **)&h->up_links, blocks * stride + 1, 4) || vb_realloc_n(&lk, cap, sizeof(atomic_uchar))) {
            free(lk);
            vb_hnsw_free(h);
            VB_FAIL(VB_ENOMEM, "out of memory loading a graph of %zu nodes", n);
        }
        h->locks = (atomic_uchar *)lk;
        for (size_t i = 0; i < cap; i++) atomic_init(&h->locks[i], 0);
        if (n) {
            memcpy(h->levels, lev, n);
            memcpy(h->links0, l0, l0_bytes);
        }
        if (blocks) memcpy(h->up_links, up, blocks * stride * 4);
    }
    h->cap = cap;
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        if ((i & 63) == 0) h->up_base[i >> 6] = off;
        off += (size_t)lev[i] * stride;
    }
    h->up_len = h->up_cap = blocks * stride;
    if (h->up_cap == 0) h->up_cap = 1;
    h->n = n;
    h->x = x;
    h->x_owned = NULL;
    h->entry = n ? entry : VB_HNSW_NONE;
    h->max_level = n ? (int)maxl : 0;
    return VB_OK;
}
