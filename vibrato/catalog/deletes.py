"""Deleted ids (`deleted_vectors`): the durable record of deletes (CONTRACT.md D40).

A delete is an LSN event: its lsn comes from the WAL's own AUTOINCREMENT sequence (SQLite keeps it
in `sqlite_sequence`, which may be updated like any table), so ingests and deletes share one order
and a delete's lsn is above every row it removes. One row per deleted id; ids are never reused, so
a row stays after its payload is purged (`purged_at`): replay-to-lsn keeps purged deletes.
"""
import json
import time

import numpy as np

_EMPTY = np.empty(0, np.int64)


def _ids_json(ids) -> str:
    return json.dumps([int(i) for i in ids])


def next_lsn(conn) -> int:
    """Take the next lsn of the WAL's sequence (the next ingested row gets a higher one)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'wal_entries'").fetchone()
    top = conn.execute("SELECT COALESCE(MAX(lsn), 0) FROM wal_entries").fetchone()[0]
    lsn = max(row[0] if row else 0, top) + 1
    if row:
        conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'wal_entries'", (lsn,))
    else:
        conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('wal_entries', ?)", (lsn,))
    return lsn


def existing_live(conn, collection_id: str, ids) -> np.ndarray:
    """The ids (sorted, unique) that name an acknowledged row not deleted yet."""
    rows = conn.execute(
        "SELECT w.vector_id FROM wal_entries w WHERE w.collection_id = ? "
        "AND w.vector_id IN (SELECT value FROM json_each(?)) AND NOT EXISTS (SELECT 1 FROM deleted_vectors d "
        "WHERE d.collection_id = w.collection_id AND d.vector_id = w.vector_id) ORDER BY w.vector_id",
        (collection_id, _ids_json(ids))).fetchall()
    return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))


def ids_for_sources(conn, collection_id: str, names) -> np.ndarray:
    """The live ids (sorted) whose source_file is one of `names` (idx_wal_source)."""
    rows = conn.execute(
        "SELECT w.vector_id FROM wal_entries w WHERE w.collection_id = ? "
        "AND w.source_file IN (SELECT value FROM json_each(?)) AND NOT EXISTS (SELECT 1 FROM deleted_vectors d "
        "WHERE d.collection_id = w.collection_id AND d.vector_id = w.vector_id)",
        (collection_id, json.dumps(list(names)))).fetchall()
    # sorted here: an ORDER BY makes SQLite walk the vector_id index over the whole collection
    return np.sort(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))


def record(conn, collection_id: str, ids: np.ndarray, now: int | None = None) -> int:
    """Record `ids` (live, distinct) as deleted under one new lsn; returns it."""
    now = int(time.time()) if now is None else now
    lsn = next_lsn(conn)
    conn.executemany("INSERT INTO deleted_vectors(collection_id, vector_id, lsn, deleted_at) VALUES (?, ?, ?, ?)",
                     ((collection_id, int(i), lsn, now) for i in ids))
    return lsn


def all_ids(conn, collection_id: str) -> np.ndarray:
    """Every deleted id, sorted (recovery, a follower's start)."""
    rows = conn.execute("SELECT vector_id FROM deleted_vectors WHERE collection_id = ? ORDER BY vector_id",
                        (collection_id,)).fetchall()
    return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))


def after_lsn(conn, collection_id: str, lsn: int) -> tuple[np.ndarray, int]:
    """(ids deleted with an lsn above `lsn`, the highest such lsn or `lsn`): a follower's catch-up."""
    rows = conn.execute("SELECT vector_id, lsn FROM deleted_vectors WHERE collection_id = ? AND lsn > ?",
                        (collection_id, lsn)).fetchall()
    if not rows:
        return _EMPTY, lsn
    return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)), max(r[1] for r in rows)


def last_lsn(conn, collection_id: str) -> int:
    return conn.execute("SELECT COALESCE(MAX(lsn), 0) FROM deleted_vectors WHERE collection_id = ?",
                        (collection_id,)).fetchone()[0]


def unpurged(conn, collection_id: str) -> np.ndarray:
    """Deleted ids whose payload has not been erased yet, sorted."""
    rows = conn.execute("SELECT vector_id FROM deleted_vectors WHERE collection_id = ? AND purged_at IS NULL "
                        "ORDER BY vector_id", (collection_id,)).fetchall()
    return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))


def erase_payloads(conn, collection_id: str, ids, now: int | None = None) -> int:
    """Purge: the WAL rows of `ids` lose their vector and metadata (id, lsn, idempotency key and
    payload digest stay: a retried ingest still answers created=false), and the deletes are marked
    purged. With secure_delete on (catalog/connection.py) the old bytes are zeroed in the file."""
    now = int(time.time()) if now is None else now
    doc = _ids_json(ids)
    conn.execute("UPDATE wal_entries SET vector = NULL, source_file = '', start_time_ms = 0, duration_ms = 0, "
                 "bpm = 0, tags_json = '[]' WHERE collection_id = ? AND vector_id IN (SELECT value FROM json_each(?))",
                 (collection_id, doc))
    conn.execute("UPDATE deleted_vectors SET purged_at = ? WHERE collection_id = ? AND purged_at IS NULL "
                 "AND vector_id IN (SELECT value FROM json_each(?))", (now, collection_id, doc))
    return conn.changes()


def pending_among(conn, collection_id: str, ids) -> np.ndarray:
    """The ids of `ids` whose WAL row is not checkpointed yet (their payload feeds a checkpoint)."""
    rows = conn.execute("SELECT vector_id FROM wal_entries WHERE collection_id = ? AND checkpointed_at IS NULL "
                        "AND vector_id IN (SELECT value FROM json_each(?)) ORDER BY vector_id",
                        (collection_id, _ids_json(ids))).fetchall()
    return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))


def undo_after_lsn(conn, collection_id: str, target_lsn: int, restorable) -> int:
    """replay-to-lsn: forget the deletes above `target_lsn` whose id `restorable(id)` says still has
    its payload; purged deletes (and the rest) stay. Returns how many were forgotten."""
    rows = conn.execute("SELECT vector_id FROM deleted_vectors WHERE collection_id = ? AND lsn > ? "
                        "AND purged_at IS NULL", (collection_id, target_lsn)).fetchall()
    undo = [r[0] for r in rows if restorable(r[0])]
    conn.executemany("DELETE FROM deleted_vectors WHERE collection_id = ? AND vector_id = ?",
                     ((collection_id, i) for i in undo))
    return len(undo)


def needs_vacuum(conn) -> bool:
    """Whether the catalog predates secure_delete and has not been vacuumed since (schema v2)."""
    row = conn.execute("SELECT value FROM catalog_meta WHERE key = 'vacuum_before_purge'").fetchone()
    return row is not None and row[0] == "1"


def clear_vacuum_flag(conn):
    conn.execute("DELETE FROM catalog_meta WHERE key = 'vacuum_before_purge'")
