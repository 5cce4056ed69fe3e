"""Compaction: merge neighbouring segments into bigger ones so the segment count stays bounded.

Policy (one step per call):
  * >= 2 L0 segments            -> up to 10 (compaction_max_inputs) adjacent L0s merge into one L1 raw
                                   segment (new graph);
  * else >= 2 L1 segments       -> up to 10 adjacent L1s merge into one L2 archive segment: the float32
                                   vectors, an HNSW graph over them and PQ codes (format version 2;
                                   CONTRACT.md D14); raw L2 when rows < pq_min_rows or no PQ split fits dim;
  * else L2 segments            -> the smallest adjacent run of L2s whose rows fit l2_merge_max_rows
                                   merges into one L2 when there are >= 4 L2 segments, or when the run
                                   holds a raw L2 (too small for PQ when it was made); tiered merging
                                   keeps the count bounded (CONTRACT.md D24).
"Adjacent" means consecutive in the id order of ALL active segments, so the output's id range
[first.start, last.end] overlaps no other segment. Overlapping inputs are an integrity error and the
inputs stay active (CONTRACT.md D13). Rows dead in the inputs (tombstones, replayed-away or deleted ids) are written as
tombstones: zero vector, no metadata.

The durable order is pipeline.py's: the job row marks the inputs `compacting`; activation makes
the output active and the inputs obsolete in one transaction; publishing swaps them in memory, then
input files not pinned by a snapshot are deleted. A failure before activation puts the inputs back
to active and removes the output.
"""
import logging

import numpy as np

from vibrato.catalog import jobs, segments as seg_sql
from vibrato.engine import pipeline
from vibrato.engine.faults import fault_point
from vibrato.engine.state import Counter
from vibrato.errors import IntegrityError
from vibrato.ids import job_id as new_id

log = logging.getLogger("vibrato.engine")

PQ_SUBSPACE_CHOICES = (16, 12, 10, 8, 6, 5, 4, 3, 2)
L2_MERGE_MIN_SEGMENTS = 4
# Rows the archive codebook is trained on: 128 per centroid. Training holds this sample twice (ours
# + the kernel's subspace copy), 32 MB at 128-d; on the text set recall@10 after the 80-candidate
# rerank is 0.931 with 16k rows, 0.936 with all 20k.
PQ_TRAIN_SAMPLE = 32_768
MERGE_CHUNK_BYTES = 8 << 20


def choose_pq_m(dim: int) -> int:
    """The first of 16, 12, 10, 8, 6, 5, 4, 3, 2 that divides dim (0: PQ not possible)."""
    for m in PQ_SUBSPACE_CHOICES:
        if dim % m == 0 and dim // m >= 1 and m <= dim:
            return m
    return 0


def plan(segments, cfg):
    """(inputs, output_level) for the next step, or (None, None)."""
    segs = sorted(segments, key=lambda s: s.id_start)
    for a, b in zip(segs, segs[1:]):
        if b.id_start <= a.id_end:
            raise IntegrityError(f"segments {a.id} [{a.id_start}, {a.id_end}] and {b.id} "
                                 f"[{b.id_start}, {b.id_end}] overlap; refusing to compact")
    for level, out_level in ((0, 1), (1, 2)):
        run = _first_run(segs, level, cfg.compaction_max_inputs)
        if run:
            return run, out_level
    l2 = [s for s in segs if s.level >= 2]
    if len(l2) >= 2:
        best = None
        for i in range(len(segs)):
            total, run = 0, []
            for s in segs[i:i + cfg.compaction_max_inputs]:
                if s.level < 2 or total + s.n > cfg.l2_merge_max_rows:
                    break
                run.append(s)
                total += s.n
                if len(run) >= 2 and (best is None or total < best[0]):
                    best = (total, list(run))
        if best and (len(l2) >= L2_MERGE_MIN_SEGMENTS or any(s.kind == "raw" for s in best[1])):
            return best[1], 2
    return None, None


def _first_run(segs, level, max_inputs):
    run = []
    for s in segs:
        if s.level == level:
            run.append(s)
            if len(run) == max_inputs:
                break
        elif run:
            if len(run) >= 2:
                break
            run = []
    return run if len(run) >= 2 else None


