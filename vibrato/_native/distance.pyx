"""Cython wrappers over include/vibrato/distance.h.

Strict inputs: float32 numpy arrays, C-contiguous, with matching dimensions; anything else is a
ValueError naming the argument (never a silent copy, never a crash). Every kernel call releases the
GIL. ``level`` selects an ISA explicitly (tests use it to run every path in one process); the
default -1 means the process-wide level chosen by vibrato._native.cpu.
"""
from libc.stdint cimport int8_t, int16_t, int64_t, uint32_t
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

import numpy as np

from vibrato._native._common cimport native_init, threads_for
from vibrato._native.cpu import selected_level, available_levels

native_init()
cdef const vb_distance_ops_t *_default_ops = vb_distance_ops_for(selected_level())

# Large scans are split across threads above this many floats (4 MiB): below it the thread start-up
# costs more than it saves. Callers that already run one task per core (the server) pass threads=1.
cdef size_t PARALLEL_MIN_FLOATS = 1 << 20


cdef const vb_distance_ops_t *_ops(int level) except NULL:
    if level < 0:
        return _default_ops
    if level not in available_levels():
        raise ValueError(f"SIMD level {level} cannot run on this CPU; available: {available_levels()}")
    return vb_distance_ops_for(level)


def isa_level():
    """The level the default kernels run at."""
    return _default_ops.level


