"""Deletes and purge (CONTRACT.md D40).

Delete: one catalog transaction records the ids under a new lsn (catalog/deletes.py); its
after-commit step, on the writer thread before the caller is released, takes them out of every
tier (state.SegmentSet.delete) and publishes the lsn to the query workers. So a delete is durable
and visible to the next query, in this process and the others, when it returns; it never resurfaces,
because every segment handle and hot row the segment set publishes later (a reload, a checkpoint or
compaction output built from older reads) is masked by the deleted ids. Checkpoint and compaction
write deleted rows as tombstones (zero vector, no metadata), so their payloads leave the segment
files as the files are rewritten.

Purge (`Engine.compact(purge=True)`), the urgent-takedown path, makes that happen now for every
delete acknowledged before it starts:
  1. checkpoint until no deleted row is pending in the WAL (its payload then lives only in a
     segment, as a tombstone, and in the WAL row);
  2. rewrite every segment whose file still holds a deleted row live (a one-input compaction at the
     segment's own level), and delete the obsolete files (unless a running snapshot pins them);
  3. erase the WAL rows' vectors and metadata; the catalog runs with secure_delete, so the freed
     bytes are zeroed (a catalog from before that is vacuumed once);
  4. delete the quarantined files (orphans from old crashes) and the previous state a restore
     left in tmp/restore_backup_* (both may hold old rows); snapshots/ is kept (D40);
  5. TRUNCATE-checkpoint the SQLite WAL, so no older page image survives in the -wal file.
Every step is durable before the next; a crash in between leaves the deletes in force, and the
next purge finishes the work.
"""
import logging
import os
import shutil
import time

import numpy as np

from vibrato.catalog import deletes as del_sql, orphans
from vibrato.engine.faults import fault_point
from vibrato.engine.state import Counter
from vibrato.engine.validation import check_delete
from vibrato.errors import StorageError
from vibrato.ids import job_id as new_id

log = logging.getLogger("vibrato.engine")

TRUNCATE_WAIT_SECS = 30.0  # a purge waits this long for readers to leave the SQLite WAL
MAX_PURGE_CHECKPOINTS = 10_000


# ------------------------------------------------------------------------------------------ delete
def delete(engine, ids=None, flt=None) -> dict:
    """{"deleted": n, "lsn": lsn or None}: see the module docstring."""
    req = check_delete(ids, flt, engine.config.limits)
    cid = engine.cid

    def txn(conn):
        if req.ids is not None:
            found = del_sql.existing_live(conn, cid, req.ids)
        else:
            found = _matching(engine, conn, req)
        if found.shape[0] == 0:
            return found, None
        return found, del_sql.record(conn, cid, found)

    def apply(result):
        found, lsn = result
        if lsn is None:
            return
        fault_point("delete:committed")
        try:
            engine.segment_set.delete(found)
            if engine.shared_state is not None:
                engine.shared_state.publish_lsn(lsn)  # before the acknowledgement
        except Exception as exc:  # noqa: BLE001 - durable already: degrade, a restart reapplies it
            log.exception("a committed delete could not be applied to the searchable tiers")
            engine.add_blocker(f"deletes out of step with the catalog after {exc!r}; restart to reapply them")
        engine.counters.add(Counter.DELETE_VECTORS, int(found.shape[0]))

    found, lsn = engine.catalog.write(txn, after_commit=apply)
    return {"deleted": int(found.shape[0]), "lsn": lsn}


def _matching(engine, conn, req) -> np.ndarray:
    """Live ids matching a delete filter: source_file from the catalog's index, the query clauses from
    the filter index; both when both are given."""
    ids = None
    if req.source_files is not None:
        ids = del_sql.ids_for_sources(conn, engine.cid, req.source_files)
    if req.flt is not None:
        allowed = engine.segment_set.filters.evaluate(req.flt)
        matched = allowed.ids_in(0, allowed.n)
        ids = matched if ids is None else np.intersect1d(ids, matched, assume_unique=True)
        # the filter index knows nothing of deletes committed earlier in this same group
        ids = del_sql.existing_live(conn, engine.cid, ids) if ids.shape[0] else ids
    return np.asarray(ids, dtype=np.int64)


