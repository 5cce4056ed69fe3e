"""The vector WAL (`wal_entries`) and the replay tombstones (`id_tombstones`).

A row is written once, in the transaction that acknowledges the ingest, and holds the vector as a
little-endian float32 blob plus its metadata. `checkpointed_at` is set in the same transaction that
activates the segment holding the row; the blob is pruned (set NULL) after the retention window,
while the id, metadata and idempotency key stay. LSNs are AUTOINCREMENT rowids: never reused, and
consecutive within one transaction because there is one writer.
"""
import hashlib
import json
import time

from vibrato.catalog import collections
from vibrato.errors import ConflictError

# One ingest row, prepared by the engine (already validated and normalised):
# (vector_blob, source_file, start_time_ms, duration_ms, bpm, tags_json, idempotency_key|None, payload digest)
# The digest is versioned (CONTRACT.md D27): 0x01 + SHA-256 (33 bytes, vibrato.engine.validation), or a bare
# 32-byte SHA-256 in rows written by 0.3.0, which `_same_payload` recomputes the 0.3.0 way.
ROW_VECTOR, ROW_SOURCE, ROW_START, ROW_DURATION, ROW_BPM, ROW_TAGS, ROW_KEY, ROW_SHA = range(8)


def insert_batch(conn, collection_id: str, rows: list, now: int | None = None) -> list:
    """Insert rows, resolving idempotency keys; returns [(vector_id, created, lsn|None)] in input order.

    A key already in the WAL, or repeated earlier in this batch, returns the original id with
    created=False when the payload is identical, and raises ConflictError when it differs.
    """
    now = int(time.time()) if now is None else now
    keys = sorted({r[ROW_KEY] for r in rows if r[ROW_KEY] is not None})
    existing = {}
    if keys:
        for key, vid, sha in conn.execute(
                "SELECT idempotency_key, vector_id, payload_sha256 FROM wal_entries "
                "WHERE collection_id = ? AND idempotency_key IN (SELECT value FROM json_each(?))",
                (collection_id, json.dumps(keys))):
            existing[key] = (vid, sha)

    results = [None] * len(rows)
    creator = {}  # key -> index of the row in this batch that creates it
    new_index = []
    for i, r in enumerate(rows):
        key = r[ROW_KEY]
        if key is None:
            new_index.append(i)
        elif key in existing:
            _check_same_payload(key, existing[key][1], r, i, len(rows))
            results[i] = (existing[key][0], False, None)
        elif key in creator:
            _check_same_payload(key, rows[creator[key]][ROW_SHA], r, i, len(rows))
            results[i] = creator[key]  # resolved to that row's id once ids are allocated
        else:
            creator[key] = i
            new_index.append(i)

    if new_index:
        first_id = collections.allocate_ids(conn, collection_id, len(new_index))
        params = []
        for offset, i in enumerate(new_index):
            r = rows[i]
            params.append((collection_id, first_id + offset, r[ROW_VECTOR], r[ROW_SOURCE], r[ROW_START],
                           r[ROW_DURATION], r[ROW_BPM], r[ROW_TAGS], r[ROW_KEY], r[ROW_SHA], now))
        conn.executemany(
            "INSERT INTO wal_entries(collection_id, vector_id, vector, source_file, start_time_ms, duration_ms, "
            "bpm, tags_json, idempotency_key, payload_sha256, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)", params)
        last_lsn = conn.last_insert_rowid()
        first_lsn = last_lsn - len(new_index) + 1
        for offset, i in enumerate(new_index):
            results[i] = (first_id + offset, True, first_lsn + offset)
    for i, res in enumerate(results):
        if isinstance(res, int):
            results[i] = (results[res][0], False, None)
    return results


def _check_same_payload(key, stored_sha, row, index, n):
    if not _same_payload(bytes(stored_sha), row):
        where = f" (vectors[{index}])" if n > 1 else ""
        raise ConflictError(f"idempotency_key '{key}'{where} was already used with a different payload")


def _same_payload(stored: bytes, row) -> bool:
    if stored == row[ROW_SHA]:
        return True
    if len(stored) != 32:
        return False
    # 0.3.0's digest: SHA-256 of the vector blob, then the fields joined with NUL
    h = hashlib.sha256(row[ROW_VECTOR])
    h.update(f"{row[ROW_SOURCE]}\x00{row[ROW_START]}\x00{row[ROW_DURATION]}\x00{row[ROW_BPM]!r}\x00"
             f"{row[ROW_TAGS]}".encode("utf-8", "surrogatepass"))
    return stored == h.digest()


def insert_checkpointed(conn, collection_id: str, first_id: int, metas, now: int | None = None) -> tuple[int, int]:
    """Bulk import: a row per id first_id, first_id + 1, ... for the normalised metas (source_file,
    start_time_ms, duration_ms, bpm, tags as JSON text), already checkpointed and without a vector
    blob (their segments hold the vectors). payload_sha256 is empty: it only answers idempotency keys,
    and these rows have none. Returns the (first, last) lsn given to them."""
    now = int(time.time()) if now is None else now
    before = conn.total_changes()
    conn.executemany(
        "INSERT INTO wal_entries(collection_id, vector_id, vector, source_file, start_time_ms, duration_ms, bpm, "
        "tags_json, idempotency_key, payload_sha256, checkpointed_at, created_at) "
        "VALUES (?, ?, NULL, ?, ?, ?, ?, ?, NULL, x'', ?, ?)",
        ((collection_id, first_id + i, m[0], m[1], m[2], m[3], m[4], now, now) for i, m in enumerate(metas)))
    last = conn.last_insert_rowid()
    return last - (conn.total_changes() - before) + 1, last


