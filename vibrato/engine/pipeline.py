"""The segment publish pipeline: the one durable order of every job that produces a segment.

An operation (checkpoint.py: hot rows -> one L0 segment; compaction.py: adjacent segments -> one
merged segment) supplies a `SegmentJob`: its plan (the job row and what it holds back), its build
step (the segment's data) and its two catalog transactions (activate, roll back). `run` owns the
order and its fault points, named "<kind>:<step>" (faults.py; the crash tests arm each of them):

  1. job row `building` + the inputs the job holds (job.start) ............ catalog commit
  2. build the segment's data (job.build) ...................................... "before_write"
     write tmp/<seg>.vdb.tmp, fsync the file ................................... "segment_written"
  3. segment row `building` (path relative to the data dir) ............... catalog commit, "registered"
  4. rename into segments/, fsync segments/ ................................... "renamed"
  5. open and validate the file (structure + checksums), load its graph ........ "loaded"
  6. ONE transaction (job.activate): segment `active`, the job's inputs retired (checkpointed WAL
     rows, obsolete segments), job `completed` .................................. catalog commit
  7. publish in memory (job.publish): one SegmentSet.swap ....................... "activated" before it
Each step is safe to crash after: recovery rolls an interrupted job forward (the same activate
transaction) when its output validates, back otherwise (CONTRACT.md D4). A failure before 6 removes
the partial file and runs job.roll_back (nothing the job held is lost); after 6 only in-memory steps
remain, and they run even if step 7's fault point raises, so memory never disagrees with the catalog.

Graphs: `build_graph` is the one place an HNSW graph is built (segments here, sealed hot chunks in
background.py), with m and ef_construction from Config.
"""
import logging
import os

import numpy as np

from vibrato.catalog import jobs, segments as seg_sql
from vibrato.engine.faults import fault_point
from vibrato.engine.state import Counter
from vibrato.engine.tiers import SegmentHandle

log = logging.getLogger("vibrato.engine")


class SegmentJob:
    """One planned run of an operation. `kind` names the job table and the fault points
    ("<kind>:<step>"); `done`/`failed` are the counters run() adds to."""

    kind = ""
    done: Counter
    failed: Counter

    def __init__(self, engine, job_id: str, segment_id: str, details: dict):
        self.engine = engine
        self.job_id = job_id
        self.segment_id = segment_id
        self.details = details  # the job row's details at start

    def start(self, conn):
        """Step 1, in one transaction: the job row `building` and the states of what it holds."""
        raise NotImplementedError

    def build(self):
        """(SegmentData, row) for the output; `row` gives level, kind, vector_id_start/end, start/end_lsn."""
        raise NotImplementedError

    def registered_details(self, row: dict) -> dict:
        return {**self.details, "phase": "segment_written"}

    def activate(self, conn, row: dict):
        """Step 6, in one transaction."""
        raise NotImplementedError

    def roll_back(self, conn, registered: bool, error: str):
        """A failure before step 6, in one transaction: job failed, output failed if registered,
        whatever the job held given back."""
        raise NotImplementedError

    def publish(self, handle: SegmentHandle):
        """Step 7: in memory only, must not fail."""
        raise NotImplementedError


