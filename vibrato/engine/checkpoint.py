"""Checkpoint: the oldest hot rows (un-checkpointed WAL) become one L0 segment.

Durable order (each step is safe to crash after; recovery rolls forward or back, CONTRACT.md D4):
  1. job row `building` (start/end LSN, segment id) ............................ catalog commit
  2. write tmp/<seg>.vdb.tmp, fsync the file
  3. segment row `building` (path relative to the data dir) .................... catalog commit
  4. rename into segments/, fsync segments/
  5. open and validate the file (structure + checksums), load its graph
  6. ONE transaction: segment `active`, WAL rows [start, end] checkpointed, job `completed`
  7. publish the segment to queries and hide the hot rows (one swap under the state lock)
A failure before 6 leaves the WAL rows pending and the hot tier untouched; the partial file is
removed and the job/segment rows are marked failed. After 6 only in-memory steps remain.
Ingest continues throughout (it only appends to the hot tier; CONTRACT.md D5).
"""
import logging
import os
import time

import numpy as np

from vibrato.catalog import jobs, segments as seg_sql, wal
from vibrato.engine.faults import fault_point
from vibrato.engine.tiers import SegmentHandle
from vibrato.ids import job_id as new_id

log = logging.getLogger("vibrato.engine")


def run(engine, *, background: bool = False) -> dict:
    cfg = engine.config
    with engine.checkpoint_lock:
        jid = new_id("chk")
        with engine._state_lock:
            ids, lsns, vectors, metas = engine.hot.head(cfg.checkpoint_max_rows)
        if ids.shape[0] == 0:
            return {"job_id": jid, "state": "idle", "details": {"reason": "no_pending_wal"}}
        start_lsn, end_lsn = int(lsns[0]), int(lsns[-1])
        seg_id = new_id("seg")
        rel_path = f"segments/{seg_id}.vdb"
        final = cfg.data_dir / rel_path
        tmp = cfg.tmp_dir / f"{seg_id}.vdb.tmp"
        details = {"phase": "start", "segment_id": seg_id, "start_lsn": start_lsn, "end_lsn": end_lsn}
        engine.catalog.write(jobs.create_checkpoint, jid, engine.cid, start_lsn, end_lsn, seg_id, details)
        registered = False
        try:
            data = build_segment_data(engine, 0, ids, vectors, metas, throttle=background)
            fault_point("checkpoint:before_write")
            info = write_tmp(engine, tmp, data, throttle=background)
            fault_point("checkpoint:segment_written")
            row = {"id": seg_id, "collection_id": engine.cid, "level": 0, "kind": "raw", "path": rel_path,
                   "row_count": data.vectors.shape[0], "live_count": int(data.live.sum()),
                   "vector_id_start": int(ids[0]), "vector_id_end": int(ids[-1]), "start_lsn": start_lsn,
                   "end_lsn": end_lsn, "state": "building", "size_bytes": info_size(info, tmp)}

            def register(conn):
                seg_sql.insert(conn, row)
                jobs.set_state(conn, "checkpoint", jid, "building",
                               {**details, "phase": "segment_written", "rows": row["row_count"]})
            engine.catalog.write(register)
            registered = True
            fault_point("checkpoint:registered")
            publish_file(tmp, final)
            fault_point("checkpoint:renamed")
            handle = load_handle(engine, row, final)
            fault_point("checkpoint:loaded")

            def activate(conn):
                seg_sql.set_state(conn, seg_id, "active")
                marked = wal.mark_checkpointed(conn, engine.cid, start_lsn, end_lsn)
                if marked != ids.shape[0]:
                    raise RuntimeError(f"checkpoint {jid}: expected {ids.shape[0]} pending WAL rows in "
                                       f"[{start_lsn}, {end_lsn}], found {marked}")
                jobs.set_state(conn, "checkpoint", jid, "completed",
                               {"phase": "completed", "segment_id": seg_id, "start_lsn": start_lsn,
                                "end_lsn": end_lsn, "rows": row["row_count"]})
            engine.catalog.write(activate)
        except BaseException as exc:
            engine.bump("checkpoint_failures_total")
            _fail(engine, jid, seg_id, registered, tmp, final, details, exc)
            raise
        # Point of no return: the segment is durable and active; publishing it is in memory only and
        # happens even if something raises here, so memory never disagrees with the catalog.
        try:
            fault_point("checkpoint:activated")
        finally:
            engine.publish(add=[handle], drop_hot_through=end_lsn)
        engine.bump("checkpoint_total")
        log.info("checkpoint %s: %d rows (lsn %d..%d) -> %s", jid, row["row_count"], start_lsn, end_lsn, seg_id)
        return {"job_id": jid, "state": "completed",
                "details": {"start_lsn": start_lsn, "end_lsn": end_lsn, "rows": row["row_count"],
                            "segment_id": seg_id}}