# ------------------------------------------------------------------------------------------ purge
def purge(engine, progress=None) -> dict:
    """Erase the payloads of every delete acknowledged so far (module docstring). Returns details."""
    from vibrato.engine import checkpoint as _checkpoint
    from vibrato.engine import compaction as _compaction
    from vibrato.engine import pipeline
    from vibrato.engine.maintenance import delete_quarantined, gc_obsolete

    t0 = time.monotonic()
    cat, cid = engine.catalog, engine.cid
    ids = cat.read(del_sql.unpurged, cid)
    out = {"purged_ids": 0, "checkpoints": 0, "segments_rewritten": [], "obsolete_files_deleted": 0,
           "quarantine_files_deleted": 0, "vacuumed": False}

    # 1. no deleted row left pending in the WAL
    while ids.shape[0] and cat.read(del_sql.pending_among, cid, ids).shape[0]:
        if out["checkpoints"] >= MAX_PURGE_CHECKPOINTS:
            raise StorageError("purge: deleted rows are still pending after "
                               f"{MAX_PURGE_CHECKPOINTS} checkpoints; retry")
        res = _checkpoint.run(engine)
        out["checkpoints"] += 1
        if res["state"] == "idle":
            break
    fault_point("purge:checkpointed")

    # 2. rewrite every segment file that still holds a deleted row
    with engine.compaction_lock:
        doomed = [h for h in engine.segment_set.handles if h.on_disk_live(ids).shape[0]] if ids.shape[0] else []
        for i, h in enumerate(doomed):
            if progress is not None:
                progress("purge: rewriting segments", i, len(doomed))
            job = _compaction.Compaction(engine, new_id("cmp"), [h], h.level)
            pipeline.run(engine, job, background=False, fault=fault_point)
            out["segments_rewritten"].append(h.id)
        out["obsolete_files_deleted"] = gc_obsolete(engine)
    if progress is not None and doomed:
        progress("purge: rewriting segments", len(doomed), len(doomed))
    fault_point("purge:rewritten")

    # 3. erase the catalog's copies
    if ids.shape[0]:
        still = cat.read(del_sql.pending_among, cid, ids)  # only when ingest outran the checkpoints
        erase = np.setdiff1d(ids, still, assume_unique=True)
        out["purged_ids"] = cat.write(del_sql.erase_payloads, cid, erase)
    fault_point("purge:erased")
    if cat.read(del_sql.needs_vacuum):
        cat.vacuum()
        cat.write(del_sql.clear_vacuum_flag)
        out["vacuumed"] = True

    # 4. quarantined orphans and a restore's backup may hold rows from before
    for o in cat.read(orphans.live):
        if o["id"] not in engine.housekeeping.unsafe_orphans and delete_quarantined(engine, o, "purge"):
            out["quarantine_files_deleted"] += 1
    out["restore_backups_deleted"] = _remove_restore_backups(engine.config.tmp_dir)

    # 5. no older page image left in the SQLite WAL
    _truncate_wal(cat)
    out["seconds"] = round(time.monotonic() - t0, 3)
    log.info("purge: %d ids erased, %d segments rewritten, %d checkpoints", out["purged_ids"],
             len(out["segments_rewritten"]), out["checkpoints"])
    return out


def _remove_restore_backups(tmp_dir) -> int:
    """Delete tmp/restore_backup_* (the data a restore replaced); symlinks are removed, never followed."""
    from vibrato.datadir import fsync_dir
    from vibrato.engine.snapshot import BACKUP_PREFIX

    n = 0
    for entry in os.scandir(tmp_dir):
        if entry.name.startswith(BACKUP_PREFIX):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            log.warning("purge: deleted %s (a restore's backup of the data it replaced)", entry.name)
            n += 1
    if n:
        fsync_dir(tmp_dir)
    return n


def _truncate_wal(cat):
    """A TRUNCATE checkpoint, retried while readers (this process's or a query worker's) hold the WAL."""
    deadline = time.monotonic() + TRUNCATE_WAIT_SECS
    while True:
        try:
            cat.checkpoint_wal("truncate")  # raises when readers kept it from completing
            return
        except StorageError as exc:
            if time.monotonic() > deadline:
                raise StorageError(f"purge: the catalog's WAL could not be truncated ({exc}); retry the purge")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ replay
def undo_for_replay(data_dir, conn, cid: str, target_lsn: int) -> int:
    """replay-to-lsn (server stopped, inside its transaction, after the WAL rows above the target are
    gone): forget the deletes above `target_lsn` whose row still has its payload (pending in the WAL
    with its vector, or live in its segment's file); the rest stay deleted, purged ones always.
    Returns how many deletes were forgotten."""
    from vibrato.catalog import segments as seg_sql
    from vibrato.engine.maintenance import segment_file
    from vibrato.segment import SegmentReader

    segs = sorted(seg_sql.list_by_state(conn, cid, seg_sql.SERVING_STATES), key=lambda r: r["vector_id_start"])
    starts = np.array([r["vector_id_start"] for r in segs], dtype=np.int64)
    readers = {}

    def restorable(vid: int) -> bool:
        row = conn.execute("SELECT vector IS NOT NULL, checkpointed_at IS NULL FROM wal_entries "
                           "WHERE collection_id = ? AND vector_id = ?", (cid, vid)).fetchone()
        if row is None:
            return False  # replayed away itself
        if row[1]:
            return bool(row[0])
        i = int(np.searchsorted(starts, vid, side="right")) - 1
        if i < 0 or vid > segs[i]["vector_id_end"]:
            return False
        seg = segs[i]
        if seg["id"] not in readers:
            readers[seg["id"]] = SegmentReader.open(segment_file(data_dir, seg["path"]))
        return bool(readers[seg["id"]].live[vid - seg["vector_id_start"]])

    try:
        return del_sql.undo_after_lsn(conn, cid, target_lsn, restorable)
    finally:
        for r in readers.values():
            r.close()
