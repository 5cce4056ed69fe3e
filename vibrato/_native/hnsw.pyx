"""Cython wrapper over include/vibrato/hnsw.h: the HNSW graph over dense rows 0..n-1.

This layer knows rows only; vibrato.index.HnswIndex maps them to ids (id_base + row) and is the public
face. Inputs are assumed checked by the caller for dtype/shape (the signatures still require
float32 C-contiguous memoryviews, so a wrong array is a ValueError/TypeError, never a crash).
Every heavy call releases the GIL. Thread-safety: any number of searches may run at once from
different Python threads; add() refuses to run while a search is in flight and vice versa
(RuntimeError), since the C index does not support that overlap.
"""
from libc.stdint cimport int64_t, int8_t, uint64_t, uint32_t, uint8_t
from libc.math cimport isfinite

import numpy as np

from vibrato._native.cpu import selected_level
from vibrato._native._common cimport VB_OK, VB_ENOMEM, VB_EINVAL, check_rc, native_init
from vibrato._native.distance cimport vb_distance_ops_t, vb_distance_ops_for

native_init()

cdef const vb_distance_ops_t *_ops = vb_distance_ops_for(selected_level())

MAX_LEVEL = VB_HNSW_MAX_LEVEL
MAX_DIM = VB_HNSW_MAX_DIM
MAX_M = VB_HNSW_MAX_M
MAX_EF = VB_HNSW_MAX_EF
SQ8_RERANK_PER_K = VB_SQ8_RERANK_PER_K  # a scan on int8 codes rescores max(this * k, ef) rows exactly
MAX_N = VB_HNSW_MAX_N
AUTO = VB_HNSW_AUTO
FORCE_GRAPH = VB_HNSW_FORCE_GRAPH
FORCE_SCAN = VB_HNSW_FORCE_SCAN


def isa_level():
    """The SIMD level the index's distance kernels run at."""
    return _ops.level


