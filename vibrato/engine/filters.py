"""In-memory filter index over the collection's dense id space.

Ids never move between ids when data moves between tiers (checkpoint and compaction keep ids), so
the index only changes on ingest (append), at startup (built from segment columns and the WAL
tail) and on replay-to-lsn (ids masked dead). A filter is evaluated to a boolean mask over the id
space; tiers slice it zero-copy (`mask[id_start:id_end + 1]`).

Layout:
  bpm  float32[capacity]   bpm by id (0.0 where unknown)
  live bool[capacity]      True when the id holds a live vector (not a tombstone, not replayed away)
  tags  per tag either a posting list (int64 arrays appended in id order, concatenated lazily) or,
        once the tag is on more than 1 in DENSE_FRACTION ids, a bitmap (1 bit per id, packed in
        uint8, little bit order): a tag on every row then costs 1/8 byte per id instead of 8
Thread-safety: appends and reads take the index lock; masks handed out are private copies.

Evaluations are remembered until the index next changes (any append, column load or kill): a
service queried with the same few filters between writes evaluates each once, not per query.
"""
import threading

import numpy as np


PENDING_FLUSH = 4096
DENSE_FRACTION = 32  # int64 postings (64 bits each) cost more than a bitmap above size/64; 2x hysteresis
SPARSE_FRACTION = 64  # evaluate() hands out ids, not a mask, when at most 1 id in this many passes
MEMO_ENTRIES = 32  # evaluations remembered while the index does not change ...
MEMO_BYTES = 32 << 20  # ... holding at most this much mask and id memory
_EMPTY = np.empty(0, dtype=np.int64)


def _bitmap_bytes(capacity: int) -> int:
    return (capacity + 7) // 8


def _set_bits(bits: np.ndarray, ids: np.ndarray):
    np.bitwise_or.at(bits, ids >> 3, np.left_shift(1, ids & 7).astype(np.uint8))


