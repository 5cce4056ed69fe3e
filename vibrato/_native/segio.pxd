# Declarations for segio.pyx: CRC32C and the segment-format validators (include/vibrato/segment.h).
from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef extern from "vibrato/segment.h" nogil:
    int VB_SEG_ECHECKSUM
    int VB_SEG_EIO
    const char *VB_SEG_MAGIC
    unsigned int VB_SEG_MAGIC_LEN
    unsigned int VB_SEG_VERSION
    unsigned int VB_SEG_HEADER_SIZE
    unsigned int VB_SEG_ENTRY_SIZE
    unsigned int VB_SEG_MAX_SECTIONS
    unsigned int VB_SEG_MAX_HEADER_LEN
    unsigned int VB_SEG_CRC_FIELD
    unsigned int VB_SEG_PAGE_ALIGN
    unsigned int VB_SEG_ALIGN
    unsigned int VB_SEG_MAX_DIM
    unsigned long long VB_SEG_MAX_COUNT
    unsigned int VB_SEG_MAX_LEVEL
    unsigned long long VB_SEG_MAX_ID
    unsigned int VB_SEG_FLAG_KIND_MASK
    unsigned int VB_SEG_FLAG_HAS_GRAPH
    unsigned int VB_SEG_FLAG_HAS_PQ
    unsigned int VB_SEG_FLAG_HAS_SCAN_CODES
    unsigned int VB_SEC_NKINDS
    unsigned int VB_SEC_SOURCE_OFFSETS
    unsigned int VB_SEC_SOURCE_BLOB

    ctypedef struct vb_seg_section_t:
        uint32_t kind
        uint32_t crc
        uint64_t offset
        uint64_t length

    ctypedef struct vb_seg_layout_t:
        uint32_t version
        uint32_t flags
        uint32_t seg_kind
        uint32_t dim
        uint32_t level
        uint32_t pq_m
        uint32_t nsections
        uint32_t header_crc
        uint64_t count
        uint64_t id_start
        uint64_t file_size
        uint64_t header_len
        uint64_t ntags
        uint64_t nnz
        uint32_t present
        vb_seg_section_t sec[15]

    ctypedef struct vb_seg_verify_t:
        uint32_t kind
        uint32_t stored
        uint32_t computed
        int sys_errno
        uint64_t offset
        uint64_t bytes

    const char *vb_seg_section_name(uint32_t kind)
    int vb_seg_parse_header(const uint8_t *buf, size_t buflen, uint64_t file_size, vb_seg_layout_t *out,
                            char *err, size_t errlen)
    int vb_seg_check_columns(const uint8_t *base, size_t length, const vb_seg_layout_t *L, char *err,
                             size_t errlen)
    int vb_seg_verify_fd(int fd, const vb_seg_layout_t *L, size_t chunk_len, uint32_t skip_kinds,
                         vb_seg_verify_t *res)
    int vb_seg_check_live(const uint8_t *p, size_t n, size_t *bad)
    int vb_seg_check_offsets32(const uint8_t *p, size_t n1, uint64_t end, size_t *bad)
    int vb_seg_check_offsets64(const uint8_t *p, size_t n1, uint64_t end, size_t *bad)
    int vb_seg_check_tag_ids(const uint8_t *offs, size_t n, const uint8_t *ids, uint64_t ntags, size_t *bad)
    int vb_seg_check_dict_order(const uint8_t *doffs, size_t ntags, const uint8_t *blob, size_t *bad)
    int vb_seg_check_utf8_csr64(const uint8_t *offs, size_t n, const uint8_t *blob, size_t *bad)
    int vb_seg_check_utf8_csr32(const uint8_t *offs, size_t n, const uint8_t *blob, size_t *bad)


cdef class Mapping:
    """A read-only, shared mmap of a whole file; unmapped when the last reference (including every
    buffer exported from it, e.g. numpy views) goes away."""
    cdef char *addr
    cdef size_t length
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]
    cdef int _page_range(self, size_t offset, size_t length, size_t *start, size_t *span) except -1


cdef class SegmentLayout:
    """A header and section table that passed vb_seg_parse_header."""
    cdef vb_seg_layout_t c