cdef class Graph:
    """An HNSW graph over rows of float32 vectors (owned, or borrowed from a read-only array)."""
    cdef vb_hnsw_t h
    cdef bint ready
    cdef object vectors_ref   # the borrowed array, kept alive while the graph points into it
    cdef object graph_ref     # the graph bytes the links and levels are borrowed from (from_graph(borrow=True))
    cdef object codes_ref     # (codes, scale) borrowed by attach_scan_codes, kept alive while in use
    cdef int searches         # searches in flight (changed only while holding the GIL)
    cdef bint adding

    def __cinit__(self):
        self.ready = False
        self.vectors_ref = None
        self.graph_ref = None
        self.codes_ref = None
        self.searches = 0
        self.adding = False

    def __dealloc__(self):
        if self.ready:
            vb_hnsw_free(&self.h)
            self.ready = False

    @staticmethod
    def create(size_t dim, size_t m, size_t ef_construction, uint64_t seed):
        cdef Graph g = Graph.__new__(Graph)
        check_rc(vb_hnsw_init(&g.h, dim, m, ef_construction, seed), "HNSW init")
        g.ready = True
        return g

    @staticmethod
    def from_graph(vectors, const uint8_t[::1] graph not None, bint borrow=False):
        """Validate `graph` (bytes from graph_bytes) and build an index over `vectors` without copying.

        vectors: (n, d) float32 C-contiguous, may be read-only; kept by reference, never written.
        borrow: use the levels and links of `graph` in place (kept by reference, never written) instead of a copy,
        so it stays in the file-backed pages of a mapped segment.
        Raises ValueError naming what is wrong for any malformed or mismatched blob.
        """
        cdef const float[:, ::1] xv = vectors
        cdef Graph g = Graph.__new__(Graph)
        cdef char msg[256]
        cdef int rc
        cdef const float *xp = &xv[0, 0] if xv.shape[0] and xv.shape[1] else NULL
        cdef size_t xn = xv.shape[0], xd = xv.shape[1]
        msg[0] = 0
        with nogil:
            rc = vb_hnsw_graph_read_checked(&g.h, &graph[0] if graph.shape[0] else NULL, graph.shape[0], xp,
                                            xn, xd, borrow, msg, sizeof(msg))
        if rc == VB_ENOMEM:
            raise MemoryError(msg.decode("utf-8", "replace"))
        if rc != VB_OK:
            raise ValueError(msg.decode("utf-8", "replace"))
        g.ready = True
        g.vectors_ref = vectors
        if g.h.graph_borrowed:
            g.graph_ref = graph
        return g

    @property
    def links_borrowed(self):
        """True while the levels and links are read in place from the graph bytes given to from_graph."""
        return bool(self.h.graph_borrowed)

    @property
    def n(self):
        return self.h.n

    @property
    def dim(self):
        return self.h.d

    @property
    def m(self):
        return self.h.M

    @property
    def ef_construction(self):
        return self.h.ef_construction

    @property
    def borrowed(self):
        """True while the vectors are a caller's array (from_graph/load) rather than owned."""
        return self.h.x_owned == NULL

    def add(self, const float[:, ::1] x not None, size_t threads=1):
        """Append rows x (m, d) and link them; threads > 1 inserts in parallel (GIL released)."""
        if x.shape[1] != self.h.d:
            raise ValueError(f"vectors have dimension {x.shape[1]}, the index has {self.h.d}")
        if self.searches:
            raise RuntimeError("add() cannot run while a search on the same index is in progress")
        if self.adding:
            raise RuntimeError("add() is already running on this index")
        if x.shape[0] == 0:
            return
        cdef size_t m = x.shape[0]
        cdef int rc
        self.adding = True
        try:
            with nogil:
                rc = vb_hnsw_add(&self.h, &x[0, 0], m, threads, _ops)
        finally:
            self.adding = False
        if self.h.x_owned != NULL:
            self.vectors_ref = None
        if not self.h.graph_borrowed:
            self.graph_ref = None
        self.codes_ref = None  # vb_hnsw_add dropped the codes
        if rc == VB_EINVAL:
            raise ValueError(f"adding {m} rows to {self.h.n} would exceed the limit of {VB_HNSW_MAX_N} rows")
        check_rc(rc, "HNSW add")

    cdef int _enter(self) except -1:
        if self.adding:
            raise RuntimeError("search cannot run while add() is in progress on the same index")
        self.searches += 1
        return 0

    cdef int _filter_args(self, mask, size_t allowed, allowed_rows, const uint8_t **mp,
                          const uint32_t **gp) except -1:
        """Checked pointers into a search's mask (uint8 (n,)) and allowed rows (uint32 (allowed,));
        NULL for None. The caller keeps both objects alive for the search."""
        cdef const uint8_t[::1] mv
        cdef const uint32_t[::1] gv
        mp[0] = NULL
        gp[0] = NULL
        if mask is not None:
            mv = mask
            if <size_t>mv.shape[0] != self.h.n:
                raise ValueError(f"mask has {mv.shape[0]} entries, the index has {self.h.n} rows")
            if self.h.n:
                mp[0] = &mv[0]
        if allowed_rows is not None:
            gv = allowed_rows
            if mp[0] == NULL or <size_t>gv.shape[0] != allowed:
                raise ValueError(f"allowed_rows has {gv.shape[0]} rows, the mask allows {allowed}")
            if allowed:
                gp[0] = &gv[0]
        return 0

    def search(self, const float[:, ::1] q not None, size_t k, size_t ef, mask=None, size_t allowed=0,
               int mode=0, size_t threads=1, int64_t base=0, luts=None, codes=None, size_t rerank=0,
               allowed_rows=None):
        """Top-k per query: (ids int64 (nq, k), scores float32 (nq, k)), -1/-inf padded.

        mask: None or uint8 (n,) with `allowed` nonzero entries (rows that may be returned).
        allowed_rows: None or those `allowed` rows, uint32 ascending (an exact scan reads them
        instead of the mask).
        luts (nq, m * 256) float32 and codes (n, m) uint8: traverse on the codes, rescore a beam of
        max(ef, rerank) rows exactly. ids are base + row.
        """
        if q.shape[1] != self.h.d:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index has {self.h.d}")
        cdef size_t nq = q.shape[0]
        cdef const float[:, ::1] lv
        cdef const uint8_t[:, ::1] cv
        cdef const float *lp = NULL
        cdef const uint8_t *cp = NULL
        cdef size_t pq_m = 0
        if luts is not None:
            lv = luts
            cv = codes
            pq_m = cv.shape[1]
            if <size_t>cv.shape[0] != self.h.n or pq_m < 1:
                raise ValueError(f"codes have shape ({cv.shape[0]}, {pq_m}), the index has {self.h.n} rows")
            if <size_t>lv.shape[0] != nq or <size_t>lv.shape[1] != pq_m * 256:
                raise ValueError(f"luts have shape ({lv.shape[0]}, {lv.shape[1]}), expected ({nq}, {pq_m * 256})")
            if rerank > VB_HNSW_MAX_EF:
                raise ValueError(f"rerank {rerank} exceeds {VB_HNSW_MAX_EF}")
            if nq and self.h.n:
                lp = &lv[0, 0]
                cp = &cv[0, 0]
        rows = np.empty((nq, k), dtype=np.int64)
        scores = np.empty((nq, k), dtype=np.float32)
        if nq == 0 or k == 0:
            return rows, scores
        cdef int64_t[:, ::1] rv = rows
        cdef float[:, ::1] sv = scores
        cdef const uint8_t *mp = NULL
        cdef const uint32_t *gp = NULL
        self._filter_args(mask, allowed, allowed_rows, &mp, &gp)
        cdef int rc
        self._enter()
        try:
            with nogil:
                rc = vb_hnsw_search(&self.h, _ops, &q[0, 0], nq, k, ef, mp, allowed, mode, threads, lp, cp,
                                    pq_m, rerank, gp, &rv[0, 0], &sv[0, 0])
        finally:
            self.searches -= 1
        check_rc(rc, "HNSW search")
        cdef size_t i, total = nq * k
        cdef int64_t *rp = &rv[0, 0]
        if base != 0:
            for i in range(total):
                if rp[i] >= 0:
                    rp[i] += base
        return rows, scores

    def search_one(self, const float[::1] q not None, size_t k, size_t ef, int64_t base=0, mask=None,
                   size_t allowed=0, int mode=0, allowed_rows=None):
        """search() of one query q (d,) without codes, as 1-d arrays without the padding: (ids int64
        (found,), scores float32 (found,)), best first. The serving path's walk or scan: one
        argument check and no reshaping or slicing left to the caller."""
        if <size_t>q.shape[0] != self.h.d:
            raise ValueError(f"the query has dimension {q.shape[0]}, the index has {self.h.d}")
        cdef const uint8_t *mp = NULL
        cdef const uint32_t *gp = NULL
        self._filter_args(mask, allowed, allowed_rows, &mp, &gp)
        rows = np.empty(k, dtype=np.int64)
        scores = np.empty(k, dtype=np.float32)
        if k == 0:
            return rows, scores
        cdef int64_t[::1] rv = rows
        cdef float[::1] sv = scores
        cdef int rc
        self._enter()
        try:
            with nogil:
                rc = vb_hnsw_search(&self.h, _ops, &q[0], 1, k, ef, mp, allowed, mode, 1, NULL, NULL, 0, 0, gp,
                                    &rv[0], &sv[0])
        finally:
            self.searches -= 1
        check_rc(rc, "HNSW search")
        cdef size_t i, found = 0
        while found < k and rv[found] >= 0:
            rv[found] += base
            found += 1
        if found < k:
            return rows[:found], scores[:found]
        return rows, scores

    def build_scan_codes(self):
        """Build the int8 scan codes of the rows (include/vibrato/hnsw.h, vb_hnsw_sq8_build): d + 4
        bytes per row in RAM; filtered exact scans and graph walks then rank on them and rescore
        exactly. A no-op once built; safe while searches run."""
        cdef int rc
        self._enter()
        try:
            with nogil:
                rc = vb_hnsw_sq8_build(&self.h)
        finally:
            self.searches -= 1
        check_rc(rc, "building the scan codes")

    def attach_scan_codes(self, const int8_t[:, ::1] codes not None, const float[::1] scale not None):
        """Use int8 scan codes made by distance.sq8_encode of these rows, in place (e.g. a segment's
        mapped section; never copied or written): codes (n, d), scale (n,) finite and >= 0. Raises
        ValueError on a shape mismatch or when the index has codes already."""
        cdef size_t n = self.h.n
        if <size_t>codes.shape[0] != n or <size_t>codes.shape[1] != self.h.d or <size_t>scale.shape[0] != n or n == 0:
            raise ValueError(f"scan codes of shape ({codes.shape[0]}, {codes.shape[1]}) and scale ({scale.shape[0]},) "
                             f"do not match the index's {n} rows of dimension {self.h.d}")
        if self.adding:
            raise RuntimeError("attach_scan_codes() cannot run while add() is in progress")
        if vb_hnsw_sq8_attach(&self.h, &codes[0, 0], &scale[0], n) != VB_OK:
            raise ValueError("the index has scan codes already")
        self.codes_ref = (codes, scale)

    @property
    def has_scan_codes(self):
        return bool(vb_hnsw_has_sq8(&self.h))

    def graph_bytes(self):
        """The graph (params, entry point, levels, links; no vectors) as bytes, CRC32C-terminated."""
        if self.adding:
            raise RuntimeError("graph_bytes() cannot run while add() is in progress")
        cdef size_t size = vb_hnsw_graph_size(&self.h)
        out = bytearray(size)
        cdef uint8_t[::1] ov = out
        cdef int rc
        with nogil:
            rc = vb_hnsw_graph_write(&self.h, &ov[0], size)
        check_rc(rc, "HNSW graph_bytes")
        return bytes(out)

    @property
    def borrowed_array(self):
        """The caller's array the vectors are borrowed from (from_graph), or None once owned."""
        return self.vectors_ref

    def vectors_view(self):
        """A read-only (n, d) float32 view of the vectors WITHOUT a reference to this graph.

        Internal: valid only while this Graph is alive and no add() runs (add may reallocate).
        Copy it, or use it under the caller's add/search guard.
        """
        if self.h.n == 0:
            return np.empty((0, self.h.d), dtype=np.float32)
        cdef const float[:, ::1] v = <const float[:self.h.n, :self.h.d]> self.h.x
        arr = np.asarray(v)
        arr.flags.writeable = False
        return arr

    def unreachable(self):
        """Rows a search can never reach (debug/test helper): uint32 (k,) ascending, empty when none.

        Walks the graph the way a search does: a BFS on the top layer from the entry point, then on
        each lower layer a BFS seeded with every node reached on the layer above, down to layer 0.
        A row not reached on layer 0 is unreachable. Unreachable rows are legal in a loaded graph;
        a parallel build must not create more of them than a serial one (none at the usual M).
        O(edges) time, O(n) memory.
        """
        if self.adding:
            raise RuntimeError("unreachable() cannot run while add() is in progress")
        cdef size_t n = self.h.n
        if n == 0:
            return np.empty(0, dtype=np.uint32)
        seen_arr = np.zeros(n, dtype=np.uint8)      # (n,) 1 once reached on the current layer or above
        queue_arr = np.empty(n, dtype=np.uint32)    # (n,) BFS queue; [0, nq) are the reached nodes
        cdef uint8_t[::1] seen = seen_arr
        cdef uint32_t[::1] queue = queue_arr
        cdef const uint32_t *ln
        cdef size_t nq = 0, head, j, cnt
        cdef uint32_t r, nb
        cdef int l
        with nogil:
            seen[self.h.entry] = 1
            queue[nq] = self.h.entry
            nq += 1
            for l in range(self.h.max_level, -1, -1):
                head = 0  # every node reached so far has level >= l, so it seeds this layer's BFS
                while head < nq:
                    r = queue[head]
                    head += 1
                    if l == 0:
                        ln = self.h.links0 + <size_t>r * (1 + self.h.M0)
                    else:
                        ln = self.h.up_links + vb_hnsw_up_off(&self.h, r) + <size_t>(l - 1) * (1 + self.h.M)
                    cnt = ln[0]
                    for j in range(1, cnt + 1):
                        nb = ln[j]
                        if not seen[nb]:
                            seen[nb] = 1
                            queue[nq] = nb
                            nq += 1
        return np.flatnonzero(seen_arr == 0).astype(np.uint32)

    def stats(self):
        """Graph shape and search counters (a dict of ints)."""
        cdef size_t n = self.h.n, i, e0 = 0, eu = 0, mx0 = 0, c
        cdef int l
        levels = [0] * (VB_HNSW_MAX_LEVEL + 1)
        for i in range(n):
            levels[self.h.levels[i]] += 1
            c = self.h.links0[i * (1 + self.h.M0)]
            e0 += c
            if c > mx0:
                mx0 = c
            for l in range(1, self.h.levels[i] + 1):
                eu += self.h.up_links[vb_hnsw_up_off(&self.h, <uint32_t>i) + (l - 1) * (1 + self.h.M)]
        while len(levels) > 1 and levels[len(levels) - 1] == 0:
            levels.pop()
        return {
            "n": n, "dim": self.h.d, "m": self.h.M, "m0": self.h.M0, "ef_construction": self.h.ef_construction,
            "max_level": self.h.max_level if n else -1, "entry": self.h.entry if n else -1,
            "level_counts": levels, "edges_layer0": e0, "edges_upper": eu, "max_degree_layer0": mx0,
            "graph_searches": self.h.n_graph, "scan_searches": self.h.n_scan,
            "scan_fallbacks": self.h.n_fallback, "distances": self.h.n_dist,
            "scan_code_searches": self.h.n_sq8, "code_walks": self.h.n_sq8_walk,
            "scan_codes": bool(vb_hnsw_has_sq8(&self.h)),
            "borrowed_vectors": self.h.x_owned == NULL,
            "borrowed_graph": bool(self.h.graph_borrowed),
        }


