"""In-memory filter index over the collection's dense id space.

Ids never move between ids when data moves between tiers (checkpoint and compaction keep ids), so
the index only changes on ingest (append), at startup (built from segment columns and the WAL
tail) and on replay-to-lsn (ids masked dead). A filter is evaluated to a boolean mask over the id
space; tiers slice it zero-copy (`mask[id_start:id_end + 1]`).

Layout:
  bpm  float32[capacity]   bpm by id (0.0 where unknown)
  live bool[capacity]      True when the id holds a live vector (not a tombstone, not replayed away)
  tags {tag: [int64 arrays]}  posting lists, appended in id order; concatenated lazily
Thread-safety: appends and reads take the index lock; masks handed out are private copies.
"""
import threading

import numpy as np


PENDING_FLUSH = 4096


class FilterIndex:
    def __init__(self, capacity: int = 1 << 16):
        self._lock = threading.Lock()
        self.bpm = np.zeros(capacity, dtype=np.float32)
        self.live = np.zeros(capacity, dtype=bool)
        self.size = 0  # one past the largest id known
        self._tags: dict[str, list] = {}
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
                        self._tags.setdefault(t, []).append(np.asarray(pend, dtype=np.int64))
                        pend.clear()

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
                    self._tags.setdefault(tag, []).append(chunk_rows[keep] + id_start)

    def kill_range(self, id_start: int, id_end: int):
        """Mark ids [id_start, id_end] dead (replay-to-lsn)."""
        with self._lock:
            lo, hi = max(0, id_start), min(self.size, id_end + 1)
            if lo < hi:
                self.live[lo:hi] = False

    # ------------------------------------------------------------ queries
    def _postings(self, tag: str):
        pending = self._pending.pop(tag, None)
        parts = self._tags.get(tag)
        if pending:
            parts = (parts or []) + [np.asarray(pending, dtype=np.int64)]
            self._tags[tag] = parts
        if not parts:
            return None
        if len(parts) > 1:
            merged = np.concatenate(parts)
            self._tags[tag] = [merged]
            return merged
        return parts[0]

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
                    post = self._postings(tag)
                    sub = np.zeros(n, dtype=bool)
                    if post is not None:
                        sub[post[post < n]] = True
                    mask &= sub
            if tags_any is not None:
                sub = np.zeros(n, dtype=bool)
                for tag in tags_any:
                    post = self._postings(tag)
                    if post is not None:
                        sub[post[post < n]] = True
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
