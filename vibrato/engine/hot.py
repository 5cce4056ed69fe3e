"""The hot tier: acknowledged WAL rows not yet in a segment, held in memory and searchable.

Rows arrive in commit order (ids and LSNs ascending) through `append`, which the engine calls under
its state lock from the catalog writer thread, before the write is acknowledged (read-your-writes,
CONTRACT.md D5). Storage is a list of fixed-capacity chunks; rows inside a chunk are written once and never
moved, so a `HotView` (chunk, lo, hi) taken under the state lock can be read later without locks.

Search: the growing chunk (and any sealed chunk whose graph is not built yet) is scanned exactly with
the SIMD kernels; sealed chunks get an HNSW graph built in the background ("exact scan below a size
threshold, HNSW above"). Identify and metadata look rows up by id, so results are exact and
independent of this organisation (CONTRACT.md D1).
"""
from dataclasses import dataclass

import numpy as np

from vibrato import kernels


class HotChunk:
    """Rows [0, n) of a chunk are immutable once appended. Shapes: ids/lsns (capacity,), vectors
    (capacity, dim) float32, bpm/start/duration (capacity,)."""

    def __init__(self, capacity: int, dim: int):
        self.capacity = capacity
        self.ids = np.zeros(capacity, dtype=np.int64)
        self.lsns = np.zeros(capacity, dtype=np.int64)
        self.vectors = np.zeros((capacity, dim), dtype=np.float32)
        self.bpm = np.zeros(capacity, dtype=np.float32)
        self.start = np.zeros(capacity, dtype=np.uint32)
        self.duration = np.zeros(capacity, dtype=np.uint32)
        self.sources: list = []
        self.tags: list = []
        self.n = 0
        self.index = None  # HnswIndex over all `capacity` rows once sealed and built

    @property
    def sealed(self) -> bool:
        return self.n == self.capacity

    def row_of(self, vid: int) -> int:
        r = int(np.searchsorted(self.ids[:self.n], vid))
        return r if r < self.n and self.ids[r] == vid else -1


@dataclass(frozen=True)
class HotSlice:
    chunk: HotChunk
    lo: int
    hi: int

    @property
    def first_id(self) -> int:
        return int(self.chunk.ids[self.lo])

    @property
    def last_id(self) -> int:
        return int(self.chunk.ids[self.hi - 1])


class HotView:
    """An immutable view of the hot tier at one instant."""

    def __init__(self, slices: tuple):
        self.slices = slices
        self.count = sum(s.hi - s.lo for s in slices)
        self._firsts = np.array([s.first_id for s in slices], dtype=np.int64)

    @property
    def first_id(self):
        return self.slices[0].first_id if self.slices else None

    @property
    def last_id(self):
        return self.slices[-1].last_id if self.slices else None

    def search(self, q: np.ndarray, k: int, ef: int, mask: np.ndarray | None):
        """Top-k (ids, scores) over visible rows; mask is a bool mask over the global id space."""
        out_ids, out_scores = [], []
        for s in self.slices:
            ch = s.chunk
            rows_ids = ch.ids[s.lo:s.hi]
            allowed = None
            if mask is not None:
                inside = rows_ids < mask.shape[0]
                allowed = np.zeros(s.hi - s.lo, dtype=bool)
                allowed[inside] = mask[rows_ids[inside]]
                if not allowed.any():
                    continue
            index = ch.index
            if index is not None and (allowed is None or allowed.sum() > 4 * k):
                full = np.zeros(ch.capacity, dtype=bool)
                full[s.lo:s.hi] = True if allowed is None else allowed
                ids, scores = index.search(q, k=k, ef=max(ef, k), allowed=full)
                ids, scores = ids.reshape(-1), scores.reshape(-1)
                keep = ids >= 0
                out_ids.append(ch.ids[ids[keep]])
                out_scores.append(scores[keep])
                continue
            scores = kernels.dot_many(q, ch.vectors[s.lo:s.hi], threads=1)
            if allowed is not None:
                rows = np.flatnonzero(allowed)
                scores = scores[rows]
            else:
                rows = None
            take = _topk(scores, k)
            out_scores.append(scores[take])
            out_ids.append(rows_ids[take] if rows is None else rows_ids[rows[take]])
        if not out_ids:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        return np.concatenate(out_ids), np.concatenate(out_scores)

    def locate(self, ids: np.ndarray):
        """For each id: (slice index or -1, row within the chunk). Vectorised over ids."""
        where = np.full(ids.shape, -1, dtype=np.int64)
        rows = np.zeros(ids.shape, dtype=np.int64)
        if not self.slices:
            return where, rows
        which = np.searchsorted(self._firsts, ids, side="right") - 1
        for si in np.unique(which[which >= 0]).tolist():
            s = self.slices[si]
            sel = np.flatnonzero(which == si)
            cand = np.searchsorted(s.chunk.ids[s.lo:s.hi], ids[sel]) + s.lo
            ok = cand < s.hi
            ok[ok] = s.chunk.ids[cand[ok]] == ids[sel[ok]]
            where[sel[ok]] = si
            rows[sel[ok]] = cand[ok]
        return where, rows

    def vectors_for(self, ids: np.ndarray, out: np.ndarray, found: np.ndarray):
        """Fill out[i] and found[i] for ids held in this view."""
        where, rows = self.locate(ids)
        for si in np.unique(where[where >= 0]).tolist():
            sel = np.flatnonzero(where == si)
            out[sel] = self.slices[si].chunk.vectors[rows[sel]]
            found[sel] = True

    def metadata(self, vid: int):
        where, rows = self.locate(np.array([vid], dtype=np.int64))
        if where[0] < 0:
            return None
        ch = self.slices[int(where[0])].chunk
        r = int(rows[0])
        return {"source_file": ch.sources[r], "start_time_ms": int(ch.start[r]),
                "duration_ms": int(ch.duration[r]), "bpm": float(ch.bpm[r]), "tags": list(ch.tags[r])}


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    n = scores.shape[0]
    if k >= n:
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


