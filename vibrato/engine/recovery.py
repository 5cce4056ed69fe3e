"""Startup recovery (CONTRACT.md §4.5), in this order:

  0. catalog path check: every segment row's path (any state) must read 'segments/NAME' and every
     live orphan's 'quarantine/NAME' (a tampered catalog, e.g. from a snapshot, is hostile input).
     A row that does not is a blocker and is skipped by every later step: its path is never
     unlinked, renamed or opened. A segment file that is a symlink is a blocker too, never followed.
  1. temp cleanup: stale `tmp/*.tmp` files from interrupted writes are removed
  2. orphan sweep: `segments/*.vdb` files unknown to the catalog go to `quarantine/` (caps: oldest
     quarantined files are evicted first; a file that still does not fit is deleted)
  3. quarantine TTL GC (maintenance.quarantine_gc; housekeeping runs it too)
  4. in-flight job reconciliation: a checkpoint/compaction whose output file validates is rolled
     forward (through the operation's own activation transaction); otherwise rolled back (output
     failed and removed, WAL rows stay pending, inputs back to active). Neither loses data, so
     neither is a readiness blocker.
  5. segment validation and state promotion/failure: structure plus every section checksum except
     the bulk vector section (start-up must not be a full scan, CONTRACT.md §5; the background scrubber
     verifies the vectors next and degrades readiness if they fail). An ACTIVE segment that fails is
     a blocker (its rows would be lost). Outputs of interrupted jobs are verified in full.
  6. load active segments; overlapping id ranges are an integrity blocker
  7. hot tail rebuild from the pending WAL, filter index from segment columns + hot rows
  8. GC of obsolete files; id coverage check: every id below the counter must be in an active
     segment, pending in the WAL, or removed by replay-to-lsn — anything else is a blocker.
"""
import logging
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vibrato.catalog import collections, deletes, jobs, orphans, segments as seg_sql, wal
from vibrato.datadir import UnsafePathError
from vibrato.engine import checkpoint, compaction
from vibrato.engine.maintenance import (delete_quarantined, gc_obsolete, quarantine_file, quarantine_gc, segment_file,
                                       unsafe_row_blocker)
from vibrato.engine.state import Counter
from vibrato.engine.tiers import SegmentHandle

log = logging.getLogger("vibrato.engine")

HOT_REBUILD_BATCH = 20_000
SEGMENT_STATES = ("building", "pending_activate", "active", "compacting", "obsolete", "failed", "deleted")


def recover(engine, progress=None) -> dict:
    cfg, cat = engine.config, engine.catalog
    t0 = time.monotonic()
    rep = {"temp_files_removed": 0, "quarantined": 0, "quarantine_evictions": 0, "gc_deleted": 0,
           "obsolete_deleted": 0, "jobs_rolled_forward": 0, "jobs_rolled_back": 0, "segments_failed": 0,
           "active_segments": 0, "hot_rows": 0, "blockers": []}
    step = _stepper(progress, 9)

    step("catalog path check")
    check_catalog_paths(engine, rep)
    step("temp cleanup")
    rep["temp_files_removed"] = clean_tmp(cfg)
    step("orphan sweep")
    sweep_orphans(engine, rep)
    step("quarantine gc")
    rep["gc_deleted"] = quarantine_gc(engine)
    step("job reconciliation")
    reconcile_jobs(engine, rep)
    step("segment validation")
    engine.segment_set.set_dead_ranges(cat.read(wal.tombstone_ranges, engine.cid))
    engine.segment_set.set_deleted(cat.read(deletes.all_ids, engine.cid))
    handles = validate_and_load(engine, rep, progress)
    step("hot tail rebuild")
    engine.segment_set.add(handles)
    rep["hot_rows"] = rebuild_hot(engine)
    step("obsolete gc")
    rep["obsolete_deleted"] = gc_obsolete(engine)
    step("coverage check")
    check_coverage(engine, rep)
    rep["active_segments"] = len(engine.segment_set.handles)
    rep["seconds"] = round(time.monotonic() - t0, 3)
    # the readiness report's summary (state.Readiness composes "recovered: ..." / "degraded: ...")
    rep["summary"] = (f"active_segments={rep['active_segments']}, quarantined={rep['quarantined']}, "
                      f"gc_deleted={rep['gc_deleted']}, obsolete_deleted={rep['obsolete_deleted']}")
    engine.counters.add(Counter.QUARANTINE_EVICTIONS, rep["quarantine_evictions"])
    engine.counters.add(Counter.OBSOLETE_FILES_DELETED, rep["obsolete_deleted"])
    return rep


