"""Quarantined orphan files (segment files the catalog does not know)."""
import time


def insert(conn, collection_id, original_path, quarantine_path, size_bytes, reason="unregistered_segment") -> int:
    conn.execute("INSERT INTO orphan_files(collection_id, original_path, quarantine_path, reason, size_bytes, "
                 "quarantined_at) VALUES (?, ?, ?, ?, ?, ?)",
                 (collection_id, original_path, quarantine_path, reason, size_bytes, int(time.time())))
    return conn.last_insert_rowid()


def usage(conn) -> tuple[int, int]:
    """(files, bytes) of quarantined files not yet deleted, across all collections."""
    n, b = conn.execute("SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM orphan_files "
                        "WHERE deleted_at IS NULL").fetchone()
    return n, b


def live(conn) -> list[dict]:
    """Undeleted orphans, oldest first."""
    cur = conn.execute("SELECT id, quarantine_path, size_bytes, quarantined_at FROM orphan_files "
                       "WHERE deleted_at IS NULL ORDER BY quarantined_at, id")
    return [{"id": r[0], "quarantine_path": r[1], "size_bytes": r[2], "quarantined_at": r[3]} for r in cur]


def mark_deleted(conn, orphan_id: int, reason: str) -> None:
    conn.execute("UPDATE orphan_files SET deleted_at = ?, deleted_reason = ? WHERE id = ?",
                 (int(time.time()), reason, orphan_id))
