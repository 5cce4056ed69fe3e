"""Housekeeping that keeps every store bounded (CONTRACT.md D24), run by the background loop.

* obsolete segment files are deleted once no snapshot pins them (queries that still hold one keep
  reading it: an unlinked file stays mapped); their rows become `deleted` and are purged later;
* quarantined orphan files past `orphan_ttl_hours` are deleted (also at start-up, by recovery);
* checkpointed vector blobs in the WAL are dropped after `wal_retention_secs` (ids, metadata and
  idempotency keys stay);
* finished job rows, deleted segment rows and audit rows past their retention are purged;
* a path read from the catalog is trusted only as a plain name inside segments/ (quarantine/): a row
  naming anything else is never acted on and degrades readiness (`unsafe_row_blocker`);
* segments whose vectors were not checksummed at start-up are verified first, one per pass; after
  that one active segment per minute is re-verified in rotation; a failure degrades readiness live.
"""
import logging
import os
import time
from dataclasses import dataclass, field

from vibrato.catalog import audit, jobs, orphans, segments as seg_sql, wal
from vibrato.datadir import UnsafePathError, resolve_rel
from vibrato.engine.memory import release_free_memory
from vibrato.engine.state import Counter

log = logging.getLogger("vibrato.engine")

JOB_RETENTION_SECS = 7 * 86400
SCRUB_EVERY_SECS = 60.0


@dataclass
class Housekeeping:
    """Maintenance bookkeeping: recovery fills the sets, the housekeeping loop works through them."""
    last_purge: float = 0.0   # time.monotonic() of the last purge of finished job/segment/audit rows
    last_scrub: float = 0.0   # ... and of the last scrub pass
    scrub_pos: int = 0        # rotation position over the active segments
    unscrubbed: set = field(default_factory=set)       # active segments not checksummed since start-up
    unsafe_segments: set = field(default_factory=set)  # segment ids whose row names an untrusted path:
    unsafe_orphans: set = field(default_factory=set)   # ... and orphan ids: never acted on


def segment_file(data_dir, rel):
    """The file of a segment row: `rel` must read 'segments/NAME' (UnsafePathError otherwise)."""
    return resolve_rel(data_dir, rel, "segments", "segment path")


def quarantine_file(data_dir, rel):
    """The file of an orphan row: `rel` must read 'quarantine/NAME' (UnsafePathError otherwise)."""
    return resolve_rel(data_dir, rel, "quarantine", "quarantine path")


def unsafe_row_blocker(what: str, exc: Exception) -> str:
    return (f"unsafe catalog row: {what}: {exc}; its file was not touched: restore the catalog from a "
            f"trusted snapshot or correct the row")


def gc_obsolete(engine) -> int:
    """Delete the files of obsolete segments that no snapshot has pinned. Returns files deleted."""
    cfg = engine.config
    unsafe = engine.housekeeping.unsafe_segments

    def read(conn):
        return seg_sql.list_by_state(conn, engine.cid, ["obsolete"]), seg_sql.pinned_segment_ids(conn)

    rows, pinned = engine.catalog.read(read)
    done = []
    for row in rows:
        if row["id"] in pinned or row["id"] in unsafe:
            continue
        try:
            path = segment_file(cfg.data_dir, row["path"])
        except UnsafePathError as exc:
            log.error("obsolete segment %s: %s; not deleted", row["id"], exc)
            unsafe.add(row["id"])
            engine.add_blocker(unsafe_row_blocker(f"segment {row['id']} (obsolete)", exc))
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not delete obsolete segment %s: %s", row["path"], exc)
            continue
        done.append(row["id"])
    if done:
        engine.catalog.write(seg_sql.set_states, done, "deleted")
        engine.counters.add(Counter.OBSOLETE_FILES_DELETED, len(done))
    return len(done)


def quarantine_gc(engine) -> int:
    """Delete quarantined files older than orphan_ttl_hours (rows kept, marked deleted). Returns files deleted."""
    cfg = engine.config
    cutoff = time.time() - cfg.orphan_ttl_hours * 3600
    n = 0
    unsafe = engine.housekeeping.unsafe_orphans
    for o in engine.catalog.read(orphans.live):
        if o["quarantined_at"] < cutoff and o["id"] not in unsafe and delete_quarantined(engine, o, "ttl_gc"):
            n += 1
    return n


def delete_quarantined(engine, orphan: dict, reason: str) -> bool:
    """Delete one quarantined file and mark its row deleted with `reason` (ttl_gc, cap_evict).
    False, touching nothing, when the row's path is not a plain name in quarantine/."""
    try:
        os.unlink(quarantine_file(engine.config.data_dir, orphan["quarantine_path"]))
    except FileNotFoundError:
        pass
    except UnsafePathError as exc:
        log.error("orphan %s: %s; not %s", orphan["id"], exc, "evicted" if reason == "cap_evict" else "deleted")
        return False
    engine.catalog.write(orphans.mark_deleted, orphan["id"], reason)
    return True


def run_once(engine):
    now = int(time.time())
    cfg = engine.config
    gc_obsolete(engine)
    expired = quarantine_gc(engine)
    if expired:
        log.info("deleted %d quarantined file(s) older than %d h", expired, cfg.orphan_ttl_hours)
    pruned = engine.catalog.write(wal.prune_vectors, engine.cid, now - cfg.wal_retention_secs)
    if pruned:
        engine.counters.add(Counter.WAL_ROWS_PRUNED, pruned)
    state = engine.housekeeping
    if time.monotonic() - state.last_purge > 3600:
        state.last_purge = time.monotonic()

        def purge(conn):
            jobs.purge_finished(conn, now - JOB_RETENTION_SECS)
            seg_sql.purge_deleted(conn, now - JOB_RETENTION_SECS)
            seg_sql.purge_expired_pins(conn, now)
            audit.prune(conn, now - cfg.audit_retention_days * 86400)
        engine.catalog.write(purge)
    if state.unscrubbed or time.monotonic() - state.last_scrub > SCRUB_EVERY_SECS:
        state.last_scrub = time.monotonic()
        scrub_one(engine)
    release_free_memory()


def scrub_one(engine):
    """Verify one active segment's checksums: an unscrubbed one first, else the next in rotation."""
    state = engine.housekeeping
    segs = engine.segment_set.handles
    if not segs:
        state.unscrubbed.clear()
        return
    pending = [s for s in segs if s.id in state.unscrubbed]
    if pending:
        seg = pending[0]
    else:
        state.unscrubbed.clear()  # the rest were compacted away unverified: their outputs were verified
        seg = segs[state.scrub_pos % len(segs)]
        state.scrub_pos += 1
    state.unscrubbed.discard(seg.id)
    try:
        seg.reader.verify(evict=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file cannot be trusted
        log.error("scrub: segment %s failed verification: %s", seg.id, exc)
        engine.add_blocker(f"active segment {seg.id} invalid: {exc}")
