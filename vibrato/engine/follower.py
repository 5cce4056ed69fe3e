"""A read-only engine in another process, kept current with the writer's (the first step of serving
queries from several processes; docs/ARCHITECTURE.md).

The writer (an `Engine` opened with `publish_state=True`) owns the data dir: its lock, the catalog's
writes, checkpoint, compaction. A `Follower` opens the same data dir without the lock: the catalog
read-only, the active segments' files mapped, the WAL tail in its own hot tier and filter index.
`sync()` brings it up to date (a search calls it unless the follower is already current, below):

  1. read `seq` from the writer's serving state (engine/shared_state.py); while it is odd a change
     of the segment set is being published: wait for it (at most SYNC_WAIT_SECS);
  2. when `seq` moved since the last sync, reload the segment set from the catalog: open the new
     active segments, drop the retired ones, hide the hot rows the new segments hold (by id: ids
     ascend with lsn and checkpoint takes the oldest rows);
  3. when the published `lsn` is past what it applied, read the WAL rows after it (un-checkpointed
     ones) into the hot tier and the filter index, then the deletes after the last one it applied
     (a delete takes an lsn from the same sequence, engine/deletes.py);
  4. read `seq` again: if it moved, a change overlapped steps 2-3 (rows may have left the WAL for a
     segment not loaded yet), so start over.

The writer publishes `lsn` after a commit and before acknowledging it, and moves `seq` before the
transaction that retires WAL rows into a segment, so a write acknowledged before `sync()` starts is
visible after it (read-your-writes across processes, CONTRACT.md D5).

A serving follower also runs `follow()`: a thread that syncs as soon as the writer publishes, and
reports the lsn its last completed sync applied in its slot of `tmp/followers.state`, where the writer
waits for it before acknowledging a write. A query then usually finds the follower current: the same
state file and the writer's `visible` (the highest lsn it may have acknowledged) no later than the
last completed sync, checked without the lock (`_current`); catching up inside a query is left for a
follower that fell behind. Lock-free readers compare with `_synced`, never `_applied`: during a sync
`_applied` runs ahead of the deletes and of a segment reload it has yet to do.
"""
import logging
import os
import socket
import threading
import time

import numpy as np

from vibrato.catalog import Catalog, collections, deletes, segments as seg_sql, wal
from vibrato.config import Config
from vibrato.engine.core import Searcher
from vibrato.engine.maintenance import segment_file
from vibrato.engine.shared_state import FILE_NAME, SharedState
from vibrato.engine.state import Counters, SegmentSet
from vibrato.engine.pipeline import load_handle
from vibrato.engine.tiers import SegmentHandle
from vibrato.errors import NotReadyError

log = logging.getLogger("vibrato.engine")

SYNC_WAIT_SECS = 5.0   # longest wait for the writer to finish publishing a segment-set change
CATCH_UP_BATCH = 20_000
FOLLOW_IDLE_SECS = 0.05    # the follow thread looks at the writer's state at least this often
FOLLOW_RETRY_SECS = 0.5    # after a failed sync in the follow thread


