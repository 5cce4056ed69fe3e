"""Snapshots, restore and point-in-time replay (runbook §4-§5; SPEC D9, D10, D11).

snapshot_create — consistent point-in-time copy, safe while a server runs (cron runs it live):
  1. pin the collection's segments in the catalog (the server never deletes a pinned file);
  2. copy the catalog with SQLite's online backup API (one consistent read snapshot; it includes
     the un-checkpointed WAL tail, so un-flushed vectors are in the snapshot);
  3. read the segment list FROM THE COPY and pin any segment created since step 1; copy each file
     (SHA-256 while copying, optional zstd) — a file that vanished means a compaction retired it
     between the steps: start over (bounded retries);
  4. manifest.json (SHA-256 per file), fsync everything, then rename the `.partial` directory into
     place, so a snapshot directory either is complete or does not exist; unpin.
snapshot_restore — verify everything first (manifest, every checksum, every segment's structure)
  into a staging directory, then swap it in through a journal (`RESTORE_JOURNAL`) that the next
  restore or engine open rolls forward after a crash; the previous state goes to
  tmp/restore_backup_<ts>/. Works into a different data dir (paths are relative). Refuses while a
  server holds the data dir.
replay_to_lsn — the collection becomes exactly its WAL rows with lsn <= target: later rows are
  deleted and their id range is tombstoned, so no acknowledged id is ever issued again (D11).
"""
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import apsw

from vibrato.catalog import Catalog, collections, segments as seg_sql, wal
from vibrato.engine.lock import DataDirLock, is_locked
from vibrato.errors import IntegrityError, NotFoundError, VibratoError
from vibrato.ids import job_id as new_id

log = logging.getLogger("vibrato.engine")

MANIFEST = "manifest.json"
JOURNAL = "RESTORE_JOURNAL"
CHUNK = 1 << 20
SNAPSHOT_STATES = ("active", "compacting")
MAX_ATTEMPTS = 5
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


class SnapshotError(VibratoError):
    code = "snapshot_failed"
    status = 500


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_hashed(src, dst, compress: bool = False, progress=None) -> tuple[str, int]:
    """Copy src to dst (zstd-compressed if asked), fsync dst; returns (sha256 of dst, size of dst)."""
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        if compress:
            import zstandard

            class _Hashing:
                def write(self, b):
                    h.update(b)
                    return fout.write(b)

            cctx = zstandard.ZstdCompressor(level=3, threads=-1)
            with cctx.stream_writer(_Hashing(), closefd=False) as w:
                while chunk := fin.read(CHUNK):
                    w.write(chunk)
        else:
            while chunk := fin.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
        size = fout.tell()
    return h.hexdigest(), size


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _open_catalog(data_dir) -> Catalog:
    path = Path(data_dir) / "catalog.sqlite3"
    if not path.exists():
        raise NotFoundError(f"no catalog at {path}: is {data_dir} a Vibrato data dir?")
    return Catalog(path, passive_checkpoint_secs=3600)


# ---------------------------------------------------------------------------------- create
def create(data_dir, collection: str, *, catalog: Catalog | None = None, compress: bool = False,
           progress=None) -> dict:
    data_dir = Path(data_dir)
    own = catalog is None
    cat = _open_catalog(data_dir) if own else catalog
    try:
        col = cat.read(collections.get, collection)
        last_exc = None
        for attempt in range(MAX_ATTEMPTS):
            try:
                return _create_once(data_dir, cat, col, compress, progress)
            except _Retry as exc:
                last_exc = exc
                log.info("snapshot attempt %d restarted: %s", attempt + 1, exc)
        raise SnapshotError(f"snapshot could not get a stable copy after {MAX_ATTEMPTS} attempts: {last_exc}")
    finally:
        if own:
            cat.close()


class _Retry(Exception):
    pass


