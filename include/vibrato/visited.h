/*
 * Epoch-tagged visited lists and a small lock-protected object pool (for graph searches).
 *
 * A visited list is an array of uint16 tags indexed by dense internal id. "Clearing" it bumps the
 * epoch: a slot is visited iff tags[id] == epoch. The whole array is zeroed only when the epoch
 * wraps (every 65535 searches), as hnswlib's VisitedList::reset does
 * (https://github.com/nmslib/hnswlib/blob/master/hnswlib/visited_list_pool.h). uint16 tags keep the
 * array at 2 bytes per node so more of it stays in cache than with uint32 tags.
 *
 * Thread-safety: a vb_visited_t belongs to one thread at a time. vb_pool_t is safe to use from any
 * number of threads: get/put take its mutex for a push or a pop and nothing else.
 */
#pragma once

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "vibrato/common.h"

typedef struct vb_visited {
    uint16_t *tags; /* (cap,) tags[id] == epoch means visited in the current search */
    size_t cap;     /* slots allocated */
    uint16_t epoch; /* current epoch, 1..65535 (0 is the value of a fresh slot) */
} vb_visited_t;

static inline void vb_visited_init(vb_visited_t *v) {
    v->tags = NULL;
    v->cap = 0;
    v->epoch = 0;
}

static inline void vb_visited_free(vb_visited_t *v) {
    free(v->tags);
    vb_visited_init(v);
}

/*
 * Make room for ids [0, n). Grown slots are zero, and 0 is never a live epoch, so they read as
 * "not visited"; kept slots hold epochs <= the current one, which the next vb_visited_next()
 * leaves behind. Returns VB_OK or VB_ENOMEM (the list is unchanged then).
 */
static inline int vb_visited_reserve(vb_visited_t *v, size_t n) {
    if (n <= v->cap) return VB_OK;
    size_t cap = v->cap ? v->cap : 1024;
    while (cap < n) cap = cap > SIZE_MAX / 2 ? n : cap * 2;
    size_t bytes;
    if (vb_mul_overflow(cap, sizeof(uint16_t), &bytes)) return VB_ENOMEM;
    uint16_t *t = (uint16_t *)realloc(v->tags, bytes);
    if (!t) return VB_ENOMEM;
    memset(t + v->cap, 0, (cap - v->cap) * sizeof(uint16_t));
    v->tags = t;
    v->cap = cap;
    return VB_OK;
}

/* Start a new search: every slot becomes "not visited" in O(1) (O(cap) once per 65535 calls). */
static inline void vb_visited_next(vb_visited_t *v) {
    if (VB_UNLIKELY(++v->epoch == 0)) {
        memset(v->tags, 0, v->cap * sizeof(uint16_t));
        v->epoch = 1;
    }
}

/* Mark id visited; returns 1 if it already was. id < cap is the caller's contract. */
static inline int vb_visited_test_set(vb_visited_t *v, uint32_t id) {
    if (v->tags[id] == v->epoch) return 1;
    v->tags[id] = v->epoch;
    return 0;
}

/*
 * A pool of reusable per-search scratch objects (each owning a visited list and buffers), so a
 * search never allocates once the pool is warm. Objects are created on demand by `create` and
 * at most VB_POOL_KEEP idle ones are kept; the rest are destroyed on put.
 */
#define VB_POOL_KEEP 64

typedef struct vb_pool {
    pthread_mutex_t mu;
    void *items[VB_POOL_KEEP]; /* idle objects, a stack */
    size_t n;                  /* number of idle objects */
    void *(*create)(void);     /* returns NULL when out of memory */
    void (*destroy)(void *);
} vb_pool_t;

static inline int vb_pool_init(vb_pool_t *p, void *(*create)(void), void (*destroy)(void *)) {
    p->n = 0;
    p->create = create;
    p->destroy = destroy;
    return pthread_mutex_init(&p->mu, NULL) == 0 ? VB_OK : VB_ENOMEM;
}

/* Destroy every idle object. No object may be checked out (the caller guarantees it). */
static inline void vb_pool_destroy(vb_pool_t *p) {
    for (size_t i = 0; i < p->n; i++) p->destroy(p->items[i]);
    p->n = 0;
    pthread_mutex_destroy(&p->mu);
}

/* An idle object, or a new one; NULL only if creating one failed (out of memory). */
static inline void *vb_pool_get(vb_pool_t *p) {
    void *it = NULL;
    pthread_mutex_lock(&p->mu);
    if (p->n) it = p->items[--p->n];
    pthread_mutex_unlock(&p->mu);
    return it ? it : p->create();
}

static inline void vb_pool_put(vb_pool_t *p, void *it) {
    if (!it) return;
    pthread_mutex_lock(&p->mu);
    if (p->n < VB_POOL_KEEP) {
        p->items[p->n++] = it;
        it = NULL;
    }
    pthread_mutex_unlock(&p->mu);
    if (it) p->destroy(it);
}