def _fail(engine, jid, seg_id, registered, tmp, final, details, exc):
    log.error("checkpoint %s failed: %s", jid, exc)
    for path in (tmp, final):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove %s: %s", path, e)

    def mark(conn):
        jobs.set_state(conn, "checkpoint", jid, "failed", {**details, "phase": "failed", "error": str(exc)})
        if registered:
            seg_sql.set_state(conn, seg_id, "failed", error=str(exc))
    try:
        engine.catalog.write(mark)
    except Exception as e:  # noqa: BLE001 - recovery reconciles the job at the next start
        log.error("could not record checkpoint failure: %s", e)


def densify(id_start: int, ids: np.ndarray, vectors: np.ndarray, metas: list, dim: int):
    """Rows for every id in [ids[0], ids[-1]]: gaps become tombstones (zero vector, live=False)."""
    n = int(ids[-1]) - id_start + 1
    rows = ids - id_start
    out_vec = np.zeros((n, dim), dtype=np.float32)
    out_vec[rows] = vectors
    live = np.zeros(n, dtype=bool)
    live[rows] = True
    start = np.zeros(n, dtype=np.uint32)
    duration = np.zeros(n, dtype=np.uint32)
    bpm = np.zeros(n, dtype=np.float32)
    sources = [""] * n
    tags = [[] for _ in range(n)]
    for r, m in zip(rows.tolist(), metas):
        sources[r], start[r], duration[r], bpm[r], tags[r] = m[0], m[1], m[2], m[3], list(m[4])
    return out_vec, live, start, duration, bpm, sources, tags


def build_segment_data(engine, level: int, ids, vectors, metas, throttle: bool):
    from vibrato.index import HnswIndex
    from vibrato.segment import SegmentData

    cfg = engine.config
    vec, live, start, duration, bpm, sources, tags = densify(int(ids[0]), ids, vectors, metas, engine.dim)
    index = HnswIndex(engine.dim, m=cfg.hnsw_m, ef_construction=cfg.hnsw_ef_construction, seed=int(ids[0]))
    index.add(vec, threads=build_threads())
    return SegmentData(level=level, id_start=int(ids[0]), vectors=vec, live=live, start_time_ms=start,
                       duration_ms=duration, bpm=bpm, tags=tags, source_file=sources, graph=index.graph_bytes())


def build_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def write_tmp(engine, tmp, data, throttle: bool):
    from vibrato.segment import write_segment_tmp

    info = write_segment_tmp(tmp, data)
    if throttle:
        engine.throttle.consume(os.path.getsize(tmp))
    return info


def info_size(info, path) -> int:
    size = getattr(info, "size_bytes", None)
    return int(size) if size is not None else os.path.getsize(path)


def publish_file(tmp, final):
    from vibrato.segment import publish_segment

    publish_segment(tmp, final)


def load_handle(engine, row: dict, path) -> SegmentHandle:
    from vibrato.segment import SegmentReader

    reader = SegmentReader.open(path, madvise=engine.config.vector_madvise_mode)
    reader.verify()
    if reader.dim != engine.dim or reader.id_start != row["vector_id_start"] or reader.count != row["row_count"]:
        raise ValueError(f"segment {row['id']} does not match its catalog row (dim {reader.dim}, "
                         f"id_start {reader.id_start}, count {reader.count})")
    return SegmentHandle(row, reader, engine._dead_ranges, engine.config.archive_rerank_factor)
