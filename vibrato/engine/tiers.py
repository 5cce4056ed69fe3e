"""Searchable tiers: loaded segments and the immutable `View` every query runs against.

A `View` is (segments sorted by id_start, hot view), swapped atomically under the engine's state
lock by checkpoint and compaction. A query holds one View for its whole life, so it never sees a
half-published change; segments it references stay mapped (and their files readable, since a file
unlinked while mapped stays valid on Linux) until the query drops the View.
"""
import numpy as np

from vibrato import kernels
from vibrato.engine.hot import HotView, _topk


class SegmentHandle:
    """A loaded segment. raw: HNSW over the mmapped vectors; archive: PQ codes for candidate
    selection + exact rerank against the float32 vectors kept in the file (CONTRACT.md D14)."""

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
        live = np.array(reader.live, dtype=bool)
        for lo, hi in dead_ranges:
            a, b = max(lo, self.id_start), min(hi, self.id_end)
            if a <= b:
                live[a - self.id_start:b - self.id_start + 1] = False
        self.live = live
        self.live_count = int(live.sum())
        self.all_live = self.live_count == self.n
        self.vectors = reader.vectors
        self.rerank_factor = rerank_factor
        self.index = None
        self.pq = None
        if self.kind == "raw":
            self.index = HnswIndex.from_graph(reader.vectors, reader.graph, id_base=self.id_start)
        else:
            self.pq = ProductQuantizer.from_bytes(reader.pq_codebook)
            self.codes = reader.pq_codes

    def allowed(self, mask):
        """Bool mask over this segment's rows, or None when every row may be returned."""
        if mask is None:
            return None if self.all_live else self.live
        sub = np.zeros(self.n, dtype=bool)
        hi = min(mask.shape[0], self.id_end + 1)
        if hi > self.id_start:
            sub[:hi - self.id_start] = mask[self.id_start:hi]
        return sub & self.live

    def search(self, q, k: int, ef: int, mask):
        allowed = self.allowed(mask)
        if allowed is not None and not allowed.any():
            return np.empty(0, np.int64), np.empty(0, np.float32)
        if self.index is not None:
            ids, scores = self.index.search(q, k=k, ef=max(ef, k), allowed=allowed)
            ids, scores = ids.reshape(-1), scores.reshape(-1)
            keep = ids >= 0
            return ids[keep], scores[keep]
        rows, _approx = self.pq.adc_scan(q, self.codes, max(k * self.rerank_factor, 32), allowed)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.shape[0] == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        exact = kernels.dot_many(q, self.vectors, rows, threads=1)
        take = _topk(exact, k)
        return rows[take] + self.id_start, exact[take]

    def vectors_for(self, ids, out, found):
        sel = np.flatnonzero((ids >= self.id_start) & (ids <= self.id_end) & ~found)
        if sel.shape[0] == 0:
            return
        rows = ids[sel] - self.id_start
        ok = self.live[rows]
        sel, rows = sel[ok], rows[ok]
        out[sel] = self.vectors[rows]
        found[sel] = True

    def metadata(self, vid: int):
        row = vid - self.id_start
        if not 0 <= row < self.n or not self.live[row]:
            return None
        return self.reader.metadata(row)


def tier_filter(search_tier: str):
    """(include_hot, segment predicate) for a search_tier value (CONTRACT.md §1.3, Search tiers)."""
    if search_tier == "active":
        return True, lambda s: s.level <= 1
    if search_tier == "archive":
        return False, lambda s: s.level >= 2
    return True, lambda s: True


class View:
    def __init__(self, segments: tuple, hot: HotView):
        self.segments = tuple(sorted(segments, key=lambda s: s.id_start))
        self.hot = hot
        self._starts = np.array([s.id_start for s in self.segments], dtype=np.int64)

    def with_segments(self, segments, hot=None) -> "View":
        return View(tuple(segments), self.hot if hot is None else hot)

    def search(self, q, k, ef, mask, search_tier):
        include_hot, pred = tier_filter(search_tier)
        ids, scores = [], []
        if include_hot and self.hot.count:
            i, s = self.hot.search(q, k, ef, mask)
            ids.append(i)
            scores.append(s)
        for seg in self.segments:
            if pred(seg):
                i, s = seg.search(q, k, ef, mask)
                ids.append(i)
                scores.append(s)
        return merge_topk(ids, scores, k)

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

    def metadata(self, vid: int):
        meta = self.hot.metadata(vid)
        if meta is not None:
            return meta
        si = int(np.searchsorted(self._starts, vid, side="right")) - 1
        if si >= 0:
            return self.segments[si].metadata(vid)
        return None

    @property
    def dim(self):
        return None


def merge_topk(ids_list, scores_list, k):
    """Keep the best score per id across tiers, then the top k by score (descending)."""
    if not ids_list:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    ids = np.concatenate(ids_list)
    scores = np.concatenate(scores_list).astype(np.float32, copy=False)
    if ids.shape[0] == 0:
        return ids, scores
    order = np.lexsort((ids, -scores))  # by score desc, ties by id
    ids, scores = ids[order], scores[order]
    _, first = np.unique(ids, return_index=True)
    first.sort()
    ids, scores = ids[first], scores[first]
    return ids[:k], scores[:k]