def pending(conn, collection_id: str, after_lsn: int = 0, limit: int = -1) -> list:
    """Un-checkpointed rows with lsn > after_lsn, in lsn order:
    [(lsn, vector_id, vector_blob, source_file, start_time_ms, duration_ms, bpm, tags_json)]."""
    return conn.execute(
        "SELECT lsn, vector_id, vector, source_file, start_time_ms, duration_ms, bpm, tags_json FROM wal_entries "
        "WHERE collection_id = ? AND checkpointed_at IS NULL AND lsn > ? ORDER BY lsn LIMIT ?",
        (collection_id, after_lsn, limit)).fetchall()


def count_pending(conn, collection_id: str) -> int:
    return conn.execute("SELECT COUNT(*) FROM wal_entries WHERE collection_id = ? AND checkpointed_at IS NULL",
                        (collection_id,)).fetchone()[0]


def count(conn, collection_id: str) -> int:
    return conn.execute("SELECT COUNT(*) FROM wal_entries WHERE collection_id = ?", (collection_id,)).fetchone()[0]


def mark_checkpointed(conn, collection_id: str, start_lsn: int, end_lsn: int, now: int | None = None) -> int:
    now = int(time.time()) if now is None else now
    conn.execute("UPDATE wal_entries SET checkpointed_at = ? WHERE collection_id = ? AND lsn BETWEEN ? AND ? "
                 "AND checkpointed_at IS NULL", (now, collection_id, start_lsn, end_lsn))
    return conn.changes()


def prune_vectors(conn, collection_id: str, checkpointed_before: int, limit: int = 20_000) -> int:
    """Drop the float32 blobs of rows checkpointed before the given time (the segment holds them)."""
    conn.execute("UPDATE wal_entries SET vector = NULL WHERE lsn IN (SELECT lsn FROM wal_entries "
                 "WHERE collection_id = ? AND checkpointed_at IS NOT NULL AND checkpointed_at < ? "
                 "AND vector IS NOT NULL LIMIT ?)", (collection_id, checkpointed_before, limit))
    return conn.changes()


def metadata_for_ids(conn, collection_id: str, ids: list) -> dict:
    """{vector_id: (source_file, start_time_ms, duration_ms, bpm, tags_json)} for the ids that exist."""
    out = {}
    for vid, src, start, dur, bpm, tags in conn.execute(
            "SELECT vector_id, source_file, start_time_ms, duration_ms, bpm, tags_json FROM wal_entries "
            "WHERE collection_id = ? AND vector_id IN (SELECT value FROM json_each(?))",
            (collection_id, json.dumps([int(i) for i in ids]))):
        out[vid] = (src, start, dur, bpm, tags)
    return out


def truncate_after_lsn(conn, collection_id: str, target_lsn: int, now: int | None = None) -> dict:
    """Replay-to-LSN in the catalog: drop this collection's rows with lsn > target_lsn and record their
    id range as tombstoned so it is never served or re-issued (the id counter is left alone)."""
    now = int(time.time()) if now is None else now
    lo, hi, n = conn.execute("SELECT MIN(vector_id), MAX(vector_id), COUNT(*) FROM wal_entries "
                             "WHERE collection_id = ? AND lsn > ?", (collection_id, target_lsn)).fetchone()
    if n == 0:
        return {"removed": 0, "id_start": None, "id_end": None}
    id_end = collections.next_id(conn, collection_id) - 1
    conn.execute("DELETE FROM wal_entries WHERE collection_id = ? AND lsn > ?", (collection_id, target_lsn))
    conn.execute("INSERT OR REPLACE INTO id_tombstones(collection_id, id_start, id_end, reason, created_at) "
                 "VALUES (?, ?, ?, ?, ?)", (collection_id, lo, max(hi, id_end), f"replay_to_lsn:{target_lsn}", now))
    return {"removed": n, "id_start": lo, "id_end": max(hi, id_end)}


def last_lsn(conn, collection_id: str) -> int:
    """The highest lsn of the collection's WAL events, rows and deletes (0 when it has none)."""
    return conn.execute("SELECT MAX(COALESCE((SELECT MAX(lsn) FROM wal_entries WHERE collection_id = ?1), 0), "
                        "COALESCE((SELECT MAX(lsn) FROM deleted_vectors WHERE collection_id = ?1), 0))",
                        (collection_id,)).fetchone()[0]


def tombstone_ranges(conn, collection_id: str) -> list:
    """[(id_start, id_end)] inclusive ranges removed by replay-to-lsn, ascending."""
    return conn.execute("SELECT id_start, id_end FROM id_tombstones WHERE collection_id = ? ORDER BY id_start",
                        (collection_id,)).fetchall()


def scan_metadata(conn, collection_id: str) -> int:
    """Read every row's metadata in id order (a full metadata scan); returns the number of rows.

    Exists for the WAL growth guard (tests/test_catalog_wal_growth_guard.py): a slow, timeout-prone
    reader that must not pin the SQLite WAL. Rows are read, not just counted, so the read
    transaction lasts as long as a real metadata dump.
    """
    n = 0
    for _row in conn.execute(
            "SELECT vector_id, source_file, start_time_ms, duration_ms, bpm, tags_json FROM wal_entries "
            "WHERE collection_id = ? ORDER BY vector_id", (collection_id,)):
        n += 1
    return n