def run(engine, *, background: bool = False) -> dict:
    with engine.compaction_lock:
        jid = new_id("cmp")
        inputs, out_level = plan(engine.segment_set.handles, engine.config)
        if not inputs:
            return {"job_id": jid, "state": "idle", "details": {"reason": "not_enough_compaction_candidates"}}
        job = Compaction(engine, jid, inputs, out_level)
        row = pipeline.run(engine, job, background=background, fault=fault_point)
        from vibrato.engine.maintenance import gc_obsolete
        gc_obsolete(engine)
        log.info("compaction %s: %s -> %s (L%d, %s, %d rows)", jid, job.input_ids, job.segment_id, out_level,
                 row["kind"], row["row_count"])
        return {"job_id": jid, "state": "completed",
                "details": {"input_segments": job.input_ids, "output_segment": job.segment_id,
                            "output_level": out_level, "archive_pq": row["kind"] == "archive"}}


class Compaction(pipeline.SegmentJob):
    kind = "compaction"
    done, failed = Counter.COMPACTION, Counter.COMPACTION_FAILURES

    def __init__(self, engine, jid, inputs, out_level):
        self.inputs, self.out_level = inputs, out_level
        self.input_ids = [s.id for s in inputs]
        out_id = new_id("seg")
        super().__init__(engine, jid, out_id, {"phase": "start", "output_segment": out_id,
                                               "input_segments": self.input_ids})

    def start(self, conn):
        jobs.create_compaction(conn, self.job_id, self.engine.cid, self.segment_id, self.input_ids, self.details)
        seg_sql.set_states(conn, self.input_ids, "compacting")

    def build(self):
        data, archive = merge(self.engine, self.inputs, self.out_level)
        return data, {"level": self.out_level, "kind": "archive" if archive else "raw",
                      "vector_id_start": self.inputs[0].id_start, "vector_id_end": self.inputs[-1].id_end,
                      "start_lsn": None, "end_lsn": None}

    def activate(self, conn, row):
        activate(conn, self.job_id, self.segment_id, self.input_ids,
                 {"phase": "completed", "output_segment": self.segment_id, "input_segments": self.input_ids})

    def roll_back(self, conn, registered, error):
        roll_back(conn, self.job_id, self.segment_id if registered else None, self.input_ids, self.details, error)

    def publish(self, handle):
        self.engine.segment_set.swap(add=[handle], remove=self.inputs)


# ---------------------------------------------------------------- catalog transactions (also recovery's)
def activate(conn, jid, out_id, input_ids, details):
    """Output active, inputs obsolete, job completed: ONE transaction."""
    seg_sql.set_state(conn, out_id, "active")
    seg_sql.set_states(conn, input_ids, "obsolete")
    jobs.set_state(conn, "compaction", jid, "completed", details)


def roll_back(conn, jid, out_id, input_ids, details, error, seg_error=None):
    """Inputs back to active, output failed (when it has a row), job failed: ONE transaction."""
    seg_sql.set_states(conn, input_ids, "active")
    if out_id is not None:
        seg_sql.set_state(conn, out_id, "failed", error=error if seg_error is None else seg_error)
    jobs.set_state(conn, "compaction", jid, "failed", {**details, "phase": "failed", "error": error})


