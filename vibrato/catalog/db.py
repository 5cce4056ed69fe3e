"""The catalog database: one writer thread with group commit, a pool of read-only readers.

Writes: callers submit ``fn(conn, *args)``; the writer thread runs every queued request inside one
IMMEDIATE transaction, each request in its own SAVEPOINT (a failing request rolls back alone and
gets its exception; the others commit), then commits once. With synchronous=FULL that commit is
fsynced, so concurrent writers share one fsync (group commit). ``write()`` returns after the commit:
its result is durable on return. An optional ``after_commit`` hook runs on the writer thread, in
commit order, before the caller is released (the engine uses it to update the hot tier, so a write
is visible to queries before it is acknowledged).

Reads: ``read(fn, *args)`` borrows a read-only connection; a progress handler aborts any read that
exceeds ``read_timeout_ms`` (CatalogReadTimeout). Readers fetch everything before returning, so no
read transaction outlives the call and pins the WAL.

SQLite WAL size: the writer thread runs a PASSIVE checkpoint every ``passive_checkpoint_secs``,
escalates to TRUNCATE when the -wal file exceeds ``wal_max_bytes`` and does a TRUNCATE on close.

``readonly=True`` opens readers only (no writer thread, no migration, writes refused): for a process
that follows a catalog another process writes (vibrato.engine.follower).
"""
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import apsw

from vibrato.catalog.connection import open_reader, open_writer
from vibrato.catalog.schema import migrate
from vibrato.errors import CatalogReadTimeout, StorageError

log = logging.getLogger("vibrato.catalog")

_STOP = object()
MAINTENANCE_BUSY_MS = 100    # how long a TRUNCATE checkpoint may wait for readers
TRUNCATE_BACKOFF_SECS = 2.0  # after readers blocked it, the next TRUNCATE attempt waits this long


@dataclass
class _WriteRequest:
    fn: object
    args: tuple
    after_commit: object
    future: Future


