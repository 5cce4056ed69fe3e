"""The engine's shared state, each part with one owner and an explicit interface.

* `SegmentSet`: what queries search. The active segment handles, the hot tier, the filter index,
  the tombstone (replayed-away) id ranges and the deleted ids, changed only through `add` (recovery),
  `swap` (checkpoint, compaction), `append` (ingest) and `delete`, under one lock. Every handle it is
  given (`add`, `swap`, `index_columns`) and every hot row appended is masked here by the deleted
  ids, whenever it was built. `view()` is the immutable snapshot a query
  holds for its whole life (tiers.View).
* `Readiness`: recovering -> recovered, or degraded by blockers; a blocker found later (the scrubber,
  an unsafe catalog row, a hot tier out of step) degrades it live (CONTRACT.md D21).
* `Counters`: the engine's monotonic counters, named by the `Counter` enum (stats field names).

Thread-safety: every method may be called from any thread.
"""
import enum
import threading
import time

import numpy as np
import orjson

from vibrato.engine.filters import FilterIndex
from vibrato.engine.hot import HotTier, HotView
from vibrato.engine.tiers import View


# ------------------------------------------------------------------------------------ counters
class Counter(enum.Enum):
    """An engine counter; the value is its field name in stats (docs/ENGINE_API.md)."""
    CHECKPOINT = "checkpoint_total"
    CHECKPOINT_FAILURES = "checkpoint_failures_total"
    COMPACTION = "compaction_total"
    COMPACTION_FAILURES = "compaction_failures_total"
    OBSOLETE_FILES_DELETED = "obsolete_files_deleted_total"
    QUARANTINE_EVICTIONS = "quarantine_evictions_total"
    INGEST_VECTORS = "ingest_vectors_total"
    DELETE_VECTORS = "delete_vectors_total"
    QUERY = "query_total"
    IDENTIFY = "identify_total"
    WAL_ROWS_PRUNED = "wal_rows_pruned_total"


class Counters:
    def __init__(self):
        self._lock = threading.Lock()
        self._values = dict.fromkeys(Counter, 0)

    def add(self, counter: Counter, n: int = 1):
        with self._lock:
            self._values[counter] += n

    def __getitem__(self, counter: Counter) -> int:
        return self._values[counter]

    def as_dict(self) -> dict:
        """{stats field name: value} for every counter, read together."""
        with self._lock:
            return {c.value: v for c, v in self._values.items()}


