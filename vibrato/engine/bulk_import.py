"""Bulk import (`vibrato import`, CONTRACT.md D42): vectors from a .npy file, and optionally their
metadata from a JSON-lines file, written straight into L0 segments while the server is stopped.

1. Everything is checked before anything is written: the array (2-D, float16/32/64, every value
   finite in float32), the metadata file (one JSON object per line, the ingest rules of
   engine/validation.py, as many lines as vectors), parsed once into columns (`MetaColumns`) that
   the segments and the WAL rows both read. An error names the row or the line.
2. The data dir is opened like the server opens it (its lock, recovery), so a locked one is refused.
3. Segments of IMPORT_SEGMENT_ROWS rows are built (short-lived graphs at `import_ef_construction`,
   which compaction rebuilds) and written under tmp/, fsynced, then renamed into segments/. The
   graphs start building while step 1 checks the metadata (`GraphBuilder`; in memory only).
4. ONE catalog transaction: the ids are allocated (they continue the collection's), each vector gets
   a WAL row (its metadata, checkpointed, no vector blob: its segment holds it) and the segments become
   active. It opens as step 3 starts, so the WAL rows go in while the graphs build, and commits
   after the last rename.
A crash before step 4 leaves the store exactly as it was: tmp files are removed and renamed files the
catalog does not know are quarantined at the next start (orphans, CONTRACT.md §4.5). After it, the
whole file is imported.
"""
import os
import queue
import threading

import numpy as np
import orjson

from vibrato.catalog import collections, segments as seg_sql, wal
from vibrato.config import Config, Limits
from vibrato.engine.faults import fault_point
from vibrato.engine.lock import is_locked
from vibrato.engine.validation import DEFAULT_META, check_metadata
from vibrato.errors import BadRequestError, VibratoError
from vibrato.ids import job_id as new_id

IMPORT_SEGMENT_ROWS = 100_000
CHECK_CHUNK_ROWS = 65_536
_FLOATS = (np.float16, np.float32, np.float64)


def check_vectors(path) -> np.ndarray:
    """The array at `path`, memory-mapped, after checking its shape, type and every value."""
    try:
        X = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadRequestError(f"{path}: not a readable .npy array ({exc})") from None
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise BadRequestError(f"{path}: expected a 2-D array of vectors (rows, dim), got shape {X.shape}")
    if X.dtype.type not in _FLOATS:
        raise BadRequestError(f"{path}: expected float16, float32 or float64 values, got {X.dtype}")
    with np.errstate(over="ignore"):
        for lo in range(0, X.shape[0], CHECK_CHUNK_ROWS):
            ok = np.isfinite(np.asarray(X[lo:lo + CHECK_CHUNK_ROWS], dtype=np.float32)).all(axis=1)
            if not ok.all():
                row = lo + int(np.flatnonzero(~ok)[0])
                raise BadRequestError(f"{path}: vector at row {row} has a value that is not finite in float32")
    return X


class MetaColumns:
    """The metadata of every row as columns, checked and normalised (engine/validation.py's ingest
    rules): the file is parsed once, and the segments and the WAL rows both read these. Repeated
    source files and tag lists are stored once (a track's frames share them)."""

    def __init__(self, source_file: list, start_time_ms, duration_ms, bpm, tags: list):
        self.source_file = source_file
        self.start_time_ms = np.asarray(start_time_ms, dtype=np.uint32)
        self.duration_ms = np.asarray(duration_ms, dtype=np.uint32)
        self.bpm = np.asarray(bpm, dtype=np.float32)
        self.tags = tags

    @classmethod
    def defaults(cls, n: int) -> "MetaColumns":
        src, start, dur, bpm, tags = DEFAULT_META
        return cls([src] * n, np.full(n, start), np.full(n, dur), np.full(n, bpm), [tags] * n)

    @classmethod
    def read(cls, path, n: int, limits: Limits) -> "MetaColumns":
        """One JSON object per line, exactly n lines; an error names the line."""
        src_col, start_col, dur_col, bpm_col, tags_col = [], [], [], [], []
        sources, tag_lists = {}, {}
        lineno = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if lineno > n:
                    raise BadRequestError(f"{path} has more than {n} lines but the vectors file has {n} rows: "
                                          f"one line per vector")
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise BadRequestError(f"{path} line {lineno}: not valid JSON ({exc})") from None
                src, start, dur, bpm, tags = check_metadata(doc, limits, f"{path} line {lineno}")
                src_col.append(sources.setdefault(src, src))
                start_col.append(start)
                dur_col.append(dur)
                bpm_col.append(bpm)
                tags_col.append(tag_lists.setdefault(tuple(tags), tags))
        if lineno != n:
            raise BadRequestError(f"{path} has {lineno} lines but the vectors file has {n} rows: one line per vector")
        return cls(src_col, start_col, dur_col, bpm_col, tags_col)

    def wal_rows(self):
        """(source_file, start_time_ms, duration_ms, bpm, tags JSON) per row, for wal.insert_checkpointed;
        a tag list shared by many rows is serialised once."""
        tags_json = {}
        return zip(self.source_file, self.start_time_ms.tolist(), self.duration_ms.tolist(), self.bpm.tolist(),
                   (tags_json.get(id(t)) or tags_json.setdefault(id(t), orjson.dumps(t).decode())
                    for t in self.tags))


