# Declarations of include/vibrato/pq.h (product quantization: train, encode, decode, ADC).
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from vibrato._native.distance cimport vb_distance_ops_t

cdef extern from "vibrato/pq.h" nogil:
    int VB_PQ_NBITS
    int VB_PQ_KSUB
    unsigned int VB_PQ_MAX_DIM
    unsigned int VB_PQ_MAX_ITERS
    unsigned int VB_PQ_MIN_TRAIN
    unsigned int VB_PQ_HEADER_BYTES
    unsigned int VB_PQ_MAX_SCAN_ROWS

    ctypedef uint32_t (*vb_pq_nearest_fn)(const float *x, const float *ct, size_t dsub, float *dist)
    ctypedef void (*vb_pq_l2sq_cols_fn)(float *out, const float *xt, size_t ld, size_t dsub, const float *c, size_t nb)
    ctypedef void (*vb_pq_scores_fn)(float *out, const float *table, const uint8_t *planes, size_t m,
                                     const uint8_t *codes, size_t n)
    ctypedef struct vb_pq_ops_t:
        int level
        const char *name
        int needs_planes
        const vb_distance_ops_t *dist
        vb_pq_nearest_fn nearest
        vb_pq_l2sq_cols_fn l2sq_cols
        vb_pq_scores_fn scores
    const vb_pq_ops_t *vb_pq_ops_for(int level)

    ctypedef struct vb_pq_train_stats_t:
        size_t rows_used
        size_t iterations
        size_t reseeded
        size_t bad_row
        double inertia

    int vb_pq_check_shape(size_t dim, size_t m)
    int vb_pq_train(const vb_pq_ops_t *ops, const float *x, size_t n, size_t dim, size_t m, size_t iters,
                    uint64_t seed, size_t sample, const float *init, size_t nthreads, float *codebook,
                    vb_pq_train_stats_t *stats)
    int vb_pq_encode(const vb_pq_ops_t *ops, const float *codebook, size_t dim, size_t m, const float *x,
                     size_t n, uint8_t *codes, size_t nthreads, int pairwise)
    void vb_pq_decode(const float *codebook, size_t dim, size_t m, const uint8_t *codes, size_t n, float *out)
    void vb_pq_adc_table(const vb_pq_ops_t *ops, int metric, const float *codebook, size_t dim, size_t m,
                         const float *q, float *table)
    int vb_pq_adc_scores(const vb_pq_ops_t *ops, const float *table, size_t m, const uint8_t *codes, size_t n,
                         float *out)
    int vb_pq_adc_scan(const vb_pq_ops_t *ops, const float *table, size_t m, const uint8_t *codes, size_t n,
                       const uint8_t *allowed, size_t k, size_t nthreads, int64_t *out_rows, float *out_scores,
                       size_t *out_k)

    ctypedef struct vb_pq_header_t:
        uint32_t version, dim, m, nbits, ksub
        uint64_t payload_bytes
        const uint8_t *payload
    size_t vb_pq_serialized_bytes(size_t dim)
    int vb_pq_serialize(uint8_t *out, size_t out_len, size_t dim, size_t m, const float *codebook)
    int vb_pq_parse(const uint8_t *buf, size_t len, vb_pq_header_t *hdr, const char **why)
