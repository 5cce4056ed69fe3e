"""Distance kernels for float32 vectors (inner product and squared L2), SIMD-dispatched at run time.

Inputs are numpy float32 arrays, C-contiguous; anything else is a ValueError naming the argument.
Every call releases the GIL while the kernel runs.

>>> import numpy as np, vibrato.kernels as K
>>> K.dot(np.ones(3, np.float32), np.ones(3, np.float32))
3.0
"""
from vibrato._native import cpu as _cpu
from vibrato._native import distance as _distance

__all__ = ["dot", "l2sq", "dot_many", "l2sq_many", "dot_windows", "dot_matrix", "l2sq_matrix", "isa",
           "scan_codes"]


def isa() -> str:
    """Name of the process-wide SIMD level every kernel table is picked from: 'scalar', 'neon', 'avx2',
    'avx512' or 'avx512vbmi' (the best this CPU runs, or VIBRATO_SIMD). Levels without a distance
    kernel of their own use the next lower one (avx512vbmi runs the avx512 distance kernels)."""
    return _cpu.level_name(_cpu.selected_level())


def dot(a, b) -> float:
    """Inner product of two vectors of equal length."""
    return _distance.dot(a, b)


def l2sq(a, b) -> float:
    """Squared Euclidean distance of two vectors of equal length."""
    return _distance.l2sq(a, b)


def dot_many(q, X, ids=None, threads=None):
    """Inner products of q (d,) with each row of X (n, d), or with X[ids] for int64 row ids. (n,) float32.

    threads: None splits large scans (>= 4 MiB of rows) across the cores; pass 1 to stay on this thread.
    """
    return _distance.dot_many(q, X, ids, threads=threads)


def l2sq_many(q, X, ids=None, threads=None):
    """Squared L2 distances of q (d,) to each row of X (n, d), or to X[ids]. (n,) float32."""
    return _distance.l2sq_many(q, X, ids, threads=threads)


def dot_windows(q, X, starts):
    """Inner products of a flattened L-row query q (L*d,) with the L consecutive rows X[s:s+L] of X (n, d)
    for each int64 start s (s + L <= n), read in place. (len(starts),) float32."""
    return _distance.dot_windows(q, X, starts)


def scan_codes(X):
    """The int8 scan codes of X (n, d): (codes int8 (n, d), scale float32 (n,)) with X[r] ~ scale[r] *
    codes[r], each row rounded on its own range (error <= scale/2 per component). Rows with a
    non-finite or zero component range get scale 0."""
    return _distance.sq8_encode(X)


def dot_matrix(Q, X, threads=None):
    """All inner products: (nq, d) x (nx, d) -> (nq, nx) float32, blocked for cache reuse."""
    return _distance.distance_matrix(Q, X, 0, threads=threads)


def l2sq_matrix(Q, X, threads=None):
    """All squared L2 distances: (nq, d) x (nx, d) -> (nq, nx) float32."""
    return _distance.distance_matrix(Q, X, 1, threads=threads)
