"""Catalog (APSW) behaviour: migrations, group commit isolation (CONTRACT.md D2), durability settings,
read timeouts, WAL maintenance that never stalls writers behind a long reader."""
import hashlib
import threading

import apsw
import numpy as np
import pytest

from vibrato.catalog import Catalog, collections, keys, schema, wal
from vibrato.errors import CatalogReadTimeout, ConflictError


def row(i, key=None):
    v = np.full(4, i, np.float32).tobytes()
    return (v, "f.wav", i, 10, 120.0, "[]", key, hashlib.sha256(v).digest())


@pytest.fixture
def cat(tmp_path):
    c = Catalog(tmp_path / "catalog.sqlite3", passive_checkpoint_secs=0.05)
    yield c
    c.close()


def test_schema_and_pragmas(tmp_path, cat):
    assert cat.read(lambda c: c.pragma("user_version")) == schema.LATEST_VERSION
    assert cat.read(lambda c: c.pragma("application_id")) == schema.APPLICATION_ID
    assert cat.write(lambda c: c.pragma("journal_mode")) == "wal"
    assert cat.write(lambda c: c.pragma("synchronous")) == 2  # FULL: an acknowledged commit survives power loss
    assert cat.write(lambda c: c.pragma("secure_delete")) == 1  # freed payloads are zeroed (purge, D40)
    cat.close()
    again = Catalog(tmp_path / "catalog.sqlite3")  # migrations are idempotent
    assert again.read(lambda c: c.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0]) == \
        schema.LATEST_VERSION
    again.close()


def test_foreign_database_refused(tmp_path):
    p = tmp_path / "other.sqlite3"
    c = apsw.Connection(str(p))
    c.pragma("application_id", 1234)
    c.close()
    with pytest.raises(schema.SchemaError, match="not a Vibrato catalog"):
        Catalog(p)


def test_one_failing_request_does_not_affect_its_group(cat):
    col = cat.write(collections.ensure, "default", 4)
    barrier = threading.Barrier(9)
    results = {}

    def ingest(i):
        barrier.wait()
        try:
            results[i] = cat.write(wal.insert_batch, col["id"], [row(i, key="dup" if i == 3 else None)])
        except Exception as exc:  # noqa: BLE001
            results[i] = exc

    def bad():
        barrier.wait()
        try:
            cat.write(lambda c: c.execute("INSERT INTO no_such_table VALUES (1)"))
        except Exception as exc:  # noqa: BLE001
            results["bad"] = exc

    threads = [threading.Thread(target=ingest, args=(i,)) for i in range(8)] + [threading.Thread(target=bad)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert isinstance(results["bad"], Exception)
    ids = sorted(results[i][0][0] for i in range(8))
    assert ids == list(range(8)), "every good request committed, ids dense"
    assert cat.read(wal.count, col["id"]) == 8
    assert cat.write(lambda c: c.in_transaction) is True  # the writer is not wedged (inside our own txn)
    with pytest.raises(ConflictError):
        cat.write(wal.insert_batch, col["id"], [row(99, key="dup")])
    assert cat.read(wal.count, col["id"]) == 8


def test_a_cancelled_write_is_skipped_and_the_writer_goes_on(cat):
    """A caller that cancels its future while it waits (asyncio.wrap_future does when the awaiting task is
    cancelled, as the audit pruner's is at shutdown) gets its request skipped; the writer thread stays
    up and later writes, in the same group or after, commit."""
    col = cat.write(collections.ensure, "default", 4)
    gate, entered = threading.Event(), threading.Event()

    def hold(c):  # keeps the writer busy while the next requests queue up behind it
        entered.set()
        gate.wait(10)
    blocker = cat.write_async(hold)
    assert entered.wait(10)
    cancelled = cat.write_async(wal.insert_batch, col["id"], [row(1)])
    kept = cat.write_async(wal.insert_batch, col["id"], [row(2)])
    assert cancelled.cancel()
    gate.set()
    blocker.result(10)
    assert kept.result(10)[0][0] >= 0 and cancelled.cancelled()
    assert cat.write(wal.insert_batch, col["id"], [row(3)])
    assert cat.read(wal.count, col["id"]) == 2
    assert cat._thread.is_alive()


def test_keys_roundtrip(cat):
    cat.write(keys.create, "vbk_1", "n", "hash", "query")
    assert cat.read(keys.get, "vbk_1")["roles"] == "query"
    assert cat.write(keys.revoke, "vbk_1") is True
    assert cat.write(keys.revoke, "vbk_1") is False
    assert cat.read(keys.count_active) == 0


def test_read_timeout(tmp_path):
    c = Catalog(tmp_path / "c.sqlite3", read_timeout_ms=1)
    col = c.write(collections.ensure, "default", 4)
    c.write(wal.insert_batch, col["id"], [row(i) for i in range(20000)])
    slow = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r WHERE x < 5000000) SELECT COUNT(*) FROM r"
    with pytest.raises(CatalogReadTimeout, match="catalog_read_timeout"):
        c.read(lambda conn: conn.execute(slow).fetchone())
    assert c.wal_stats()["catalog_read_timeout_total"] >= 1
    c.close()


def test_long_reader_never_stalls_writes(tmp_path):
    """TRUNCATE must wait for readers; it may not hold up the writes queued behind it."""
    path = tmp_path / "c.sqlite3"
    c = Catalog(path, wal_max_bytes=64 * 1024, passive_checkpoint_secs=0.01)
    col = c.write(collections.ensure, "default", 4)
    c.write(wal.insert_batch, col["id"], [row(i) for i in range(2000)])
    reader = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM wal_entries").fetchone()  # holds a read snapshot from now on
    done = threading.Event()

    def writes():
        for i in range(300):
            c.write(wal.insert_batch, col["id"], [row(i)])
        done.set()

    t = threading.Thread(target=writes)
    t.start()
    finished_while_reader_held = done.wait(timeout=60)
    reader.execute("COMMIT")
    reader.close()
    t.join()
    assert finished_while_reader_held, "writes waited for the reader to let go of the WAL"
    assert c.wal_stats()["sqlite_wal_checkpoints"]["passive"] > 0
    c.close()


def test_expired_snapshot_pins_are_ignored_then_purged(cat):
    import time

    from vibrato.catalog import segments as seg_sql

    cat.write(seg_sql.pin, "snap_a", ["seg_1", "seg_2"], 3600)
    cat.write(seg_sql.pin, "snap_b", ["seg_3"], -10)  # already expired
    assert cat.read(seg_sql.pinned_segment_ids) == {"seg_1", "seg_2"}  # a read-only connection: no writes
    assert cat.write(seg_sql.purge_expired_pins, int(time.time())) == 1
    assert cat.write(lambda c: c.execute("SELECT COUNT(*) FROM snapshot_pins").fetchone()[0]) == 2
    assert cat.read(seg_sql.pinned_segment_ids) == {"seg_1", "seg_2"}
