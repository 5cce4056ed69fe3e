"""Collections and their id counters."""
import time

from vibrato.errors import NotFoundError, VibratoError
from vibrato.ids import long_id


class CollectionDimMismatch(VibratoError):
    code = "dimension_mismatch"
    status = 500


def get(conn, name: str) -> dict:
    row = conn.execute("SELECT id, name, dim, created_at FROM collections WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NotFoundError(f"collection '{name}' not found")
    return {"id": row[0], "name": row[1], "dim": row[2], "created_at": row[3]}


def ensure(conn, name: str, dim: int) -> dict:
    """Get the collection, creating it with `dim` if absent; a different stored dim is an error."""
    row = conn.execute("SELECT id, name, dim, created_at FROM collections WHERE name = ?", (name,)).fetchone()
    if row is not None:
        if row[2] != dim:
            raise CollectionDimMismatch(f"collection '{name}' exists with dim {row[2]}, expected {dim}")
        return {"id": row[0], "name": row[1], "dim": row[2], "created_at": row[3]}
    cid = long_id("col")
    now = int(time.time())
    conn.execute("INSERT INTO collections(id, name, dim, created_at) VALUES (?, ?, ?, ?)", (cid, name, dim, now))
    conn.execute("INSERT INTO vector_id_counters(collection_id, next_id) VALUES (?, 0)", (cid,))
    return {"id": cid, "name": name, "dim": dim, "created_at": now}


def next_id(conn, collection_id: str) -> int:
    row = conn.execute("SELECT next_id FROM vector_id_counters WHERE collection_id = ?", (collection_id,)).fetchone()
    return 0 if row is None else row[0]


def allocate_ids(conn, collection_id: str, n: int) -> int:
    """Reserve n consecutive ids; returns the first. Never goes backwards (ids are never reused)."""
    row = conn.execute("UPDATE vector_id_counters SET next_id = next_id + ? WHERE collection_id = ? "
                       "RETURNING next_id", (n, collection_id)).fetchone()
    if row is None:
        raise NotFoundError(f"collection id '{collection_id}' has no id counter")
    return row[0] - n
