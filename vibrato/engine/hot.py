"""The hot tier: acknowledged WAL rows not yet in a segment, held in memory and searchable.

Rows arrive in commit order (ids and LSNs ascending) through `append`, which state.SegmentSet (the
tier's only owner) calls under its lock from the catalog writer thread, before the write is
acknowledged (read-your-writes, CONTRACT.md D5). Storage is a list of fixed-capacity chunks; rows
inside a chunk are written once and never moved, so a `HotView` (chunk, lo, hi) taken under that
lock can be read later without locks.

Search: sealed chunks get an HNSW graph built in the background; the query planner (planner.py)
scans the growing chunk and graph-less chunks exactly and decides per slice between a chunk's graph
and an exact scan ("exact scan below a size threshold, HNSW above"). Identify and metadata look rows
up by id, so results are exact and independent of this organisation (CONTRACT.md D1).
"""
import functools
from dataclasses import dataclass

import numpy as np

from vibrato import kernels


class HotChunk:
    """Rows [0, n) of a chunk are immutable once appended. Shapes: ids/lsns (capacity,), vectors
    (capacity, dim) float32, bpm/start/duration (capacity,); codes (capacity, dim) int8 and scale
    (capacity,): the rows' int8 scan codes (kernels.scan_codes), which the planner's exact scan of a
    chunk without a graph ranks on before rescoring the best rows exactly."""

    def __init__(self, capacity: int, dim: int):
        self.capacity = capacity
        self.ids = np.zeros(capacity, dtype=np.int64)
        self.lsns = np.zeros(capacity, dtype=np.int64)
        self.vectors = np.zeros((capacity, dim), dtype=np.float32)
        self.codes = np.zeros((capacity, dim), dtype=np.int8)
        self.scale = np.zeros(capacity, dtype=np.float32)
        self.bpm = np.zeros(capacity, dtype=np.float32)
        self.start = np.zeros(capacity, dtype=np.uint32)
        self.duration = np.zeros(capacity, dtype=np.uint32)
        self.sources: list = []
        self.tags: list = []
        self.n = 0
        self.index = None  # HnswIndex over all `capacity` rows once sealed and built
        self.live = None   # bool (capacity,) once a row is deleted; None: every row is live

    def kill(self, deleted: np.ndarray) -> int:
        """Mark rows [0, n) whose ids are in sorted `deleted` not live; returns how many were live."""
        ids = self.ids[:self.n]
        if self.n == 0 or deleted.shape[0] == 0:
            return 0
        a, b = np.searchsorted(deleted, (ids[0], ids[-1] + 1))
        want = deleted[a:b]
        if want.shape[0] == 0:
            return 0
        pos = np.searchsorted(ids, want)
        rows = pos[ids[np.minimum(pos, self.n - 1)] == want]
        live = np.ones(self.capacity, dtype=bool) if self.live is None else self.live
        rows = rows[live[rows]]
        if rows.shape[0] == 0:
            return 0
        live[rows] = False
        self.live = live
        return int(rows.shape[0])

    @property
    def sealed(self) -> bool:
        return self.n == self.capacity


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

    def __init__(self, slices: tuple, dim: int):
        self.slices = slices
        self.dim = dim
        self.count = sum(s.hi - s.lo for s in slices)

    @functools.cached_property
    def _firsts(self) -> np.ndarray:  # only id lookups need it, not a query's search
        return np.array([s.first_id for s in self.slices], dtype=np.int64)

    @property
    def first_id(self):
        return self.slices[0].first_id if self.slices else None

    @property
    def last_id(self):
        return self.slices[-1].last_id if self.slices else None

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

    def locate_live(self, ids: np.ndarray):
        """locate(), with deleted rows reported as not held (-1)."""
        where, rows = self.locate(ids)
        for si in np.unique(where[where >= 0]).tolist():
            live = self.slices[si].chunk.live
            if live is not None:
                sel = np.flatnonzero(where == si)
                where[sel[~live[rows[sel]]]] = -1
        return where, rows

    def head(self, max_rows: int):
        """Copies of the oldest rows of this view (at most max_rows): (ids, lsns, vectors, metas).
        Reads only rows the view covers, which never change, so no lock is needed: a checkpoint
        copying 50,000 rows held the tier's lock (and every query's view()) for ~40-75 ms."""
        ids, lsns, vecs, metas = [], [], [], []
        left = max_rows
        for s in self.slices:
            if left <= 0:
                break
            ch, lo = s.chunk, s.lo
            hi = min(s.hi, lo + left)
            ids.append(ch.ids[lo:hi].copy())
            lsns.append(ch.lsns[lo:hi].copy())
            vecs.append(ch.vectors[lo:hi].copy())
            metas.extend(zip(ch.sources[lo:hi], ch.start[lo:hi].tolist(), ch.duration[lo:hi].tolist(),
                             ch.bpm[lo:hi].astype(np.float64).tolist(), ch.tags[lo:hi]))
            left -= hi - lo
        if not ids:
            return (np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, self.dim), np.float32), [])
        return np.concatenate(ids), np.concatenate(lsns), np.concatenate(vecs), metas

    def vectors_for(self, ids: np.ndarray, out: np.ndarray, found: np.ndarray):
        """Fill out[i] and found[i] for the live ids held in this view."""
        where, rows = self.locate_live(ids)
        for si in np.unique(where[where >= 0]).tolist():
            sel = np.flatnonzero(where == si)
            out[sel] = self.slices[si].chunk.vectors[rows[sel]]
            found[sel] = True

    def metadata_many(self, ids: np.ndarray) -> list:
        """Metadata dict per id (None where the id is not in this view or deleted), one lookup for all ids."""
        out = [None] * ids.shape[0]
        where, rows = self.locate_live(ids)
        for si in np.unique(where[where >= 0]).tolist():
            ch = self.slices[si].chunk
            sel = np.flatnonzero(where == si)
            r = rows[sel]
            for i, row, start, dur, bpm in zip(sel.tolist(), r.tolist(), ch.start[r].tolist(),
                                               ch.duration[r].tolist(), ch.bpm[r].astype(np.float64).tolist()):
                out[i] = {"source_file": ch.sources[row], "start_time_ms": start, "duration_ms": dur,
                          "bpm": bpm, "tags": list(ch.tags[row])}
        return out


