# What every native module shares (scikit-learn's _typedefs.pxd plays this role there): the C error
# codes and SIMD levels, the CRC32C and thread-pool set-up, and the two helpers each wrapper needs, so
# every module maps a C error code to the same Python exception and picks thread counts the same way.
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
        VB_SIMD_AVX512VBMI

cdef extern from "vibrato/crc32c.h" nogil:
    int vb_crc32c_hw  # the SSE4.2 instruction is used; set by vb_crc32c_init()
    void vb_crc32c_init()
    uint32_t vb_crc32c(uint32_t crc, const void *buf, size_t length)
    uint32_t vb_crc32c_with(uint32_t crc, const void *buf, size_t length, int hw)

cdef extern from "vibrato/parallel.h" nogil:
    size_t VB_MAX_THREADS
    size_t vb_auto_threads  # threads a large call uses when not told; set by vb_parallel_init()
    void vb_parallel_init()


cdef inline void native_init() noexcept:
    """Every native module calls this once, at import (the C state above is per module)."""
    vb_crc32c_init()
    vb_parallel_init()


cdef inline int check_rc(int rc, str what) except -1:
    """Raise the exception for a VB_E* code from a C call (`what` names the call); 0 for VB_OK."""
    if rc == VB_OK:
        return 0
    if rc == VB_ENOMEM:
        raise MemoryError(f"{what}: out of memory")
    if rc == VB_EINVAL:
        raise ValueError(f"{what}: invalid argument")
    if rc == VB_ECORRUPT:
        raise ValueError(f"{what}: invalid or corrupt input")
    if rc == VB_ETHREAD:
        raise RuntimeError(f"{what}: could not start worker threads")
    raise RuntimeError(f"{what}: native error {rc}")


cdef inline size_t threads_for(object threads, size_t work, size_t parallel_min) except 0:
    """The thread count for a call: `threads` when given (an int in [1, VB_MAX_THREADS]), else
    vb_auto_threads when `work` reaches `parallel_min` (below it thread start-up costs more than it
    saves) and 1 otherwise."""
    if threads is None:
        return vb_auto_threads if work >= parallel_min else 1
    if isinstance(threads, bool) or not isinstance(threads, int) and not hasattr(threads, "__index__"):
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    if not 1 <= threads <= VB_MAX_THREADS:
        raise ValueError(f"threads must be in [1, {VB_MAX_THREADS}], got {threads}")
    return threads


cdef inline object byte_view(object obj, str what):
    """A flat read-only uint8 memoryview of a C-contiguous buffer (bytes, mmap, numpy arrays of any
    dtype); ValueError naming `what` for anything else."""
    try:
        m = memoryview(obj)
    except TypeError:
        raise ValueError(f"{what} must be a bytes-like object, got {type(obj).__name__}") from None
    if not m.c_contiguous:
        raise ValueError(f"{what} must be a C-contiguous bytes-like object")
    if m.format != "B" or m.ndim != 1:
        m = m.cast("B")
    return m
