"""Catalog schema and versioned migrations (PRAGMA user_version, one transaction per step).

Tables (all timestamps are unix seconds):
  collections, vector_id_counters   one row per collection; ids are dense from 0, never reused
  wal_entries                       one row per acknowledged vector: its lsn (AUTOINCREMENT, never
                                    reused), id, float32 blob (NULL once checkpointed and past the
                                    retention window), metadata columns, idempotency key + payload
                                    hash; checkpointed_at is set in the transaction that activates
                                    the segment holding the row
  id_tombstones                     id ranges removed by replay-to-lsn (never re-issued)
  deleted_vectors                   one row per deleted id: the delete's lsn (from the WAL's own
                                    sequence), when it was deleted and when its payload was purged
  catalog_meta                      small key/value flags (e.g. a catalog written before
                                    secure_delete must be vacuumed once before a purge)
  segments                          segment files (path relative to the data dir) and their state
  checkpoint_jobs, compaction_jobs  job state machines, reconciled by recovery
  snapshot_pins                     segments a snapshot is copying; the server does not delete them
  api_keys, audit_events, orphan_files
"""
import time

import apsw

APPLICATION_ID = 0x56425241  # "VBRA"

MIGRATIONS = [
    (1, "v1_initial", """
CREATE TABLE schema_migrations(
    version INTEGER PRIMARY KEY,
    applied_at INTEGER NOT NULL,
    checksum TEXT NOT NULL
);
CREATE TABLE collections(
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    dim INTEGER NOT NULL CHECK (dim BETWEEN 1 AND 4096),
    created_at INTEGER NOT NULL
);
CREATE TABLE vector_id_counters(
    collection_id TEXT PRIMARY KEY REFERENCES collections(id),
    next_id INTEGER NOT NULL CHECK (next_id >= 0)
);
CREATE TABLE wal_entries(
    lsn INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id TEXT NOT NULL REFERENCES collections(id),
    vector_id INTEGER NOT NULL,
    vector BLOB,
    source_file TEXT NOT NULL,
    start_time_ms INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    bpm REAL NOT NULL,
    tags_json TEXT NOT NULL,
    idempotency_key TEXT,
    payload_sha256 BLOB NOT NULL,
    checkpointed_at INTEGER,
    created_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX idx_wal_idempotency ON wal_entries(collection_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX idx_wal_vector_id ON wal_entries(collection_id, vector_id);
CREATE INDEX idx_wal_pending ON wal_entries(collection_id, lsn) WHERE checkpointed_at IS NULL;
CREATE INDEX idx_wal_prunable ON wal_entries(collection_id, checkpointed_at)
    WHERE checkpointed_at IS NOT NULL AND vector IS NOT NULL;
CREATE TABLE id_tombstones(
    collection_id TEXT NOT NULL REFERENCES collections(id),
    id_start INTEGER NOT NULL,
    id_end INTEGER NOT NULL,
    reason TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY(collection_id, id_start)
);
CREATE TABLE segments(
    id TEXT PRIMARY KEY,
    collection_id TEXT NOT NULL REFERENCES collections(id),
    level INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('raw', 'archive')),
    path TEXT NOT NULL UNIQUE,
    row_count INTEGER NOT NULL,
    live_count INTEGER NOT NULL,
    vector_id_start INTEGER NOT NULL,
    vector_id_end INTEGER NOT NULL,
    start_lsn INTEGER,
    end_lsn INTEGER,
    state TEXT NOT NULL CHECK (state IN
        ('building', 'pending_activate', 'active', 'compacting', 'obsolete', 'failed', 'deleted')),
    size_bytes INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX idx_segments_state ON segments(collection_id, state);
CREATE TABLE checkpoint_jobs(
    id TEXT PRIMARY KEY,
    collection_id TEXT NOT NULL REFERENCES collections(id),
    state TEXT NOT NULL,
    start_lsn INTEGER,
    end_lsn INTEGER,
    segment_id TEXT,
    details_json TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX idx_checkpoint_jobs_state ON checkpoint_jobs(collection_id, state);
CREATE TABLE compaction_jobs(
    id TEXT PRIMARY KEY,
    collection_id TEXT NOT NULL REFERENCES collections(id),
    state TEXT NOT NULL,
    output_segment_id TEXT,
    input_segments_json TEXT NOT NULL,
    details_json TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX idx_compaction_jobs_state ON compaction_jobs(collection_id, state);
CREATE TABLE snapshot_pins(
    snapshot_id TEXT NOT NULL,
    segment_id TEXT NOT NULL,
    pinned_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY(snapshot_id, segment_id)
);
CREATE TABLE api_keys(
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    roles TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER,
    hash_version INTEGER NOT NULL DEFAULT 2
);
CREATE TABLE audit_events(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    api_key_id TEXT,
    endpoint TEXT NOT NULL,
    action TEXT NOT NULL,
    status_code INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    client_ip TEXT,
    details_json TEXT NOT NULL,
    flushed_at INTEGER NOT NULL
);
CREATE INDEX idx_audit_ts ON audit_events(ts);
CREATE TABLE orphan_files(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id TEXT NOT NULL,
    original_path TEXT NOT NULL,
    quarantine_path TEXT NOT NULL,
    reason TEXT NOT NULL,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    quarantined_at INTEGER NOT NULL,
    deleted_at INTEGER,
    deleted_reason TEXT
);
CREATE INDEX idx_orphans_live ON orphan_files(quarantined_at) WHERE deleted_at IS NULL;
"""),
    # Deletes (CONTRACT.md D40). source_file is indexed so a whole track is found without a scan.
    # A catalog written by an earlier version may hold freed pages with old payloads (it ran without
    # secure_delete): its first purge vacuums it (engine/deletes.py).
    (2, "v2_deletes", """
CREATE TABLE deleted_vectors(
    collection_id TEXT NOT NULL REFERENCES collections(id),
    vector_id INTEGER NOT NULL,
    lsn INTEGER NOT NULL,
    deleted_at INTEGER NOT NULL,
    purged_at INTEGER,
    PRIMARY KEY(collection_id, vector_id)
);
CREATE INDEX idx_deleted_lsn ON deleted_vectors(collection_id, lsn);
CREATE INDEX idx_deleted_unpurged ON deleted_vectors(collection_id, vector_id) WHERE purged_at IS NULL;
CREATE INDEX idx_wal_source ON wal_entries(collection_id, source_file);
CREATE TABLE catalog_meta(
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO catalog_meta(key, value) SELECT 'vacuum_before_purge', '1' WHERE EXISTS (SELECT 1 FROM wal_entries);
"""),
]

LATEST_VERSION = MIGRATIONS[-1][0]


class SchemaError(Exception):
    pass


def migrate(conn: apsw.Connection) -> int:
    """Bring the catalog to LATEST_VERSION; returns the version found before migrating."""
    app_id = conn.pragma("application_id")
    version = conn.pragma("user_version")
    if app_id not in (0, APPLICATION_ID):
        raise SchemaError(f"not a Vibrato catalog (application_id {app_id:#x}, expected {APPLICATION_ID:#x})")
    if version > LATEST_VERSION:
        raise SchemaError(f"catalog schema version {version} is newer than this build supports ({LATEST_VERSION})")
    start = version
    for number, checksum, script in MIGRATIONS:
        if number <= version:
            continue
        with conn:
            conn.execute(script)
            conn.execute("INSERT INTO schema_migrations(version, applied_at, checksum) VALUES (?, ?, ?)",
                         (number, int(time.time()), checksum))
            conn.pragma("application_id", APPLICATION_ID)
            conn.pragma("user_version", number)
        version = number
    return start