class HotTier:
    """Mutable owner of the chunks. Every method is called with state.SegmentSet's lock held."""

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
            ch.codes[a:b], ch.scale[a:b] = kernels.scan_codes(ch.vectors[a:b])
            part = metas[i:i + take]
            # one numpy store per column, not one per row and column (the writer holds the lock here)
            sources, start, duration, bpm, tags = zip(*part)
            ch.sources.extend(sources)
            ch.start[a:b] = np.array(start, dtype=np.uint32)  # out of range raises, as a row store did
            ch.duration[a:b] = np.array(duration, dtype=np.uint32)
            ch.bpm[a:b] = np.array(bpm, dtype=np.float32)
            # tuples: the garbage collector stops tracking a tuple of strings, so a large tier adds
            # nothing to its full passes (lists would: ~100 ns each per pass, holding the GIL)
            ch.tags.extend(map(tuple, tags))
            ch.n = b  # publish the rows only after they are fully written
            i += take

    def view(self) -> HotView:
        slices = []
        for ci, ch in enumerate(self.chunks):
            lo = self.lo if ci == 0 else 0
            if ch.n > lo:
                slices.append(HotSlice(ch, lo, ch.n))
        return HotView(tuple(slices), self.dim)

    def count(self) -> int:
        return sum(ch.n for ch in self.chunks) - self.lo

    def live_count(self) -> int:
        """Visible rows not deleted."""
        dead = 0
        for ci, ch in enumerate(self.chunks):
            if ch.live is not None:
                lo = self.lo if ci == 0 else 0
                dead += int(np.count_nonzero(~ch.live[lo:ch.n]))
        return self.count() - dead

    def kill(self, deleted: np.ndarray) -> int:
        """A delete: every chunk marks its rows in sorted `deleted`; returns how many were live."""
        return sum(ch.kill(deleted) for ch in self.chunks)

    def drop_through(self, lsn: int):
        """Hide every row with lsn <= `lsn` (they now live in a published segment)."""
        while self.chunks:
            ch = self.chunks[0]
            hi = int(np.searchsorted(ch.lsns[:ch.n], lsn, side="right"))
            if hi >= ch.n and ch.sealed:
                self.chunks.pop(0)
                self.lo = 0
                continue
            self.lo = max(self.lo, hi)  # a fully dropped growing chunk stays: new rows append after lo
            break

    def drop_ids_through(self, max_id: int):
        """Hide every row with id <= max_id (a follower: the segments it loaded hold them now).
        Ids ascend with lsn, so this is drop_through of the last such row's lsn."""
        lsn = None
        for ci, ch in enumerate(self.chunks):
            lo = self.lo if ci == 0 else 0
            ids = ch.ids[lo:ch.n]
            take = int(np.searchsorted(ids, max_id, side="right"))
            if take:
                lsn = int(ch.lsns[lo + take - 1])
            if take < ids.shape[0]:
                break
        if lsn is not None:
            self.drop_through(lsn)

    def sealed_without_index(self) -> list:
        return [ch for ch in self.chunks if ch.sealed and ch.index is None]
