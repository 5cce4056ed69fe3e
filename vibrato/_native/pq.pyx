"""Cython wrappers over include/vibrato/pq.h (product quantization with 8-bit codes).

Stateless functions over explicit arrays; ``vibrato.pq.ProductQuantizer`` is the object face.
Strict inputs: numpy arrays of the stated dtype, C-contiguous, with matching shapes; anything else is
a ValueError naming the argument (never a silent copy, never a crash). Read-only arrays (mmap views)
are accepted wherever the function only reads. Every heavy call releases the GIL. ``level`` selects
an ISA explicitly (tests run every path in one process); -1 means the process-wide level chosen by
vibrato._native.cpu. ``threads=None`` picks a thread count from the amount of work.

Layouts: codebook float32 (m, 256, dsub); codes uint8 (n, m); table float32 (m, 256).
"""
from libc.stdint cimport int64_t, uint8_t, uint64_t

from vibrato._native._common cimport VB_OK, VB_EINVAL, byte_view, check_rc, native_init, threads_for

import numpy as np

from vibrato._native.cpu import available_levels, level_name, selected_level

native_init()
cdef const vb_pq_ops_t *_default_ops = vb_pq_ops_for(selected_level())

KSUB = VB_PQ_KSUB
NBITS = VB_PQ_NBITS
MIN_TRAIN_ROWS = VB_PQ_MIN_TRAIN
MAX_DIM = VB_PQ_MAX_DIM
MAX_ITERS = VB_PQ_MAX_ITERS
HEADER_BYTES = VB_PQ_HEADER_BYTES
MAX_SCAN_ROWS = VB_PQ_MAX_SCAN_ROWS

# Work sizes above which threads=None uses every core (below them thread start-up costs more).
cdef size_t ENCODE_PARALLEL_MIN = 1 << 13   # subvectors
cdef size_t SCAN_PARALLEL_MIN = 1 << 22     # code bytes (4 MiB)


def isa_level():
    """The level the default kernels run at."""
    return _default_ops.level


def kernel_name(int level=-1):
    """Name of the kernel set a level uses here: 'scalar', 'neon', 'avx2', 'avx512' or 'avx512vbmi'."""
    return _ops(level, None).name.decode()


def kernels():
    """Every kernel set this CPU can run, by name, one per available SIMD level (tests and benchmarks
    pass them as ``kernel=``; ``VIBRATO_SIMD`` picks the process default among the same sets)."""
    return [vb_pq_ops_for(lvl).name.decode() for lvl in available_levels()]


cdef const vb_pq_ops_t *_ops(int level, object kernel) except NULL:
    if kernel is not None:
        for lvl in available_levels():
            if level_name(lvl) == kernel:
                return vb_pq_ops_for(lvl)
        raise ValueError(f"kernel {kernel!r} cannot run on this CPU; available: {kernels()}")
    if level < 0:
        return _default_ops
    if level not in available_levels():
        raise ValueError(f"SIMD level {level} cannot run on this CPU; available: {available_levels()}")
    return vb_pq_ops_for(level)


