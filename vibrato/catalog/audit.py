"""Audit rows: one per request of interest, written in batches by the server's audit writer."""

COLUMNS = ("ts", "request_id", "api_key_id", "endpoint", "action", "status_code", "latency_ms", "client_ip",
           "details_json", "flushed_at")


def insert_many(conn, events: list) -> None:
    """events: tuples in COLUMNS order (ts is the request time; flushed_at the write time)."""
    conn.executemany("INSERT INTO audit_events(ts, request_id, api_key_id, endpoint, action, status_code, latency_ms, "
                     "client_ip, details_json, flushed_at) VALUES (?,?,?,?,?,?,?,?,?,?)", events)


def prune(conn, older_than: int, limit: int = 50_000) -> int:
    conn.execute("DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events WHERE ts < ? LIMIT ?)",
                 (older_than, limit))
    return conn.changes()


def recent(conn, limit: int = 100) -> list[dict]:
    cur = conn.execute("SELECT id, " + ", ".join(COLUMNS) + " FROM audit_events ORDER BY id DESC LIMIT ?", (limit,))
    return [dict(zip(("id",) + COLUMNS, r)) for r in cur]