def _stepper(progress, total):
    state = {"n": 0}

    def step(name):
        if progress is not None:
            progress(f"recovery: {name}", state["n"], total)
        state["n"] += 1
    return step


def check_catalog_paths(engine, rep):
    data_dir = engine.config.data_dir

    def read(conn):
        return (seg_sql.list_by_state(conn, engine.cid, SEGMENT_STATES), seg_sql.all_paths(conn),
                orphans.live(conn))

    rows, all_paths, live = engine.catalog.read(read)

    def trusted(resolve, rel, what) -> bool:
        try:
            resolve(data_dir, rel)
            return True
        except UnsafePathError as exc:
            rep["blockers"].append(unsafe_row_blocker(what, exc))
            return False

    for row in rows:
        if not trusted(segment_file, row["path"], f"segment {row['id']} ({row['state']})"):
            engine.housekeeping.unsafe_segments.add(row["id"])
    for path in sorted(all_paths - {r["path"] for r in rows}, key=repr):  # other collections' rows
        trusted(segment_file, path, "segment of another collection")
    for o in live:
        if not trusted(quarantine_file, o["quarantine_path"], f"orphan {o['id']}"):
            engine.housekeeping.unsafe_orphans.add(o["id"])


def clean_tmp(cfg) -> int:
    n = 0
    for entry in os.scandir(cfg.tmp_dir):
        if entry.is_file() and (entry.name.endswith(".tmp") or entry.name.startswith(".")):
            try:
                os.unlink(entry.path)
                n += 1
            except OSError as exc:
                log.warning("could not remove stale temp file %s: %s", entry.path, exc)
    return n


def sweep_orphans(engine, rep):
    cfg = engine.config
    known = engine.catalog.read(seg_sql.all_paths)
    for entry in sorted(os.scandir(cfg.segments_dir), key=lambda e: e.name):
        if not entry.name.endswith(".vdb"):
            continue
        rel = f"segments/{entry.name}"
        if rel in known:
            continue
        if entry.is_symlink():
            rep["blockers"].append(f"unsafe data dir: {rel} is a symlink (not followed, not moved): remove it")
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        size = entry.stat().st_size
        rep["quarantine_evictions"] += enforce_quarantine_cap(engine, incoming=size)
        files, used = engine.catalog.read(orphans.usage)
        if files + 1 > cfg.quarantine_max_files or used + size > cfg.quarantine_max_bytes:
            log.warning("quarantine full: deleting orphan %s (%d bytes)", rel, size)
            os.unlink(entry.path)
            continue
        qname = f"{int(time.time())}_{entry.name}"
        qpath = cfg.quarantine_dir / qname
        os.rename(entry.path, qpath)
        engine.catalog.write(orphans.insert, engine.cid, rel, f"quarantine/{qname}", size)
        rep["quarantined"] += 1
        log.warning("quarantined orphan segment file %s -> quarantine/%s", rel, qname)


def enforce_quarantine_cap(engine, incoming: int = 0) -> int:
    """Evict the oldest quarantined files until one more file of `incoming` bytes fits."""
    cfg = engine.config
    evicted = 0
    live = engine.catalog.read(orphans.live)
    files = len(live)
    used = sum(o["size_bytes"] for o in live)
    unsafe = engine.housekeeping.unsafe_orphans
    for o in live:
        if files + 1 <= cfg.quarantine_max_files and used + incoming <= cfg.quarantine_max_bytes:
            break
        if o["id"] in unsafe or not delete_quarantined(engine, o, "cap_evict"):
            continue
        files -= 1
        used -= o["size_bytes"]
        evicted += 1
    return evicted


