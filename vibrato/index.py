"""HNSW index over float32 vectors, scored by inner product (maximum inner product search).

The graph and every number-crunching loop live in C (include/vibrato/hnsw.h) behind
vibrato._native.hnsw; this module maps user labels to the dense rows the graph uses and checks
arguments.

Labels: every row has an int64 label in [0, 2**63). ``add(X)`` without ids gives the labels
``next_label() ...`` (0, 1, 2, ... for a fresh index: one more than the largest label so far). As long
as the labels are ``id_base + row`` (the usual case, and always for ``from_graph``) no per-row
table is kept; explicit non-consecutive labels switch to an int64 table plus a sorted copy for
lookups.

Results: ``search`` always returns 2-D arrays ``(ids int64 (nq, k), scores float32 (nq, k))``, also
for a single (d,) query (nq = 1), best first. Missing results (fewer than k rows, or fewer than k
allowed) are padded with id -1 and score -inf.

Thread-safety: ``search`` and ``search_subsequence`` may be called from many threads at once (the
GIL is released while they run). ``add`` may not overlap a search on the same index: doing so
raises RuntimeError in whichever call comes second (the storage engine only searches immutable
graphs).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from vibrato._native import hnsw as _hnsw

__all__ = ["HnswIndex"]

MAX_LABEL = 2**63 - 1
_MODES = {"auto": _hnsw.AUTO, "graph": _hnsw.FORCE_GRAPH, "scan": _hnsw.FORCE_SCAN}


def _int_arg(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _float_rows(name, X, dim, allow_1d):
    """X as a C-contiguous float32 (n, dim) array (float64/float16 are converted; ints are refused)."""
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
    """HNSW (M, M0 = 2M, level multiplier 1/ln M, diversity heuristic) with filtered and subsequence search.

    Parameters: dim in [1, 4096]; m (links per node on upper layers, 2M on layer 0) in [2, 1024];
    ef_construction (build beam) in [1, 65536]; seed for the level draws (with threads=1 the graph
    is a deterministic function of seed and data).
    """

    def __init__(self, dim: int, m: int = 16, ef_construction: int = 200, seed: int = 0):
        dim = _int_arg("dim", dim, 1, _hnsw.MAX_DIM)
        m = _int_arg("m", m, 2, _hnsw.MAX_M)
        ef_construction = _int_arg("ef_construction", ef_construction, 1, _hnsw.MAX_EF)
        seed = _int_arg("seed", seed, 0, 2**64 - 1)
        self._init(_hnsw.Graph.create(dim, m, ef_construction, seed), id_base=0, labels=None)

    def _init(self, graph, id_base, labels, next_label=None):
        self._g = graph
        self._base = int(id_base)      # label of row r is _base + r while _labels is None
        self._labels = labels          # int64 (n,) or None
        self._sorted = None            # (sorted labels int64, rows uint32), built on demand
        if next_label is None:
            n = graph.n
            next_label = (self._base + n) if labels is None else (int(labels.max()) + 1 if n else 0)
        self._next = int(next_label)
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

    def next_label(self) -> int:
        """The label add() gives the next row when no ids are passed."""
        return self._next

    def labels(self) -> np.ndarray:
        """int64 (n,) label of every row, in insertion order."""
        if self._labels is None:
            return np.arange(self._base, self._base + len(self), dtype=np.int64)
        return self._labels.copy()

    def vectors(self) -> np.ndarray:
        """float32 (n, dim) vectors in insertion order: the caller's array itself for an index made
        by from_graph/load (never copied), otherwise a copy (the index's own buffer may move on add)."""
        borrowed = self._g.borrowed_array
        if borrowed is not None:
            return borrowed
        return self._g.vectors_view().copy()

    def stats(self) -> dict:
        """Graph shape (level counts, edges, max degree) and search counters (graph/scan/fallback)."""
        return self._g.stats()

    def _unreachable(self) -> np.ndarray:
        """Debug/test helper: int64 labels of the rows no search can reach from the entry point
        (a BFS down the layers, see Graph.unreachable). Parallel and serial builds leave it empty at
        the usual M; at very small M (e.g. 4) heuristic pruning can rarely orphan a row, as in hnswlib."""
        self._begin_search()
        try:
            rows = self._g.unreachable()
        finally:
            self._end_search()
        if self._labels is None:
            return rows.astype(np.int64) + self._base
        return self._labels[rows]

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

    def add(self, X, ids=None, threads: int | None = None) -> None:
        """Add rows X (n, dim) with labels `ids` (int64/uint64 (n,), unique, new, in [0, 2**63)).

        Without ids the labels continue from next_label(). threads: None uses every core (the graph
        then depends on thread timing); 1 gives a deterministic build. Vectors are copied.
        """
        X = _float_rows("X", X, self.dim, allow_1d=False)
        n_new = X.shape[0]
        if threads is None:
            threads = min(os.cpu_count() or 1, 64)
        threads = _int_arg("threads", threads, 1, 256)
        n_old = len(self)
        new_labels = None
        if ids is None:
            start = self._next
            if start + n_new - 1 > MAX_LABEL:
                raise ValueError(f"labels would exceed {MAX_LABEL}")
        else:
            new_labels = self._check_new_ids(ids, n_new)
            start = int(new_labels[0]) if n_new else self._next
            if n_new and not np.array_equal(new_labels, np.arange(start, start + n_new, dtype=np.int64)):
                start = None  # not consecutive
        with self._guard:
            if self._searches or self._adding:
                raise RuntimeError("add() cannot run while a search or another add() is in progress")
            self._adding = True
        try:
            if n_new == 0:
                return
            # Decide the label layout before touching the graph, so a failure leaves both unchanged.
            consecutive = (self._labels is None and start is not None
                           and (n_old == 0 or start == self._base + n_old))
            if consecutive:
                base = start if n_old == 0 else self._base
                labels = None
            else:
                new = new_labels if new_labels is not None else np.arange(start, start + n_new, dtype=np.int64)
                labels = np.concatenate([self.labels(), new])
            self._g.add(X, threads)
            self._base, self._labels = (base, None) if consecutive else (0, labels)
            self._sorted = None
            top = (start + n_new) if start is not None else int(new_labels.max()) + 1
            self._next = max(self._next, top)
        finally:
            with self._guard:
                self._adding = False

    def _check_new_ids(self, ids, n_new):
        if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
            raise ValueError(f"ids must be a numpy int64 or uint64 array, got "
                             f"{type(ids).__name__ if not isinstance(ids, np.ndarray) else ids.dtype}")
        if ids.ndim != 1 or ids.shape[0] != n_new:
            raise ValueError(f"ids must have shape ({n_new},) to match X, got {ids.shape}")
        if n_new == 0:
            return ids.astype(np.int64)
        if ids.dtype.kind == "u":
            if int(ids.max()) > MAX_LABEL:
                raise ValueError(f"ids must be in [0, {MAX_LABEL}], got {int(ids.max())}")
        elif int(ids.min()) < 0:
            raise ValueError(f"ids must be in [0, {MAX_LABEL}], got {int(ids.min())}")
        lab = ids.astype(np.int64)
        srt = np.sort(lab)
        dups = srt[1:][srt[1:] == srt[:-1]]
        if dups.size:
            raise ValueError(f"ids contain a duplicate label {int(dups[0])}")
        uniq = srt
        present = self._rows_of(uniq)
        if (present >= 0).any():
            raise ValueError(f"label {int(uniq[np.argmax(present >= 0)])} is already in the index")
        return lab

    # ------------------------------------------------------------------ labels <-> rows

    def _sorted_labels(self):
        if self._sorted is None:
            order = np.argsort(self._labels, kind="stable")
            self._sorted = (np.ascontiguousarray(self._labels[order]), order.astype(np.uint32))
        return self._sorted

    def _rows_of(self, labels: np.ndarray) -> np.ndarray:
        """Row of each label (int64 array), -1 where the label is not in the index."""
        n = len(self)
        if self._labels is None:
            rows = labels.astype(np.int64) - self._base
            rows[(rows < 0) | (rows >= n)] = -1
            return rows
        sl, sr = self._sorted_labels()
        pos = np.searchsorted(sl, labels)
        pos_c = np.minimum(pos, max(n - 1, 0))
        hit = (pos < n) & (sl[pos_c] == labels) if n else np.zeros(labels.shape, bool)
        return np.where(hit, sr[pos_c].astype(np.int64), -1)

    def _mask(self, name, allowed):
        """A uint8 row mask from a bool mask over rows or an array of labels (labels not present are ignored)."""
        n = len(self)
        if not isinstance(allowed, np.ndarray):
            raise ValueError(f"{name} must be a numpy bool mask over rows or an int64/uint64 array of labels, "
                             f"got {type(allowed).__name__}")
        if allowed.dtype == np.bool_:
            if allowed.shape != (n,):
                raise ValueError(f"{name} bool mask must have shape ({n},) (one entry per row), got {allowed.shape}")
            return np.ascontiguousarray(allowed).view(np.uint8)
        if allowed.dtype.kind in "iu":
            if allowed.ndim != 1:
                raise ValueError(f"{name} label array must be 1-D, got shape {allowed.shape}")
            mask = np.zeros(n, dtype=np.uint8)
            if allowed.size:
                if allowed.dtype.kind == "u":
                    allowed = allowed[allowed <= MAX_LABEL]
                rows = self._rows_of(allowed.astype(np.int64))
                mask[rows[rows >= 0]] = 1
            return mask
        raise ValueError(f"{name} must have dtype bool (row mask) or int64/uint64 (labels), got {allowed.dtype}")

    # ------------------------------------------------------------------ search

    def search(self, Q, k: int = 10, ef: int = 64, allowed=None, threads: int = 1, *, mode: str = "auto"):
        """Top-k labels by inner product for Q (nq, dim) or one query (dim,).

        Returns (ids int64 (nq, k), scores float32 (nq, k)), best first; padded with id -1 and
        score -inf when fewer than k results exist. ef (beam width, >= 1) is raised to k if smaller.

        allowed: None, a bool mask over rows (insertion order, length len(index)), or an int64/uint64
        array of labels (labels not in the index are ignored). Only allowed rows are returned; the
        search still walks through disallowed nodes, widens its beam for tight filters, and
        switches to an exact SIMD scan of the allowed rows when its cost model says that is cheaper
        (or when the graph walk overruns the scan's cost).

        threads: queries of a batch are split over this many threads (one query never uses more
        than one). mode: "auto", or "graph"/"scan" to force a strategy (benchmarks, tests).
        """
        Q = _float_rows("Q", Q, self.dim, allow_1d=True)
        k = _int_arg("k", k, 1, _hnsw.MAX_EF)
        ef = _int_arg("ef", ef, 1, _hnsw.MAX_EF)
        threads = _int_arg("threads", threads, 1, 256)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
        mask, count = None, 0
        self._begin_search()
        try:
            if allowed is not None:
                mask = self._mask("allowed", allowed)
                count = int(np.count_nonzero(mask))
            return self._g.search(Q, k, ef, mask, count, _MODES[mode], threads, self._base, self._labels)
        finally:
            self._end_search()

    def search_subsequence(self, frames, k: int = 5, ef: int = 100, valid=None, *, anchors: int = 8,
                           anchor_k: int = 32, spread: bool = False):
        """Identify an excerpt: the k start labels s maximising mean_i dot(frames[i], vector(s + i)).

        frames: (L, dim). Labels are taken as consecutive frames: a window s..s+L-1 counts only if
        every label in it is in the index and valid. valid: None, a bool mask over rows (insertion
        order), or a callable taking an int64 array of labels and returning a bool array of the same
        shape (it is called once, on all labels of the index). Returns (start ids int64 (k,),
        mean scores float32 (k,)), best first, padded with -1 / -inf.

        How: `anchors` frames spread evenly over the excerpt are each searched for `anchor_k`
        neighbours (beam max(ef, anchor_k)); each hit h at offset o proposes start h - o (and
        h - o +/- 1 with `spread`); distinct starts are scored exactly with SIMD kernels. All of it
        runs in C with the GIL released.
        """
        frames = _float_rows("frames", frames, self.dim, allow_1d=False)
        if frames.shape[0] == 0:
            raise ValueError("frames must hold at least one frame, got shape (0, dim)")
        k = _int_arg("k", k, 1, _hnsw.MAX_EF)
        ef = _int_arg("ef", ef, 1, _hnsw.MAX_EF)
        anchors = _int_arg("anchors", anchors, 1, 4096)
        anchor_k = _int_arg("anchor_k", anchor_k, 1, _hnsw.MAX_EF)
        self._begin_search()
        try:
            vmask = None
            if valid is not None:
                if callable(valid):
                    res = np.asarray(valid(self.labels()))
                    if res.dtype != np.bool_ or res.shape != (len(self),):
                        raise ValueError(f"valid(labels) must return a bool array of shape ({len(self)},), "
                                         f"got {res.dtype} {res.shape}")
                    vmask = np.ascontiguousarray(res).view(np.uint8)
                elif isinstance(valid, np.ndarray) and valid.dtype == np.bool_:
                    if valid.shape != (len(self),):
                        raise ValueError(f"valid mask must have shape ({len(self)},), got {valid.shape}")
                    vmask = np.ascontiguousarray(valid).view(np.uint8)
                else:
                    raise ValueError("valid must be None, a bool mask over rows, or a callable on labels")
            if self._labels is None:
                starts, scores, _ = self._g.subsequence(frames, k, ef, anchors, anchor_k, spread, vmask,
                                                        self._base)
            else:
                sl, sr = self._sorted_labels()
                starts, scores, _ = self._g.subsequence(frames, k, ef, anchors, anchor_k, spread, vmask, 0,
                                                        self._labels, sl, sr)
            return starts, scores
        finally:
            self._end_search()

    # ------------------------------------------------------------------ engine integration

    def graph_bytes(self) -> bytes:
        """The graph alone (params, entry point, levels, links; no vectors, no labels), CRC32C-checked."""
        self._begin_search()
        try:
            return self._g.graph_bytes()
        finally:
            self._end_search()

    @classmethod
    def from_graph(cls, vectors, graph, id_base: int = 0) -> "HnswIndex":
        """An index over `vectors` (n, dim) float32 C-contiguous, e.g. a read-only view of an mmap.

        The array is referenced, never copied or written (keep the mapping alive as long as the
        index; add() on such an index first copies the vectors into memory it owns). `graph` is a
        bytes-like from graph_bytes(); it is validated completely (ValueError saying what is wrong)
        before use. Labels are id_base + row.
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
        g = _hnsw.Graph.from_graph(vectors, gv)
        if g.n and id_base + g.n - 1 > MAX_LABEL:
            raise ValueError(f"id_base {id_base} + {g.n} rows exceeds the label limit {MAX_LABEL}")
        self = cls.__new__(cls)
        self._init(g, id_base=id_base, labels=None)
        return self

    def save(self, path) -> None:
        """Write params, vectors, labels and graph to `path` with CRC32C checksums.

        Durable on return: written to a temporary file, fsynced, renamed over `path`, and the
        directory fsynced.
        """
        path = Path(path)
        self._begin_search()
        try:
            graph = self._g.graph_bytes()
            vecs = self._g.vectors_view()  # no add() can run while the guard counts this call
            labels = b"" if self._labels is None else self._labels.astype("<i8").tobytes()
            vec_crc = _hnsw.crc32c(vecs.reshape(-1).view(np.uint8)) if vecs.size else 0
            header, vec_off, lab_off, graph_off = _hnsw.file_header(
                len(self), self.dim, 0 if self._labels is None else 1, self._base if self._labels is None else 0,
                self._next, vecs.nbytes, len(labels), len(graph), vec_crc, _hnsw.crc32c(labels),
                _hnsw.crc32c(graph))
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            try:
                with open(tmp, "wb") as f:
                    f.write(header)
                    f.write(memoryview(vecs.reshape(-1)).cast("B") if vecs.size else b"")
                    f.write(b"\0" * (lab_off - vec_off - vecs.nbytes))
                    f.write(labels)
                    f.write(b"\0" * (graph_off - lab_off - len(labels)))
                    f.write(graph)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            self._end_search()

    @classmethod
    def load(cls, path) -> "HnswIndex":
        """Read an index written by save(). Every length, offset, checksum and graph link is checked
        first; a damaged or foreign file raises ValueError saying what is wrong."""
        buf = np.fromfile(path, dtype=np.uint8)
        return cls._from_file_bytes(buf)

    @classmethod
    def _from_file_bytes(cls, buf: np.ndarray) -> "HnswIndex":
        info = _hnsw.parse_file(buf)
        n, d = info["n"], info["d"]
        vo, lo, go = info["vec_off"], info["lab_off"], info["graph_off"]
        vectors = buf[vo:vo + info["vec_len"]].view(np.float32).reshape(n, d)
        vectors.flags.writeable = False
        g = _hnsw.Graph.from_graph(vectors, buf[go:go + info["graph_len"]])
        labels = None
        next_label = info["next_label"]
        if info["flags"] & 1:
            labels = buf[lo:lo + info["lab_len"]].view("<i8").astype(np.int64)
            if n and int(labels.min()) < 0:
                raise ValueError(f"index file has a negative label {int(labels.min())}")
            if np.unique(labels).shape[0] != n:
                raise ValueError("index file has duplicate labels")
            top = int(labels.max()) + 1 if n else 0
        else:
            if info["id_base"] + n - 1 > MAX_LABEL:
                raise ValueError(f"index file id_base {info['id_base']} + {n} rows exceeds the label limit")
            top = info["id_base"] + n
        if next_label < top:
            raise ValueError(f"index file next_label {next_label} is below the largest label + 1 ({top})")
        self = cls.__new__(cls)
        self._init(g, id_base=info["id_base"] if labels is None else 0, labels=labels, next_label=next_label)
        return self