def _check_array(a, str name, dtype, int ndim, str shape_desc):
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy {np.dtype(dtype).name} array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_desc}, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def check_shape(dim, m):
    """Validates (dim, m): 1 <= m <= dim <= 65536 and m divides dim. Returns dsub."""
    for name, v in (("dim", dim), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {type(v).__name__}")
    if not 1 <= dim <= VB_PQ_MAX_DIM:
        raise ValueError(f"dim must be in [1, {VB_PQ_MAX_DIM}], got {dim}")
    if not 1 <= m <= dim:
        raise ValueError(f"m must be in [1, dim={dim}], got m={m}")
    if dim % m != 0:
        raise ValueError(f"m must divide dim: dim={dim} is not a multiple of m={m}")
    return dim // m


def _check_codebook(codebook):
    _check_array(codebook, "codebook", np.float32, 3, "(m, 256, dsub)")
    m, ksub, dsub = codebook.shape
    if ksub != VB_PQ_KSUB or m == 0 or dsub == 0:
        raise ValueError(f"codebook must have shape (m, 256, dsub) with m, dsub >= 1, got {codebook.shape}")
    check_shape(m * dsub, m)
    return m, dsub


def train(X, int m, iters=15, seed=42, sample=65536, init=None, int level=-1, threads=None):
    """Trains a codebook on X (n, dim) float32; returns (codebook (m, 256, dim // m) float32, stats dict).

    k-means++ then at most ``iters`` Lloyd iterations per subspace on a seeded subsample of at most
    ``sample`` rows; empty clusters are re-seeded deterministically. ``init``: a (m, 256, dsub) float32
    codebook to start from instead of k-means++ (warm start). Same inputs and seed give a
    bit-identical codebook for any ``threads``. stats: rows_used, iterations (summed over subspaces),
    reseeded (empty clusters re-seeded), inertia (sum of squared distances at the last assignment).
    """
    _check_array(X, "X", np.float32, 2, "(n, dim)")
    cdef Py_ssize_t n = X.shape[0], dim = X.shape[1]
    if dim == 0:
        raise ValueError("X must have dim >= 1 columns")
    dsub = check_shape(dim, m)
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or not 0 <= iters <= VB_PQ_MAX_ITERS:
        raise ValueError(f"iters must be an int in [0, {VB_PQ_MAX_ITERS}], got {iters!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < VB_PQ_MIN_TRAIN:
        raise ValueError(f"sample must be an int >= {VB_PQ_MIN_TRAIN} (one row per centroid), got {sample!r}")
    if n < VB_PQ_MIN_TRAIN:
        raise ValueError(f"X must have at least {VB_PQ_MIN_TRAIN} rows to train 256 centroids per subspace, "
                         f"got {n}")
    cdef const float[:, :, ::1] iv
    cdef const float *ip = NULL
    if init is not None:
        if not isinstance(init, np.ndarray) or init.shape != (m, VB_PQ_KSUB, dsub):
            raise ValueError(f"init must be a (m, 256, dsub) = ({m}, 256, {dsub}) float32 array, got "
                             f"{getattr(init, 'shape', type(init).__name__)}")
        _check_array(init, "init", np.float32, 3, "(m, 256, dsub)")
        if not np.isfinite(init).all():
            raise ValueError("init contains a non-finite value (NaN or inf)")
        iv = init
        ip = &iv[0, 0, 0]
    cdef const vb_pq_ops_t *ops = _ops(level, None)
    cdef size_t nthreads = threads_for(threads, 1, 0)
    cdef const float[:, ::1] Xv = X
    codebook = np.empty((m, VB_PQ_KSUB, dsub), dtype=np.float32)
    cdef float[:, :, ::1] cv = codebook
    cdef vb_pq_train_stats_t st
    cdef size_t c_iters = iters, c_sample = min(sample, 2 ** 62)
    cdef uint64_t c_seed = seed
    cdef int rc
    with nogil:
        rc = vb_pq_train(ops, &Xv[0, 0], n, dim, m, c_iters, c_seed, c_sample, ip, nthreads, &cv[0, 0, 0], &st)
    if rc == VB_EINVAL and st.bad_row != <size_t>-1:
        raise ValueError(f"X row {st.bad_row} contains a non-finite value (NaN or inf)")
    check_rc(rc, "train")
    return codebook, {"rows_used": st.rows_used, "iterations": st.iterations, "reseeded": st.reseeded,
                      "inertia": st.inertia}


def encode(codebook, X, int level=-1, threads=None, bint pairwise=False):
    """codes (n, m) uint8: the nearest centroid (squared L2, lowest index on ties) per subspace of X (n, dim)."""
    m, dsub = _check_codebook(codebook)
    _check_array(X, "X", np.float32, 2, "(n, dim)")
    if X.shape[1] != m * dsub:
        raise ValueError(f"X must have dim={m * dsub} columns, got {X.shape[1]}")
    cdef const vb_pq_ops_t *ops = _ops(level, None)
    cdef Py_ssize_t n = X.shape[0]
    codes = np.empty((n, m), dtype=np.uint8)
    if n == 0:
        return codes
    cdef size_t nthreads = threads_for(threads, <size_t>n * m, ENCODE_PARALLEL_MIN)
    cdef const float[:, :, ::1] cv = codebook
    cdef const float[:, ::1] Xv = X
    cdef uint8_t[:, ::1] out = codes
    cdef size_t c_dim = m * dsub, c_m = m
    cdef int rc
    with nogil:
        rc = vb_pq_encode(ops, &cv[0, 0, 0], c_dim, c_m, &Xv[0, 0], n, &out[0, 0], nthreads, pairwise)
    check_rc(rc, "encode")
    return codes


def _check_codes(codes, size_t m):
    _check_array(codes, "codes", np.uint8, 2, "(n, m)")
    if codes.shape[1] != m:
        raise ValueError(f"codes must have m={m} columns, got {codes.shape[1]}")


def decode(codebook, codes):
    """(n, dim) float32: each row of codes (n, m) replaced by its concatenated centroids."""
    m, dsub = _check_codebook(codebook)
    _check_codes(codes, m)
    cdef Py_ssize_t n = codes.shape[0]
    out = np.empty((n, m * dsub), dtype=np.float32)
    if n == 0:
        return out
    cdef const float[:, :, ::1] cv = codebook
    cdef const uint8_t[:, ::1] codv = codes
    cdef float[:, ::1] ov = out
    cdef size_t c_dim = m * dsub, c_m = m
    with nogil:
        vb_pq_decode(&cv[0, 0, 0], c_dim, c_m, &codv[0, 0], n, &ov[0, 0])
    return out


def adc_table(codebook, q, int metric=0, int level=-1):
    """(m, 256) float32: metric 0 = dot(q_j, centroid[j, c]) (inner product), 1 = squared L2."""
    m, dsub = _check_codebook(codebook)
    _check_array(q, "q", np.float32, 1, "(dim,)")
    if q.shape[0] != m * dsub:
        raise ValueError(f"q must have dim={m * dsub} values, got {q.shape[0]}")
    if metric not in (0, 1):
        raise ValueError(f"metric must be 0 (inner product) or 1 (squared L2), got {metric}")
    if not np.isfinite(q).all():
        raise ValueError("q contains a non-finite value (NaN or inf)")
    cdef const vb_pq_ops_t *ops = _ops(level, None)
    table = np.empty((m, VB_PQ_KSUB), dtype=np.float32)
    cdef const float[:, :, ::1] cv = codebook
    cdef const float[::1] qv = q
    cdef float[:, ::1] tv = table
    cdef size_t c_dim = m * dsub, c_m = m
    with nogil:
        vb_pq_adc_table(ops, metric, &cv[0, 0, 0], c_dim, c_m, &qv[0], &tv[0, 0])
    return table


def _check_table(table):
    _check_array(table, "table", np.float32, 2, "(m, 256)")
    if table.shape[1] != VB_PQ_KSUB or table.shape[0] == 0:
        raise ValueError(f"table must have shape (m, 256) with m >= 1, got {table.shape}")
    return table.shape[0]


def adc_scores(table, codes, int level=-1, kernel=None):
    """(n,) float32: sum_j table[j, codes[i, j]] for every row (the lookup-accumulate kernel alone)."""
    m = _check_table(table)
    _check_codes(codes, m)
    cdef const vb_pq_ops_t *ops = _ops(level, kernel)
    cdef Py_ssize_t n = codes.shape[0]
    out = np.empty(n, dtype=np.float32)
    if n == 0:
        return out
    cdef const float[:, ::1] tv = table
    cdef const uint8_t[:, ::1] codv = codes
    cdef float[::1] ov = out
    cdef size_t c_m = m
    cdef int rc
    with nogil:
        rc = vb_pq_adc_scores(ops, &tv[0, 0], c_m, &codv[0, 0], n, &ov[0])
    check_rc(rc, "adc_scores")
    return out


def adc_scan(table, codes, k, allowed=None, int level=-1, threads=None, kernel=None):
    """Top-k rows of codes (n, m) by approximate score sum_j table[j, codes[i, j]], highest first.

    allowed: None or a bool mask (n,) over rows. Returns (rows int64 (k',), scores float32 (k',)) with
    k' = min(k, allowed rows); equal scores keep the lower row first. Same result for any threads.
    """
    m = _check_table(table)
    _check_codes(codes, m)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    cdef Py_ssize_t n = codes.shape[0]
    cdef const uint8_t[::1] av
    cdef const uint8_t *ap = NULL
    if n > VB_PQ_MAX_SCAN_ROWS:
        raise ValueError(f"codes has {n} rows; one ADC scan takes at most {VB_PQ_MAX_SCAN_ROWS}")
    if allowed is not None:
        _check_array(allowed, "allowed", np.bool_, 1, "(n,)")
        if allowed.shape[0] != n:
            raise ValueError(f"allowed must have one entry per row of codes ({n}), got {allowed.shape[0]}")
    cdef const vb_pq_ops_t *ops = _ops(level, kernel)
    cdef size_t cap = min(<size_t>k, <size_t>n) if n else 0
    rows = np.empty(cap, dtype=np.int64)
    scores = np.empty(cap, dtype=np.float32)
    if n == 0:
        return rows, scores
    if allowed is not None:
        av = allowed.view(np.uint8)
        ap = &av[0]
    cdef size_t nthreads = threads_for(threads, <size_t>n * m, SCAN_PARALLEL_MIN)
    cdef const float[:, ::1] tv = table
    cdef const uint8_t[:, ::1] codv = codes
    cdef int64_t[::1] rv = rows
    cdef float[::1] sv = scores
    cdef size_t c_m = m, c_k = cap, got = 0
    cdef int rc
    with nogil:
        rc = vb_pq_adc_scan(ops, &tv[0, 0], c_m, &codv[0, 0], n, ap, c_k, nthreads, &rv[0], &sv[0], &got)
    check_rc(rc, "adc_scan")
    if got < cap:
        return rows[:got].copy(), scores[:got].copy()
    return rows, scores


def to_bytes(codebook):
    """Serialises a codebook (m, 256, dsub) float32 (format in include/vibrato/pq.h; CRC32C trailer)."""
    m, dsub = _check_codebook(codebook)
    if not np.isfinite(codebook).all():
        raise ValueError("codebook contains a non-finite value (NaN or inf)")
    cdef size_t dim = m * dsub, c_m = m
    cdef size_t size = vb_pq_serialized_bytes(dim)
    buf = bytearray(size)
    cdef uint8_t[::1] bv = buf
    cdef const float[:, :, ::1] cv = codebook
    cdef int rc
    with nogil:
        rc = vb_pq_serialize(&bv[0], size, dim, c_m, &cv[0, 0, 0])
    check_rc(rc, "to_bytes")
    return bytes(buf)


def from_bytes(buf):
    """Validates and parses a serialised codebook. Returns (dim, m, nbits, codebook (m, 256, dsub)).

    Any truncated, corrupt or adversarial buffer raises ValueError; nothing larger than the buffer is
    ever allocated.
    """
    mv = byte_view(buf, "buf")
    cdef const uint8_t[::1] bv = mv
    cdef size_t length = bv.shape[0]
    cdef const uint8_t *p = &bv[0] if length else NULL
    cdef vb_pq_header_t hdr
    cdef const char *why = NULL
    cdef int rc
    with nogil:
        rc = vb_pq_parse(p, length, &hdr, &why)
    if rc != VB_OK:
        reason = why.decode() if why != NULL else f"error {rc}"
        raise ValueError(f"invalid PQ codebook bytes ({length} bytes): {reason}")
    dsub = hdr.dim // hdr.m
    codebook = np.frombuffer(mv, dtype="<f4", count=VB_PQ_KSUB * hdr.dim, offset=VB_PQ_HEADER_BYTES)
    codebook = codebook.astype(np.float32).reshape(hdr.m, VB_PQ_KSUB, dsub)
    return hdr.dim, hdr.m, hdr.nbits, codebook