# ------------------------------------------------------------------------------------ readiness
class Readiness:
    """The report reads "recovering", "recovered: <summary>", or "degraded: <summary>, blockers=a | b"
    ("degraded: a | b" when recovery itself failed and left no summary)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._recovering = True
        self._summary = None
        self._blockers: list[str] = []

    def finish(self, summary: str | None, blockers=()):
        """Recovery ended: `summary` its counts (None when it failed), `blockers` what keeps it unready."""
        with self._lock:
            self._summary = summary
            self._blockers = list(dict.fromkeys(blockers))
            self._recovering = False

    def add_blocker(self, blocker: str):
        with self._lock:
            if blocker not in self._blockers:
                self._blockers.append(blocker)

    @property
    def recovering(self) -> bool:
        return self._recovering

    @property
    def blockers(self) -> list[str]:
        with self._lock:
            return list(self._blockers)

    def state(self) -> tuple[bool, str]:
        """(ready, report)."""
        with self._lock:
            if self._recovering:
                return False, "recovering"
            if not self._blockers:
                return True, f"recovered: {self._summary}"
            joined = " | ".join(self._blockers)
            if self._summary is None:
                return False, f"degraded: {joined}"
            return False, f"degraded: {self._summary}, blockers={joined}"


# ------------------------------------------------------------------------------------ segment set
class SegmentSet:
    """Owner of the searchable state (see the module docstring). Segment handles are kept sorted by
    id_start; ids are dense across tiers, so the hot tier always follows the last segment."""

    @classmethod
    def for_config(cls, config) -> "SegmentSet":
        """Hot chunks of hot_exact_rows rows, but at most ~64 MiB of vectors per chunk."""
        return cls(config.dim, max(1024, min(config.hot_exact_rows, (64 << 20) // (4 * config.dim))))

    def __init__(self, dim: int, hot_chunk_rows: int):
        self._lock = threading.RLock()
        self._segments: tuple = ()
        self._hot = HotTier(dim, hot_chunk_rows)
        self.filters = FilterIndex()
        self._dead_ranges: tuple = ()
        self._deleted = _NO_IDS  # every deleted id, sorted; replaced (never changed in place)
        self._room = threading.Condition(self._lock)  # ingest backpressure (reserve / release)
        self._reserved = 0       # rows of ingests admitted and not yet appended
        self.waiting = 0         # ingests waiting for room: the checkpointer drains the tier for them
        self._view = None        # the last view(), until the next change (_changed)

    # -------------------------------------------------------------- reads
    def view(self) -> View:
        """The snapshot of the searchable state: one View object shared by every query until the next
        change, so what a query decides once per view (planner.walk_alone) is decided once."""
        with self._lock:
            view = self._view
            if view is None:
                view = self._view = View(self._segments, self._hot.view())
            return view

    def _changed(self):
        """Under the lock, by every change of the segments, the hot rows or what is live: the next
        view() is a new one."""
        self._view = None

    @property
    def handles(self) -> tuple:
        """The active segment handles, sorted by id_start."""
        return self._segments

    @property
    def dead_ranges(self) -> tuple:
        """Inclusive (lo, hi) id ranges replayed away (tombstones): never live in any tier."""
        return self._dead_ranges

    @property
    def deleted(self) -> np.ndarray:
        """Every deleted id, sorted (read-only snapshot)."""
        return self._deleted

    def handles_and_hot_count(self) -> tuple[tuple, int]:
        """Both read at one instant (stats: no row counted twice or missed across a swap); the hot
        count is of live rows."""
        with self._lock:
            return self._segments, self._hot.live_count()

    def hot_count(self) -> int:
        with self._lock:
            return self._hot.count()

    def hot_head(self, max_rows: int):
        """Copies of the oldest hot rows (checkpoint's input): (ids, lsns, vectors, metas), copied
        outside the lock from a view taken under it."""
        return self.hot_view().head(max_rows)

    def hot_view(self) -> HotView:
        with self._lock:
            return self._hot.view()

    def hot_chunks_needing_graph(self) -> list:
        """Sealed hot chunks whose HNSW graph is not built yet (background.py builds them)."""
        with self._lock:
            return self._hot.sealed_without_index()

    # -------------------------------------------------------------- ingest backpressure
    def reserve(self, n: int, bound: int, timeout: float, on_full) -> bool:
        """Admit an ingest of n rows when the hot tier's rows plus those admitted and not yet appended
        stay within `bound` (an empty tier takes any batch); else call `on_full()` (wake the
        checkpointer) and wait up to `timeout` s for a checkpoint to make room. False: no room."""
        deadline = time.monotonic() + timeout
        with self._room:
            while True:
                used = self._hot.count() + self._reserved
                if used + n <= bound or used == 0:
                    self._reserved += n
                    return True
                on_full()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.waiting += 1
                try:
                    self._room.wait(min(left, 0.25))
                finally:
                    self.waiting -= 1

    def release(self, n: int):
        """The admitted rows are appended (or the write failed)."""
        with self._room:
            self._reserved -= n
            self._room.notify_all()

    # -------------------------------------------------------------- changes
    def set_dead_ranges(self, ranges):
        """Recovery, before segments load: handles built with `dead_ranges` mark these ids not live
        (tiers.SegmentHandle), and the filter index stops allowing any of them it already holds."""
        with self._lock:
            self._changed()
            self._dead_ranges = tuple((int(lo), int(hi)) for lo, hi in ranges)
            for lo, hi in self._dead_ranges:
                self.filters.kill_range(lo, hi)

    def set_deleted(self, ids):
        """Recovery and a follower's start, before segments load: the deleted ids (sorted)."""
        with self._lock:
            self._changed()
            self._deleted = np.array(ids, dtype=np.int64)
            self._deleted.flags.writeable = False
            self.filters.kill_ids(self._deleted)

    def delete(self, ids: np.ndarray) -> int:
        """A committed delete (sorted unique ids): from now on no view serves them, in any tier or
        filter. Returns how many rows it took out of the searchable tiers."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape[0] == 0:
            return 0
        with self._lock:
            self._changed()
            merged = np.union1d(self._deleted, ids)
            merged.flags.writeable = False
            self._deleted = merged
            self.filters.kill_ids(ids)
            return sum(h.kill(ids) for h in self._segments) + self._hot.kill(ids)

    def add(self, handles):
        """Recovery: publish loaded segments and index their filter columns."""
        with self._lock:
            self._changed()
            for h in handles:
                h.kill(self._deleted)
            self._segments = _sorted(self._segments + tuple(handles))
            for h in handles:
                r = h.reader
                self.filters.add_columns(h.id_start, h.live, r.bpm, r.tag_dict, r.tag_offsets, r.tag_ids)

    def swap(self, add=(), remove=(), drop_hot_through: int | None = None, drop_hot_ids_through: int | None = None):
        """Checkpoint and compaction: one atomic change for new queries. `add` replaces `remove`, and
        hot rows with lsn <= drop_hot_through (or id <= drop_hot_ids_through: a follower), now held by
        an added segment, are hidden. The filter index is by id: it already holds every row of `add`
        that it ever held hot (a follower indexes the rest first, `index_columns`)."""
        with self._lock:
            self._changed()
            for h in add:  # built from rows read before a delete that committed since
                h.kill(self._deleted)
            gone = {s.id for s in remove}
            self._segments = _sorted(tuple(s for s in self._segments if s.id not in gone) + tuple(add))
            if drop_hot_through is not None:
                self._hot.drop_through(drop_hot_through)
            if drop_hot_ids_through is not None:
                self._hot.drop_ids_through(drop_hot_ids_through)
            self._room.notify_all()

    def index_columns(self, handles):
        """A follower: index the filter columns of the rows of `handles` the filter index has not seen
        (ids at or past its size; ids are indexed in ascending order, so the rest are known)."""
        with self._lock:
            self._changed()
            for h in handles:  # before their columns are indexed (swap masks them again: no-op)
                h.kill(self._deleted)
            for h in sorted(handles, key=lambda s: s.id_start):
                first = max(h.id_start, self.filters.size)
                if first > h.id_end:
                    continue
                r, a, b = h.reader, first - h.id_start, h.n
                off = r.tag_offsets[a:b + 1]
                self.filters.add_columns(first, h.live[a:b], r.bpm[a:b], r.tag_dict,
                                         off - off[0], r.tag_ids[int(off[0]):int(off[-1])])

    def append_wal_rows(self, rows: list):
        """Recovery's hot-tail rebuild and a follower's catch-up: rows as catalog.wal.pending returns
        them, (lsn, id, vector blob, source_file, start_time_ms, duration_ms, bpm, tags_json)."""
        n = len(rows)
        if not n:
            return
        lsns = np.fromiter((r[0] for r in rows), dtype=np.int64, count=n)
        ids = np.fromiter((r[1] for r in rows), dtype=np.int64, count=n)
        vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(n, self._hot.dim)
        metas = [(r[3], r[4], r[5], r[6], orjson.loads(r[7])) for r in rows]
        self.append(ids, lsns, vectors.astype(np.float32), metas)

    def append(self, ids: np.ndarray, lsns: np.ndarray, vectors: np.ndarray, metas: list):
        """Ingest and the hot-tail rebuild: committed rows become visible to the next view."""
        bpm = np.array([m[3] for m in metas], dtype=np.float32)
        with self._lock:
            self._changed()
            self._hot.append(ids, lsns, vectors, metas)
            self.filters.add_rows(ids, bpm, [m[4] for m in metas])
            if self._deleted.shape[0] and self._deleted[-1] >= ids[0]:
                gone = self._deleted[np.searchsorted(self._deleted, ids[0]):]
                self._hot.kill(gone)  # a catch-up that read a row after its delete
                self.filters.kill_ids(gone)


_NO_IDS = np.empty(0, np.int64)
_NO_IDS.flags.writeable = False


def _sorted(handles: tuple) -> tuple:
    return tuple(sorted(handles, key=lambda s: s.id_start))