class Catalog:
    """Thread-safe handle on catalog.sqlite3. See the module docstring for the threading model."""

    def __init__(self, path, *, read_timeout_ms: int = 5000, wal_autocheckpoint_pages: int = 1000,
                 wal_max_bytes: int = 64 * 1024 * 1024, passive_checkpoint_secs: float = 5.0,
                 readers: int = 3, busy_timeout_ms: int = 30_000, max_group: int = 512, readonly: bool = False):
        self.path = str(path)
        self.readonly = readonly
        self.busy_timeout_ms = busy_timeout_ms
        self._truncate_retry_at = 0.0
        self.read_timeout_ms = max(1, int(read_timeout_ms))
        self.wal_max_bytes = int(wal_max_bytes)
        self.passive_checkpoint_secs = passive_checkpoint_secs
        self.max_group = max_group
        self.read_timeout_total = 0
        self.last_checkpoint = {"mode": None, "log_frames": 0, "checkpointed_frames": 0, "at": 0.0}
        self.checkpoints_total = {"passive": 0, "restart": 0, "truncate": 0}
        self.group_commits_total = 0
        self.writes_total = 0
        self._stats_lock = threading.Lock()

        self._writer = None
        if not readonly:
            self._writer = open_writer(self.path, busy_timeout_ms=busy_timeout_ms,
                                       wal_autocheckpoint_pages=wal_autocheckpoint_pages,
                                       journal_size_limit=self.wal_max_bytes)
            try:
                migrate(self._writer)
            except Exception:
                self._writer.close()
                raise
        self._readers = queue.SimpleQueue()
        self._reader_conns = []
        for _ in range(max(1, readers)):
            conn = open_reader(self.path, busy_timeout_ms=self.read_timeout_ms)
            self._reader_conns.append(conn)
            self._readers.put(conn)

        self._queue = queue.Queue()
        self._closed = False
        self._thread = None
        if not readonly:
            self._thread = threading.Thread(target=self._writer_loop, name="vibrato-catalog-writer", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ writes
    def write_async(self, fn, *args, after_commit=None) -> Future:
        if self._closed:
            raise StorageError("catalog is closed")
        if self.readonly:
            raise StorageError("catalog is open read-only (a follower): writes go to the writer process")
        fut = Future()
        self._queue.put(_WriteRequest(fn, args, after_commit, fut))
        return fut

    def write(self, fn, *args, after_commit=None):
        """Run fn(conn, *args) in a transaction on the writer thread; durable when this returns."""
        return self.write_async(fn, *args, after_commit=after_commit).result()

    def _writer_loop(self):
        conn = self._writer
        next_passive = time.monotonic() + self.passive_checkpoint_secs
        held = None  # a request taken from the queue that must start the next group
        while True:
            if held is not None:
                first, held = held, None
            else:
                timeout = max(0.0, next_passive - time.monotonic())
                try:
                    first = self._queue.get(timeout=timeout)
                except queue.Empty:
                    first = None
            if first is _STOP:
                break
            if first is not None and isinstance(first.fn, _CheckpointMarker):
                self._run_checkpoint_request(conn, first)
            elif first is not None:
                batch = [first]
                while len(batch) < self.max_group:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP or isinstance(nxt.fn, _CheckpointMarker):
                        held = nxt
                        break
                    batch.append(nxt)
                self._run_group(conn, batch)
            now = time.monotonic()
            if now >= next_passive:
                self._maintain_wal(conn)
                next_passive = now + self.passive_checkpoint_secs
        self._drain_after_stop()

    def _run_checkpoint_request(self, conn, req):
        if not req.future.set_running_or_notify_cancel():
            return
        try:
            if req.fn.mode is None:  # vacuum: like a checkpoint, it cannot run inside a transaction
                conn.execute("VACUUM")
                req.future.set_result(None)
                return
            req.future.set_result(self._checkpoint(conn, req.fn.mode, req.fn.name))
        except apsw.Error as exc:
            req.future.set_exception(_storage_error(exc))

    def _run_group(self, conn, batch):
        # A caller may cancel its future while it waits (asyncio.wrap_future does when the awaiting
        # task is cancelled, e.g. at shutdown): such a request is not run, and once marked running
        # no future can be cancelled under the set_result below, which would raise here and end
        # this thread with every later write waiting forever.
        batch = [req for req in batch if req.future.set_running_or_notify_cancel()]
        if not batch:
            return
        results = [None] * len(batch)
        errors = [None] * len(batch)
        try:
            with conn:  # BEGIN IMMEDIATE ... COMMIT (fsync), ROLLBACK on exception
                for i, req in enumerate(batch):
                    try:
                        with conn:  # SAVEPOINT: one failing request rolls back alone
                            results[i] = req.fn(conn, *req.args)
                    except Exception as exc:  # noqa: BLE001 - handed to that request's caller
                        errors[i] = exc
        except Exception as exc:  # the commit itself failed: nothing in this group is durable
            log.error("catalog group commit failed: %s", exc)
            wrapped = _storage_error(exc)
            for req in batch:
                req.future.set_exception(wrapped)
            return
        with self._stats_lock:
            self.group_commits_total += 1
            self.writes_total += len(batch)
        for i, req in enumerate(batch):
            if errors[i] is None and req.after_commit is not None:
                try:
                    req.after_commit(results[i])
                except Exception as exc:  # noqa: BLE001
                    log.exception("after_commit hook failed")
                    errors[i] = exc
        for i, req in enumerate(batch):
            if errors[i] is not None:
                req.future.set_exception(_storage_error(errors[i]))
            else:
                req.future.set_result(results[i])

    def _maintain_wal(self, conn):
        # TRUNCATE must wait for readers to leave the WAL; it gets a short busy timeout here so that a
        # long reader delays the truncation (retried next tick), never the writes queued behind it.
        try:
            if self.wal_size_bytes() > self.wal_max_bytes and time.monotonic() >= self._truncate_retry_at:
                conn.set_busy_timeout(MAINTENANCE_BUSY_MS)
                try:
                    self._checkpoint(conn, apsw.SQLITE_CHECKPOINT_TRUNCATE, "truncate")
                    return
                except apsw.BusyError:
                    log.info("sqlite wal truncate deferred: readers are active")
                    self._truncate_retry_at = time.monotonic() + TRUNCATE_BACKOFF_SECS
                finally:
                    conn.set_busy_timeout(self.busy_timeout_ms)
            self._checkpoint(conn, apsw.SQLITE_CHECKPOINT_PASSIVE, "passive")
        except apsw.Error as exc:  # busy readers: try again next tick
            log.warning("sqlite wal checkpoint failed: %s", exc)

    def _checkpoint(self, conn, mode, name):
        log_frames, done = conn.wal_checkpoint(mode=mode)
        with self._stats_lock:
            self.checkpoints_total[name] += 1
            self.last_checkpoint = {"mode": name, "log_frames": log_frames, "checkpointed_frames": done,
                                    "at": time.time()}
        return log_frames, done

    def checkpoint_wal(self, mode: str = "truncate"):
        """Run an SQLite WAL checkpoint on the writer thread now (passive | restart | truncate)."""
        modes = {"passive": apsw.SQLITE_CHECKPOINT_PASSIVE, "restart": apsw.SQLITE_CHECKPOINT_RESTART,
                 "truncate": apsw.SQLITE_CHECKPOINT_TRUNCATE}
        if self.readonly:
            raise StorageError("catalog is open read-only: the writer process checkpoints its WAL")
        fut = Future()
        # A checkpoint cannot run inside a transaction: the writer loop runs this marker on its own.
        self._queue.put(_WriteRequest(_CheckpointMarker(modes[mode], mode), (), None, fut))
        return fut.result()

    def vacuum(self):
        """VACUUM on the writer thread now (rewrites the file without free space; the -wal then holds
        the new pages until a checkpoint)."""
        if self.readonly:
            raise StorageError("catalog is open read-only: the writer process vacuums it")
        fut = Future()
        self._queue.put(_WriteRequest(_CheckpointMarker(None, "vacuum"), (), None, fut))
        return fut.result()

    def _drain_after_stop(self):
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            if req is not _STOP and req.future.set_running_or_notify_cancel():
                req.future.set_exception(StorageError("catalog is closed"))

    # ------------------------------------------------------------------ reads
    def read(self, fn, *args):
        """Run fn(conn, *args) on a read-only connection with the read timeout applied."""
        conn = self._readers.get()
        deadline = time.monotonic() + self.read_timeout_ms / 1000.0
        timed_out = False

        def progress():
            nonlocal timed_out
            if time.monotonic() > deadline:
                timed_out = True
                return True
            return False

        conn.set_progress_handler(progress, 1000)
        try:
            with conn:
                return fn(conn, *args)
        except apsw.InterruptError as exc:
            if timed_out:
                with self._stats_lock:
                    self.read_timeout_total += 1
                raise CatalogReadTimeout(
                    f"catalog_read_timeout: sqlite exceeded {self.read_timeout_ms}ms") from exc
            raise _storage_error(exc) from exc
        except apsw.BusyError as exc:
            with self._stats_lock:
                self.read_timeout_total += 1
            raise CatalogReadTimeout(
                f"catalog_read_timeout: sqlite busy for more than {self.read_timeout_ms}ms") from exc
        except apsw.Error as exc:
            raise _storage_error(exc) from exc
        finally:
            conn.set_progress_handler(None)
            self._readers.put(conn)

    # ------------------------------------------------------------------ misc
    def wal_size_bytes(self) -> int:
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:
            return 0

    def db_size_bytes(self) -> int:
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def wal_stats(self) -> dict:
        with self._stats_lock:
            return {
                "sqlite_wal_bytes": self.wal_size_bytes(),
                "sqlite_db_bytes": self.db_size_bytes(),
                "sqlite_wal_checkpoints": dict(self.checkpoints_total),
                "sqlite_wal_last_checkpoint": dict(self.last_checkpoint),
                "catalog_read_timeout_total": self.read_timeout_total,
                "catalog_group_commits_total": self.group_commits_total,
                "catalog_writes_total": self.writes_total,
            }

    def close(self):
        """Stop the writer (pending writes finish first), TRUNCATE-checkpoint, close every connection."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
        for conn in self._reader_conns:
            conn.close()
        if self._writer is None:
            return
        try:
            self._writer.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
        except apsw.Error as exc:
            log.warning("final sqlite wal checkpoint failed: %s", exc)
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _CheckpointMarker:
    """A write request that runs an SQLite checkpoint (or, mode None, a VACUUM) outside any
    transaction (see _run_group)."""

    def __init__(self, mode, name):
        self.mode = mode
        self.name = name


def _storage_error(exc):
    if isinstance(exc, (CatalogReadTimeout,)) or not isinstance(exc, apsw.Error):
        return exc
    if isinstance(exc, apsw.ConstraintError):
        return StorageError(f"constraint failed: {exc}", code="conflict", status=409)
    return StorageError(f"sqlite failed: {exc}")
