"""HNSW index over float32 vectors, scored by inner product (maximum inner product search).

The graph and every number-crunching loop live in C (include/vibrato/hnsw.h) behind
vibrato._native.hnsw; this module checks arguments and maps rows to ids.

Ids: row r (insertion order) has the id ``id_base + r``: 0, 1, 2, ... for a fresh index, and the
segment's first id for one made by ``from_graph`` (the engine's case: a segment's ids are dense).

Results: ``search`` always returns 2-D arrays ``(ids int64 (nq, k), scores float32 (nq, k))``, also
for a single (d,) query (nq = 1), best first. Missing results (fewer than k rows, or fewer than k
allowed) are padded with id -1 and score -inf.

Thread-safety: ``search`` may be called from many threads at once (the GIL is released while it
runs). ``add`` may not overlap a search on the same index: doing so raises RuntimeError in whichever
call comes second (the storage engine only searches immutable graphs).

The graph is persisted only inside segment files (``graph_bytes`` / ``from_graph``); identify runs in
the engine (vibrato/engine/identify.py), across every tier.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from vibrato._native import hnsw as _hnsw

__all__ = ["FiniteArray", "HnswIndex", "first_nonfinite"]

MAX_LABEL = 2**63 - 1
_MODES = {"auto": _hnsw.AUTO, "graph": _hnsw.FORCE_GRAPH, "scan": _hnsw.FORCE_SCAN}


class FiniteArray(np.ndarray):
    """Marker type: float32 values the engine's input validation found finite (CONTRACT.md D3).

    Only vibrato.engine.validation makes these (read-only, from data it checked or copied), so
    `_float_rows` trusts them and a query is checked once at the boundary instead of once per
    segment searched. Views (slices, reshapes) keep the marker; results of arithmetic do not (a
    product of finite values may overflow).
    """

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        arr = arr.view(np.ndarray)
        return arr[()] if return_scalar else arr


def first_nonfinite(X: np.ndarray) -> int:
    """Flat index of the first NaN/inf in a C-contiguous float32 array, or -1 (native, no temporaries)."""
    return _hnsw.first_nonfinite(X.reshape(1, -1) if X.ndim != 2 else X)


def _int_arg(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _float_rows(name, X, dim, allow_1d):
    """X as a C-contiguous float32 (n, dim) array (float64/float16 are converted; ints are refused).
    A FiniteArray skips the finiteness pass: the engine checked it when it entered."""
    if (type(X) is FiniteArray and X.dtype == np.float32 and X.flags.c_contiguous and X.shape[-1:] == (dim,)
            and (X.ndim == 2 or (X.ndim == 1 and allow_1d))):
        return X if X.ndim == 2 else X.reshape(1, -1)
    if not isinstance(X, np.ndarray):
        raise ValueError(f"{name} must be a numpy array of floats, got {type(X).__name__}")
    if X.dtype.kind != "f":
        raise ValueError(f"{name} must have a floating dtype (float32 preferred), got {X.dtype}")
    if X.ndim == 1 and allow_1d:
        X = X.reshape(1, -1)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, {dim}){' or 1-D (dim,)' if allow_1d else ''}, got shape {X.shape}")
    if X.shape[1] != dim:
        raise ValueError(f"{name} has dimension {X.shape[1]}, the index has dimension {dim}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    bad = _hnsw.first_nonfinite(X)
    if bad >= 0:
        raise ValueError(f"{name} contains a non-finite value at {divmod(int(bad), dim)}")
    return X


class HnswIndex:
    """HNSW (M, M0 = 2M, level multiplier 1/ln M, diversity heuristic) with filtered search.

    Parameters: dim in [1, 4096]; m (links per node on upper layers, 2M on layer 0) in [2, 1024];
    ef_construction (build beam) in [1, 65536]; seed for the level draws (with threads=1 the graph
    is a deterministic function of seed and data).
    """

    def __init__(self, dim: int, m: int = 16, ef_construction: int = 200, seed: int = 0):
        dim = _int_arg("dim", dim, 1, _hnsw.MAX_DIM)
        m = _int_arg("m", m, 2, _hnsw.MAX_M)
        ef_construction = _int_arg("ef_construction", ef_construction, 1, _hnsw.MAX_EF)
        seed = _int_arg("seed", seed, 0, 2**64 - 1)
        self._init(_hnsw.Graph.create(dim, m, ef_construction, seed), id_base=0)

    def _init(self, graph, id_base):
        self._g = graph
        self._base = int(id_base)  # id of row r is _base + r
        self._guard = threading.Lock()
        self._searches = 0
        self._adding = False

    # ------------------------------------------------------------------ basics

    def __len__(self) -> int:
        return self._g.n

    def __repr__(self) -> str:
        return f"HnswIndex(dim={self.dim}, m={self.m}, ef_construction={self.ef_construction}, n={len(self)})"

    @property
    def dim(self) -> int:
        return self._g.dim

    @property
    def m(self) -> int:
        return self._g.m

    @property
    def ef_construction(self) -> int:
        return self._g.ef_construction

    @property
    def id_base(self) -> int:
        """The id of row 0 (row r has id id_base + r)."""
        return self._base

    def vectors(self) -> np.ndarray:
        """float32 (n, dim) vectors in insertion order: the caller's array itself for an index made
        by from_graph (never copied), otherwise a copy (the index's own buffer may move on add)."""
        borrowed = self._g.borrowed_array
        if borrowed is not None:
            return borrowed
        return self._g.vectors_view().copy()

    def stats(self) -> dict:
        """Graph shape (level counts, edges, max degree) and search counters (graph/scan/fallback)."""
        return self._g.stats()

    def _unreachable(self) -> np.ndarray:
        """Debug/test helper: int64 ids of the rows no search can reach from the entry point
        (a BFS down the layers, see Graph.unreachable). Parallel and serial builds leave it empty at
        the usual M; at very small M (e.g. 4) heuristic pruning can rarely orphan a row, as in hnswlib."""
        self._begin_search()
        try:
            rows = self._g.unreachable()
        finally:
            self._end_search()
        return rows.astype(np.int64) + self._base

    # ------------------------------------------------------------------ concurrency guard

    def _begin_search(self):
        with self._guard:
            if self._adding:
                raise RuntimeError("search cannot run while add() is in progress on the same index")
            self._searches += 1

    def _end_search(self):
        with self._guard:
            self._searches -= 1

    # ------------------------------------------------------------------ add

    def add(self, X, threads: int | None = None) -> None:
        """Append rows X (n, dim); they get the next ids (id_base + len(self), ...).

        threads: None uses every core (the graph then depends on thread timing); 1 gives a
        deterministic build. Vectors are copied.
        """
        X = _float_rows("X", X, self.dim, allow_1d=False)
        if threads is None:
            threads = min(os.cpu_count() or 1, 64)
        threads = _int_arg("threads", threads, 1, 256)
        if X.shape[0] and self._base + len(self) + X.shape[0] - 1 > MAX_LABEL:
            raise ValueError(f"ids would exceed {MAX_LABEL}")
        with self._guard:
            if self._searches or self._adding:
                raise RuntimeError("add() cannot run while a search or another add() is in progress")
            self._adding = True
        try:
            if X.shape[0]:
                self._g.add(X, threads)
        finally:
            with self._guard:
                self._adding = False

    # ------------------------------------------------------------------ search

    def search(self, Q, k: int = 10, ef: int = 64, allowed=None, threads: int = 1, *, mode: str = "auto",
               codes=None, luts=None, rerank: int = 0, allowed_count: int | None = None, allowed_rows=None):
        """Top-k ids by inner product for Q (nq, dim) or one query (dim,).

        Returns (ids int64 (nq, k), scores float32 (nq, k)), best first; padded with id -1 and
        score -inf when fewer than k results exist. ef (beam width, >= 1) is raised to k if smaller.

        allowed: None or a bool mask over rows (insertion order, length len(index)). Only allowed
        rows are returned; the search still walks through disallowed nodes, widens its beam for
        tight filters, and switches to an exact SIMD scan of the allowed rows when its cost model
        says that is cheaper (or when the graph walk overruns the scan's cost).

        threads: queries of a batch are split over this many threads (one query never uses more
        than one). mode: "auto", or "graph"/"scan" to force a strategy (benchmarks, tests).

        codes (n, m) uint8 and luts (nq, m, 256) float32 (ProductQuantizer.adc_tables(Q)): walk the
        graph on the codes instead of the vectors, then rescore the best max(ef, rerank) rows
        exactly (scores stay exact; only which rows are considered depends on the codes).

        allowed_count: the number of True entries in allowed when the caller already knows it (the
        planner keeps it with a filter's evaluation), saving a pass over the mask. It steers the
        choice between walk and scan; it is never used to index memory.

        allowed_rows: the rows allowed says, uint32 ascending, when the caller keeps them (a filter's
        evaluation does): an exact scan then reads them instead of collecting them from the mask.
        """
        Q = _float_rows("Q", Q, self.dim, allow_1d=True)
        k = _int_arg("k", k, 1, _hnsw.MAX_EF)
        ef = _int_arg("ef", ef, 1, _hnsw.MAX_EF)
        threads = _int_arg("threads", threads, 1, 256)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
        mask, count = None, 0
        if allowed is not None:
            mask = self._mask("allowed", allowed)
            count = int(np.count_nonzero(mask)) if allowed_count is None else _int_arg(
                "allowed_count", allowed_count, 0, mask.shape[0])
        if allowed_rows is not None and (mask is None or not isinstance(allowed_rows, np.ndarray)
                                         or allowed_rows.dtype != np.uint32 or allowed_rows.shape != (count,)):
            raise ValueError(f"allowed_rows must be the mask's {count} rows as uint32")
        if (luts is None) != (codes is None):
            raise ValueError("codes and luts go together: pass both (a walk on codes) or neither")
        if luts is not None:
            luts = np.ascontiguousarray(luts, dtype=np.float32).reshape(Q.shape[0], -1)
            codes = np.ascontiguousarray(codes, dtype=np.uint8)
            rerank = _int_arg("rerank", rerank, 0, _hnsw.MAX_EF)
        self._begin_search()
        try:
            return self._g.search(Q, k, ef, mask, count, _MODES[mode], threads, self._base, luts, codes, rerank,
                                  allowed_rows)
        finally:
            self._end_search()

    def search_one(self, q, k: int, ef: int, allowed=None, *, mode: str = "auto", allowed_count: int | None = None,
                   allowed_rows=None):
        """search(q, k, ef, allowed, ...) of one query q (dim,), without the padding: (ids int64
        (found,), scores float32 (found,)), best first, ties to the lower id. For the serving path:
        arguments as the engine and planner make them (_direct) skip search()'s conversion (~20% of
        a warm walk); anything else, errors included, goes through search()."""
        if not self._direct(q, k, ef, allowed, mode, allowed_count, allowed_rows):
            ids, scores = self.search(q, k=k, ef=ef, allowed=allowed, mode=mode, allowed_count=allowed_count,
                                      allowed_rows=allowed_rows)
            found = int(np.count_nonzero(ids[0] >= 0))
            return ids[0, :found], scores[0, :found]
        # no _begin_search: the native graph itself refuses a search during add() and an add()
        # during a search (under the GIL), which is all this call needs
        if allowed is None:
            return self._g.search_one(q, k, ef, self._base)
        return self._g.search_one(q, k, ef, self._base, allowed.view(np.uint8), allowed_count, _MODES[mode],
                                  allowed_rows)

    def _direct(self, q, k, ef, allowed, mode, allowed_count, allowed_rows) -> bool:
        """Whether search_one's arguments are already what the native search takes: a FiniteArray q
        (the engine's validation made it), 1 <= k <= ef <= MAX_EF, a known mode and, with a filter, a
        C-contiguous bool mask over the rows with its allowed_count and, if any, uint32 rows (their
        number and the mask's length are checked natively)."""
        if (type(q) is not FiniteArray or q.shape != (self.dim,) or not q.flags.c_contiguous
                or type(k) is not int or type(ef) is not int or not 1 <= k <= ef <= _hnsw.MAX_EF
                or mode not in _MODES):
            return False
        if allowed is None:
            return True
        return (type(allowed) is np.ndarray and allowed.dtype == np.bool_ and allowed.flags.c_contiguous
                and type(allowed_count) is int and 0 <= allowed_count <= allowed.shape[0]
                and (allowed_rows is None or (type(allowed_rows) is np.ndarray and allowed_rows.dtype == np.uint32)))

    def build_scan_codes(self) -> None:
        """Keep an int8 copy of the vectors (d + 4 bytes per row, in RAM) for filtered exact scans and
        graph walks: they rank rows on it, reading a quarter of the memory, and rescore the best
        (max(8k, ef) of a scan, the beam of a walk) on the float vectors, so scores stay exact. A
        no-op once built; dropped by add()."""
        self._begin_search()
        try:
            self._g.build_scan_codes()
        finally:
            self._end_search()

    def attach_scan_codes(self, codes, scale) -> None:
        """Use int8 scan codes of the rows made elsewhere (kernels.scan_codes; a segment file holds
        them), read in place instead of built: codes (n, dim) int8, scale (n,) float32 finite and
        >= 0, both C-contiguous and kept alive by the index. Searches then rank on them as after
        build_scan_codes. ValueError on a wrong dtype or shape, or when the index has codes."""
        for name, a, dtype, ndim in (("codes", codes, np.int8, 2), ("scale", scale, np.float32, 1)):
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != ndim or not a.flags.c_contiguous:
                raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype).name} array with {ndim} dimension(s)")
        self._begin_search()
        try:
            self._g.attach_scan_codes(codes, scale)
        finally:
            self._end_search()

    @property
    def has_scan_codes(self) -> bool:
        return self._g.has_scan_codes

    def _mask(self, name, allowed):
        """The uint8 row mask of a bool mask over rows."""
        n = len(self)
        if not isinstance(allowed, np.ndarray) or allowed.dtype != np.bool_:
            what = allowed.dtype if isinstance(allowed, np.ndarray) else type(allowed).__name__
            raise ValueError(f"{name} must be a numpy bool mask over rows (dtype bool), got {what}")
        if allowed.shape != (n,):
            raise ValueError(f"{name} bool mask must have shape ({n},) (one entry per row), got {allowed.shape}")
        return np.ascontiguousarray(allowed).view(np.uint8)

    # ------------------------------------------------------------------ engine integration

    def graph_bytes(self) -> bytes:
        """The graph alone (params, entry point, levels, links; no vectors, no ids), CRC32C-checked."""
        self._begin_search()
        try:
            return self._g.graph_bytes()
        finally:
            self._end_search()

    @classmethod
    def from_graph(cls, vectors, graph, id_base: int = 0, *, borrow_graph: bool = False) -> "HnswIndex":
        """An index over `vectors` (n, dim) float32 C-contiguous, e.g. a read-only view of an mmap.

        The array is referenced, never copied or written (keep the mapping alive as long as the
        index; add() on such an index first copies the vectors into memory it owns). `graph` is a
        bytes-like from graph_bytes(); it is validated completely (ValueError saying what is wrong)
        before use. With borrow_graph, the levels and links are read in place from `graph` too,
        e.g. a segment's mapped graph section, so they cost page cache instead of anonymous memory
        (what stays anonymous is a word per 64 rows). Row r has the id id_base + r.
        """
        if not isinstance(vectors, np.ndarray) or vectors.dtype != np.float32 or vectors.ndim != 2:
            raise ValueError("vectors must be a 2-D float32 numpy array, got "
                             + (f"{vectors.dtype} {vectors.shape}" if isinstance(vectors, np.ndarray)
                                else type(vectors).__name__))
        if not vectors.flags.c_contiguous:
            raise ValueError("vectors must be C-contiguous (they are used in place, never copied)")
        id_base = _int_arg("id_base", id_base, 0, MAX_LABEL)
        try:
            gv = memoryview(graph).cast("B")
        except TypeError as e:
            raise ValueError(f"graph must be a bytes-like object, got {type(graph).__name__}") from e
        g = _hnsw.Graph.from_graph(vectors, gv, bool(borrow_graph))
        if g.n and id_base + g.n - 1 > MAX_LABEL:
            raise ValueError(f"id_base {id_base} + {g.n} rows exceeds the id limit {MAX_LABEL}")
        self = cls.__new__(cls)
        self._init(g, id_base=id_base)
        return self