class FilterIndex:
    def __init__(self, capacity: int = 1 << 16):
        self._lock = threading.Lock()
        self.bpm = np.zeros(capacity, dtype=np.float32)
        self.live = np.zeros(capacity, dtype=bool)
        self.size = 0  # one past the largest id known
        self._tags: dict[str, list] = {}          # sparse tags: posting parts
        self._dense: dict[str, np.ndarray] = {}    # dense tags: packed bitmaps over capacity
        self._pending: dict[str, list] = {}
        self._ordered: set = set()                 # sparse tags whose single posting part is sorted
        self._memo: dict = {}                      # filter key -> Allowed, for the index as it is now
        self._memo_bytes = 0

    def _changed(self):
        """Called under the lock by every change to what a filter can match."""
        if self._memo:
            self._memo.clear()
            self._memo_bytes = 0

    # ------------------------------------------------------------ building
    def _grow(self, needed: int):
        cap = self.bpm.shape[0]
        if needed <= cap:
            return
        new_cap = max(needed, cap * 2)
        bpm = np.zeros(new_cap, dtype=np.float32)
        live = np.zeros(new_cap, dtype=bool)
        bpm[:cap] = self.bpm
        live[:cap] = self.live
        self.bpm, self.live = bpm, live
        for tag, bits in self._dense.items():
            grown = np.zeros(_bitmap_bytes(new_cap), dtype=np.uint8)
            grown[:bits.shape[0]] = bits
            self._dense[tag] = grown

    def _append_postings(self, tag: str, ids: np.ndarray):
        """Add ids (int64) to a tag: OR them into its bitmap, or append them to its posting list and
        switch it to a bitmap once it is dense."""
        bits = self._dense.get(tag)
        if bits is not None:
            _set_bits(bits, ids)
            return
        parts = self._tags.setdefault(tag, [])
        parts.append(ids)
        if sum(p.shape[0] for p in parts) * DENSE_FRACTION > self.bpm.shape[0]:
            bits = np.zeros(_bitmap_bytes(self.bpm.shape[0]), dtype=np.uint8)
            for part in self._tags.pop(tag):
                _set_bits(bits, part)
            pending = self._pending.pop(tag, None)
            if pending:
                _set_bits(bits, np.asarray(pending, dtype=np.int64))
            self._dense[tag] = bits

    def add_rows(self, ids: np.ndarray, bpm: np.ndarray, tags: list):
        """Append ingested rows (ids ascending, tags already normalised)."""
        if len(ids) == 0:
            return
        with self._lock:
            self._changed()
            top = int(ids[-1]) + 1
            self._grow(top)
            self.bpm[ids] = bpm
            self.live[ids] = True
            self.size = max(self.size, top)
            for vid, row_tags in zip(ids.tolist(), tags):
                for t in row_tags:
                    pend = self._pending.setdefault(t, [])
                    pend.append(vid)
                    if len(pend) >= PENDING_FLUSH:  # ints in a list cost ~36 B each, 8 B in an array
                        ids_t = np.asarray(pend, dtype=np.int64)
                        pend.clear()
                        self._append_postings(t, ids_t)

    def add_columns(self, id_start: int, live: np.ndarray, bpm: np.ndarray, tag_dict: list,
                    tag_offsets: np.ndarray, tag_ids: np.ndarray):
        """Add a segment's columns (row i is id id_start + i; tags as CSR over tag_dict)."""
        n = live.shape[0]
        with self._lock:
            self._changed()
            self._grow(id_start + n)
            self.live[id_start:id_start + n] = live
            self.bpm[id_start:id_start + n] = bpm
            self.size = max(self.size, id_start + n)
            if len(tag_ids):
                counts = np.diff(tag_offsets.astype(np.int64))
                rows = np.repeat(np.arange(n, dtype=np.int64), counts)
                order = np.argsort(tag_ids, kind="stable")
                sorted_tags = np.asarray(tag_ids)[order]
                sorted_rows = rows[order]
                bounds = np.flatnonzero(np.diff(sorted_tags)) + 1
                for chunk_tags, chunk_rows in zip(np.split(sorted_tags, bounds), np.split(sorted_rows, bounds)):
                    tag = tag_dict[int(chunk_tags[0])]
                    keep = live[chunk_rows]
                    self._append_postings(tag, chunk_rows[keep] + id_start)

    def kill_ids(self, ids: np.ndarray):
        """Mark ids dead (a delete); ids past the indexed ones are ignored (rows added later are
        masked by state.SegmentSet)."""
        with self._lock:
            self._changed()
            ids = ids[ids < self.size]
            if ids.shape[0]:
                self.live[ids] = False

    def kill_range(self, id_start: int, id_end: int):
        """Mark ids [id_start, id_end] dead (replay-to-lsn)."""
        with self._lock:
            self._changed()
            lo, hi = max(0, id_start), min(self.size, id_end + 1)
            if lo < hi:
                self.live[lo:hi] = False

    # ------------------------------------------------------------ queries
    def _postings(self, tag: str):
        """The ids carrying a sparse tag (sorted, unique; empty for an unknown tag), or None when the
        tag is a bitmap. Flushes the tag's pending ids first."""
        pending = self._pending.pop(tag, None)
        if pending:
            self._append_postings(tag, np.asarray(pending, dtype=np.int64))
        if tag in self._dense:
            return None
        parts = self._tags.get(tag)
        if not parts:
            return _EMPTY
        if len(parts) > 1 or tag not in self._ordered:
            post = np.concatenate(parts) if len(parts) > 1 else parts[0]
            if post.shape[0] > 1 and not (post[1:] > post[:-1]).all():
                post = np.unique(post)
            self._tags[tag] = [post]
            self._ordered.add(tag)
        return self._tags[tag][0]

    def _has(self, tag: str, ids: np.ndarray) -> np.ndarray:
        """Bool per id (ids < size): does the row carry `tag`?"""
        post = self._postings(tag)
        if post is None:
            bits = self._dense[tag]
            return (bits[ids >> 3] >> (ids & 7).astype(np.uint8)) & 1 == 1
        if post.shape[0] == 0:
            return np.zeros(ids.shape[0], dtype=bool)
        pos = np.minimum(np.searchsorted(post, ids), post.shape[0] - 1)
        return post[pos] == ids

    def _tag_mask(self, tag: str, n: int) -> np.ndarray:
        """Bool mask over ids [0, n) of the rows carrying `tag`."""
        post = self._postings(tag)
        if post is None:
            return np.unpackbits(self._dense[tag], count=n, bitorder="little").view(bool)
        sub = np.zeros(n, dtype=bool)
        sub[post[post < n]] = True
        return sub

    def _candidates(self, tags_any, tags_all, n: int):
        """(sorted ids that include every match, tag those ids all carry or None) from posting lists
        alone, or None when a bitmap tag keeps the filter from narrowing that way."""
        best, best_tag = None, None
        for tag in tags_all or ():
            post = self._postings(tag)
            if post is not None and (best is None or post.shape[0] < best.shape[0]):
                best, best_tag = post, tag
        if tags_any:
            posts = [self._postings(tag) for tag in tags_any]
            if all(p is not None for p in posts):
                total = sum(p.shape[0] for p in posts)
                if (best is None or total < best.shape[0]) and total * SPARSE_FRACTION <= max(n, 1) * 8:
                    best = posts[0] if len(posts) == 1 else np.unique(np.concatenate(posts))
                    best_tag = tags_any[0] if len(posts) == 1 else None
                    return best, best_tag, True
        return (None if best is None else (best, best_tag, False))

    def evaluate(self, flt) -> "Allowed":
        """flt = (tags_any|None, tags_all|None, bpm_gte|None, bpm_lte|None) -> the ids it allows.

        A filter on a sparse tag is answered from posting lists in O(matches), without touching
        the rest of the id space; anything else (bpm alone, bitmap tags only) scans the columns.
        The result is remembered until the index changes (the module docstring)."""
        tags_any, tags_all, lo, hi = flt
        key = (None if tags_any is None else tuple(tags_any), None if tags_all is None else tuple(tags_all), lo, hi)
        with self._lock:
            allowed = self._memo.get(key)
            if allowed is None:
                allowed = self._evaluate(tags_any, tags_all, lo, hi)
                size = allowed.nbytes
                if len(self._memo) < MEMO_ENTRIES and self._memo_bytes + size <= MEMO_BYTES:
                    self._memo[key] = allowed
                    self._memo_bytes += size
            return allowed

    def _evaluate(self, tags_any, tags_all, lo, hi) -> "Allowed":
        """evaluate() without the memo; the caller holds the lock."""
        n = self.size
        if (tags_all is not None and not tags_all) or (tags_any is not None and not tags_any) or n == 0:
            return Allowed(n, ids=_EMPTY)
        for tag in (tags_all or ()):
            self._postings(tag)
        cand = self._candidates(tags_any, tags_all, n)
        if cand is not None:
            ids, source, from_any = cand
            ids = ids[ids < n]
            keep = self.live[ids]
            for tag in tags_all or ():
                if tag != source or from_any:
                    keep &= self._has(tag, ids)
            if tags_any and not from_any:
                any_ = np.zeros(ids.shape[0], dtype=bool)
                for tag in tags_any:
                    self._postings(tag)
                    any_ |= self._has(tag, ids)
                keep &= any_
            if lo is not None:
                keep &= self.bpm[ids] >= lo
            if hi is not None:
                keep &= self.bpm[ids] <= hi
            return Allowed(n, ids=ids[keep])
        mask = self.live[:n].copy()
        for tag in tags_all or ():
            mask &= self._tag_mask(tag, n)
        if tags_any is not None:
            sub = self._tag_mask(tags_any[0], n)  # a fresh array: ORed into in place
            for tag in tags_any[1:]:
                sub |= self._tag_mask(tag, n)
            mask &= sub
        if lo is not None:
            mask &= self.bpm[:n] >= lo
        if hi is not None:
            mask &= self.bpm[:n] <= hi
        allowed = Allowed(n, mask=mask)
        if allowed.count * SPARSE_FRACTION <= n:
            return Allowed(n, ids=np.flatnonzero(mask))
        return allowed

    def live_count(self) -> int:
        with self._lock:
            return int(np.count_nonzero(self.live[:self.size]))


