"""Checkpoint and compaction job rows. States: building -> pending_activate -> completed | failed."""
import json
import time

INFLIGHT = ("building", "pending_activate")


def create_checkpoint(conn, job_id, collection_id, start_lsn, end_lsn, segment_id, details) -> None:
    now = int(time.time())
    conn.execute("INSERT INTO checkpoint_jobs(id, collection_id, state, start_lsn, end_lsn, segment_id, details_json, "
                 "created_at, updated_at) VALUES (?, ?, 'building', ?, ?, ?, ?, ?, ?)",
                 (job_id, collection_id, start_lsn, end_lsn, segment_id, json.dumps(details, sort_keys=True),
                  now, now))


def create_compaction(conn, job_id, collection_id, output_segment_id, input_segment_ids, details) -> None:
    now = int(time.time())
    conn.execute("INSERT INTO compaction_jobs(id, collection_id, state, output_segment_id, input_segments_json, "
                 "details_json, created_at, updated_at) VALUES (?, ?, 'building', ?, ?, ?, ?, ?)",
                 (job_id, collection_id, output_segment_id, json.dumps(list(input_segment_ids)),
                  json.dumps(details, sort_keys=True), now, now))


def set_state(conn, table: str, job_id: str, state: str, details: dict | None = None) -> None:
    table = _table(table)
    if details is None:
        conn.execute(f"UPDATE {table} SET state = ?, updated_at = ? WHERE id = ?", (state, int(time.time()), job_id))
    else:
        conn.execute(f"UPDATE {table} SET state = ?, details_json = ?, updated_at = ? WHERE id = ?",
                     (state, json.dumps(details, sort_keys=True), int(time.time()), job_id))


_COLUMNS = {
    "checkpoint_jobs": ("id", "collection_id", "state", "start_lsn", "end_lsn", "segment_id", "details_json",
                        "created_at", "updated_at"),
    "compaction_jobs": ("id", "collection_id", "state", "output_segment_id", "input_segments_json", "details_json",
                        "created_at", "updated_at"),
}


def inflight(conn, table: str, collection_id: str) -> list[dict]:
    table = _table(table)
    names = _COLUMNS[table]
    cur = conn.execute(f"SELECT {', '.join(names)} FROM {table} WHERE collection_id = ? AND state IN (?, ?) "
                       "ORDER BY updated_at, id", (collection_id, *INFLIGHT))
    rows = []
    for r in cur:
        row = dict(zip(names, r))
        row["details"] = json.loads(row.pop("details_json") or "{}")
        if "input_segments_json" in row:
            row["input_segments"] = json.loads(row.pop("input_segments_json") or "[]")
        rows.append(row)
    return rows


def count_inflight(conn, table: str, collection_id: str) -> int:
    table = _table(table)
    return conn.execute(f"SELECT COUNT(*) FROM {table} WHERE collection_id = ? AND state IN (?, ?)",
                        (collection_id, *INFLIGHT)).fetchone()[0]


def purge_finished(conn, older_than: int) -> int:
    n = 0
    for table in ("checkpoint_jobs", "compaction_jobs"):
        conn.execute(f"DELETE FROM {table} WHERE state IN ('completed', 'failed') AND updated_at < ?", (older_than,))
        n += conn.changes()
    return n


def _table(name: str) -> str:
    # Table names cannot be bound parameters; only these two literals are ever interpolated.
    if name in ("checkpoint", "checkpoint_jobs"):
        return "checkpoint_jobs"
    if name in ("compaction", "compaction_jobs"):
        return "compaction_jobs"
    raise ValueError(f"unknown job table {name!r}")
