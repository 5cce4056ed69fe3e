/*
 * A minimal parallel-for over pthreads, for native loops that run with the GIL released.
 *
 * Work is handed out in chunks of `grain` items from an atomic counter, so uneven items (HNSW
 * inserts, queries with different beam lengths) balance across threads. The calling thread works
 * too. The first error a task returns is recorded, no further chunks are handed out, every thread
 * is joined, and then that error is returned (hnswlib's ParallelFor does the same with exceptions).
 */
#pragma once

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "vibrato/common.h"

#define VB_MAX_THREADS 256     /* threads one call may use (callers asking for more get this many) */
#define VB_AUTO_THREADS_CAP 8  /* threads a large call uses when its caller does not say */

/* min(online CPUs, VB_AUTO_THREADS_CAP), set by vb_parallel_init() (every native module calls it once,
 * at import); the wrappers use it for threads=None. */
static size_t vb_auto_threads = 1;

static inline void vb_parallel_init(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    vb_auto_threads = n < 1 ? 1 : n > VB_AUTO_THREADS_CAP ? VB_AUTO_THREADS_CAP : (size_t)n;
}

/* Process items [begin, end) for worker `tid`. Return 0 or a negative VB_E* code. */
typedef int (*vb_task_fn)(void *ctx, size_t tid, size_t begin, size_t end);

typedef struct {
    vb_task_fn fn;
    void *ctx;
    size_t n, grain;
    atomic_size_t next;
    atomic_int err;
} vb_pfor_state_t;

typedef struct {
    vb_pfor_state_t *st;
    size_t tid;
} vb_pfor_arg_t;

static void *vb_pfor_worker(void *p) {
    vb_pfor_arg_t *a = (vb_pfor_arg_t *)p;
    vb_pfor_state_t *st = a->st;
    for (;;) {
        if (atomic_load_explicit(&st->err, memory_order_relaxed) != 0) break;
        size_t b = atomic_fetch_add(&st->next, st->grain);
        if (b >= st->n) break;
        size_t e = b + st->grain < st->n ? b + st->grain : st->n;
        int rc = st->fn(st->ctx, a->tid, b, e);
        if (rc != 0) {
            int expected = 0;
            atomic_compare_exchange_strong(&st->err, &expected, rc);
            break;
        }
    }
    return NULL;
}

/* Run fn over [0, n) on up to nthreads threads (including the caller). */
static inline int vb_parallel_for(size_t n, size_t nthreads, size_t grain, vb_task_fn fn, void *ctx) {
    if (n == 0) return VB_OK;
    if (grain == 0) grain = 1;
    size_t max_useful = (n + grain - 1) / grain;
    if (nthreads > max_useful) nthreads = max_useful;
    if (nthreads <= 1) return fn(ctx, 0, 0, n);
    if (nthreads > VB_MAX_THREADS) nthreads = VB_MAX_THREADS;

    vb_pfor_state_t st;
    st.fn = fn;
    st.ctx = ctx;
    st.n = n;
    st.grain = grain;
    atomic_init(&st.next, 0);
    atomic_init(&st.err, 0);

    pthread_t threads[VB_MAX_THREADS];
    vb_pfor_arg_t args[VB_MAX_THREADS];
    size_t started = 0;
    for (size_t t = 1; t < nthreads; t++) {
        args[t].st = &st;
        args[t].tid = t;
        if (pthread_create(&threads[t], NULL, vb_pfor_worker, &args[t]) != 0) break;
        started = t;
    }
    args[0].st = &st;
    args[0].tid = 0;
    vb_pfor_worker(&args[0]);
    for (size_t t = 1; t <= started; t++) pthread_join(threads[t], NULL);
    return atomic_load(&st.err);
}
