"""Helpers the benchmarks share: the data-set location, the tiled text vectors, exact top-10 ground truth
and paired A/B timing.

Import from a benchmark in perf/ (each puts perf/ and the repository root on sys.path).
"""
import os
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("VIBRATO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def text_vectors(n: int, seed: int = 0) -> np.ndarray:
    """n unit rows: shared/data/text base_128.npy tiled to n rows, plus small noise (N(0, 0.02))."""
    base = np.load(DATA / "text" / "base_128.npy")
    rng = np.random.default_rng(seed)
    reps = -(-n // base.shape[0])
    X = np.tile(base, (reps, 1))[:n].copy()
    X += rng.normal(0, 0.02, X.shape).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X


def exact_top10(X, Q) -> np.ndarray:
    """Exact inner-product top-10 ids of each row of Q over X (float64), 200k rows of X at a time, so
    X may be a memory map larger than memory."""
    best = np.empty((Q.shape[0], 10), dtype=np.int64)
    scores = np.full((Q.shape[0], 10), -np.inf)
    for lo in range(0, X.shape[0], 200_000):
        s = Q.astype(np.float64) @ X[lo:lo + 200_000].astype(np.float64).T
        ids = np.argpartition(-s, 10, axis=1)[:, :10] + lo
        sc = np.take_along_axis(s, ids - lo, axis=1)
        allids, allsc = np.concatenate([best, ids], 1), np.concatenate([scores, sc], 1)
        o = np.argsort(-allsc, axis=1, kind="stable")[:, :10]
        best, scores = np.take_along_axis(allids, o, 1), np.take_along_axis(allsc, o, 1)
    return best


def paired_times(ours, peer, rounds: int) -> tuple[list, list]:
    """(our times, peer times) in seconds over `rounds` alternating calls after one warm-up each, so
    both sides see the same machine load."""
    ours(), peer()
    to, tp = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        peer()
        t2 = time.perf_counter()
        to.append(t1 - t0)
        tp.append(t2 - t1)
    return to, tp