def _create_once(data_dir: Path, cat: Catalog, col: dict, compress: bool, progress) -> dict:
    snap_id = new_id("snap")
    snaps = data_dir / "snapshots"
    snaps.mkdir(parents=True, exist_ok=True)
    partial = snaps / f".{snap_id}.partial"
    final = snaps / snap_id
    (partial / "segments").mkdir(parents=True)
    try:
        def pin_current(conn):
            rows = seg_sql.list_by_state(conn, col["id"], SNAPSHOT_STATES + ("building", "pending_activate"))
            seg_sql.pin(conn, snap_id, [r["id"] for r in rows])
        cat.write(pin_current)

        catalog_copy = partial / "catalog.sqlite3"
        src = apsw.Connection(str(cat.path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            src.set_busy_timeout(30_000)
            dest = apsw.Connection(str(catalog_copy))
            try:
                with dest.backup("main", src, "main") as b:
                    b.step(-1)
                dest.execute("DELETE FROM snapshot_pins")
                rows = [dict(zip(seg_sql.COLUMNS, r)) for r in dest.execute(
                    "SELECT " + ", ".join(seg_sql.COLUMNS) + " FROM segments WHERE collection_id = ? "
                    "AND state IN (?, ?) ORDER BY level, vector_id_start", (col["id"], *SNAPSHOT_STATES))]
                dest.pragma("journal_mode", "delete")  # a single self-contained file
            finally:
                dest.close()
        finally:
            src.close()
        cat.write(lambda conn: seg_sql.pin(conn, snap_id, [r["id"] for r in rows]))

        entries = []
        total = len(rows)
        for i, row in enumerate(rows):
            srcf = data_dir / row["path"]
            name = Path(row["path"]).name + (".zst" if compress else "")
            if not srcf.exists():
                raise _Retry(f"segment {row['id']} was retired while the snapshot was taken")
            sha, size = _copy_hashed(srcf, partial / "segments" / name, compress)
            entries.append({"segment_id": row["id"], "source_path": row["path"], "snapshot_file": name,
                            "state": row["state"], "size_bytes": size, "sha256": sha,
                            "compression": "zstd" if compress else None})
            if progress is not None:
                progress("snapshot: copying segments", i + 1, total)
        _fsync_dir(partial / "segments")
        with open(catalog_copy, "rb+") as f:
            os.fsync(f.fileno())
        manifest = {
            "snapshot_id": snap_id,
            "created_at": int(time.time()),
            "collection": col["name"],
            "collection_id": col["id"],
            "catalog_file": "catalog.sqlite3",
            "catalog_sha256": _sha256(catalog_copy),
            "format_version": 1,
            "segments": entries,
        }
        tmp_manifest = partial / (MANIFEST + ".tmp")
        with open(tmp_manifest, "w") as f:
            json.dump(manifest, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp_manifest, partial / MANIFEST)
        _fsync_dir(partial)
        os.rename(partial, final)
        _fsync_dir(snaps)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        try:
            cat.write(seg_sql.unpin, snap_id)
        except Exception as exc:  # noqa: BLE001 - pins expire on their own
            log.warning("could not unpin snapshot %s: %s", snap_id, exc)
    return {"snapshot_id": snap_id, "snapshot_dir": str(data_dir / "snapshots" / snap_id), "segments": len(entries)}


def snapshot_create(data_dir, collection: str = "default", progress=None, compress: bool = False) -> dict:
    """CLI entry point: {'snapshot_id', 'snapshot_dir', 'segments'}; works against a live server."""
    return create(data_dir, collection, compress=compress, progress=progress)


# ---------------------------------------------------------------------------------- restore
def _read_manifest(snapshot_dir: Path) -> dict:
    path = snapshot_dir / MANIFEST
    if not path.is_file():
        raise SnapshotError(f"{path} not found: not a snapshot directory")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise SnapshotError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(m, dict) or not isinstance(m.get("segments"), list):
        raise SnapshotError(f"{path}: missing 'segments' list")
    for key in ("catalog_file", "catalog_sha256"):
        if not isinstance(m.get(key), str):
            raise SnapshotError(f"{path}: missing '{key}'")
    for i, e in enumerate(m["segments"]):
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("snapshot_file", "sha256")):
            raise SnapshotError(f"{path}: segments[{i}] is malformed")
        if "/" in e["snapshot_file"] or e["snapshot_file"] in (".", ".."):
            raise SnapshotError(f"{path}: segments[{i}].snapshot_file must be a plain file name")
    if "/" in m["catalog_file"]:
        raise SnapshotError(f"{path}: catalog_file must be a plain file name")
    return m


def snapshot_restore(data_dir, snapshot_dir, progress=None) -> dict:
    """Verify the snapshot completely, then swap it in atomically; previous state to tmp/restore_backup_<ts>/."""
    from vibrato.segment import SegmentReader

    data_dir, snapshot_dir = Path(data_dir), Path(snapshot_dir)
    for sub in ("segments", "quarantine", "snapshots", "tmp", "logs"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    if is_locked(data_dir):
        raise SnapshotError(f"data dir {data_dir} is in use by a running server; stop it before restoring")
    with DataDirLock(data_dir).acquire("snapshot-restore"):
        finish_interrupted_restore(data_dir)
        m = _read_manifest(snapshot_dir)
        ts = int(time.time())
        stage = data_dir / "tmp" / f"restore_stage_{ts}_{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        (stage / "segments").mkdir(parents=True)
        try:
            cat_src = snapshot_dir / m["catalog_file"]
            if not cat_src.is_file():
                raise SnapshotError(f"snapshot catalog {cat_src} missing")
            sha, _ = _copy_hashed(cat_src, stage / "catalog.sqlite3")
            if sha != m["catalog_sha256"]:
                raise SnapshotError(f"catalog checksum mismatch for {cat_src}: expected {m['catalog_sha256']}, got {sha}")
            total = len(m["segments"])
            for i, e in enumerate(m["segments"]):
                src = snapshot_dir / "segments" / e["snapshot_file"]
                if not src.is_file():
                    raise SnapshotError(f"snapshot segment missing: {src}")
                sha = _sha256(src)
                if sha != e["sha256"]:
                    raise SnapshotError(f"segment checksum mismatch for {src}: expected {e['sha256']}, got {sha}")
                name = e["snapshot_file"]
                if e.get("compression") == "zstd" or name.endswith(".zst"):
                    import zstandard
                    name = name[:-4] if name.endswith(".zst") else name
                    with open(src, "rb") as fin, open(stage / "segments" / name, "wb") as fout:
                        zstandard.ZstdDecompressor().copy_stream(fin, fout)
                        fout.flush()
                        os.fsync(fout.fileno())
                else:
                    _copy_hashed(src, stage / "segments" / name)
                reader = SegmentReader.open(stage / "segments" / name)
                try:
                    reader.verify()
                finally:
                    reader.close()
                if progress is not None:
                    progress("restore: verifying segments", i + 1, total)
            _check_catalog_refs(stage, m)
            _fsync_dir(stage / "segments")
            _fsync_dir(stage)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        backup = data_dir / "tmp" / f"restore_backup_{ts}"
        journal = {"stage": str(stage.relative_to(data_dir)), "backup": str(backup.relative_to(data_dir)),
                   "snapshot_dir": str(snapshot_dir)}
        jpath = data_dir / JOURNAL
        with open(str(jpath) + ".tmp", "w") as f:
            json.dump(journal, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(str(jpath) + ".tmp", jpath)
        _fsync_dir(data_dir)
        finish_interrupted_restore(data_dir)
    return {"restored_snapshot": str(snapshot_dir)}


def _check_catalog_refs(stage: Path, m: dict):
    """Every active/compacting segment of the snapshot catalog must have its file in the stage."""
    conn = apsw.Connection(str(stage / "catalog.sqlite3"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        paths = [r[0] for r in conn.execute("SELECT path FROM segments WHERE state IN ('active', 'compacting')")]
    except apsw.Error as exc:
        raise SnapshotError(f"snapshot catalog is not readable: {exc}") from None
    finally:
        conn.close()
    for p in paths:
        if not (stage / "segments" / Path(p).name).is_file():
            raise SnapshotError(f"snapshot catalog references {p}, which the snapshot does not contain")


def finish_interrupted_restore(data_dir):
    """Roll a journaled restore forward: every step is a rename that is skipped once done."""
    data_dir = Path(data_dir)
    jpath = data_dir / JOURNAL
    if not jpath.exists():
        return False
    j = json.loads(jpath.read_text())
    stage, backup = data_dir / j["stage"], data_dir / j["backup"]
    (backup / "segments").mkdir(parents=True, exist_ok=True)
    if (stage / "catalog.sqlite3").exists():
        for name in ("catalog.sqlite3", "catalog.sqlite3-wal", "catalog.sqlite3-shm"):
            if (data_dir / name).exists():
                os.replace(data_dir / name, backup / name)
        if (stage / "segments").exists():
            for entry in os.scandir(data_dir / "segments"):
                os.replace(entry.path, backup / "segments" / entry.name)
        _fsync_dir(backup / "segments")
        _fsync_dir(backup)
        if (stage / "segments").exists():
            for entry in os.scandir(stage / "segments"):
                os.replace(entry.path, data_dir / "segments" / entry.name)
            _fsync_dir(data_dir / "segments")
        os.replace(stage / "catalog.sqlite3", data_dir / "catalog.sqlite3")
    _fsync_dir(data_dir)
    shutil.rmtree(stage, ignore_errors=True)
    os.unlink(jpath)
    _fsync_dir(data_dir)
    log.info("restore finished: previous state kept in %s", backup)
    return True


# ---------------------------------------------------------------------------------- replay
def replay_to_lsn(data_dir, collection: str, target_lsn: int, progress=None) -> dict:
    data_dir = Path(data_dir)
    if target_lsn < 0:
        raise VibratoError(f"target_lsn must be >= 0, got {target_lsn}")
    if is_locked(data_dir):
        raise VibratoError(f"data dir {data_dir} is in use by a running server; stop it before replay-to-lsn")
    with DataDirLock(data_dir).acquire("replay-to-lsn"):
        finish_interrupted_restore(data_dir)
        cat = _open_catalog(data_dir)
        try:
            col = cat.read(collections.get, collection)

            def txn(conn):
                res = wal.truncate_after_lsn(conn, col["id"], target_lsn)
                if res["removed"]:
                    lo, hi = res["id_start"], res["id_end"]
                    dead = [r["id"] for r in seg_sql.list_by_state(conn, col["id"], ("active", "compacting"))
                            if r["vector_id_start"] >= lo and r["vector_id_end"] <= hi]
                    seg_sql.set_states(conn, dead, "obsolete")
                return res
            res = cat.write(txn)
            if progress is not None:
                progress("replay: done", 1, 1)
            log.info("replay-to-lsn %d on %s: removed %d rows", target_lsn, collection, res["removed"])
        finally:
            cat.close()
    return {"replayed_to_lsn": int(target_lsn), "collection": collection}