def codes_topk(const float[::1] q not None, const int8_t[:, ::1] codes not None, const float[::1] scale not None,
               const float[:, ::1] x not None, size_t k, size_t depth):
    """Exact top k of the rows of x (n, d) without a graph: ranked on their int8 codes (n, d) and
    scale (n,) (distance.sq8_encode), the best max(k, depth) (at most n) rescored exactly against x.
    Returns (rows int64 (k,), scores float32 (k,)), best first (ties to the lower row), padded with
    -1 / -inf (include/vibrato/hnsw.h, vb_sq8_topk)."""
    cdef size_t n = x.shape[0], d = x.shape[1]
    if <size_t>q.shape[0] != d:
        raise ValueError(f"q has dimension {q.shape[0]}, the rows have {d}")
    if <size_t>codes.shape[0] != n or <size_t>codes.shape[1] != d or <size_t>scale.shape[0] != n:
        raise ValueError(f"codes {codes.shape[0]}x{codes.shape[1]} and scale ({scale.shape[0]},) do not match "
                         f"the rows ({n}, {d})")
    if n > VB_HNSW_MAX_N or k > VB_HNSW_MAX_EF or depth > VB_HNSW_MAX_EF:
        raise ValueError(f"n {n}, k {k} or depth {depth} beyond the limits ({VB_HNSW_MAX_N}, {VB_HNSW_MAX_EF})")
    rows = np.empty(k, dtype=np.int64)
    scores = np.empty(k, dtype=np.float32)
    if k == 0:
        return rows, scores
    cdef int64_t[::1] rv = rows
    cdef float[::1] sv = scores
    cdef const int8_t *cp = &codes[0, 0] if n else NULL
    cdef const float *sp = &scale[0] if n else NULL
    cdef const float *xp = &x[0, 0] if n else NULL
    cdef int rc
    with nogil:
        rc = vb_sq8_topk(_ops, &q[0], cp, sp, xp, n, d, k, depth, &rv[0], &sv[0])
    check_rc(rc, "scan on int8 codes")
    return rows, scores


def first_nonfinite(const float[:, ::1] x not None):
    """Flat index of the first NaN/inf in x, or -1 (a nogil loop; no temporary arrays)."""
    cdef size_t i, total = <size_t>x.shape[0] * <size_t>x.shape[1]
    cdef const float *p = &x[0, 0] if total else NULL
    cdef Py_ssize_t bad = -1
    with nogil:
        for i in range(total):
            if not isfinite(p[i]):
                bad = i
                break
    return bad
