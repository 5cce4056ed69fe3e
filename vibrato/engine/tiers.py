"""Searchable tiers: loaded segments and the immutable `View` every query runs against.

A `View` is (segments sorted by id_start, hot view), taken from state.SegmentSet, which checkpoint
and compaction change with one atomic `swap`. A query holds one View for its whole life, so it never sees a
half-published change; segments it references stay mapped (and their files readable, since a file
unlinked while mapped stays valid on Linux) until the query drops the View.
"""
import functools

import numpy as np

from vibrato import kernels
from vibrato.engine import planner
from vibrato.engine.hot import HotView
from vibrato.engine.planner import tier_filter

WINDOW_BUDGET_ROWS = 1 << 19  # window_scores gathers at most this many rows at a time


class SegmentHandle:
    """A loaded segment. raw: HNSW over the mmapped vectors. archive written by this version: the
    same graph walked on PQ codes held in memory, its beam rescored exactly against the mmapped
    vectors; a version-1 archive (no graph): ADC scan of the PQ codes + exact rerank. Scores are
    exact everywhere (CONTRACT.md D14)."""

    def __init__(self, row: dict, reader, dead_ranges=(), rerank_factor: int = 8):
        from vibrato.index import HnswIndex
        from vibrato.pq import ProductQuantizer

        self.id = row["id"]
        self.level = int(row["level"])
        self.kind = row["kind"]
        self.path = row["path"]
        self.reader = reader
        self.id_start = int(reader.id_start)
        self.n = int(reader.count)
        self.id_end = self.id_start + self.n - 1
        live = reader.live  # read-only, from the mapped file; copied only when a dead range masks it
        for lo, hi in dead_ranges:
            a, b = max(lo, self.id_start), min(hi, self.id_end)
            if a <= b:
                if not live.flags.writeable:
                    live = np.array(live, dtype=bool)
                live[a - self.id_start:b - self.id_start + 1] = False
        self.live = live
        self.live_count = int(live.sum())
        self.all_live = self.live_count == self.n
        self.vectors = reader.vectors
        self.rerank_factor = rerank_factor
        self.index = None
        self.pq = None
        self.codes = None
        self.ram_codes = None
        if self.kind == "raw" or reader.graph is not None:
            # the graph is read in place from the mapped file: page cache, not anonymous memory
            self.index = HnswIndex.from_graph(reader.vectors, reader.graph, id_base=self.id_start, borrow_graph=True)
            # The file's scan codes are attached on the first filtered scan (ensure_scan_codes), not
            # here: walked on from the start, the vectors are read only to rescore, which made the CI
            # madvise A/B gate's warm comparison flaky (perf/README.md, "Scan codes in the segment files").
        if self.kind == "archive":
            self.pq = ProductQuantizer.from_bytes(reader.pq_codebook)
            self.codes = reader.pq_codes
            if self.index is not None:
                # the graph walk scores these codes, so they live in memory (m bytes a row); the
                # vectors are read from the file only to rescore the beam (CONTRACT.md D14)
                self.ram_codes = np.array(self.codes)

    def ensure_scan_codes(self) -> None:
        """The int8 scan codes a filtered scan ranks on (raw segment): its file's, read in place (page
        cache), or for a file written before them built in this process's memory. Once there, the
        segment's graph walks read them too (HnswIndex.build_scan_codes)."""
        if self.index.has_scan_codes:
            return
        codes = self.reader.scan_codes
        if codes is None:
            self.index.build_scan_codes()
            return
        try:
            self.index.attach_scan_codes(*codes)
        except ValueError:  # another query attached them first
            if not self.index.has_scan_codes:
                raise

    def kill(self, deleted: np.ndarray) -> int:
        """Mark the ids of sorted `deleted` that fall in this segment not live (a delete, state.SegmentSet
        holds the lock); returns how many were live. The mapped flags are copied on the first one."""
        a, b = np.searchsorted(deleted, (self.id_start, self.id_end + 1))
        if a == b:
            return 0
        rows = deleted[a:b] - self.id_start
        rows = rows[self.live[rows]]
        if rows.shape[0] == 0:
            return 0
        live = self.live if self.live.flags.writeable else np.array(self.live, dtype=bool)
        live[rows] = False
        self.live = live
        self.live_count -= int(rows.shape[0])
        self.all_live = False
        return int(rows.shape[0])

    def on_disk_live(self, deleted: np.ndarray) -> np.ndarray:
        """The ids of sorted `deleted` whose payload this segment's file still holds (purge)."""
        a, b = np.searchsorted(deleted, (self.id_start, self.id_end + 1))
        ids = deleted[a:b]
        return ids[self.reader.live[ids - self.id_start]]

    def vectors_for(self, ids, out, found):
        sel = np.flatnonzero((ids >= self.id_start) & (ids <= self.id_end) & ~found)
        if sel.shape[0] == 0:
            return
        rows = ids[sel] - self.id_start
        ok = self.live[rows]
        sel, rows = sel[ok], rows[ok]
        out[sel] = self.vectors[rows]
        found[sel] = True

    def metadata_rows(self, rows: list) -> list:
        """Metadata dict per row (Python ints, all live) of this segment, in one native decode (cheaper
        than row by row from one row up: 2.2 against 3.1 µs for one, 2.6 against 7.5 µs for three)."""
        return self.reader.metadata_rows(np.array(rows, dtype=np.int64))