def open_verified(engine, row, *, quick: bool = False):
    """Open a segment file, check it against its catalog row and verify its checksums (all of them,
    or with quick=True all but the vector section's). UnsafePathError: the row's path is not a
    plain name in segments/, or the file is a symlink (neither is followed, nor may be removed)."""
    from vibrato.segment import SegmentReader

    path = segment_file(engine.config.data_dir, row["path"])
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"segment file \"{row['path']}\" missing") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"segment file {row['path']!r} is a symlink; it is never followed")
    reader = SegmentReader.open(path, madvise=engine.config.vector_madvise_mode)
    if reader.dim != engine.dim:
        raise ValueError(f"dim {reader.dim} != collection dim {engine.dim}")
    if reader.id_start != row["vector_id_start"] or reader.count != row["row_count"]:
        raise ValueError(f"id range [{reader.id_start}, +{reader.count}) != catalog "
                         f"[{row['vector_id_start']}, +{row['row_count']})")
    if reader.level != row["level"]:
        raise ValueError(f"level {reader.level} != catalog level {row['level']}")
    reader.verify(skip_vectors=quick)
    return reader


def _remove_file(engine, rel_path):
    try:
        os.unlink(segment_file(engine.config.data_dir, rel_path))
    except FileNotFoundError:
        pass
    except UnsafePathError as exc:  # callers skip such rows first; never unlink outside segments/
        log.error("not removing %r: %s", rel_path, exc)


def _unsafe(engine, rep, row, exc):
    """A row whose file must not be touched: a blocker, and every later step skips the row."""
    engine.housekeeping.unsafe_segments.add(row["id"])
    rep["blockers"].append(unsafe_row_blocker(f"segment {row['id']} ({row['state']})", exc))


def reconcile_jobs(engine, rep):
    """Each in-flight job rolls forward through its operation's own activate transaction when its
    output validates, back through its roll_back otherwise (its output file removed)."""
    cat, cid = engine.catalog, engine.cid
    unsafe = engine.housekeeping.unsafe_segments
    for kind, output_of, inputs_of, forward, back in _JOB_KINDS:
        for job in cat.read(jobs.inflight, kind, cid):
            out_id, inputs = output_of(job), inputs_of(job)
            out = cat.read(seg_sql.find, out_id) if out_id else None
            if (out is not None and out["id"] in unsafe) or unsafe & set(inputs):
                continue  # left in flight: the blocker names it
            exc = None
            if out is not None:
                try:
                    open_verified(engine, out).close()
                except UnsafePathError as e:
                    _unsafe(engine, rep, out, e)
                    continue
                except Exception as e:  # noqa: BLE001 - any defect means: roll back
                    _remove_file(engine, out["path"])
                    exc = e
                else:
                    cat.write(forward, cid, job, out)
                    rep["jobs_rolled_forward"] += 1
                    continue
            cat.write(back, job, out, exc)
            rep["jobs_rolled_back"] += 1


def _recovered(job) -> dict:
    return {**job["details"], "phase": "completed", "recovered": True}


def _checkpoint_forward(conn, cid, job, out):
    checkpoint.activate(conn, cid, job["id"], out["id"], job["start_lsn"], job["end_lsn"], _recovered(job))


def _checkpoint_back(conn, job, out, exc):
    error = "segment row missing (rolled back)" if out is None else f"rolled back: {exc}"
    checkpoint.roll_back(conn, job["id"], None if out is None else out["id"], job["details"], error)


def _compaction_forward(conn, cid, job, out):
    compaction.activate(conn, job["id"], out["id"], job["input_segments"], _recovered(job))


def _compaction_back(conn, job, out, exc):
    compaction.roll_back(conn, job["id"], None if out is None else out["id"], job["input_segments"],
                         job["details"], "rolled back at recovery", seg_error="rolled back")


# (job table, its output segment id, its input segment ids, roll forward, roll back)
_JOB_KINDS = (
    ("checkpoint", lambda job: job["segment_id"], lambda job: (), _checkpoint_forward, _checkpoint_back),
    ("compaction", lambda job: job["output_segment_id"], lambda job: job["input_segments"],
     _compaction_forward, _compaction_back),
)


