"""The one place SQLite connections are opened and configured (after apsw.bestpractice).

Writer: WAL, synchronous=FULL (an acknowledged commit survives power loss; throughput comes from
group commit, not from NORMAL), IMMEDIATE transactions, a 30 s busy timeout, journal_size_limit,
an explicit auto-checkpoint size. Readers: read-only, a busy timeout capped at the read timeout.
Both: foreign keys on, double-quoted strings off, query-planner optimisation, SQLite's log routed to
`logging`.

Files: the catalog is created 0600 before SQLite opens it, because SQLite gives -wal and -shm the
main file's mode; no connection follows a symlink (SQLITE_OPEN_NOFOLLOW).
"""
import logging
import os

import apsw
import apsw.bestpractice

from vibrato import datadir

log = logging.getLogger("vibrato.catalog")

_logging_configured = False


def _route_sqlite_log():
    global _logging_configured
    if not _logging_configured:
        apsw.bestpractice.library_logging()
        _logging_configured = True


def _precreate_private(path) -> None:
    """Create the catalog file 0600 (or tighten an existing one of ours), and its -wal/-shm."""
    os.close(datadir.open_private(path, os.O_RDWR | os.O_CREAT, "catalog"))
    for suffix in ("-wal", "-shm"):
        try:
            os.close(datadir.open_private(f"{path}{suffix}", os.O_RDONLY, "catalog"))
        except FileNotFoundError:
            pass


def open_writer(path: str, *, busy_timeout_ms: int = 30_000, wal_autocheckpoint_pages: int = 1000,
                journal_size_limit: int = 64 * 1024 * 1024) -> apsw.Connection:
    _route_sqlite_log()
    _precreate_private(path)
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
                           | apsw.SQLITE_OPEN_NOFOLLOW)
    conn.set_busy_timeout(busy_timeout_ms)
    conn.pragma("journal_mode", "wal")
    conn.pragma("synchronous", "FULL")
    conn.pragma("foreign_keys", "ON")
    conn.pragma("temp_store", "MEMORY")
    conn.pragma("journal_size_limit", journal_size_limit)
    # Freed content (a pruned blob, a purged payload) is overwritten with zeros, in the page and in
    # freelist pages, so a purge leaves no copy behind in the database file (CONTRACT.md D40).
    conn.pragma("secure_delete", 1)
    conn.wal_autocheckpoint(wal_autocheckpoint_pages)
    apsw.bestpractice.connection_dqs(conn)
    # optimize may ANALYZE at open (SQLite's advice: with analysis_limit). Under a small page cache:
    # after a bulk load its scan would otherwise leave ~15 MB of pages cached for good.
    conn.pragma("analysis_limit", 1000)
    conn.pragma("cache_size", -2000)
    apsw.bestpractice.connection_optimize(conn)
    conn.pragma("cache_size", -16000)  # 16 MB: appends and key-index probes; more only grows RSS
    conn.transaction_mode = "IMMEDIATE"
    return conn


def open_reader(path: str, *, busy_timeout_ms: int) -> apsw.Connection:
    _route_sqlite_log()
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_NOFOLLOW)
    conn.set_busy_timeout(max(1, busy_timeout_ms))
    conn.pragma("foreign_keys", "ON")
    conn.pragma("temp_store", "MEMORY")
    apsw.bestpractice.connection_dqs(conn)
    return conn