def run(data_dir, collection: str, vectors_path, metadata_path=None, progress=None, ef_construction=None) -> dict:
    from vibrato.engine.core import Engine

    if is_locked(data_dir):
        raise VibratoError(f"data dir {data_dir} is in use by a running server; stop it before import")
    limits = Limits()
    X = check_vectors(vectors_path)
    n, dim = X.shape
    cfg = Config(data_dir=data_dir, collection=collection, dim=dim,
                 **({} if ef_construction is None else {"import_ef_construction": ef_construction}))
    with GraphBuilder(cfg, X) as graphs:  # in memory only: the metadata is checked meanwhile
        meta = MetaColumns.defaults(n) if metadata_path is None else MetaColumns.read(metadata_path, n, limits)
        eng = Engine.open_config(cfg, background=False)
        try:
            return _write(eng, X, meta, graphs, progress)
        finally:
            eng.close()


class GraphBuilder:
    """Builds the graph of each IMPORT_SEGMENT_ROWS block in turn on a thread of its own (the native
    build releases the GIL and uses build_threads() cores), at most one finished block ahead of the
    consumer, so checking the metadata, writing the segments and inserting the WAL rows overlap it.
    Iterating yields (lo, hi, float32 vectors, graph bytes) in order; a build error is re-raised there."""

    def __init__(self, cfg, X):
        from vibrato.engine import pipeline

        self._cfg, self._X, self._build = cfg, X, pipeline.build_graph
        self._queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vibrato-import-graphs", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        while self._thread.is_alive():  # unblock a put, then let the thread see the stop
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()

    def _run(self):
        n, dim = self._X.shape
        try:
            for lo in range(0, n, IMPORT_SEGMENT_ROWS):
                if self._stop.is_set():
                    return
                hi = min(n, lo + IMPORT_SEGMENT_ROWS)
                vec = np.ascontiguousarray(self._X[lo:hi], dtype=np.float32)
                graph = self._build(self._cfg, dim, vec, seed=lo,
                                    ef_construction=self._cfg.import_ef_construction).graph_bytes()
                self._queue.put((lo, hi, vec, graph))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._queue.put(exc)

    def __iter__(self):
        n = self._X.shape[0]
        for _ in range(0, n, IMPORT_SEGMENT_ROWS):
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item


def _write(eng, X, meta: MetaColumns, graphs: GraphBuilder, progress) -> dict:
    from vibrato.segment import SegmentData, publish_segment, write_segment_tmp

    cfg, cat, cid = eng.config, eng.catalog, eng.cid
    n = X.shape[0]
    id_start = cat.read(collections.next_id, cid)
    done = []  # (tmp path, final path, segment row)
    segment_rows = queue.Queue()  # the activating transaction waits here for the written segments

    def activate(conn):
        first = collections.allocate_ids(conn, cid, n)
        if first != id_start:
            raise VibratoError(f"the collection's next id moved from {id_start} to {first} during the import")
        first_lsn, _last = wal.insert_checkpointed(conn, cid, id_start, meta.wal_rows())
        rows = segment_rows.get()
        if rows is None:
            raise VibratoError("import aborted before its segments were written")
        for row in rows:
            off = row["vector_id_start"] - id_start
            seg_sql.insert(conn, {**row, "start_lsn": first_lsn + off, "end_lsn": first_lsn + off + row["row_count"] - 1})

    # The transaction opens now and inserts the WAL rows while the graphs build; it commits only
    # once every segment file is written and renamed, so a crash before that rolls all of it back.
    activation = cat.write_async(activate)
    try:
        for lo, hi, vec, graph in graphs:
            data = SegmentData(level=0, id_start=id_start + lo, vectors=vec, live=np.ones(hi - lo, dtype=bool),
                               start_time_ms=meta.start_time_ms[lo:hi], duration_ms=meta.duration_ms[lo:hi],
                               bpm=meta.bpm[lo:hi], tags=meta.tags[lo:hi], source_file=meta.source_file[lo:hi],
                               graph=graph)
            seg_id = new_id("seg")
            tmp, rel = cfg.tmp_dir / f"{seg_id}.vdb.tmp", f"segments/{seg_id}.vdb"
            info = write_segment_tmp(tmp, data)
            done.append((tmp, cfg.data_dir / rel, {
                "id": seg_id, "collection_id": cid, "level": 0, "kind": "raw", "path": rel,
                "row_count": hi - lo, "live_count": hi - lo, "vector_id_start": id_start + lo,
                "vector_id_end": id_start + hi - 1, "state": "active", "size_bytes": int(info.size_bytes)}))
            fault_point("import:segment_written")
            if progress is not None:
                progress("import: writing segments", hi, n)
        for tmp, final, _row in done:
            publish_segment(tmp, final)
        fault_point("import:renamed")
        segment_rows.put([row for _tmp, _final, row in done])
        activation.result()
    except BaseException:
        segment_rows.put(None)  # an activation still waiting rolls back
        try:
            activation.result()
            committed = True
        except BaseException:  # noqa: BLE001 - the import's own error is the one raised
            committed = False
        if not committed:  # not active: nothing of the import may stay behind
            for tmp, final, _row in done:
                for p in (tmp, final):
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        pass
        raise
    fault_point("import:activated")
    return {"imported": n, "id_start": id_start, "id_end": id_start + n - 1, "segments": len(done)}
