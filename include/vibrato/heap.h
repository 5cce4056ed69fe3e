/*
 * Binary heaps of (key, row) pairs for top-k selection: the one heap every native search uses (HNSW
 * beams and result sets, exact scans, PQ ADC scans).
 *
 * Order: a pair is better when its key d is smaller, and on equal keys when its row is lower, so
 * results never depend on the order pairs were offered in. Scores (higher is better) are stored as
 * d = -score. The heaps live in caller arrays and never allocate: capacity is the caller's contract.
 * A min-heap keeps the best pair at [0] (candidates to expand); a max-heap keeps the worst kept pair at
 * [0] (a bounded top-k: compare with [0], replace it).
 */
#pragma once

#include "vibrato/common.h"

typedef struct {
    float d;     /* the key, smaller is better (a distance; -score for scores) */
    uint32_t id; /* a row */
} vb_pair_t;

static inline int vb_pair_lt(vb_pair_t a, vb_pair_t b) {
    return a.d < b.d || (a.d == b.d && a.id < b.id);
}

/* min-heap: h[0] is the smallest */
static inline void vb_minheap_push(vb_pair_t *h, size_t *n, vb_pair_t x) {
    size_t i = (*n)++;
    while (i) {
        size_t p = (i - 1) >> 1;
        if (!vb_pair_lt(x, h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = x;
}

static inline void vb_minheap_pop(vb_pair_t *h, size_t *n) {
    size_t m = --(*n);
    if (!m) return;
    vb_pair_t x = h[m];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m) break;
        if (c + 1 < m && vb_pair_lt(h[c + 1], h[c])) c++;
        if (!vb_pair_lt(h[c], x)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

/* max-heap: h[0] is the largest */
static inline void vb_maxheap_push(vb_pair_t *h, size_t *n, vb_pair_t x) {
    size_t i = (*n)++;
    while (i) {
        size_t p = (i - 1) >> 1;
        if (!vb_pair_lt(h[p], x)) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = x;
}

static inline void vb_maxheap_sift_down(vb_pair_t *h, size_t m, size_t i, vb_pair_t x) {
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m) break;
        if (c + 1 < m && vb_pair_lt(h[c], h[c + 1])) c++;
        if (!vb_pair_lt(x, h[c])) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
}

static inline void vb_maxheap_pop(vb_pair_t *h, size_t *n) {
    size_t m = --(*n);
    if (m) vb_maxheap_sift_down(h, m, 0, h[m]);
}

/* Replace the largest element by x (x must be smaller for the heap to stay meaningful). */
static inline void vb_maxheap_replace_top(vb_pair_t *h, size_t n, vb_pair_t x) {
    vb_maxheap_sift_down(h, n, 0, x);
}

/* Pop a max-heap of n elements into out[0..n) in ascending order (the heap is consumed). */
static inline void vb_maxheap_drain_sorted(vb_pair_t *h, size_t n, vb_pair_t *out) {
    while (n) {
        out[n - 1] = h[0];
        vb_maxheap_pop(h, &n);
    }
}

static inline void vb_minheap_heapify(vb_pair_t *h, size_t n) {
    for (size_t k = n / 2; k-- > 0;) {
        vb_pair_t x = h[k];
        size_t i = k;
        for (;;) {
            size_t c = 2 * i + 1;
            if (c >= n) break;
            if (c + 1 < n && vb_pair_lt(h[c + 1], h[c])) c++;
            if (!vb_pair_lt(h[c], x)) break;
            h[i] = h[c];
            i = c;
        }
        h[i] = x;
    }
}

/* Offer x to a bounded top-k: a max-heap of *n <= k pairs, the worst kept at [0]. */
static inline void vb_topk_offer(vb_pair_t *h, size_t *n, size_t k, vb_pair_t x) {
    if (*n < k) {
        vb_maxheap_push(h, n, x);
    } else if (vb_pair_lt(x, h[0])) {
        vb_maxheap_replace_top(h, *n, x);
    }
}

/* qsort comparator: ascending in the heap order (best first). */
static int vb_pair_cmp(const void *a, const void *b) {
    const vb_pair_t *x = (const vb_pair_t *)a, *y = (const vb_pair_t *)b;
    if (vb_pair_lt(*x, *y)) return -1;
    if (vb_pair_lt(*y, *x)) return 1;
    return 0;
}
