# Declarations of include/vibrato/hnsw.h (the HNSW index in C). See that header for the contracts.
from libc.stdint cimport int64_t, int8_t, uint64_t, uint32_t, uint8_t

from vibrato._native.distance cimport vb_distance_ops_t

cdef extern from "vibrato/hnsw.h" nogil:
    int VB_HNSW_MAX_LEVEL
    int VB_HNSW_MAX_DIM
    int VB_HNSW_MAX_M
    int VB_HNSW_MAX_EF
    unsigned int VB_HNSW_MAX_N
    int VB_HNSW_AUTO
    int VB_HNSW_FORCE_GRAPH
    int VB_HNSW_FORCE_SCAN
    int VB_SQ8_RERANK_PER_K

    ctypedef struct vb_hnsw_t:
        size_t d
        size_t M
        size_t M0
        size_t ef_construction
        size_t n
        size_t cap
        const float *x
        float *x_owned
        uint32_t *links0
        uint8_t *levels
        uint64_t *up_base
        int graph_borrowed
        uint32_t *up_links
        size_t up_len
        uint32_t entry
        int max_level
        size_t n_graph
        size_t n_scan
        size_t n_fallback
        size_t n_dist
        size_t n_sq8
        size_t n_sq8_walk

    size_t vb_hnsw_up_off(const vb_hnsw_t *h, uint32_t r)
    int vb_hnsw_init(vb_hnsw_t *h, size_t d, size_t M, size_t efc, uint64_t seed)
    void vb_hnsw_free(vb_hnsw_t *h)
    int vb_hnsw_sq8_build(vb_hnsw_t *h)
    bint vb_hnsw_has_sq8(const vb_hnsw_t *h)
    int vb_hnsw_sq8_attach(vb_hnsw_t *h, const int8_t *codes, const float *scale, size_t n)
    int vb_hnsw_add(vb_hnsw_t *h, const float *x_new, size_t m, size_t nthreads, const vb_distance_ops_t *ops)
    int vb_hnsw_search(vb_hnsw_t *h, const vb_distance_ops_t *ops, const float *q, size_t nq, size_t k,
                       size_t ef, const uint8_t *mask, size_t allowed, int mode, size_t nthreads,
                       const float *luts, const uint8_t *codes, size_t pq_m, size_t rerank,
                       const uint32_t *given, int64_t *rows, float *scores)
    int vb_sq8_topk(const vb_distance_ops_t *ops, const float *q, const int8_t *codes, const float *scale,
                    const float *x, size_t n, size_t d, size_t k, size_t depth, int64_t *rows, float *scores)
    size_t vb_hnsw_graph_size(const vb_hnsw_t *h)
    int vb_hnsw_graph_write(const vb_hnsw_t *h, uint8_t *out, size_t len)
    int vb_hnsw_graph_read_checked(vb_hnsw_t *h, const uint8_t *buf, size_t len, const float *x, size_t xn,
                                   size_t xd, int borrow_links, char *msg, size_t msglen)
