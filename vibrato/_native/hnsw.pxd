# Declarations of include/vibrato/hnsw.h (the HNSW index in C). See that header for the contracts.
from libc.stdint cimport int64_t, uint64_t, uint32_t, uint8_t

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
    int VB_HNSW_FILE_HEADER

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
        uint64_t *up_off
        uint32_t *up_links
        size_t up_len
        uint32_t entry
        int max_level
        size_t n_graph
        size_t n_scan
        size_t n_fallback
        size_t n_dist

    ctypedef struct vb_hnsw_labels_t:
        int64_t base
        const int64_t *row_labels
        const int64_t *sorted
        const uint32_t *sorted_rows

    ctypedef struct vb_hnsw_file_t:
        uint64_t n
        uint32_t d
        uint32_t flags
        int64_t id_base
        int64_t next_label
        uint64_t vec_off
        uint64_t vec_len
        uint64_t lab_off
        uint64_t lab_len
        uint64_t graph_off
        uint64_t graph_len
        uint32_t vec_crc
        uint32_t lab_crc
        uint32_t graph_crc

    int vb_hnsw_init(vb_hnsw_t *h, size_t d, size_t M, size_t efc, uint64_t seed)
    void vb_hnsw_free(vb_hnsw_t *h)
    int vb_hnsw_add(vb_hnsw_t *h, const float *x_new, size_t m, size_t nthreads, const vb_distance_ops_t *ops)
    int vb_hnsw_search(vb_hnsw_t *h, const vb_distance_ops_t *ops, const float *q, size_t nq, size_t k, size_t ef,
                       const uint8_t *mask, size_t allowed, int mode, size_t nthreads, int64_t *rows, float *scores)
    int vb_hnsw_subseq(vb_hnsw_t *h, const vb_distance_ops_t *ops, const float *frames, size_t L, size_t k,
                       size_t ef, size_t n_anchors, size_t anchor_k, int spread, const uint8_t *valid,
                       const vb_hnsw_labels_t *lab, int64_t *starts, float *scores, size_t *ncand)
    size_t vb_hnsw_graph_size(const vb_hnsw_t *h)
    int vb_hnsw_graph_write(const vb_hnsw_t *h, uint8_t *out, size_t len, int hw)
    int vb_hnsw_graph_read_checked(vb_hnsw_t *h, const uint8_t *buf, size_t len, const float *x, size_t xn,
                                   size_t xd, int hw, char *msg, size_t msglen)
    int vb_hnsw_file_layout(vb_hnsw_file_t *f)
    void vb_hnsw_file_header_write(const vb_hnsw_file_t *f, uint8_t *out, int hw)
    int vb_hnsw_file_read_checked(const uint8_t *buf, size_t len, int hw, vb_hnsw_file_t *f, char *msg,
                                  size_t msglen)

cdef extern from "vibrato/crc32c.h" nogil:
    void vb_crc32c_init_tables()
    uint32_t vb_crc32c(uint32_t crc, const void *buf, size_t len, int hw)
