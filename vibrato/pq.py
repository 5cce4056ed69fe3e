"""Product quantization (PQ) with 8-bit codes, for the archive tier.

A vector of ``dim`` float32 values is split into ``m`` subvectors of ``dsub = dim // m`` values; each
subvector is replaced by the index of its nearest of 256 centroids (one byte), so a 128-d vector with
m=16 takes 16 bytes instead of 512. Queries are scored against codes by asymmetric distance
computation (ADC): a per-query table ``table[j, c] = dot(q_j, centroid[j, c])`` is summed over the
row's codes. ADC scores are approximate; the engine re-ranks the best candidates exactly against the
float32 vectors kept on disk (CONTRACT.md D14).

Arrays: ``X`` (n, dim) float32, ``codes`` (n, m) uint8, ``centroids`` (m, 256, dsub) float32, all
C-contiguous; wrong dtype, shape or layout is a ValueError naming the argument, never a silent copy.
Heavy calls release the GIL and run SIMD kernels chosen at run time
(``vibrato._native.cpu.selected_level()``, ``VIBRATO_SIMD`` to force one). Objects are safe to share
between threads once trained: encode/decode/adc_* only read the codebook.

>>> import numpy as np
>>> from vibrato.pq import ProductQuantizer
>>> X = np.random.default_rng(0).standard_normal((1000, 32)).astype(np.float32)
>>> pq = ProductQuantizer(32, 8).train(X, iters=5)
>>> codes = pq.encode(X)
>>> rows, scores = pq.adc_scan(X[0], codes, k=5)
>>> rows.shape, codes.shape
((5,), (1000, 8))
"""
from __future__ import annotations

import numpy as np

from vibrato._native import pq as _pq

__all__ = ["ProductQuantizer"]

_METRICS = {"ip": 0, "l2": 1}


