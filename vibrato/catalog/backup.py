"""Catalog copies for snapshots: the online backup, making the copy self-contained, and reading a
snapshot's copy back (which is hostile input until restore has validated it).

A snapshot's catalog must describe only data the snapshot holds. A checkpoint or compaction that is
in flight when the backup runs is not part of it: its output segment row (`building` or
`pending_activate`, file not copied) and its job row are dropped, and the compaction's inputs
(`compacting`, real data whose files are copied) become `active` again. Nothing is lost: a
checkpoint's WAL rows are marked checkpointed only in the transaction that activates its segment,
so in the copy they are still pending and the restored engine replays them into the hot tier.
Failed segment rows (files already removed) and snapshot pins are live-dir history and go too.
"""
import os

import apsw

from vibrato.catalog import jobs, segments as seg_sql
from vibrato.catalog.schema import APPLICATION_ID


def copy_for_snapshot(src_path, dest_path, collection_id: str, *, file_mode: int = 0o600,
                      busy_timeout_ms: int = 30_000) -> list[dict]:
    """Back up the catalog at src_path into a new file dest_path (one consistent read, including the
    SQLite WAL tail), strip in-flight state, and return the collection's segment rows whose files the
    snapshot must hold, i.e. its active rows in the copy."""
    fd = os.open(os.fspath(dest_path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 file_mode)  # SQLite keeps the mode of an existing file (journals get it too)
    os.close(fd)
    src = apsw.Connection(str(src_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        src.set_busy_timeout(busy_timeout_ms)
        dest = apsw.Connection(str(dest_path), flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_NOFOLLOW)
        try:
            with dest.backup("main", src, "main") as b:
                b.step(-1)
            with dest:
                _strip_inflight(dest)
                rows = seg_sql.list_by_state(dest, collection_id, ("active",))
            dest.pragma("journal_mode", "delete")  # a single self-contained file
        finally:
            dest.close()
    finally:
        src.close()
    return rows


def _strip_inflight(conn) -> None:
    marks = ",".join("?" * len(jobs.INFLIGHT))
    conn.execute("DELETE FROM snapshot_pins")
    conn.execute(f"DELETE FROM checkpoint_jobs WHERE state IN ({marks})", jobs.INFLIGHT)
    conn.execute(f"DELETE FROM compaction_jobs WHERE state IN ({marks})", jobs.INFLIGHT)
    conn.execute("DELETE FROM segments WHERE state IN ('building', 'pending_activate', 'failed')")
    conn.execute("UPDATE segments SET state = 'active' WHERE state = 'compacting'")


def read_copy(path) -> dict:
    """The file references of a snapshot's catalog copy, read without writing anything:
    {'segments': [(id, state, path)] in every state, 'quarantine': [quarantine_path]}.
    Raises ValueError when the file is not a readable Vibrato catalog."""
    uri = "file:" + os.path.abspath(os.fspath(path)).replace("?", "%3f").replace("#", "%23") + "?immutable=1"
    try:
        conn = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI
                               | apsw.SQLITE_OPEN_NOFOLLOW)
    except apsw.Error as exc:
        raise ValueError(f"not a readable SQLite file: {exc}") from None
    try:
        app_id = conn.pragma("application_id")
        if app_id != APPLICATION_ID:
            raise ValueError(f"not a Vibrato catalog (application_id {app_id:#x})")
        segs = [tuple(r) for r in conn.execute("SELECT id, state, path FROM segments ORDER BY id")]
        quarantine = [r[0] for r in conn.execute("SELECT quarantine_path FROM orphan_files")]
    except apsw.Error as exc:
        raise ValueError(f"not a readable catalog: {exc}") from None
    finally:
        conn.close()
    return {"segments": segs, "quarantine": quarantine}