def _check_f32(x, str name, int ndim):
    """x must be a C-contiguous float32 numpy array: a non-empty vector (ndim 1) or an (n, d) matrix
    with d >= 1 (ndim 2)."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy float32 array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(f"{name} must have dtype float32, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be " + ("1-D" if ndim == 1 else "2-D (n, d)") + f", got shape {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if x.shape[ndim - 1] == 0:
        raise ValueError(f"{name} must not be empty" if ndim == 1 else f"{name} must have d >= 1")


def _check_vec(a, str name):
    _check_f32(a, name, 1)


def _check_mat(x, str name):
    _check_f32(x, name, 2)


cdef vb_pair_fn _pair_fn(a, b, int metric, int level) except NULL:
    """The single-pair kernel for metric 0 (inner product) or 1 (squared L2), after checking a and b."""
    _check_vec(a, "a")
    _check_vec(b, "b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"dimension mismatch: a has {a.shape[0]}, b has {b.shape[0]}")
    cdef const vb_distance_ops_t *ops = _ops(level)
    return ops.dot if metric == 0 else ops.l2sq


cdef float _pair(a, b, int metric, int level) except? -1:
    cdef vb_pair_fn fn = _pair_fn(a, b, metric, level)
    cdef const float[::1] av = a
    cdef const float[::1] bv = b
    cdef float r
    with nogil:
        r = fn(&av[0], &bv[0], av.shape[0])
    return r


def dot(a, b, int level=-1):
    """Inner product of two float32 vectors of equal length."""
    return _pair(a, b, 0, level)


def l2sq(a, b, int level=-1):
    """Squared Euclidean distance of two float32 vectors of equal length."""
    return _pair(a, b, 1, level)


def _check_ids(ids, Py_ssize_t n):
    if not isinstance(ids, np.ndarray) or ids.dtype != np.int64 or ids.ndim != 1:
        raise ValueError("ids must be a 1-D numpy int64 array of row indices")
    if not ids.flags.c_contiguous:
        raise ValueError("ids must be C-contiguous")
    if ids.shape[0] and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(f"ids must lie in [0, {n}), got range [{ids.min()}, {ids.max()}]")


cdef object _many(int metric, q, X, ids, int level, object threads):
    _check_vec(q, "q")
    _check_mat(X, "X")
    if X.shape[1] != q.shape[0]:
        raise ValueError(f"dimension mismatch: q has {q.shape[0]}, X rows have {X.shape[1]}")
    cdef const vb_distance_ops_t *ops = _ops(level)
    cdef const float[::1] qv = q
    cdef const float[:, ::1] Xv = X
    cdef size_t d = qv.shape[0]
    cdef const int64_t[::1] idv
    cdef const int64_t *idp = NULL
    cdef float[::1] outv
    cdef size_t n = X.shape[0]
    if ids is not None:
        _check_ids(ids, X.shape[0])
        n = ids.shape[0]
    out = np.empty(n, dtype=np.float32)
    if n == 0 or X.shape[0] == 0:
        return out
    if ids is not None:
        idv = ids
        idp = &idv[0]
    outv = out
    cdef size_t nthreads = threads_for(threads, n * d, PARALLEL_MIN_FLOATS)
    with nogil:
        vb_distance_many(ops, metric, &outv[0], &qv[0], &Xv[0, 0], d, n, idp, nthreads)
    return out


def dot_many(q, X, ids=None, int level=-1, threads=None):
    """Inner products of q against every row of X (n, d), or against rows X[ids]. Returns (n,) float32."""
    return _many(0, q, X, ids, level, threads)


def l2sq_many(q, X, ids=None, int level=-1, threads=None):
    """Squared L2 distances of q to every row of X (n, d), or to rows X[ids]. Returns (n,) float32."""
    return _many(1, q, X, ids, level, threads)


def dot_windows(q, X, starts, int level=-1):
    """out[i] = q . X[starts[i] : starts[i] + L].ravel() with L = len(q) / X.shape[1]: a flattened L-row
    query against L consecutive rows of X, read in place (identify scores its windows so, without
    gathering them). starts: int64 rows with starts[i] + L <= X.shape[0]. Returns (n,) float32."""
    _check_vec(q, "q")
    _check_mat(X, "X")
    cdef size_t d = X.shape[1]
    if d == 0 or q.shape[0] == 0 or q.shape[0] % d:
        raise ValueError(f"q's length {q.shape[0]} is not a positive multiple of X's row length {d}")
    cdef size_t L = q.shape[0] // d
    if L > <size_t>X.shape[0]:
        raise ValueError(f"a window of {L} rows does not fit in X's {X.shape[0]} rows")
    _check_ids(starts, X.shape[0] - L + 1)
    cdef vb_pair_fn fn = _ops(level).dot
    cdef size_t n = starts.shape[0]
    out = np.empty(n, dtype=np.float32)
    if n == 0:
        return out
    cdef const float[::1] qv = q
    cdef const float[:, ::1] Xv = X
    cdef const int64_t[::1] sv = starts
    cdef float[::1] outv = out
    cdef const float *base = &Xv[0, 0]
    cdef size_t i
    with nogil:
        for i in range(n):
            outv[i] = fn(&qv[0], base + <size_t>sv[i] * d, L * d)
    return out


def sq8_encode(X):
    """The int8 scan codes of X (n, d) float32: (codes int8 (n, d), scale float32 (n,)), with
    X[r] ~ scale[r] * codes[r] (include/vibrato/distance.h, vb_sq8_encode)."""
    _check_mat(X, "X")
    cdef size_t n = X.shape[0], d = X.shape[1]
    codes = np.empty((n, d), dtype=np.int8)
    scale = np.empty(n, dtype=np.float32)
    if n == 0:
        return codes, scale
    cdef const float[:, ::1] Xv = X
    cdef int8_t[:, ::1] cv = codes
    cdef float[::1] sv = scale
    with nogil:
        vb_sq8_encode(&Xv[0, 0], n, d, &cv[0, 0], &sv[0])
    return codes, scale


def dot_sq8(q, codes, scale, ids=None, int level=-1):
    """scale[r] * (q . codes[r]) for every row r of codes, or for r in ids (int64 rows), as float32:
    the approximate inner products an exact scan on the int8 codes ranks by (q rounded to int16 first,
    vb_sq8_query: a relative error of at most 1 / 65534 of its largest component)."""
    _check_vec(q, "q")
    if not isinstance(codes, np.ndarray) or codes.dtype != np.int8 or codes.ndim != 2 or not codes.flags.c_contiguous:
        raise ValueError("codes must be a C-contiguous 2-D numpy int8 array")
    if codes.shape[1] != q.shape[0]:
        raise ValueError(f"dimension mismatch: q has {q.shape[0]}, codes rows have {codes.shape[1]}")
    if (not isinstance(scale, np.ndarray) or scale.dtype != np.float32 or scale.shape != (codes.shape[0],)
            or not scale.flags.c_contiguous):
        raise ValueError(f"scale must be a C-contiguous float32 array of shape ({codes.shape[0]},)")
    if ids is not None:
        _check_ids(ids, codes.shape[0])
    cdef const vb_distance_ops_t *ops = _ops(level)
    cdef size_t n = codes.shape[0] if ids is None else ids.shape[0], d = q.shape[0]
    out = np.empty(n, dtype=np.float32)
    if n == 0:
        return out
    cdef const float[::1] qv = q
    cdef const int8_t[:, ::1] cv = codes
    cdef const float[::1] sv = scale
    cdef const uint32_t[::1] rv
    cdef float[::1] outv = out
    cdef int16_t[::1] q16 = np.empty(d, dtype=np.int16)
    cdef float qs
    if ids is None:
        with nogil:
            qs = vb_sq8_query(&qv[0], d, &q16[0])
            ops.dot_sq8_ny(&outv[0], &q16[0], qs, &cv[0, 0], &sv[0], d, n)
        return out
    rv = ids.astype(np.uint32)
    with nogil:
        qs = vb_sq8_query(&qv[0], d, &q16[0])
        ops.dot_sq8_ids32(&outv[0], &q16[0], qs, &cv[0, 0], &sv[0], d, &rv[0], n)
    return out


def distance_matrix(Q, X, int metric=0, int level=-1, threads=None):
    """out[i, j] = op(Q[i], X[j]) as (nq, nx) float32; metric 0 = inner product, 1 = squared L2."""
    _check_mat(Q, "Q")
    _check_mat(X, "X")
    if Q.shape[1] != X.shape[1]:
        raise ValueError(f"dimension mismatch: Q rows have {Q.shape[1]}, X rows have {X.shape[1]}")
    if metric not in (0, 1):
        raise ValueError("metric must be 0 (inner product) or 1 (squared L2)")
    cdef const vb_distance_ops_t *ops = _ops(level)
    out = np.empty((Q.shape[0], X.shape[0]), dtype=np.float32)
    if Q.shape[0] == 0 or X.shape[0] == 0:
        return out
    cdef const float[:, ::1] Qv = Q
    cdef const float[:, ::1] Xv = X
    cdef float[:, ::1] outv = out
    cdef size_t nthreads = threads_for(threads, <size_t>Qv.shape[0] * Xv.shape[0] * Qv.shape[1] // 16,
                                       PARALLEL_MIN_FLOATS)
    with nogil:
        vb_distance_matrix_mt(ops, metric, &outv[0, 0], &Qv[0, 0], Qv.shape[0], &Xv[0, 0], Xv.shape[0],
                              Qv.shape[1], nthreads)
    return out


def bench_pair(a, b, int metric=0, long iters=1000000, int level=-1):
    """Nanoseconds per single-pair kernel call, timed in a native loop (no Python per call)."""
    cdef vb_pair_fn fn = _pair_fn(a, b, metric, level)
    cdef const float[::1] av = a
    cdef const float[::1] bv = b
    cdef size_t d = av.shape[0]
    cdef timespec t0, t1
    cdef float sink = 0
    cdef long i
    with nogil:
        clock_gettime(CLOCK_MONOTONIC, &t0)
        for i in range(iters):
            sink += fn(&av[0], &bv[0], d)
        clock_gettime(CLOCK_MONOTONIC, &t1)
    if sink == 12345.678:  # keeps the loop observable to the optimiser
        print("", end="")
    return ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / iters