class ProductQuantizer:
    """A product quantizer with ``m`` subspaces of 256 centroids each (``nbits=8``).

    Attributes: ``dim``, ``m``, ``nbits``, ``ksub`` (256), ``dsub`` (dim // m), ``is_trained``,
    ``centroids`` ((m, 256, dsub) float32, read-only; None until trained), ``train_info`` (dict from the
    last ``train``: rows_used, iterations, reseeded, inertia; None otherwise).
    """

    def __init__(self, dim: int, m: int, nbits: int = 8):
        if isinstance(nbits, bool) or not isinstance(nbits, (int, np.integer)) or nbits != 8:
            raise ValueError(f"nbits must be 8 (256 centroids per subspace, one byte per code); got {nbits!r}")
        self.dsub = _pq.check_shape(dim, m)
        self.dim = int(dim)
        self.m = int(m)
        self.nbits = 8
        self.ksub = _pq.KSUB
        self._centroids = None
        self.train_info = None

    def __repr__(self) -> str:
        state = "trained" if self.is_trained else "untrained"
        return f"ProductQuantizer(dim={self.dim}, m={self.m}, nbits={self.nbits}, {state})"

    @property
    def is_trained(self) -> bool:
        return self._centroids is not None

    @property
    def centroids(self):
        """(m, 256, dsub) float32, read-only, or None before training."""
        return self._centroids

    def _set_centroids(self, centroids) -> None:
        centroids.setflags(write=False)
        self._centroids = centroids

    def _require_trained(self) -> None:
        if self._centroids is None:
            raise ValueError("ProductQuantizer is not trained: call train(X) or load it with from_bytes()")

    # -- training -----------------------------------------------------------------------------------

    def train(self, X, iters: int = 15, seed: int = 42, sample: int = 65536, threads=None,
              init=None) -> "ProductQuantizer":
        """Learns the codebook from X (n, dim) float32, n >= 256. Returns self.

        k-means++ initialisation then at most ``iters`` Lloyd iterations per subspace (stopping early when
        no assignment changes), on at most ``sample`` rows drawn without replacement by a RNG seeded
        with ``seed``. Empty clusters are re-seeded deterministically with the point farthest from its
        centroid. The same data and seed give a bit-identical codebook for any ``threads`` (None uses
        every core). Sampled rows must be finite. ``init`` (m, 256, dsub) float32 replaces k-means++
        with given starting centroids (e.g. ``self.centroids`` to refine a codebook on new data).
        Retraining replaces the codebook.
        """
        self._check_X(X)
        centroids, info = _pq.train(X, self.m, iters=iters, seed=seed, sample=sample, init=init, threads=threads)
        self._set_centroids(centroids)
        self.train_info = info
        return self

    # -- codec ---------------------------------------------------------------------------------------

    def _check_X(self, X) -> None:
        if not isinstance(X, np.ndarray):
            raise ValueError(f"X must be a numpy float32 array, got {type(X).__name__}")
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise ValueError(f"X must have shape (n, {self.dim}), got {X.shape}")

    def encode(self, X, threads=None):
        """(n, m) uint8 codes: per subspace, the nearest centroid by squared L2 (lowest index on ties)."""
        self._require_trained()
        self._check_X(X)
        return _pq.encode(self._centroids, X, threads=threads)

    def decode(self, codes):
        """(n, dim) float32 reconstruction: each code replaced by its centroid."""
        self._require_trained()
        return _pq.decode(self._centroids, codes)

    # -- ADC -----------------------------------------------------------------------------------------

    def adc_table(self, q, metric: str = "ip"):
        """(m, 256) float32 table for query q (dim,) float32.

        metric "ip" (what the engine uses): ``table[j, c] = dot(q[j*dsub:(j+1)*dsub], centroids[j, c])``,
        so sum_j table[j, codes[i, j]] = dot(q, decode(codes)[i]); "l2": the squared L2 distance instead.
        """
        self._require_trained()
        if metric not in _METRICS:
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        return _pq.adc_table(self._centroids, q, _METRICS[metric])

    def adc_tables(self, Q):
        """(nq, m, 256) float32 inner-product tables for the queries Q (nq, dim): adc_table per row."""
        self._require_trained()
        Q = np.asarray(Q, dtype=np.float32)
        if Q.ndim != 2 or Q.shape[1] != self.dim:
            raise ValueError(f"Q must have shape (nq, {self.dim}), got {Q.shape}")
        if Q.shape[0] == 1:
            return self.adc_table(Q[0])[None]
        c = self._centroids  # (m, 256, dsub)
        sub = Q.reshape(Q.shape[0], self.m, -1).transpose(1, 0, 2)  # (m, nq, dsub)
        return np.ascontiguousarray(np.matmul(sub, c.transpose(0, 2, 1)).transpose(1, 0, 2))

    def adc_scan(self, q, codes, k: int, allowed=None, threads=None):
        """Top-k rows of codes (n, m) by approximate inner product with q, highest first.

        codes: (n, m) uint8, C-contiguous, may be a read-only mmap view. allowed: None or a bool mask
        (n,) over rows. Returns (rows int64 (k',), scores float32 (k',)) with k' = min(k, allowed rows);
        equal scores list the lower row first. threads: None splits scans over 4 MiB of codes across
        the cores; pass 1 when the caller already runs one scan per core.
        """
        return self.scan_table(self.adc_table(q), codes, k, allowed=allowed, threads=threads)

    def scan_table(self, table, codes, k: int, allowed=None, threads=None):
        """adc_scan with a precomputed inner-product table (adc_table(q)), e.g. one table for many segments."""
        if isinstance(table, np.ndarray) and table.ndim == 2 and table.shape[0] != self.m:
            raise ValueError(f"table must have shape ({self.m}, 256), got {table.shape}")
        return _pq.adc_scan(table, codes, k, allowed=allowed, threads=threads)

    # -- serialisation -------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The codebook as bytes: a 32-byte header (magic, version, dim, m, nbits, ksub, payload length),
        the (m, 256, dsub) float32 centroids little-endian, and a CRC32C trailer."""
        self._require_trained()
        return _pq.to_bytes(self._centroids)

    @classmethod
    def from_bytes(cls, buf) -> "ProductQuantizer":
        """Rebuilds a trained quantizer from ``to_bytes()`` output (bytes, bytearray, memoryview, mmap).

        The buffer is validated completely (magic, version, nbits, dim, m | dim, exact length,
        checksum, finite values); anything else raises ValueError.
        """
        dim, m, nbits, centroids = _pq.from_bytes(buf)
        pq = cls(dim, m, nbits)
        pq._set_centroids(centroids)
        return pq
