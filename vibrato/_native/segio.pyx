"""Native I/O for segment files: CRC32C, a read-only mmap with madvise, and the structural validators.

Everything that judges untrusted segment bytes lives in include/vibrato/segment.h and is reached
from here, so the fuzz tests (and any future libFuzzer harness) exercise the C checks directly:

* ``parse_header(buf, file_size)`` validates the fixed header and the section table and returns a
  :class:`SegmentLayout` (or raises :class:`SegmentFormatError` / :class:`SegmentChecksumError`).
* ``check_columns(layout, buffer)`` validates every metadata column against the layout.
* ``verify_fd(layout, fd)`` re-reads the whole file with pread and checks every CRC32C and padding.
* ``crc32c(buffer, crc=0)`` over any C-contiguous buffer, GIL released for large inputs.
* ``metadata_rows(rows, columns...)`` the metadata dicts of rows, read from the mapped columns.

The file layout itself is documented in vibrato/segment/format.py. Thread-safety: every function
here is safe to call from several threads at once; the CRC tables are built once at import.
"""
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE,
                             PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES)
from libc.errno cimport errno
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.mman cimport mmap, munmap, madvise, mincore, PROT_READ, MAP_SHARED, MAP_FAILED
from posix.unistd cimport sysconf

from vibrato._native._common cimport byte_view, native_init, vb_crc32c_hw, vb_crc32c_with

import os

cdef extern from "<unistd.h>" nogil:
    enum: _SC_PAGESIZE

native_init()
cdef size_t _page = <size_t>sysconf(_SC_PAGESIZE)
# Below this many bytes a CRC is cheaper than releasing and re-taking the GIL.
cdef Py_ssize_t _NOGIL_MIN = 1 << 16
cdef char *_FORMAT_B = "B"

MAGIC = (<bytes>VB_SEG_MAGIC)[:VB_SEG_MAGIC_LEN]
VERSION = VB_SEG_VERSION
HEADER_SIZE = VB_SEG_HEADER_SIZE
ENTRY_SIZE = VB_SEG_ENTRY_SIZE
MAX_SECTIONS = VB_SEG_MAX_SECTIONS
MAX_HEADER_LEN = VB_SEG_MAX_HEADER_LEN
CRC_FIELD = VB_SEG_CRC_FIELD
PAGE_ALIGN = VB_SEG_PAGE_ALIGN
ALIGN = VB_SEG_ALIGN
MAX_DIM = VB_SEG_MAX_DIM
MAX_COUNT = VB_SEG_MAX_COUNT
MAX_LEVEL = VB_SEG_MAX_LEVEL
MAX_ID = VB_SEG_MAX_ID
FLAG_KIND_MASK = VB_SEG_FLAG_KIND_MASK
FLAG_HAS_GRAPH = VB_SEG_FLAG_HAS_GRAPH
FLAG_HAS_PQ = VB_SEG_FLAG_HAS_PQ
FLAG_HAS_SCAN_CODES = VB_SEG_FLAG_HAS_SCAN_CODES
NUM_SECTION_KINDS = VB_SEC_NKINDS
PAGE_SIZE = _page


class SegmentFormatError(ValueError):
    """A segment file is structurally invalid (bad magic/version, sizes, offsets, columns, UTF-8).

    ``path`` is the file (or None for an in-memory buffer), ``section`` the section name when one
    section is at fault.
    """

    def __init__(self, message, path=None, section=None):
        super().__init__(message)
        self.path = path
        self.section = section


class SegmentChecksumError(SegmentFormatError):
    """A stored CRC32C does not match the bytes (``section`` is "header" or a section name)."""


def section_name(unsigned int kind):
    """The name of section kind ``kind`` ("unknown" if it is not a known kind)."""
    return vb_seg_section_name(kind).decode()


def has_hw_crc():
    """True when CRC32C runs on the SSE4.2 instruction."""
    return bool(vb_crc32c_hw)


