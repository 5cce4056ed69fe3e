"""The common `POST /v2/query` read from a connection's bytes in C (include/vibrato/httpq.h).

`RequestReader.head` frames what an idle connection received (where the request ends, by its
Content-Length) and says whether it is the common query; `RequestReader.query_body` reads that query's
JSON body into a float32 vector and the search parameters. Both take only a strict subset of what
aiohttp and the regular route take and return a refusal for the rest, which then takes the regular
route unchanged (server/protocol.py, server/fastpath.py).
"""
cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

import numpy as np

cnp.import_array()

cdef extern from "vibrato/httpq.h" nogil:
    ctypedef struct vb_httpq_t:
        size_t head_len
        int64_t content_length
        int is_query
        int plain
        int json
        int auth_count
        size_t auth_off, auth_len
        int rid_count
        size_t rid_off, rid_len
        int64_t k, ef
        int include_metadata
        int tier
        size_t filter_off, filter_len
    int vb_httpq_init()
    int vb_httpq_head(const unsigned char *buf, size_t n, vb_httpq_t *r)
    int vb_httpq_query_body(const unsigned char *body, size_t n, size_t dim, int64_t max_k, int64_t max_ef,
                            float *vec, vb_httpq_t *r)
    int vb_httpq_identify_body(const unsigned char *body, size_t n, size_t dim, size_t max_frames, int64_t max_k,
                               int64_t max_ef, float *out, size_t *frames, vb_httpq_t *r)
    int VB_HTTPQ_MAX_HEAD

if vb_httpq_init() != 0:
    raise MemoryError("newlocale(C) failed")

MAX_HEAD = VB_HTTPQ_MAX_HEAD
TIERS = ("active", "archive", "all")


cdef object _marked(out, type cls):
    """out as a read-only array of type cls (the caller's marker for vectors this reader checked)."""
    out = out.view(cls)
    cnp.PyArray_CLEARFLAGS(<cnp.ndarray>out, cnp.NPY_ARRAY_WRITEABLE)
    return out