def run(engine, job: SegmentJob, *, background: bool, fault=fault_point) -> dict:
    """Steps 1-7 for `job`; returns the output's segment row. Raises (after rolling back) on failure.
    `fault` is the calling operation's module-level `fault_point`, looked up at each call, so a test
    can hook one operation's points there."""
    from vibrato.segment import publish_segment, write_segment_tmp

    cfg = engine.config
    kind, seg_id = job.kind, job.segment_id
    rel_path = f"segments/{seg_id}.vdb"
    final = cfg.data_dir / rel_path
    tmp = cfg.tmp_dir / f"{seg_id}.vdb.tmp"
    engine.catalog.write(job.start)
    registered = False
    shared = engine.shared_state  # followers see a segment-set change as a changed seq
    changing = False
    try:
        data, row = job.build()
        fault(f"{kind}:before_write")
        info = write_segment_tmp(tmp, data)
        if background:
            engine.throttle.consume(os.path.getsize(tmp))
        fault(f"{kind}:segment_written")
        size = getattr(info, "size_bytes", None)
        row.update({"id": seg_id, "collection_id": engine.cid, "path": rel_path,
                    "row_count": data.vectors.shape[0], "live_count": int(data.live.sum()),
                    "state": "building", "size_bytes": int(size) if size is not None else os.path.getsize(tmp)})

        def register(conn):
            seg_sql.insert(conn, row)
            jobs.set_state(conn, kind, job.job_id, "building", job.registered_details(row))
        engine.catalog.write(register)
        registered = True
        fault(f"{kind}:registered")
        publish_segment(tmp, final)
        fault(f"{kind}:renamed")
        handle = load_handle(engine, row, final)
        fault(f"{kind}:loaded")
        if shared is not None:
            shared.begin_change()
            changing = True
        engine.catalog.write(job.activate, row)
    except BaseException as exc:
        if changing:
            shared.end_change()
        engine.counters.add(job.failed)
        _fail(engine, job, registered, (tmp, final), exc)
        raise
    # Point of no return: the segment is durable and active; publishing it is in memory only and
    # happens even if something raises here, so memory never disagrees with the catalog.
    try:
        fault(f"{kind}:activated")
    finally:
        job.publish(handle)
        if changing:
            shared.end_change()
    engine.counters.add(job.done)
    return row


def _fail(engine, job: SegmentJob, registered: bool, paths, exc):
    log.error("%s %s failed: %s", job.kind, job.job_id, exc)
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove %s: %s", path, e)
    try:
        engine.catalog.write(job.roll_back, registered, str(exc))
    except Exception as e:  # noqa: BLE001 - recovery reconciles the job at the next start
        log.error("could not record %s failure: %s", job.kind, e)


# ---------------------------------------------------------------- shared build and load steps
def build_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def build_graph(cfg, dim: int, vectors, *, seed: int, threads: int | None = None,
                ef_construction: int | None = None):
    """An HnswIndex over `vectors` (rows in order) with the configured m, at `ef_construction` (default
    hnsw_ef_construction; short-lived graphs, which compaction rebuilds, pass theirs: l0_, l1_ or
    import_ef_construction); `threads` defaults to build_threads(). `vectors` is an (n, dim) array or
    an iterable of such chunks: each is copied into the index as it comes, so a caller streaming a
    merge never holds the vectors twice."""
    from vibrato.index import HnswIndex

    index = HnswIndex(dim, m=cfg.hnsw_m, ef_construction=ef_construction or cfg.hnsw_ef_construction, seed=seed)
    threads = build_threads() if threads is None else threads
    for chunk in (vectors,) if isinstance(vectors, np.ndarray) else vectors:
        index.add(chunk, threads=threads)
    return index


def load_handle(engine, row: dict, path, verify: bool = True) -> SegmentHandle:
    """The segment at `path` opened (checksums verified unless `verify` is False: a follower loads
    files the writer verified), matched against its catalog row, as a handle for `engine`'s segment
    set (an Engine or a Follower)."""
    from vibrato.segment import SegmentReader

    reader = SegmentReader.open(path, madvise=engine.config.vector_madvise_mode)
    try:
        if verify:
            reader.verify()
        if reader.dim != engine.dim or reader.id_start != row["vector_id_start"] or reader.count != row["row_count"]:
            raise ValueError(f"segment {row['id']} does not match its catalog row (dim {reader.dim}, "
                             f"id_start {reader.id_start}, count {reader.count})")
    except BaseException:
        reader.close()
        raise
    return SegmentHandle(row, reader, engine.segment_set.dead_ranges, engine.config.archive_rerank_factor)