def _id_start(seg) -> int:
    return seg.id_start


class View:
    def __init__(self, segments: tuple, hot: HotView):
        self.segments = tuple(sorted(segments, key=_id_start))
        self.hot = hot
        self.alone = {}  # planner.walk_alone's answer per search tier, decided once per view

    @functools.cached_property
    def _starts(self) -> np.ndarray:
        # only id lookups need it, not a query's search: built on first use
        return np.array([s.id_start for s in self.segments], dtype=np.int64)

    def with_segments(self, segments, hot=None) -> "View":
        return View(tuple(segments), self.hot if hot is None else hot)

    def search(self, q, k, ef, allowed, search_tier):
        """Top-k (ids, scores) over the tiers of search_tier (allowed: a filter's `Allowed` or None)."""
        return planner.search(self, q, k, ef, allowed, search_tier)

    def search_many(self, Q, k, ef, search_tier, threads: int = 1) -> list:
        """Top-k (ids, scores) for every row of Q, no filter (planner.search_many)."""
        return planner.search_many(self, Q, k, ef, search_tier, threads)

    def vectors_for(self, ids: np.ndarray, search_tier: str = "all"):
        """(vectors (n, dim), found bool (n,)) for live ids in the searched tiers."""
        include_hot, pred = tier_filter(search_tier)
        dim = self.hot.slices[0].chunk.vectors.shape[1] if self.hot.slices else (
            self.segments[0].vectors.shape[1] if self.segments else 0)
        out = np.zeros((ids.shape[0], dim), dtype=np.float32)
        found = np.zeros(ids.shape[0], dtype=bool)
        if include_hot:
            self.hot.vectors_for(ids, out, found)
        if self.segments:
            which = np.searchsorted(self._starts, ids, side="right") - 1
            for si in np.unique(which[which >= 0]).tolist():
                seg = self.segments[si]
                if pred(seg):
                    seg.vectors_for(ids, out, found)
        return out, found

    def window_scores(self, starts: np.ndarray, flat_query: np.ndarray, L: int, search_tier: str = "all"):
        """Mean per-row inner product of flat_query (L * dim,) with the L consecutive ids from each of
        `starts` (float64; -inf where a window has an id no searched tier holds live: identify's hole
        guard). A window inside one live stretch of a segment is scored in place from the mapped rows;
        the rest (hot tier, windows spanning tiers) are gathered by id, at most WINDOW_BUDGET_ROWS
        rows at a time."""
        _, pred = tier_filter(search_tier)
        scores = np.full(starts.shape[0], -np.inf, dtype=np.float64)
        pending = np.ones(starts.shape[0], dtype=bool)
        if self.segments:
            which = np.searchsorted(self._starts, starts, side="right") - 1
            for si in np.unique(which[which >= 0]).tolist():
                seg = self.segments[si]
                if not pred(seg):
                    continue
                sel = np.flatnonzero((which == si) & (starts + (L - 1) <= seg.id_end))
                rows = starts[sel] - seg.id_start
                if not seg.all_live:
                    pending[sel] = False  # a window with a dead row in its segment is a hole
                    ok = seg.live[rows[:, None] + np.arange(L)].all(axis=1)
                    sel, rows = sel[ok], rows[ok]
                if sel.shape[0]:  # (none fit in a segment shorter than L)
                    scores[sel] = kernels.dot_windows(flat_query, seg.vectors, rows) / L
                    pending[sel] = False
        rest = np.flatnonzero(pending)
        offsets = np.arange(L, dtype=np.int64)
        block = max(1, WINDOW_BUDGET_ROWS // L)
        for b in range(0, rest.shape[0], block):
            sel = rest[b:b + block]
            vecs, found = self.vectors_for((starts[sel, None] + offsets).reshape(-1), search_tier)
            ok = found.reshape(sel.shape[0], L).all(axis=1)
            if ok.any():
                v = vecs.reshape(sel.shape[0], flat_query.shape[0])[ok]
                scores[sel[ok]] = kernels.dot_many(flat_query, v, threads=1) / L
        return scores

    def metadata_many(self, ids: np.ndarray) -> list:
        """Metadata dict per id (None for an id no tier holds live): one lookup in the hot view, then
        the rest grouped by segment and decoded one segment at a time."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.hot.slices:
            out = self.hot.metadata_many(ids)
            todo = [i for i, m in enumerate(out) if m is None]
        else:
            out, todo = [None] * ids.shape[0], range(ids.shape[0])
        if not todo or not self.segments:
            return out
        rest = ids if len(todo) == ids.shape[0] else ids[todo]
        groups: dict = {}
        for i, si, vid in zip(todo, (np.searchsorted(self._starts, rest, side="right") - 1).tolist(), rest.tolist()):
            if si >= 0:
                seg = self.segments[si]
                row = vid - seg.id_start
                if row < seg.n and seg.live[row]:
                    where, rows = groups.setdefault(si, ([], []))
                    where.append(i)
                    rows.append(row)
        for si, (where, rows) in groups.items():
            for i, meta in zip(where, self.segments[si].metadata_rows(rows)):
                out[i] = meta
        return out

    def metadata(self, vid: int):
        return self.metadata_many(np.array([vid], dtype=np.int64))[0]