class HotTier:
    """Mutable owner of the chunks. Every method is called with the engine's state lock held."""

    def __init__(self, dim: int, chunk_rows: int):
        self.dim = dim
        self.chunk_rows = max(16, int(chunk_rows))
        self.chunks: list[HotChunk] = []
        self.lo = 0  # first visible row of chunks[0]

    def append(self, ids, lsns, vectors, metas):
        i, n = 0, len(ids)
        while i < n:
            if not self.chunks or self.chunks[-1].sealed:
                self.chunks.append(HotChunk(self.chunk_rows, self.dim))
            ch = self.chunks[-1]
            take = min(n - i, ch.capacity - ch.n)
            a, b = ch.n, ch.n + take
            ch.ids[a:b] = ids[i:i + take]
            ch.lsns[a:b] = lsns[i:i + take]
            ch.vectors[a:b] = vectors[i:i + take]
            for j, m in enumerate(metas[i:i + take]):
                ch.sources.append(m[0])
                ch.start[a + j] = m[1]
                ch.duration[a + j] = m[2]
                ch.bpm[a + j] = m[3]
                ch.tags.append(m[4])
            ch.n = b  # publish the rows only after they are fully written
            i += take

    def view(self) -> HotView:
        slices = []
        for ci, ch in enumerate(self.chunks):
            lo = self.lo if ci == 0 else 0
            if ch.n > lo:
                slices.append(HotSlice(ch, lo, ch.n))
        return HotView(tuple(slices))

    def count(self) -> int:
        return sum(ch.n for ch in self.chunks) - self.lo

    def head(self, max_rows: int):
        """The oldest visible rows (at most max_rows) as copies: (ids, lsns, vectors, metas)."""
        ids, lsns, vecs, metas = [], [], [], []
        left = max_rows
        for ci, ch in enumerate(self.chunks):
            if left <= 0:
                break
            lo = self.lo if ci == 0 else 0
            hi = min(ch.n, lo + left)
            if hi <= lo:
                continue
            ids.append(ch.ids[lo:hi].copy())
            lsns.append(ch.lsns[lo:hi].copy())
            vecs.append(ch.vectors[lo:hi].copy())
            metas.extend((ch.sources[r], int(ch.start[r]), int(ch.duration[r]), float(ch.bpm[r]), ch.tags[r])
                         for r in range(lo, hi))
            left -= hi - lo
        if not ids:
            return (np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, self.dim), np.float32), [])
        return np.concatenate(ids), np.concatenate(lsns), np.concatenate(vecs), metas

    def drop_through(self, lsn: int):
        """Hide every row with lsn <= `lsn` (they now live in a published segment)."""
        while self.chunks:
            ch = self.chunks[0]
            hi = int(np.searchsorted(ch.lsns[:ch.n], lsn, side="right"))
            if hi >= ch.n and ch.sealed:
                self.chunks.pop(0)
                self.lo = 0
                continue
            self.lo = max(self.lo, hi)
            if self.lo >= ch.n and not ch.sealed:
                pass  # keep the growing chunk; new rows append after lo
            break

    def sealed_without_index(self) -> list:
        return [ch for ch in self.chunks if ch.sealed and ch.index is None]