class Follower(Searcher):
    def __init__(self, config: Config):
        self.config = config
        self.dim = config.dim
        self.counters = Counters()
        self._state_path = os.path.join(config.tmp_dir, FILE_NAME)
        self.catalog = Catalog(config.catalog_path, read_timeout_ms=config.catalog_read_timeout_ms, readonly=True)
        try:
            self.collection = self.catalog.read(collections.get, config.collection)
            if self.collection["dim"] != config.dim:
                raise ValueError(f"collection {config.collection!r} has dim {self.collection['dim']}, "
                                 f"expected {config.dim}")
            self.cid = self.collection["id"]
            self.shared, self._state_ino = self._open_state()
        except BaseException:
            self.catalog.close()
            raise
        self.segment_set = SegmentSet.for_config(config)
        self.segment_set.set_dead_ranges(self.catalog.read(wal.tombstone_ranges, self.cid))
        deleted, self._deletes_applied = self.catalog.read(
            lambda conn: (deletes.all_ids(conn, self.cid), deletes.last_lsn(conn, self.cid)))
        self.segment_set.set_deleted(deleted)
        self._lock = threading.Lock()  # one sync at a time
        self._seq = -1                 # the writer's seq this follower's segment set matches
        self._applied = 0              # the highest lsn in its hot tier (or skipped as checkpointed)
        self._synced = 0               # _applied as of the last sync that completed (lock-free readers)
        self._closed = False
        self._follower = None          # the follow() thread
        self._wake = None              # and the socket it sleeps on
        self.sync()

    @classmethod
    def open(cls, data_dir, collection: str = "default", dim: int = 128, **options) -> "Follower":
        return cls(Config(data_dir=data_dir, collection=collection, dim=dim, **options))

    def close(self):
        self._closed = True
        if self._follower is not None:
            _poke(self._wake)
            self._follower.join()
        self.catalog.close()
        self.shared.close()

    def _require_ready(self):
        if self._closed:
            raise NotReadyError("follower is closed")

    def readiness(self) -> tuple[bool, str]:
        """A follower serves once open; the writer's readiness is the service's (its /v2/health/ready)."""
        return (not self._closed), ("follower closed" if self._closed else "following the writer")

    def view(self):
        if not self._current(for_query=True):
            self.sync()
        return self.segment_set.view()

    # ------------------------------------------------------------------ sync
    def _current(self, for_query: bool = False) -> bool:
        """True when nothing was published since the last completed sync: a state file no new writer
        retired (a restarted writer makes a new one), an even seq this follower matches, no lsn past it.

        For a query, with the follow thread running: only the same file and `visible` (the highest lsn a
        write may have been acknowledged at) no later than the last completed sync. A segment-set change
        (checkpoint, compaction) moves rows that are already in this follower's hot tier or segments, so
        the state that sync left holds every acknowledged write; the follow thread loads the new
        segments without a query waiting."""
        try:
            shared = self.shared
            if shared.retired:  # a new writer replaced the file (engine/shared_state.py)
                return False
            if for_query and self._follower is not None:
                return shared.visible <= self._synced
            return shared.seq == self._seq and shared.lsn <= self._synced
        except ValueError:  # the follow thread closed that mapping for a restarted writer's file
            return False

    def sync(self):
        """Catch up with the writer (see the module docstring)."""
        if self._current():
            return
        with self._lock:
            self._follow_restarts()
            deadline = time.monotonic() + SYNC_WAIT_SECS
            while True:
                seq = self.shared.seq
                if seq % 2 == 0:
                    complete = seq == self._seq or self._reload_segments()
                    lsn = self.shared.lsn
                    if complete and lsn > self._applied:
                        self._catch_up()
                        self._catch_up_deletes()
                        # every row up to lsn was pending (read now) or checkpointed (in a segment
                        # loaded, or a moved seq below makes this loop reload)
                        self._applied = max(self._applied, lsn)
                    if complete and self.shared.seq == seq:
                        self._seq = seq
                        # only now: mid-sync, _applied runs ahead of the deletes and of a reload
                        self._synced = self._applied
                        return
                if time.monotonic() > deadline:
                    raise NotReadyError(f"the writer did not finish publishing a segment change within "
                                        f"{SYNC_WAIT_SECS:g} s; retry")
                time.sleep(0.0005)

    def follow(self, report, wake=None):
        """Start the thread that keeps this follower current: it syncs whenever the writer publishes
        and calls `report(applied_lsn)` after each sync that moved it (close() stops it). `wake`: a
        socket the writer sends a datagram to after each publication (shared_state.wake_socket); the
        thread sleeps on it (else it looks every FOLLOW_IDLE_SECS)."""
        if self._follower is not None:
            raise RuntimeError("follow() already started")
        self._wake = wake
        self._follower = threading.Thread(target=self._follow, args=(report, wake), name="vibrato-follow",
                                          daemon=True)
        self._follower.start()

    def _follow(self, report, wake):
        reported = None
        while not self._closed:
            try:
                self.sync()  # returns at once when nothing was published
                synced = self._synced
                if synced != reported:
                    report(synced)
                    reported = synced
            except Exception as exc:  # noqa: BLE001 - queries still sync inline; retry
                log.warning("follower catch-up failed (queries catch up themselves): %s", exc)
                time.sleep(FOLLOW_RETRY_SECS)
            _wait(wake)

    def _follow_restarts(self):
        """A restarted writer makes a new state file: map it and reload the segment set."""
        ino = self._state_file_ino()
        if ino is not None and ino != self._state_ino:
            self.shared.close()
            self.shared, self._state_ino = self._open_state()
            self._seq = -1

    def _open_state(self):
        state = SharedState.open(self.config.tmp_dir)
        return state, self._state_file_ino()

    def _state_file_ino(self):
        """The inode of the writer's state file now (None while there is none): a restarted writer
        makes a new file."""
        try:
            return os.stat(self._state_path).st_ino
        except FileNotFoundError:
            return None

    def _reload_segments(self) -> bool:
        """The catalog's serving segments become the segment set. False when a file vanished on the
        way (retired and collected after the catalog read: the caller retries).

        Serving means `active` or `compacting`: a compaction marks its inputs `compacting` without
        moving `seq` and the writer serves them until the output is activated, so a reload for any
        other change (a checkpoint) while a compaction runs must keep them."""
        rows = self.catalog.read(seg_sql.list_by_state, self.cid, seg_sql.SERVING_STATES)
        have = {h.id: h for h in self.segment_set.handles}
        add = []
        try:
            for row in rows:
                if row["id"] not in have:
                    add.append(self._load(row))
        except FileNotFoundError:
            for h in add:
                h.reader.close()
            return False
        want = {r["id"] for r in rows}
        remove = [h for sid, h in have.items() if sid not in want]
        self.segment_set.index_columns(add)
        top = max((int(r["vector_id_end"]) for r in rows), default=-1)
        self.segment_set.swap(add=add, remove=remove, drop_hot_ids_through=top if top >= 0 else None)
        return True

    def _load(self, row) -> SegmentHandle:
        return load_handle(self, row, segment_file(self.config.data_dir, row["path"]), verify=False)

    def _catch_up(self):
        """Un-checkpointed WAL rows after the last applied lsn into the hot tier and filter index
        (rows a loaded segment already holds are skipped)."""
        top_id = max((h.id_end for h in self.segment_set.handles), default=-1)
        while True:
            rows = self.catalog.read(wal.pending, self.cid, self._applied, CATCH_UP_BATCH)
            if not rows:
                return
            last = rows[-1][0]
            self.segment_set.append_wal_rows([r for r in rows if r[1] > top_id])
            self._applied = last

    def _catch_up_deletes(self):
        ids, top = self.catalog.read(deletes.after_lsn, self.cid, self._deletes_applied)
        if ids.shape[0]:
            self.segment_set.delete(np.unique(ids))
        self._deletes_applied = top


def _wait(wake):
    """Until the writer's next wake-up datagram (and any queued behind it), or FOLLOW_IDLE_SECS."""
    if wake is None:
        time.sleep(FOLLOW_IDLE_SECS)
        return
    try:
        wake.settimeout(FOLLOW_IDLE_SECS)
        wake.recv(16)
        wake.settimeout(0.0)  # then whatever queued behind it, without waiting
        while True:
            wake.recv(16)
    except (BlockingIOError, TimeoutError, InterruptedError):
        pass
    except OSError:  # closed under us at shutdown
        time.sleep(FOLLOW_IDLE_SECS)


def _poke(wake):
    """Wake the follow thread sleeping on `wake` (close() does, so it need not wait out its timeout)."""
    if wake is None:
        return
    try:  # non-blocking: with its queue full a wake-up is pending anyway
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) as s:
            s.sendto(b"w", wake.getsockname())
    except OSError:
        pass
