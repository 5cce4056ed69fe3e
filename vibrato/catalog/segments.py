"""Segment rows, their state machine, and snapshot pins.

States: building -> pending_activate -> active -> (compacting -> active | obsolete) ; failed ;
deleted (obsolete file removed, row kept for history until purged). Paths are relative to the
data directory, so a data dir can be moved or restored elsewhere (CONTRACT.md D9).
"""
import time


# The states whose data is current: the writer serves `compacting` inputs until a compaction's output
# is activated (a follower, a snapshot and replay-to-lsn treat them alike).
SERVING_STATES = ("active", "compacting")

COLUMNS = ("id", "collection_id", "level", "kind", "path", "row_count", "live_count", "vector_id_start",
           "vector_id_end", "start_lsn", "end_lsn", "state", "size_bytes", "error", "created_at", "updated_at")
_SELECT = "SELECT " + ", ".join(COLUMNS) + " FROM segments"


def _row(r) -> dict:
    return dict(zip(COLUMNS, r))


def insert(conn, seg: dict) -> None:
    now = int(time.time())
    conn.execute(
        "INSERT INTO segments(id, collection_id, level, kind, path, row_count, live_count, vector_id_start, "
        "vector_id_end, start_lsn, end_lsn, state, size_bytes, error, created_at, updated_at) "
        "VALUES (:id, :collection_id, :level, :kind, :path, :row_count, :live_count, :vector_id_start, "
        ":vector_id_end, :start_lsn, :end_lsn, :state, :size_bytes, NULL, :now, :now)",
        {**{k: seg.get(k) for k in COLUMNS if k not in ("error", "created_at", "updated_at")}, "now": now})


def set_state(conn, segment_id: str, state: str, error: str | None = None) -> None:
    conn.execute("UPDATE segments SET state = ?, error = COALESCE(?, error), updated_at = ? WHERE id = ?",
                 (state, error, int(time.time()), segment_id))


def set_states(conn, segment_ids, state: str) -> None:
    now = int(time.time())
    conn.executemany("UPDATE segments SET state = ?, updated_at = ? WHERE id = ?",
                     [(state, now, sid) for sid in segment_ids])


def find(conn, segment_id: str) -> dict | None:
    r = conn.execute(_SELECT + " WHERE id = ?", (segment_id,)).fetchone()
    return None if r is None else _row(r)


def list_by_state(conn, collection_id: str, states) -> list[dict]:
    states = list(states)
    marks = ",".join("?" * len(states))  # placeholders only; values stay bound
    return [_row(r) for r in conn.execute(
        _SELECT + f" WHERE collection_id = ? AND state IN ({marks}) ORDER BY level, vector_id_start",
        (collection_id, *states))]


def count_by_state(conn, collection_id: str) -> dict:
    return dict(conn.execute("SELECT state, COUNT(*) FROM segments WHERE collection_id = ? GROUP BY state",
                             (collection_id,)).fetchall())


def all_paths(conn) -> set:
    """Every path the catalog knows, in any state (orphan detection)."""
    return {r[0] for r in conn.execute("SELECT path FROM segments")}


def purge_deleted(conn, older_than: int) -> int:
    conn.execute("DELETE FROM segments WHERE state = 'deleted' AND updated_at < ?", (older_than,))
    return conn.changes()


# ---------------------------------------------------------------- snapshot pins
def pin(conn, snapshot_id: str, segment_ids, ttl_secs: int = 3600) -> None:
    now = int(time.time())
    conn.executemany("INSERT OR REPLACE INTO snapshot_pins(snapshot_id, segment_id, pinned_at, expires_at) "
                     "VALUES (?, ?, ?, ?)", [(snapshot_id, sid, now, now + ttl_secs) for sid in segment_ids])


def unpin(conn, snapshot_id: str) -> None:
    conn.execute("DELETE FROM snapshot_pins WHERE snapshot_id = ?", (snapshot_id,))


def pinned_segment_ids(conn) -> set:
    """Segments an unexpired snapshot pin holds (their files must stay)."""
    now = int(time.time())
    return {r[0] for r in conn.execute("SELECT segment_id FROM snapshot_pins WHERE expires_at >= ?", (now,))}


def purge_expired_pins(conn, now: int) -> int:
    """Delete pin rows that expired before `now` (pinned_segment_ids already ignores them)."""
    conn.execute("DELETE FROM snapshot_pins WHERE expires_at < ?", (now,))
    return conn.changes()