def validate_and_load(engine, rep, progress) -> list:
    """Validate every segment that should be (or become) active; returns loaded handles."""
    cat, cid = engine.catalog, engine.cid
    # Inputs left `compacting` without an in-flight job go back to active; leftovers in
    # building/pending_activate without a job are promoted if valid.
    rows = [r for r in cat.read(seg_sql.list_by_state, cid, ["active", "compacting", "building", "pending_activate"])
            if r["id"] not in engine.housekeeping.unsafe_segments]
    results = [None] * len(rows)

    def check(i):
        try:
            results[i] = ("ok", open_verified(engine, rows[i], quick=rows[i]["state"] == "active"))
        except Exception as exc:  # noqa: BLE001
            results[i] = ("bad", exc)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for n, _ in enumerate(pool.map(check, range(len(rows)))):
            if progress is not None:
                progress("recovery: verifying segments", n + 1, len(rows))
    handles = []
    for row, (status, value) in zip(rows, results):
        if status == "bad" and isinstance(value, UnsafePathError):
            _unsafe(engine, rep, row, value)
            continue
        if status == "bad":
            if row["state"] == "active" or row["state"] == "compacting":
                rep["blockers"].append(f"{'active' if row['state'] == 'active' else 'compacting'} segment "
                                       f"{row['id']} invalid: {value}")
            else:
                _remove_file(engine, row["path"])
            cat.write(seg_sql.set_state, row["id"], "failed", str(value))
            rep["segments_failed"] += 1
            continue
        if row["state"] != "active":
            cat.write(seg_sql.set_state, row["id"], "active")
            row = dict(row, state="active")
        handles.append(SegmentHandle(row, value, engine.segment_set.dead_ranges, engine.config.archive_rerank_factor))
        if row["state"] == "active":
            engine.housekeeping.unscrubbed.add(row["id"])
    handles.sort(key=lambda h: h.id_start)
    for a, b in zip(handles, handles[1:]):
        if b.id_start <= a.id_end:
            rep["blockers"].append(f"integrity: segments {a.id} [{a.id_start}, {a.id_end}] and {b.id} "
                                   f"[{b.id_start}, {b.id_end}] overlap")
    return handles


def rebuild_hot(engine) -> int:
    cat, cid = engine.catalog, engine.cid
    after, total = 0, 0
    while True:
        rows = cat.read(wal.pending, cid, after, HOT_REBUILD_BATCH)
        if not rows:
            break
        engine.segment_set.append_wal_rows(rows)
        after = int(rows[-1][0])
        total += len(rows)
    return total


def check_coverage(engine, rep):
    """Every id below the counter is in an active segment, pending in the WAL, or replayed away."""
    next_id = engine.catalog.read(collections.next_id, engine.cid)
    if next_id == 0:
        return
    covered = np.zeros(next_id, dtype=bool)
    for h in engine.segment_set.handles:
        lo, hi = h.id_start, min(h.id_end, next_id - 1)
        if lo <= hi:
            covered[lo:hi + 1] = True  # live rows and tombstone gap fillers alike
    hv = engine.segment_set.hot_view()
    for s in hv.slices:
        ids = s.chunk.ids[s.lo:s.hi]
        covered[ids[ids < next_id]] = True
    for lo, hi in engine.segment_set.dead_ranges:
        covered[lo:min(hi, next_id - 1) + 1] = True
    missing = np.flatnonzero(~covered)
    if missing.shape[0]:
        # report as ranges
        breaks = np.flatnonzero(np.diff(missing) != 1)
        starts = np.concatenate(([missing[0]], missing[breaks + 1]))
        ends = np.concatenate((missing[breaks], [missing[-1]]))
        spans = ", ".join(f"{a}..{b}" for a, b in list(zip(starts.tolist(), ends.tolist()))[:5])
        rep["blockers"].append(f"integrity: {missing.shape[0]} acknowledged ids are in no active segment "
                               f"and not pending in the WAL ({spans})")