cdef class RequestReader:
    """Reads requests for one collection (dim) under the k and ef limits; one per event loop, as it
    keeps the last request read. Not thread-safe."""
    cdef vb_httpq_t r
    cdef readonly Py_ssize_t dim
    cdef int64_t max_k, max_ef
    cdef object _buf  # the buffer of the last head read
    cdef object _filter  # the last query_vector's filter object, as its JSON bytes

    def __init__(self, Py_ssize_t dim, int64_t max_k, int64_t max_ef):
        if dim <= 0 or max_k < 0 or max_ef < 0:
            raise ValueError("dim must be positive and the limits non-negative")
        self.dim = dim
        self.max_k = max_k
        self.max_ef = max_ef

    def head(self, const unsigned char[::1] buf, Py_ssize_t n):
        """Frame buf[:n], the start of a request: its whole length (head and Content-Length body), or -1
        when this reader does not take the head (incomplete, or anything but plain HTTP/1.1 with a
        Content-Length or no body, no Transfer-Encoding, no Upgrade: the caller then cannot tell where
        the request ends)."""
        if n < 0 or n > buf.shape[0]:
            raise ValueError("n is outside the buffer")
        self._buf = None
        if n == 0 or not vb_httpq_head(&buf[0], <size_t>n, &self.r):
            return -1
        self._buf = buf
        if self.r.content_length < 0:
            return <Py_ssize_t>self.r.head_len
        return <Py_ssize_t>self.r.head_len + <Py_ssize_t>self.r.content_length

    @property
    def candidate(self) -> bool:
        """The last head read is a common query's: `POST /v2/query HTTP/1.1`, JSON, one Authorization,
        at most one x-request-id, a Content-Length, no Expect, Content-Encoding or Connection: close."""
        r = &self.r
        return bool(self._buf is not None and r.is_query and r.plain and r.json and r.auth_count == 1
                    and r.rid_count <= 1 and r.content_length >= 0)

    @property
    def body_length(self) -> int:
        return self.r.content_length

    def query_body(self, const unsigned char[::1] buf, float[::1] vector) -> bool:
        """Read the body of the candidate whose head was read last from the same buf (which holds the
        whole request) into vector (dim float32) and k, ef, include_metadata, search_tier. False: not
        the common query (the regular route parses it)."""
        if not self.candidate or buf.shape[0] < 1:
            return False
        if vector.shape[0] != self.dim:
            raise ValueError("vector must hold dim components")
        cdef size_t start = self.r.head_len, length = <size_t>self.r.content_length
        if start + length > <size_t>buf.shape[0]:
            return False
        cdef int ok
        with nogil:
            ok = vb_httpq_query_body(&buf[0] + start, length, <size_t>self.dim, self.max_k, self.max_ef,
                                     &vector[0], &self.r)
        return bool(ok)

    def query_vector(self, const unsigned char[::1] buf, type cls):
        """query_body into a new read-only array of type cls (an ndarray subclass: the caller's marker
        for checked vectors), or None when the body is not the common query. A filter object's
        bytes are then in `filter_json`."""
        out = np.empty(self.dim, dtype=np.float32)
        self._filter = None
        if not self.query_body(buf, out):
            return None
        if self.r.filter_len:
            start = self.r.head_len + self.r.filter_off
            self._filter = bytes(buf[start:start + self.r.filter_len])
        return _marked(out, cls)

    def identify_body(self, const unsigned char[::1] body, Py_ssize_t max_frames, type cls):
        """An identify body in its plainest form (include/vibrato/httpq.h, vb_httpq_identify_body):
        (frames, k, ef, include_metadata, search_tier), frames a read-only (n, dim) float32 array of
        type cls; None for any other body (the regular route reads it). Independent of the head."""
        cdef Py_ssize_t n = body.shape[0]
        if n == 0 or max_frames < 1:
            return None
        # a frame takes at least 2 * dim + 1 bytes ("[" digits and commas "]"): room for every frame
        cdef size_t cap = <size_t>min(max_frames, n // (2 * self.dim + 1) + 1)
        out = np.empty((cap, self.dim), dtype=np.float32)
        cdef float[:, ::1] o = out
        cdef size_t frames = 0
        cdef vb_httpq_t r
        cdef int ok
        with nogil:
            ok = vb_httpq_identify_body(&body[0], <size_t>n, <size_t>self.dim, cap, self.max_k, self.max_ef,
                                        &o[0, 0], &frames, &r)
        if not ok:
            return None
        return _marked(out[:frames], cls), r.k, r.ef, bool(r.include_metadata), TIERS[r.tier]

    @property
    def filter_json(self):
        """The filter object of the last body query_vector read, as its bytes (not checked: parse
        and validate them), or None for no filter or a null one."""
        return self._filter

    @property
    def authorization(self) -> str:
        """The Authorization field's value (visible ASCII)."""
        return self._field(self.r.auth_off, self.r.auth_len) if self.r.auth_count else None

    @property
    def request_id(self):
        """The x-request-id field's value, or None."""
        return self._field(self.r.rid_off, self.r.rid_len) if self.r.rid_count else None

    cdef _field(self, size_t off, size_t length):
        # the head was read from this buffer in this call sequence (the caller's receive buffer is
        # reused only by the next read); its fields are visible ASCII
        cdef const unsigned char[::1] b = self._buf
        if length == 0:
            return ""
        return PyUnicode_DecodeASCII(<const char *>&b[off], <Py_ssize_t>length, NULL)

    @property
    def k(self) -> int:
        return self.r.k

    @property
    def ef(self) -> int:
        return self.r.ef

    @property
    def include_metadata(self) -> bool:
        return bool(self.r.include_metadata)

    @property
    def search_tier(self) -> str:
        return TIERS[self.r.tier]


# ---------------------------------------------------------------------------- the answer
cdef bint _same_as_f64(const unsigned char *t, size_t n) noexcept nogil:
    """A score token orjson wrote for a float32 that its float64 writer writes the same for the float
    the token parses to: no exponent and, unless zero, at least 1e-4 in magnitude (the two writers
    differ only in where they switch to exponents; tests/test_httpq.py checks millions of values)."""
    cdef size_t i = 0, j
    if n and t[0] == c'-':
        i = 1
    if i >= n:
        return False
    if t[i] == c'0':
        if i + 1 >= n or t[i + 1] != c'.':
            return False
        if i + 5 < n and t[i + 2] == c'0' and t[i + 3] == c'0' and t[i + 4] == c'0' and t[i + 5] == c'0':
            return False
    elif t[i] < c'1' or t[i] > c'9':
        return False
    for j in range(i, n):
        if t[j] != c'.' and (t[j] < c'0' or t[j] > c'9'):
            return False
    return True


cdef size_t _put(char *p, const char *s, size_t n) noexcept nogil:
    memcpy(p, s, n)
    return n


cdef size_t _put_int(char *p, int64_t v) noexcept nogil:
    cdef char tmp[24]
    cdef size_t n = 0, i, j
    cdef uint64_t u = <uint64_t>v
    if v < 0:
        u = <uint64_t>0 - u
    while True:
        tmp[n] = <char>(c'0' + u % 10)
        n += 1
        u //= 10
        if u == 0:
            break
    i = 0
    if v < 0:
        p[0] = c'-'
        i = 1
    for j in range(n):
        p[i + j] = tmp[n - 1 - j]
    return i + n


def query_answer(const int64_t[::1] ids, const unsigned char[::1] scores, const unsigned char[::1] took):
    """A query's JSON answer `{"data":{"results":[{"id":..,"score":..},...],"query_time_ms":..}}` from
    its ids, `scores` (orjson's JSON array of the float32 scores, OPT_SERIALIZE_NUMPY) and `took`
    (orjson's query_time_ms): byte for byte what orjson writes for the shaped results
    (engine/planner.py, shape_results: each score the float of its shortest float32 digits). None
    when a score would be written differently there (an exponent, below 1e-4, null) or the counts
    differ: the caller shapes those results the general way."""
    cdef size_t n = ids.shape[0], ns = scores.shape[0], nt = took.shape[0]
    if ns < 2 or scores[0] != c'[' or scores[ns - 1] != c']' or nt == 0:
        return None
    out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(48 + n * 40 + ns + nt))
    cdef char *o = PyBytes_AS_STRING(out)
    cdef const unsigned char *s = &scores[0]
    cdef size_t at = 0, pos = 1, end, i
    at += _put(o + at, b'{"data":{"results":[', 20)
    for i in range(n):
        end = pos
        while end < ns - 1 and s[end] != c',':
            end += 1
        if end == pos or not _same_as_f64(s + pos, end - pos):
            return None
        if i:
            o[at] = c','
            at += 1
        at += _put(o + at, b'{"id":', 6)
        at += _put_int(o + at, ids[i])
        at += _put(o + at, b',"score":', 9)
        at += _put(o + at, <const char *>(s + pos), end - pos)
        o[at] = c'}'
        at += 1
        pos = end + 1
    if pos != ns and not (n == 0 and ns == 2):
        return None  # more scores than ids
    at += _put(o + at, b'],"query_time_ms":', 18)
    at += _put(o + at, <const char *>&took[0], nt)
    at += _put(o + at, b'}}', 2)
    return out[:at]