def crc32c(buffer, unsigned int crc=0, hw=None):
    """CRC32C (Castagnoli) of a C-contiguous buffer (bytes, memoryview, numpy array, mmap, ...).

    ``crc`` continues a running CRC (pass the previous result). ``hw`` forces (True) or disables
    (False) the SSE4.2 path; None uses the best available (tests compare the two). The GIL is
    released for buffers of 64 KiB and more.
    """
    cdef Py_buffer view
    cdef int use_hw = vb_crc32c_hw if hw is None else (1 if hw and vb_crc32c_hw else 0)
    cdef uint32_t c = crc
    try:
        PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    except (BufferError, ValueError) as e:
        raise ValueError(f"crc32c needs a C-contiguous buffer: {e}") from None
    try:
        if view.len >= _NOGIL_MIN:
            with nogil:
                c = vb_crc32c_with(c, view.buf, <size_t>view.len, use_hw)
        else:
            c = vb_crc32c_with(c, view.buf, <size_t>view.len, use_hw)
    finally:
        PyBuffer_Release(&view)
    return c


# ------------------------------------------------------------------------------------------ mapping
cdef class Mapping:
    """A read-only ``MAP_SHARED`` mapping of the first ``length`` bytes of an open file.

    It exports a read-only buffer (``memoryview(m)``, ``np.frombuffer(m, ...)``); a writable
    request raises BufferError, and the pages are mapped PROT_READ. Every exported buffer holds a
    reference to the Mapping, so the memory stays mapped until the Mapping *and* every view made
    from it are gone: a view can never dangle. The fd may be closed right after construction.
    """

    def __cinit__(self, int fd, size_t length):
        self.addr = NULL
        if length == 0:
            raise ValueError("cannot map an empty file")
        cdef void *p
        with nogil:
            p = mmap(NULL, length, PROT_READ, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            e = errno
            raise OSError(e, f"mmap of {length} bytes failed: {os.strerror(e)}")
        self.addr = <char *>p
        self.length = length
        self.shape[0] = <Py_ssize_t>length
        self.strides[0] = 1

    def __dealloc__(self):
        if self.addr != NULL:
            munmap(self.addr, self.length)
            self.addr = NULL

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("segment mappings are read-only")
        buffer.buf = self.addr
        buffer.obj = self
        buffer.len = <Py_ssize_t>self.length
        buffer.readonly = 1
        buffer.itemsize = 1
        buffer.format = _FORMAT_B if flags & PyBUF_FORMAT else NULL
        buffer.ndim = 1
        buffer.shape = self.shape if flags & PyBUF_ND else NULL
        buffer.strides = self.strides if (flags & PyBUF_STRIDES) == PyBUF_STRIDES else NULL
        buffer.suboffsets = NULL
        buffer.internal = NULL

    def __releasebuffer__(self, Py_buffer *buffer):
        pass

    def __len__(self):
        return self.length

    @property
    def size(self):
        """Mapped bytes (the file size)."""
        return self.length

    @property
    def address(self):
        """Start address of the mapping (page-aligned)."""
        return <size_t>self.addr

    cdef int _page_range(self, size_t offset, size_t length, size_t *start, size_t *span) except -1:
        # Round [offset, offset+length) outwards to whole pages; the mapping covers whole pages up to
        # round_up(self.length), so the rounded range stays inside it.
        if offset > self.length or length > self.length - offset:
            raise ValueError(f"range [{offset}, +{length}) is outside the {self.length}-byte mapping")
        start[0] = offset - offset % _page
        cdef size_t end = offset + length
        end = (end + _page - 1) // _page * _page
        span[0] = end - start[0]
        return 0

    def madvise(self, size_t offset, size_t length, int advice):
        """madvise(advice) over [offset, offset+length), rounded out to whole pages.

        Raises OSError (with errno) if the kernel refuses; a zero-length range is a no-op.
        """
        cdef size_t start, span
        cdef int rc
        if length == 0:
            return
        self._page_range(offset, length, &start, &span)
        with nogil:
            rc = madvise(self.addr + start, span, advice)
        if rc != 0:
            e = errno
            raise OSError(e, f"madvise(advice={advice}) on [{start}, +{span}) failed: {os.strerror(e)}")

    def resident_pages(self, size_t offset=0, length=None):
        """(resident, total) pages of [offset, offset+length) according to mincore()."""
        cdef size_t start, span, i, n, res = 0
        cdef size_t ln = self.length - offset if length is None else <size_t>length
        cdef bytearray vec
        cdef unsigned char *v
        cdef int rc
        if ln == 0:
            return (0, 0)
        self._page_range(offset, ln, &start, &span)
        n = span // _page
        vec = bytearray(n)
        v = <unsigned char *>vec
        with nogil:
            rc = mincore(self.addr + start, span, v)
        if rc != 0:
            e = errno
            raise OSError(e, f"mincore failed: {os.strerror(e)}")
        for i in range(n):
            res += v[i] & 1
        return (res, n)


# ------------------------------------------------------------------------------------------- layout
cdef class SegmentLayout:
    """A validated header + section table. Read-only; built by parse_header()."""

    @property
    def version(self):
        return self.c.version

    @property
    def flags(self):
        return self.c.flags

    @property
    def seg_kind(self):
        """0 = raw, 1 = archive."""
        return self.c.seg_kind

    @property
    def has_graph(self):
        return bool(self.c.flags & VB_SEG_FLAG_HAS_GRAPH)

    @property
    def has_pq(self):
        return bool(self.c.flags & VB_SEG_FLAG_HAS_PQ)

    @property
    def has_scan_codes(self):
        return bool(self.c.flags & VB_SEG_FLAG_HAS_SCAN_CODES)

    @property
    def count(self):
        return self.c.count

    @property
    def dim(self):
        return self.c.dim

    @property
    def level(self):
        return self.c.level

    @property
    def pq_m(self):
        return self.c.pq_m

    @property
    def id_start(self):
        return self.c.id_start

    @property
    def file_size(self):
        return self.c.file_size

    @property
    def header_len(self):
        return self.c.header_len

    @property
    def header_crc(self):
        return self.c.header_crc

    @property
    def ntags(self):
        return self.c.ntags

    @property
    def nnz(self):
        return self.c.nnz

    @property
    def sections(self):
        """{name: (offset, length, crc32c)} for every present section, in kind order."""
        out = {}
        cdef uint32_t k
        for k in range(1, VB_SEC_NKINDS + 1):
            if self.c.present & (1u << k):
                out[vb_seg_section_name(k).decode()] = (self.c.sec[k].offset, self.c.sec[k].length,
                                                        self.c.sec[k].crc)
        return out

    def section(self, str name):
        """(offset, length, crc32c) of section ``name``; KeyError if absent."""
        return self.sections[name]

    def __repr__(self):
        return (f"SegmentLayout(kind={self.c.seg_kind}, count={self.c.count}, dim={self.c.dim}, "
                f"level={self.c.level}, id_start={self.c.id_start}, file_size={self.c.file_size})")


def parse_header(buf, unsigned long long file_size, path=None):
    """Validate the header and section table in ``buf`` (the file's first bytes, at least
    min(file_size, MAX_HEADER_LEN)) against the real ``file_size``. Returns a SegmentLayout.

    Raises SegmentChecksumError for a header CRC mismatch, SegmentFormatError for anything else.
    Nothing is mapped or allocated from the file's numbers.
    """
    cdef const uint8_t[::1] b = byte_view(buf, "buf")
    cdef SegmentLayout lay = SegmentLayout.__new__(SegmentLayout)
    cdef char err[512]
    cdef int rc
    err[0] = 0
    rc = vb_seg_parse_header(&b[0] if b.shape[0] else <const uint8_t *>"", <size_t>b.shape[0], file_size, &lay.c,
                             err, sizeof(err))
    if rc == VB_SEG_ECHECKSUM:
        raise SegmentChecksumError(_msg(path, err), path, "header")
    if rc != 0:
        raise SegmentFormatError(_msg(path, err), path, _section_from(err))
    return lay


def check_columns(SegmentLayout layout, buffer, path=None):
    """Validate every metadata column of ``layout`` inside ``buffer`` (the whole file: a Mapping or
    bytes). Linear in count + nnz + the tag dictionary; runs without the GIL."""
    cdef Py_buffer view
    cdef char err[512]
    cdef int rc
    err[0] = 0
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        with nogil:
            rc = vb_seg_check_columns(<const uint8_t *>view.buf, <size_t>view.len, &layout.c, err, sizeof(err))
    finally:
        PyBuffer_Release(&view)
    if rc != 0:
        raise SegmentFormatError(_msg(path, err), path, _section_from(err))


def check_source_utf8(SegmentLayout layout, buffer, path=None):
    """Every source_file string of ``layout`` inside ``buffer`` is valid UTF-8 on its own."""
    cdef Py_buffer view
    cdef size_t bad = 0
    cdef int rc
    PyObject_GetBuffer(buffer, &view, PyBUF_SIMPLE)
    try:
        if <uint64_t>view.len < layout.c.file_size:
            raise SegmentFormatError(_msg(path, b"buffer is shorter than the segment"), path)
        with nogil:
            rc = vb_seg_check_utf8_csr64(<const uint8_t *>view.buf + layout.c.sec[VB_SEC_SOURCE_OFFSETS].offset,
                                         <size_t>layout.c.count,
                                         <const uint8_t *>view.buf + layout.c.sec[VB_SEC_SOURCE_BLOB].offset, &bad)
    finally:
        PyBuffer_Release(&view)
    if rc != 0:
        raise SegmentFormatError(_msg(path, f"section source_blob: row {bad} is not valid UTF-8".encode()),
                                 path, "source_blob")


def verify_fd(SegmentLayout layout, int fd, path=None, size_t chunk=1 << 20, unsigned int skip_kinds=0):
    """Re-read the file behind ``fd`` with pread: header CRC, every section's CRC32C, and zero padding
    everywhere else. Returns the number of bytes read. Runs without the GIL. Sections whose kind bit
    is set in ``skip_kinds`` (1 << kind) are not read.

    Raises SegmentChecksumError naming the section, SegmentFormatError for non-zero padding or
    trailing bytes, OSError for read errors (or a file that shrank).
    """
    cdef vb_seg_verify_t res
    cdef int rc
    with nogil:
        rc = vb_seg_verify_fd(fd, &layout.c, chunk, skip_kinds, &res)
    where = f"{path}: " if path is not None else ""
    if rc == 0:
        return res.bytes
    if rc == VB_SEG_ECHECKSUM:
        name = "header" if res.kind == 0 else vb_seg_section_name(res.kind).decode()
        raise SegmentChecksumError(
            f"{where}checksum mismatch in section {name}: stored 0x{res.stored:08x}, "
            f"computed 0x{res.computed:08x}", path, name)
    if rc == VB_SEG_EIO:
        if res.sys_errno:
            raise OSError(res.sys_errno, f"{where}read failed at offset {res.offset}: "
                                         f"{os.strerror(res.sys_errno)}")
        raise OSError(f"{where}file ended early at offset {res.offset} (it shrank while being verified)")
    if rc == -1:
        raise MemoryError("verify: cannot allocate the read buffer")
    if res.offset == layout.c.file_size:
        raise SegmentFormatError(f"{where}bytes follow the recorded end of the file ({res.offset})", path)
    raise SegmentFormatError(f"{where}non-zero padding byte at offset {res.offset}", path)


# --------------------------------------------------- per-array checks (writer input validation)
def check_offsets(offsets, unsigned long long end):
    """-1 when a uint32/uint64 CSR pointer array is 0 = o[0] <= ... <= o[-1] = end, else the first bad
    index. ``offsets`` is a C-contiguous 1-D numpy array of dtype uint32 or uint64."""
    cdef const uint8_t[::1] b = byte_view(offsets, "offsets")
    cdef size_t bad = 0, n1 = offsets.shape[0]
    cdef int rc
    if n1 == 0:
        return 0
    if offsets.dtype.itemsize == 4:
        with nogil:
            rc = vb_seg_check_offsets32(&b[0], n1, end, &bad)
    else:
        with nogil:
            rc = vb_seg_check_offsets64(&b[0], n1, end, &bad)
    return -1 if rc == 0 else <Py_ssize_t>bad


def check_tag_rows(offsets, ids, unsigned long long ntags):
    """-1 when every row's tag ids (uint32 CSR, offsets already valid) are < ntags and strictly
    ascending, else the first bad row."""
    cdef const uint8_t[::1] o = byte_view(offsets, "offsets")
    cdef const uint8_t[::1] i = byte_view(ids, "ids")
    cdef size_t bad = 0, n = offsets.shape[0] - 1
    cdef const uint8_t *ip = &i[0] if i.shape[0] else <const uint8_t *>""
    cdef int rc
    with nogil:
        rc = vb_seg_check_tag_ids(&o[0], n, ip, ntags, &bad)
    return -1 if rc == 0 else <Py_ssize_t>bad


cdef str _msg(path, const char *err):
    text = err.decode("utf-8", "replace")
    return f"{path}: {text}" if path is not None else text


cdef object _section_from(const char *err):
    text = err.decode("utf-8", "replace")
    if text.startswith("section "):
        return text[len("section "):].split(":", 1)[0].split(" ", 1)[0]
    return None


cdef object _K_SOURCE = "source_file", _K_START = "start_time_ms", _K_DURATION = "duration_ms", _K_BPM = "bpm"
cdef object _K_TAGS = "tags"


class SourceNotUtf8(ValueError):
    """metadata_rows: the source_file bytes of `row` are not UTF-8 (`reason` says why)."""

    def __init__(self, row, reason):
        super().__init__(row, reason)
        self.row = row
        self.reason = reason


def metadata_rows(const int64_t[::1] rows, const uint32_t[::1] start, const uint32_t[::1] duration,
                  const float[::1] bpm, const uint64_t[::1] source_offsets, const uint8_t[::1] source_blob,
                  const uint32_t[::1] tag_offsets, const uint32_t[::1] tag_ids, tuple dictionary):
    """The metadata dicts of a segment's rows from its columns (SegmentReader.metadata_rows): one C
    loop instead of a numpy gather per column. Every index is checked against its column (IndexError);
    a source_file that is not UTF-8 raises SourceNotUtf8 with its row."""
    cdef Py_ssize_t n = start.shape[0], i, t
    cdef int64_t r
    cdef uint64_t a, b
    cdef uint32_t ta, tb, tag
    cdef Py_ssize_t ntags = len(dictionary)
    if duration.shape[0] != n or bpm.shape[0] != n or source_offsets.shape[0] != n + 1 or tag_offsets.shape[0] != n + 1:
        raise ValueError("metadata columns of different lengths")
    out = []
    for i in range(rows.shape[0]):
        r = rows[i]
        if r < 0 or r >= n:
            raise IndexError(f"row {r} outside [0, {n})")
        a, b = source_offsets[r], source_offsets[r + 1]
        if a > b or b > <uint64_t>source_blob.shape[0]:
            raise IndexError(f"row {r}: source_file bytes outside the blob")
        ta, tb = tag_offsets[r], tag_offsets[r + 1]
        if ta > tb or tb > <uint64_t>tag_ids.shape[0]:
            raise IndexError(f"row {r}: tags outside the tag ids")
        tags = []
        for t in range(ta, tb):
            tag = tag_ids[t]
            if tag >= ntags:
                raise IndexError(f"row {r}: tag id {tag} outside the dictionary")
            tags.append(dictionary[tag])
        try:
            source = PyUnicode_DecodeUTF8(<const char *>&source_blob[a], <Py_ssize_t>(b - a), "strict") if b > a else ""
        except UnicodeDecodeError as e:
            raise SourceNotUtf8(r, e.reason) from None
        out.append({_K_SOURCE: source, _K_START: start[r], _K_DURATION: duration[r], _K_BPM: <double>bpm[r],
                    _K_TAGS: tags})
    return out
