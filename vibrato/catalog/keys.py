"""API key records. Hashing and token formats live in vibrato.apikeys; only SQL is here."""
import time

from vibrato.errors import NotFoundError


def create(conn, key_id: str, name: str, key_hash: str, roles: str) -> None:
    conn.execute("INSERT INTO api_keys(id, name, key_hash, roles, created_at, revoked_at, hash_version) "
                 "VALUES (?, ?, ?, ?, ?, NULL, 2)", (key_id, name, key_hash, roles, int(time.time())))


def revoke(conn, key_id: str) -> bool:
    """Mark the key revoked now; returns whether a live key with that id existed."""
    conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                 (int(time.time()), key_id))
    return conn.changes() > 0


def get(conn, key_id: str) -> dict:
    row = conn.execute("SELECT id, name, key_hash, roles, created_at, revoked_at, hash_version FROM api_keys "
                       "WHERE id = ?", (key_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"api key '{key_id}' not found")
    return _row(row)


def list_all(conn) -> list[dict]:
    return [_row(r) for r in conn.execute(
        "SELECT id, name, key_hash, roles, created_at, revoked_at, hash_version FROM api_keys ORDER BY created_at, id")]


def count_active(conn) -> int:
    return conn.execute("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL").fetchone()[0]


def _row(r) -> dict:
    return {"id": r[0], "name": r[1], "key_hash": r[2], "roles": r[3], "created_at": r[4], "revoked_at": r[5],
            "hash_version": r[6]}
