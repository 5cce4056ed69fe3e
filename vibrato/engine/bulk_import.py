"""Bulk import (`vibrato import`, CONTRACT.md D42): vectors from a .npy file, and optionally their
metadata from a JSON-lines file, written straight into L0 segments while the server is stopped.

1. Everything is checked before anything is written: the array (2-D, float16/32/64, every value
   finite in float32), the metadata file (one JSON object per line, the ingest rules of
   engine/validation.py, as many lines as vectors). An error names the row or the line.
2. The data dir is opened like the server opens it (its lock, recovery), so a locked one is refused.
3. Segments of IMPORT_SEGMENT_ROWS rows are built (short-lived graphs, as checkpoints build them) and
   written under tmp/, fsynced, then renamed into segments/.
4. ONE catalog transaction: the ids are allocated (they continue the collection's), each vector gets
   a WAL row (its metadata, checkpointed, no vector blob: its segment holds it) and the segments become
   active.
A crash before step 4 leaves the store exactly as it was: tmp files are removed and renamed files the
catalog does not know are quarantined at the next start (orphans, CONTRACT.md §4.5). After it, the
whole file is imported.
"""
import os

import numpy as np
import orjson

from vibrato.catalog import collections, segments as seg_sql, wal
from vibrato.config import Limits
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


def read_metadata(path, limits: Limits):
    """(line number, normalised metadata tuple) per line of a JSON-lines file."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise BadRequestError(f"{path} line {lineno}: not valid JSON ({exc})") from None
            yield lineno, check_metadata(doc, limits, f"{path} line {lineno}")


def check_metadata_file(path, n: int, limits: Limits):
    count = 0
    for count, _meta in read_metadata(path, limits):
        pass
    if count != n:
        raise BadRequestError(f"{path} has {count} lines but the vectors file has {n} rows: one line per vector")


def run(data_dir, collection: str, vectors_path, metadata_path=None, progress=None) -> dict:
    from vibrato.engine.core import Engine

    if is_locked(data_dir):
        raise VibratoError(f"data dir {data_dir} is in use by a running server; stop it before import")
    limits = Limits()
    X = check_vectors(vectors_path)
    n, dim = X.shape
    if metadata_path is not None:
        check_metadata_file(metadata_path, n, limits)
    eng = Engine.open(data_dir, collection, dim, background=False)
    try:
        return _write(eng, X, metadata_path, limits, progress)
    finally:
        eng.close()


def _metas(metadata_path, n, limits):
    if metadata_path is None:
        return (DEFAULT_META for _ in range(n))
    return (meta for _, meta in read_metadata(metadata_path, limits))


def _write(eng, X, metadata_path, limits, progress) -> dict:
    from vibrato.engine import pipeline
    from vibrato.segment import SegmentData, publish_segment, write_segment_tmp

    cfg, cat, cid = eng.config, eng.catalog, eng.cid
    n, dim = X.shape
    id_start = cat.read(collections.next_id, cid)
    metas = _metas(metadata_path, n, limits)
    done = []  # (tmp path, final path, segment row)
    try:
        for lo in range(0, n, IMPORT_SEGMENT_ROWS):
            hi = min(n, lo + IMPORT_SEGMENT_ROWS)
            vec = np.ascontiguousarray(X[lo:hi], dtype=np.float32)
            chunk = [next(metas) for _ in range(hi - lo)]
            graph = pipeline.build_graph(cfg, dim, vec, seed=id_start + lo, short_lived=True).graph_bytes()
            data = SegmentData(level=0, id_start=id_start + lo, vectors=vec, live=np.ones(hi - lo, dtype=bool),
                               start_time_ms=np.array([m[1] for m in chunk], dtype=np.uint32),
                               duration_ms=np.array([m[2] for m in chunk], dtype=np.uint32),
                               bpm=np.array([m[3] for m in chunk], dtype=np.float32),
                               tags=[list(m[4]) for m in chunk], source_file=[m[0] for m in chunk], graph=graph)
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

        def activate(conn):
            first = collections.allocate_ids(conn, cid, n)
            if first != id_start:
                raise VibratoError(f"the collection's next id moved from {id_start} to {first} during the import")
            first_lsn, _last = wal.insert_checkpointed(conn, cid, id_start, _metas(metadata_path, n, limits))
            for _tmp, _final, row in done:
                off = row["vector_id_start"] - id_start
                seg_sql.insert(conn, {**row, "start_lsn": first_lsn + off,
                                      "end_lsn": first_lsn + off + row["row_count"] - 1})
        cat.write(activate)
    except BaseException:
        for tmp, final, _row in done:  # not active: nothing of the import may stay behind
            for p in (tmp, final):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        raise
    fault_point("import:activated")
    return {"imported": n, "id_start": id_start, "id_end": id_start + n - 1, "segments": len(done)}
