"""The SQLite catalog (APSW). The only package that runs SQL.

`Catalog` owns the connections (one writer thread with group commit, read-only readers); the
modules below hold the SQL for one table family each and take a connection as first argument, so
several of them compose inside one transaction: ``catalog.write(lambda c: (segments.set_state(c, ..),
wal.mark_checkpointed(c, ..)))``.
"""
from vibrato.catalog import audit, collections, jobs, keys, orphans, segments, wal
from vibrato.catalog.db import Catalog
from vibrato.catalog.schema import SchemaError

__all__ = ["Catalog", "SchemaError", "audit", "collections", "jobs", "keys", "orphans", "segments", "wal"]