def _vector_chunks(inputs, id_start: int, dim: int):
    """The merged output's vectors in row order, MERGE_CHUNK_BYTES at a time, read from the inputs
    with pread (tombstones and id gaps as zero rows). Returns a function that starts a new pass,
    so the output can be written without ever holding all of it in memory."""
    rows_per = max(1, MERGE_CHUNK_BYTES // (dim * 4))

    def chunks():
        buf = np.empty((rows_per, dim), dtype=np.float32)
        cursor = id_start
        for s in inputs:
            gap = s.id_start - cursor  # ids replayed away between inputs
            while gap > 0:
                c = min(gap, rows_per)
                buf[:c] = 0.0
                yield buf[:c]
                gap -= c
            for lo in range(0, s.n, rows_per):
                out = buf[:min(s.n, lo + rows_per) - lo]
                s.reader.read_vectors_into(out, start=lo)
                dead = ~s.live[lo:lo + out.shape[0]]
                if dead.any():
                    out[dead] = 0.0
                yield out
            cursor = s.id_end + 1
    return chunks


def merge(engine, inputs, out_level):
    """SegmentData for the merged output (+ whether it is a PQ archive).

    Archive outputs (which grow with the collection) stream their vectors: one pass gathers the PQ
    training sample, one encodes them and feeds the graph build chunk by chunk, and the writer reads
    them twice more (checksum, write), each pass holding MERGE_CHUNK_BYTES besides the graph index
    (which holds its own copy while it is built). Raw outputs stream theirs the same way."""
    from vibrato.pq import ProductQuantizer
    from vibrato.segment import SegmentData, StreamedVectors, StringsCSR, TagsCSR

    cfg = engine.config
    dim = engine.dim
    id_start, id_end = inputs[0].id_start, inputs[-1].id_end
    n = id_end - id_start + 1
    chunks = _vector_chunks(inputs, id_start, dim)
    live = np.zeros(n, dtype=bool)
    start = np.zeros(n, dtype=np.uint32)
    duration = np.zeros(n, dtype=np.uint32)
    bpm = np.zeros(n, dtype=np.float32)
    tag_parts, src_parts = [], []
    cursor = id_start
    for s in inputs:
        if s.id_start > cursor:  # an id gap between inputs (ids replayed away): tombstones
            gap = s.id_start - cursor
            tag_parts.append(TagsCSR.from_lists([[]] * gap))
            src_parts.append(StringsCSR.from_list([""] * gap))
        a = s.id_start - id_start
        r = s.reader
        rows_live = s.live
        live[a:a + s.n] = rows_live
        start[a:a + s.n] = np.where(rows_live, r.start_time_ms, 0)
        duration[a:a + s.n] = np.where(rows_live, r.duration_ms, 0)
        bpm[a:a + s.n] = np.where(rows_live, r.bpm, 0)
        tags, srcs = r.tags, r.source_file
        if not rows_live.all():
            tags = TagsCSR.from_lists([tags.row(i) if rows_live[i] else [] for i in range(s.n)])
            srcs = StringsCSR.from_list([srcs[i] if rows_live[i] else "" for i in range(s.n)])
        tag_parts.append(tags)
        src_parts.append(srcs)
        cursor = s.id_end + 1
    tags = TagsCSR.concat(tag_parts)
    sources = StringsCSR.concat(src_parts)
    m = choose_pq_m(dim)
    # PQ training needs at least 256 rows (one per centroid)
    archive = out_level >= 2 and int(live.sum()) >= max(cfg.pq_min_rows, 256) and m > 0
    common = dict(level=out_level, id_start=id_start, live=live, start_time_ms=start,
                  duration_ms=duration, bpm=bpm, tags=tags, source_file=sources)
    if archive:
        rows = np.flatnonzero(live)
        if rows.shape[0] > PQ_TRAIN_SAMPLE:
            rows = np.sort(np.random.default_rng(42).choice(rows, PQ_TRAIN_SAMPLE, replace=False))
        sample = np.empty((rows.shape[0], dim), dtype=np.float32)
        off = taken = 0
        for chunk in chunks():
            upto = int(np.searchsorted(rows, off + chunk.shape[0]))
            sample[taken:upto] = chunk[rows[taken:upto] - off]
            taken, off = upto, off + chunk.shape[0]
        pq = ProductQuantizer(dim, m)
        pq.train(sample, seed=42, sample=PQ_TRAIN_SAMPLE)
        del sample
        codes = np.empty((n, pq.m), dtype=np.uint8)

        def encoded():  # one pass over the inputs both encodes and feeds the graph build
            off = 0
            for chunk in chunks():
                codes[off:off + chunk.shape[0]] = pq.encode(chunk)
                off += chunk.shape[0]
                yield chunk
        # The graph makes an archive query a graph search (format version 2); the index copies each
        # chunk as it is added, so the only full copy of the vectors is the index's own.
        graph = pipeline.build_graph(cfg, dim, encoded(), seed=id_start).graph_bytes()
        return SegmentData(**common, vectors=StreamedVectors(n, dim, chunks), pq_codebook=pq.to_bytes(),
                           pq_codes=codes, graph=graph), True
    # streamed like an archive's: the graph index holds the only full copy of the vectors while it
    # builds (a 400k-row L1 held them twice: +200 MB of peak RSS while loading a catalog). An L1 is
    # short-lived too (its rows move on into an archive, which builds its own graph): its graph is
    # built at l1_ef_construction, so a load's L0 -> L1 merges take about 0.6x the time.
    efc = cfg.l1_ef_construction if out_level == 1 else None
    graph = pipeline.build_graph(cfg, dim, chunks(), seed=id_start, ef_construction=efc).graph_bytes()
    return SegmentData(**common, vectors=StreamedVectors(n, dim, chunks), graph=graph), False
