"""Checkpoint: the oldest hot rows (un-checkpointed WAL) become one L0 segment.

The plan: at most checkpoint_max_rows of the oldest hot rows, LSNs [start, end]. The build: those
rows densified over their id range (gaps and deleted rows become tombstones) plus a new graph. The durable order is
pipeline.py's; activation marks WAL rows [start, end] checkpointed in the same transaction that
makes the segment active, and publishing hides those hot rows. A failure before activation leaves
the WAL rows pending and the hot tier untouched. Ingest continues throughout (it only appends to
the hot tier; CONTRACT.md D5).
"""
import logging

import numpy as np

from vibrato.catalog import jobs, segments as seg_sql, wal
from vibrato.engine import pipeline
from vibrato.engine.faults import fault_point
from vibrato.engine.state import Counter
from vibrato.ids import job_id as new_id

log = logging.getLogger("vibrato.engine")


def run(engine, *, background: bool = False) -> dict:
    with engine.checkpoint_lock:
        jid = new_id("chk")
        ids, lsns, vectors, metas = engine.segment_set.hot_head(engine.config.checkpoint_max_rows)
        if ids.shape[0] == 0:
            return {"job_id": jid, "state": "idle", "details": {"reason": "no_pending_wal"}}
        job = Checkpoint(engine, jid, ids, lsns, vectors, metas)
        row = pipeline.run(engine, job, background=background, fault=fault_point)
        log.info("checkpoint %s: %d rows (lsn %d..%d) -> %s", jid, row["row_count"], job.start_lsn, job.end_lsn,
                 job.segment_id)
        return {"job_id": jid, "state": "completed",
                "details": {"start_lsn": job.start_lsn, "end_lsn": job.end_lsn, "rows": row["row_count"],
                            "segment_id": job.segment_id}}


class Checkpoint(pipeline.SegmentJob):
    kind = "checkpoint"
    done, failed = Counter.CHECKPOINT, Counter.CHECKPOINT_FAILURES

    def __init__(self, engine, jid, ids, lsns, vectors, metas):
        self.ids, self.vectors, self.metas = ids, vectors, metas
        self.start_lsn, self.end_lsn = int(lsns[0]), int(lsns[-1])
        seg_id = new_id("seg")
        super().__init__(engine, jid, seg_id, {"phase": "start", "segment_id": seg_id,
                                               "start_lsn": self.start_lsn, "end_lsn": self.end_lsn})

    def start(self, conn):
        jobs.create_checkpoint(conn, self.job_id, self.engine.cid, self.start_lsn, self.end_lsn, self.segment_id,
                               self.details)

    def build(self):
        from vibrato.segment import SegmentData

        eng, ids = self.engine, self.ids
        id_start, id_end = int(ids[0]), int(ids[-1])
        keep = ~np.isin(ids, eng.segment_set.deleted)  # deleted rows are written as tombstones (D40)
        metas = self.metas if keep.all() else [m for m, k in zip(self.metas, keep.tolist()) if k]
        vec, live, start, duration, bpm, sources, tags = densify(id_start, id_end, ids[keep], self.vectors[keep],
                                                                 metas, eng.dim)
        graph = pipeline.build_graph(eng.config, eng.dim, vec, seed=id_start,
                                     ef_construction=eng.config.l0_ef_construction).graph_bytes()
        data = SegmentData(level=0, id_start=id_start, vectors=vec, live=live, start_time_ms=start,
                           duration_ms=duration, bpm=bpm, tags=tags, source_file=sources, graph=graph)
        return data, {"level": 0, "kind": "raw", "vector_id_start": id_start, "vector_id_end": int(ids[-1]),
                      "start_lsn": self.start_lsn, "end_lsn": self.end_lsn}

    def registered_details(self, row):
        return {**self.details, "phase": "segment_written", "rows": row["row_count"]}

    def activate(self, conn, row):
        activate(conn, self.engine.cid, self.job_id, self.segment_id, self.start_lsn, self.end_lsn,
                 {"phase": "completed", "segment_id": self.segment_id, "start_lsn": self.start_lsn,
                  "end_lsn": self.end_lsn, "rows": row["row_count"]}, expect_rows=self.ids.shape[0])

    def roll_back(self, conn, registered, error):
        roll_back(conn, self.job_id, self.segment_id if registered else None, self.details, error)

    def publish(self, handle):
        self.engine.segment_set.swap(add=[handle], drop_hot_through=self.end_lsn)


# ---------------------------------------------------------------- catalog transactions (also recovery's)
def activate(conn, cid, jid, seg_id, start_lsn, end_lsn, details, expect_rows=None):
    """Segment active, WAL rows [start_lsn, end_lsn] checkpointed, job completed: ONE transaction.
    With expect_rows, a different number of pending WAL rows in the range aborts it."""
    seg_sql.set_state(conn, seg_id, "active")
    marked = wal.mark_checkpointed(conn, cid, start_lsn, end_lsn)
    if expect_rows is not None and marked != expect_rows:
        raise RuntimeError(f"checkpoint {jid}: expected {expect_rows} pending WAL rows in "
                           f"[{start_lsn}, {end_lsn}], found {marked}")
    jobs.set_state(conn, "checkpoint", jid, "completed", details)


def roll_back(conn, jid, seg_id, details, error):
    """Job failed (and its segment, when it has a row): ONE transaction. The WAL rows stay pending."""
    jobs.set_state(conn, "checkpoint", jid, "failed", {**details, "phase": "failed", "error": error})
    if seg_id is not None:
        seg_sql.set_state(conn, seg_id, "failed", error=error)


def densify(id_start: int, id_end: int, ids: np.ndarray, vectors: np.ndarray, metas: list, dim: int):
    """Rows for every id in [id_start, id_end]: ids not given become tombstones (zero vector, live=False)."""
    n = id_end - id_start + 1
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
