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
"""
import threading

import numpy as np


PENDING_FLUSH = 4096
DENSE_FRACTION = 32  # int64 postings (64 bits each) cost more than a bitmap above size/64; 2x hysteresis


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

    def kill_range(self, id_start: int, id_end: int):
        """Mark ids [id_start, id_end] dead (replay-to-lsn)."""
        with self._lock:
            lo, hi = max(0, id_start), min(self.size, id_end + 1)
            if lo < hi:
                self.live[lo:hi] = False

    # ------------------------------------------------------------ queries
    def _tag_mask(self, tag: str, n: int) -> np.ndarray:
        """Bool mask over ids [0, n) of the rows carrying `tag`."""
        pending = self._pending.pop(tag, None)
        if pending:
            self._append_postings(tag, np.asarray(pending, dtype=np.int64))
        bits = self._dense.get(tag)
        if bits is not None:
            return np.unpackbits(bits, count=n, bitorder="little").view(bool)
        sub = np.zeros(n, dtype=bool)
        parts = self._tags.get(tag)
        if parts:
            if len(parts) > 1:
                parts = self._tags[tag] = [np.concatenate(parts)]
            post = parts[0]
            sub[post[post < n]] = True
        return sub

    def evaluate(self, flt) -> np.ndarray:
        """flt = (tags_any|None, tags_all|None, bpm_gte|None, bpm_lte|None) -> bool mask over ids."""
        tags_any, tags_all, lo, hi = flt
        with self._lock:
            n = self.size
            mask = self.live[:n].copy()
            if tags_all is not None:
                if not tags_all:
                    mask[:] = False
                for tag in tags_all:
                    mask &= self._tag_mask(tag, n)
            if tags_any is not None:
                sub = np.zeros(n, dtype=bool)
                for tag in tags_any:
                    sub |= self._tag_mask(tag, n)
                mask &= sub
            if lo is not None:
                mask &= self.bpm[:n] >= lo
            if hi is not None:
                mask &= self.bpm[:n] <= hi
        return mask

    def live_mask(self) -> np.ndarray:
        with self._lock:
            return self.live[:self.size].copy()

    def live_count(self) -> int:
        with self._lock:
            return int(np.count_nonzero(self.live[:self.size]))
