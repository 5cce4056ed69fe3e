from vibrato._native._common cimport vb_simd_level_t

cdef extern from "vibrato/cpu.h" nogil:
    vb_simd_level_t vb_cpu_max_level()
    int vb_cpu_has_sse42()
    const char *vb_simd_level_name(int level)
