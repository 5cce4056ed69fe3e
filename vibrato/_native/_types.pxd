# Shared C declarations for every native module (sklearn's _typedefs.pxd plays this role there).
from libc.stdint cimport int64_t, uint64_t, uint32_t, uint8_t, int32_t

cdef extern from "vibrato/common.h" nogil:
    int VB_OK
    int VB_ENOMEM
    int VB_EINVAL
    int VB_ECORRUPT
    int VB_ETHREAD
    ctypedef enum vb_simd_level_t:
        VB_SIMD_SCALAR
        VB_SIMD_NEON
        VB_SIMD_AVX2
        VB_SIMD_AVX512
