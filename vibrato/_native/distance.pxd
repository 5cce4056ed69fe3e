from libc.stdint cimport int8_t, int16_t, int64_t, uint32_t

cdef extern from "vibrato/distance.h" nogil:
    ctypedef float (*vb_pair_fn)(const float *a, const float *b, size_t d)
    ctypedef void (*vb_ny_fn)(float *out, const float *x, const float *y, size_t d, size_t ny)
    ctypedef void (*vb_ids_fn)(float *out, const float *x, const float *y, size_t d, const int64_t *ids, size_t n)
    ctypedef void (*vb_ids32_fn)(float *out, const float *x, const float *y, size_t d, const uint32_t *ids, size_t n)
    ctypedef void (*vb_sq8_ids32_fn)(float *out, const int16_t *q, float qscale, const int8_t *codes,
                                     const float *scale, size_t d, const uint32_t *ids, size_t n)
    ctypedef void (*vb_sq8_ny_fn)(float *out, const int16_t *q, float qscale, const int8_t *codes,
                                  const float *scale, size_t d, size_t ny)
    ctypedef struct vb_distance_ops_t:
        int level
        vb_pair_fn dot
        vb_pair_fn l2sq
        vb_ny_fn dot_ny
        vb_ny_fn l2sq_ny
        vb_ids_fn dot_ids
        vb_ids_fn l2sq_ids
        vb_ids32_fn dot_ids32
        vb_sq8_ids32_fn dot_sq8_ids32
        vb_sq8_ny_fn dot_sq8_ny
    void vb_sq8_encode(const float *x, size_t n, size_t d, int8_t *codes, float *scale)
    float vb_sq8_query(const float *q, size_t d, int16_t *q16)
    const vb_distance_ops_t *vb_distance_ops_for(int level)
    void vb_distance_matrix(const vb_distance_ops_t *ops, int metric, float *out, const float *x, size_t nq,
                            const float *y, size_t ny, size_t d)
    int vb_distance_many(const vb_distance_ops_t *ops, int metric, float *out, const float *x, const float *y,
                         size_t d, size_t ny, const int64_t *ids, size_t nthreads)
    int vb_distance_matrix_mt(const vb_distance_ops_t *ops, int metric, float *out, const float *x, size_t nq,
                              const float *y, size_t ny, size_t d, size_t nthreads)