class Allowed:
    """The ids one filter evaluation allows, all below `n` (the id-space size when it was evaluated:
    rows ingested later are not allowed). Sparse: `ids`, sorted unique int64; dense: `mask`, bool
    over [0, n). Immutable (the mask is read-only), so it is read without the index lock."""

    __slots__ = ("n", "ids", "mask", "count", "_counts", "_rows")

    def __init__(self, n: int, ids: np.ndarray | None = None, mask: np.ndarray | None = None):
        self.n = n
        self.ids = ids
        self.mask = mask
        if mask is not None:
            mask.flags.writeable = False
            self.count = int(np.count_nonzero(mask))
        else:
            ids.flags.writeable = False
            self.count = int(ids.shape[0])
        self._counts = {}  # (lo, hi) -> count_in: an evaluation is reused while the index is unchanged
        self._rows = {}  # (lo, hi) -> rows_in

    @property
    def nbytes(self) -> int:
        return (self.mask if self.ids is None else self.ids).nbytes

    def count_in(self, lo: int, hi: int) -> int:
        """How many allowed ids lie in [lo, hi) (remembered per range)."""
        c = self._counts.get((lo, hi))
        if c is None:
            if self.ids is not None:
                a, b = np.searchsorted(self.ids, (lo, hi))
                c = int(b - a)
            elif lo <= 0 and hi >= self.n:
                c = self.count
            else:
                a, b = max(lo, 0), min(hi, self.n)
                c = int(np.count_nonzero(self.mask[a:b])) if a < b else 0
            if len(self._counts) < 256:
                self._counts[(lo, hi)] = c
        return c

    def rows_in(self, lo: int, hi: int) -> np.ndarray:
        """The allowed ids in [lo, hi) as uint32 offsets from lo, ascending (a segment's rows for its
        exact scan; remembered per range, like count_in). The planner asks only where at most 1 row
        in 4 is allowed, so what this keeps stays within the evaluation's own size again."""
        r = self._rows.get((lo, hi))
        if r is None:
            r = (self.ids_in(lo, hi) - lo).astype(np.uint32)
            r.flags.writeable = False
            if len(self._rows) < 64:
                self._rows[(lo, hi)] = r
        return r

    @property
    def sparse(self) -> bool:
        return self.ids is not None

    def ids_in(self, lo: int, hi: int) -> np.ndarray:
        """The allowed ids in [lo, hi), ascending."""
        if self.ids is not None:
            a, b = np.searchsorted(self.ids, (lo, hi))
            return self.ids[a:b]
        a, b = max(lo, 0), min(hi, self.n)
        if a >= b:
            return _EMPTY
        return np.flatnonzero(self.mask[a:b]) + a

    def mask_in(self, lo: int, hi: int) -> np.ndarray:
        """Bool mask over ids [lo, hi): a read-only view of the dense mask when it covers the range,
        else a new array."""
        if self.ids is None and 0 <= lo and hi <= self.n:
            return self.mask[lo:hi]
        out = np.zeros(hi - lo, dtype=bool)
        if self.ids is None:
            a, b = max(lo, 0), min(hi, self.n)
            if a < b:
                out[a - lo:b - lo] = self.mask[a:b]
        else:
            out[self.ids_in(lo, hi) - lo] = True
        return out

    def to_mask(self) -> np.ndarray:
        """Bool mask over [0, n) (tests, debugging)."""
        return np.array(self.mask_in(0, self.n))
