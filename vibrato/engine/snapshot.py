"""Snapshots, restore, the snapshot lifecycle (list, verify, prune) and point-in-time replay.

snapshot_create — consistent point-in-time copy, safe while a server runs (cron runs it live):
  1. pin the collection's segments in the catalog (the server never deletes a pinned file);
  2. copy the catalog with SQLite's online backup API (one consistent read; it includes the
     un-checkpointed WAL rows, so un-flushed vectors are in the snapshot) and strip the state of
     jobs in flight (see vibrato.catalog.backup): the copy describes exactly the files copied;
  3. pin the segments the copy lists that were created since step 1; copy each file (SHA-256 while
     copying, optional zstd) — a file that vanished means a compaction retired it between the
     steps: start over (bounded retries);
  4. manifest.json (SHA-256 and sizes per file), fsync everything, then rename the `.partial`
     directory into place, so a snapshot directory either is complete or does not exist; unpin.
  Pins only live while a create copies; a create that dies leaves them to expire (or to prune).
snapshot_restore — everything in a snapshot is hostile input until checked: files are opened
  without following symlinks and must be regular, compressed files may not decompress beyond their
  declared size, and every path the snapshot's catalog holds must be a plain name in segments/ or
  quarantine/. It is all verified (manifest, every checksum, every segment's structure) into a
  staging directory, then swapped in through a journal (`RESTORE_JOURNAL`) that the next restore or
  engine open rolls forward after a crash; the previous state goes to tmp/restore_backup_<ts>/.
  Works into a different data dir (paths are relative). Refuses while a server holds the data dir.
Lifecycle — restore and verify hold a shared flock on the snapshot directory and a create holds an
  exclusive one on its `.partial` directory; prune takes an exclusive non-blocking flock and refuses
  a snapshot someone is reading. verify records its result in `VERIFIED` (bound to the manifest's
  hash) so that listing stays cheap. None of them takes the data dir lock.
replay_to_lsn — the collection becomes exactly its WAL rows with lsn <= target: later rows are
  deleted and their id range is tombstoned, so no acknowledged id is ever issued again.
"""
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

from vibrato.catalog import Catalog, backup, collections, segments as seg_sql, wal
from vibrato.config import Config
from vibrato.datadir import DIR_MODE, FILE_MODE, UnsafePathError, fsync_dir, open_regular, plain_name, resolve_rel
from vibrato.engine.deletes import undo_for_replay
from vibrato.engine.lock import DataDirLock, is_locked
from vibrato.errors import NotFoundError, VibratoError
from vibrato.ids import job_id as new_id

log = logging.getLogger("vibrato.engine")

MANIFEST = "manifest.json"
JOURNAL = "RESTORE_JOURNAL"
VERIFIED = "VERIFIED"
CATALOG_FILE = "catalog.sqlite3"  # the catalog's name inside a snapshot directory
SEGMENTS = "segments"
CHUNK = 1 << 20
MAX_ATTEMPTS = 5
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_SMALL_FILE_BYTES = 64 * 1024  # restore journal, VERIFIED marker
PIN_TTL_SECS = 3600
STAGE_PREFIX, BACKUP_PREFIX = "restore_stage_", "restore_backup_"


class SnapshotError(VibratoError):
    code = "snapshot_failed"
    status = 500


def _layout(data_dir) -> Config:
    """The data-dir layout (catalog and sub-directory paths) of a data dir or a staging copy of one."""
    return Config(data_dir=data_dir)


def _open_catalog(data_dir) -> Catalog:
    path = _layout(data_dir).catalog_path
    if not path.exists():
        raise NotFoundError(f"no catalog at {path}: is {data_dir} a Vibrato data dir?")
    return Catalog(path, passive_checkpoint_secs=3600)


def _mkdirs(*paths) -> None:
    """mkdir -p where every directory created (parents too, unlike os.makedirs) gets DIR_MODE."""
    for p in paths:
        p = Path(p)
        for d in [*reversed(p.parents), p]:
            if d.is_dir():
                continue
            try:
                d.mkdir(mode=DIR_MODE)
            except FileExistsError:
                pass


def _create_file(path) -> int:
    return os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)


def _write_all(fd, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_json_atomic(path: Path, obj, indent=None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = _create_file(tmp)
    try:
        _write_all(fd, json.dumps(obj, indent=indent).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


def _read_small(path, limit: int, what: str, dir_fd=None) -> bytes:
    fd = open_regular(path, dir_fd=dir_fd, what=what)
    try:
        if os.fstat(fd).st_size > limit:
            raise SnapshotError(f"{what} {path} is larger than {limit} bytes")
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


def _lock_dir(fd, exclusive: bool) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


# ---------------------------------------------------------------------------------- create
def create(data_dir, collection: str, *, catalog: Catalog | None = None, compress: bool = False,
           progress=None, out_dir=None) -> dict:
    """Write a snapshot into out_dir/<snapshot_id> (default: <data_dir>/snapshots/<snapshot_id>)."""
    data_dir = Path(data_dir)
    snaps = Path(out_dir) if out_dir is not None else _layout(data_dir).snapshots_dir
    own = catalog is None
    cat = _open_catalog(data_dir) if own else catalog
    try:
        col = cat.read(collections.get, collection)
        _mkdirs(snaps)
        last_exc = None
        for attempt in range(MAX_ATTEMPTS):
            try:
                return _create_once(data_dir, snaps, cat, col, compress, progress)
            except _Retry as exc:
                last_exc = exc
                log.info("snapshot attempt %d restarted: %s", attempt + 1, exc)
        raise SnapshotError(f"snapshot could not get a stable copy after {MAX_ATTEMPTS} attempts: {last_exc}")
    finally:
        if own:
            cat.close()


class _Retry(Exception):
    pass


def _create_once(data_dir: Path, snaps: Path, cat: Catalog, col: dict, compress: bool, progress) -> dict:
    snap_id = new_id("snap")
    partial = snaps / f".{snap_id}.partial"
    final = snaps / snap_id
    partial.mkdir(mode=DIR_MODE)
    # Held until the rename is done: prune treats a `.partial` it can lock as abandoned.
    lock_fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    try:
        (partial / SEGMENTS).mkdir(mode=DIR_MODE)

        def pin_current(conn):
            rows = seg_sql.list_by_state(conn, col["id"], ("active", "compacting", "building", "pending_activate"))
            seg_sql.pin(conn, snap_id, [r["id"] for r in rows], PIN_TTL_SECS)
        cat.write(pin_current)
        catalog_copy = partial / CATALOG_FILE
        rows = backup.copy_for_snapshot(cat.path, catalog_copy, col["id"], file_mode=FILE_MODE)
        cat.write(seg_sql.pin, snap_id, [r["id"] for r in rows], PIN_TTL_SECS)
        pinned_at = time.monotonic()

        entries = []
        for i, row in enumerate(rows):
            src = resolve_rel(data_dir, row["path"], SEGMENTS, f"segment {row['id']} path")
            name = src.name + (".zst" if compress else "")
            try:
                fd = open_regular(src, what="segment file")
            except FileNotFoundError:
                raise _Retry(f"segment {row['id']} was retired while the snapshot was taken") from None
            try:
                sha, size, raw = _copy_out(fd, partial / SEGMENTS / name, compress)
            finally:
                os.close(fd)
            entries.append({"segment_id": row["id"], "source_path": row["path"], "snapshot_file": name,
                            "state": row["state"], "size_bytes": size, "uncompressed_bytes": raw,
                            "sha256": sha, "compression": "zstd" if compress else None})
            if time.monotonic() - pinned_at > PIN_TTL_SECS / 4:  # a long copy keeps its pins alive
                cat.write(seg_sql.pin, snap_id, [r["id"] for r in rows], PIN_TTL_SECS)
                pinned_at = time.monotonic()
            if progress is not None:
                progress("snapshot: copying segments", i + 1, len(rows))
        fsync_dir(partial / SEGMENTS)
        fd = open_regular(catalog_copy, os.O_RDWR, what="catalog copy")
        try:
            os.fsync(fd)
            cat_sha, cat_bytes = _hash_fd(fd)
        finally:
            os.close(fd)
        manifest = {
            "snapshot_id": snap_id,
            "created_at": int(time.time()),
            "collection": col["name"],
            "collection_id": col["id"],
            "catalog_file": CATALOG_FILE,
            "catalog_sha256": cat_sha,
            "catalog_bytes": cat_bytes,
            "total_bytes": sum(e["uncompressed_bytes"] for e in entries),
            "format_version": 1,
            "segments": entries,
        }
        _write_json_atomic(partial / MANIFEST, manifest, indent=2)
        os.rename(partial, final)
        fsync_dir(snaps)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        os.close(lock_fd)
        try:
            cat.write(seg_sql.unpin, snap_id)
        except Exception as exc:  # noqa: BLE001 - pins expire on their own
            log.warning("could not unpin snapshot %s: %s", snap_id, exc)
    return {"snapshot_id": snap_id, "snapshot_dir": str(final), "segments": len(entries)}


def _hash_fd(fd) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def _copy_out(fd, dst: Path, compress: bool) -> tuple[str, int, int]:
    """Copy an open file to a new file dst (zstd if asked) and fsync it: (sha256 of dst, size of dst,
    bytes read)."""
    h = hashlib.sha256()
    out = _create_file(dst)
    written = read = 0
    try:
        def emit(b):
            nonlocal written
            h.update(b)
            _write_all(out, b)
            written += len(b)
            return len(b)
        if compress:
            import zstandard

            class _Sink:
                write = staticmethod(emit)

            with zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(_Sink(), closefd=False) as w:
                while chunk := os.read(fd, CHUNK):
                    read += len(chunk)
                    w.write(chunk)
        else:
            while chunk := os.read(fd, CHUNK):
                read += len(chunk)
                emit(chunk)
        os.fsync(out)
    finally:
        os.close(out)
    return h.hexdigest(), written, read


def snapshot_create(data_dir, collection: str = "default", progress=None, compress: bool = False,
                    out_dir=None) -> dict:
    """CLI entry point: {'snapshot_id', 'snapshot_dir', 'segments'}; works against a live server."""
    return create(data_dir, collection, compress=compress, progress=progress, out_dir=out_dir)


# ---------------------------------------------------------------------------------- reading a snapshot
def _nonneg_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class _Snapshot:
    """A snapshot directory opened for reading, holding a shared flock that prune will not break.

    The directory given by the operator may be reached through a symlink; nothing inside it may.
    """

    def __init__(self, path, *, lock: bool = True):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise SnapshotError(f"{self.path} not found: not a snapshot directory") from None
        self._seg_fd = None
        try:
            if lock and not _lock_dir(self.fd, exclusive=False):
                raise SnapshotError(f"snapshot {self.path} is being pruned or written; try again later")
            self.manifest_bytes = self._read_manifest_bytes()
            self.manifest = _parse_manifest(self.manifest_bytes, self.path / MANIFEST)
        except BaseException:
            self.close()
            raise

    def _read_manifest_bytes(self) -> bytes:
        try:
            return _read_small(MANIFEST, MAX_MANIFEST_BYTES, "snapshot manifest", dir_fd=self.fd)
        except FileNotFoundError:
            raise SnapshotError(f"{self.path / MANIFEST} not found: not a snapshot directory") from None
        except UnsafePathError as exc:
            raise SnapshotError(f"{self.path}: {exc.message}") from None

    def open(self, name: str, what: str, in_segments: bool = False) -> int:
        """An O_NOFOLLOW fd of a regular file of the snapshot (SnapshotError when missing or unsafe)."""
        shown = self.path / (SEGMENTS if in_segments else "") / name
        try:
            if in_segments and self._seg_fd is None:
                self._seg_fd = os.open(SEGMENTS, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                       dir_fd=self.fd)
            return open_regular(name, dir_fd=self._seg_fd if in_segments else self.fd, what=what)
        except FileNotFoundError:
            raise SnapshotError(f"{what} missing: {shown}") from None
        except UnsafePathError as exc:
            raise SnapshotError(exc.message) from None
        except OSError as exc:  # e.g. segments/ itself is a symlink (ELOOP) or not a directory
            raise SnapshotError(f"{what} {shown} cannot be opened safely: {exc.strerror}") from None

    def close(self):
        for fd in (self._seg_fd, self.fd):
            if fd is not None:
                os.close(fd)
        self._seg_fd = self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _parse_manifest(raw: bytes, path: Path) -> dict:
    try:
        m = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(m, dict) or not isinstance(m.get("segments"), list):
        raise SnapshotError(f"{path}: missing 'segments' list")
    for key in ("catalog_file", "catalog_sha256"):
        if not isinstance(m.get(key), str):
            raise SnapshotError(f"{path}: missing '{key}'")
    for key in ("catalog_bytes", "total_bytes"):
        if key in m and not _nonneg_int(m[key]):
            raise SnapshotError(f"{path}: '{key}' must be a non-negative integer")
    try:
        plain_name(m["catalog_file"], f"{path}: catalog_file")
        seen = set()
        for i, e in enumerate(m["segments"]):
            if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("snapshot_file", "sha256")):
                raise SnapshotError(f"{path}: segments[{i}] is malformed")
            name = plain_name(e["snapshot_file"], f"{path}: segments[{i}].snapshot_file")
            for key in ("size_bytes", "uncompressed_bytes"):
                if key in e and not _nonneg_int(e[key]):
                    raise SnapshotError(f"{path}: segments[{i}].{key} must be a non-negative integer")
            staged = _staged_name(e)
            if not staged.endswith(".vdb") or staged in seen:
                raise SnapshotError(f"{path}: segments[{i}].snapshot_file {name!r} is not a unique .vdb file")
            seen.add(staged)
    except UnsafePathError as exc:
        raise SnapshotError(exc.message) from None
    return m


def _compressed(e: dict) -> bool:
    return e.get("compression") == "zstd" or e["snapshot_file"].endswith(".zst")


def _staged_name(e: dict) -> str:
    """The segment's file name in a data dir (the snapshot's name without its .zst)."""
    name = e["snapshot_file"]
    return name[:-4] if _compressed(e) and name.endswith(".zst") else name


class _Budget:
    """Bytes a restore may still write: the manifest's declared total (or, for manifests from before
    sizes were recorded, the free space where the files go), so a hostile file cannot fill the disk."""

    def __init__(self, m: dict, dest_dir: Path):
        self.left = m["total_bytes"] if "total_bytes" in m else shutil.disk_usage(dest_dir).free

    def take(self, n: int, what: str):
        if n > self.left:
            raise SnapshotError(f"{what} is larger than the snapshot's declared total size")
        self.left -= n


def _stage_file(snap: _Snapshot, e: dict, dest: Path | None, budget: _Budget | None) -> str:
    """Check one manifest entry's checksum; with dest, also write the segment file there
    (decompressed). Returns the sha256 of the snapshot's file."""
    src = snap.path / SEGMENTS / e["snapshot_file"]
    fd = snap.open(e["snapshot_file"], "snapshot segment", in_segments=True)
    out = None
    try:
        st = os.fstat(fd)
        if "size_bytes" in e and st.st_size != e["size_bytes"]:
            raise SnapshotError(f"segment checksum mismatch for {src}: it is {st.st_size} bytes, the manifest "
                                f"says {e['size_bytes']}")
        if dest is None:  # hash only
            sha, _ = _hash_fd(fd)
            return _check_sha(sha, e["sha256"], src)
        h = hashlib.sha256()
        out = _create_file(dest)
        if _compressed(e):
            _decompress_capped(fd, h, out, e, budget, src)
        else:
            budget.take(st.st_size, f"snapshot segment {src}")
            left = st.st_size
            while left > 0 and (chunk := os.read(fd, min(CHUNK, left))):
                h.update(chunk)
                _write_all(out, chunk)
                left -= len(chunk)
        os.fsync(out)
        return _check_sha(h.hexdigest(), e["sha256"], src)
    finally:
        os.close(fd)
        if out is not None:
            os.close(out)


def _decompress_capped(fd, h, out, e: dict, budget: _Budget, src: Path) -> None:
    """zstd-decompress fd into out, hashing the compressed bytes into h; stops as soon as the output
    would exceed the entry's declared size (or, without one, what the budget has left)."""
    import zstandard

    class _HashingReader:
        def read(self, n=-1):
            b = os.read(fd, CHUNK if n is None or n < 0 else min(n, CHUNK))
            h.update(b)
            return b

    declared = e.get("uncompressed_bytes")
    cap = declared if declared is not None else budget.left
    written = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(_HashingReader(), read_across_frames=True) as r:
            while chunk := r.read(CHUNK):
                if written + len(chunk) > cap:
                    raise SnapshotError(f"snapshot segment {src} decompresses to more than "
                                        f"{'its declared ' if declared is not None else 'the allowed '}{cap} bytes")
                _write_all(out, chunk)
                written += len(chunk)
    except zstandard.ZstdError as exc:
        raise SnapshotError(f"snapshot segment {src} is not valid zstd: {exc}") from None
    while b := os.read(fd, CHUNK):  # bytes after the last frame still count for the checksum
        h.update(b)
    if declared is not None and written != declared:
        raise SnapshotError(f"snapshot segment {src} decompresses to {written} bytes, manifest says {declared}")
    budget.take(written, f"snapshot segment {src}")


def _check_sha(got: str, expected: str, src: Path) -> str:
    if got != expected:
        raise SnapshotError(f"segment checksum mismatch for {src}: expected {expected}, got {got}")
    return got


def _stage_catalog(snap: _Snapshot, dest: Path | None) -> None:
    m = snap.manifest
    src = snap.path / m["catalog_file"]
    fd = snap.open(m["catalog_file"], "snapshot catalog")
    out = None
    try:
        size = os.fstat(fd).st_size
        if "catalog_bytes" in m and size != m["catalog_bytes"]:
            raise SnapshotError(f"catalog checksum mismatch for {src}: it is {size} bytes, the manifest says "
                                f"{m['catalog_bytes']}")
        h = hashlib.sha256()
        if dest is not None:
            out = _create_file(dest)
        left = size
        while left > 0 and (chunk := os.read(fd, min(CHUNK, left))):
            h.update(chunk)
            if out is not None:
                _write_all(out, chunk)
            left -= len(chunk)
        if out is not None:
            os.fsync(out)
        sha = h.hexdigest()
        if sha != m["catalog_sha256"]:
            raise SnapshotError(f"catalog checksum mismatch for {src}: expected {m['catalog_sha256']}, got {sha}")
    finally:
        os.close(fd)
        if out is not None:
            os.close(out)


def _verify_segment(path: Path) -> int:
    from vibrato.segment import SegmentReader

    try:
        reader = SegmentReader.open(path)
        try:
            return reader.verify()
        finally:
            reader.close()
    except (OSError, ValueError) as exc:  # SegmentFormatError / SegmentChecksumError included
        raise SnapshotError(f"snapshot segment {path.name} is damaged: {exc}") from None


def _check_catalog(catalog_path: Path, m: dict, base: Path) -> None:
    """The snapshot's catalog may only reference plain names in segments/ and quarantine/, and its
    active segments must be exactly the files the manifest lists."""
    try:
        refs = backup.read_copy(catalog_path)
    except ValueError as exc:
        raise SnapshotError(f"snapshot catalog is not usable: {exc}") from None
    names = {_staged_name(e) for e in m["segments"]}
    referenced = set()
    try:
        for sid, state, rel in refs["segments"]:
            p = resolve_rel(base, rel, SEGMENTS, f"snapshot catalog: segment {sid!r} ({state}) path")
            if state in seg_sql.SERVING_STATES:
                if p.name not in names:
                    raise SnapshotError(f"snapshot catalog references {rel}, which the snapshot does not contain")
                referenced.add(p.name)
        for q in refs["quarantine"]:
            resolve_rel(base, q, "quarantine", "snapshot catalog: quarantine path")
    except UnsafePathError as exc:
        raise SnapshotError(f"{exc.message}; refusing the snapshot") from None
    extra = names - referenced
    if extra:
        raise SnapshotError(f"snapshot manifest lists {sorted(extra)[0]}, which its catalog does not reference")


# ---------------------------------------------------------------------------------- restore
def snapshot_restore(data_dir, snapshot_dir, progress=None) -> dict:
    """Verify the snapshot completely, then swap it in atomically; previous state to tmp/restore_backup_<ts>/."""
    data_dir, snapshot_dir = Path(data_dir), Path(snapshot_dir)
    lay = _layout(data_dir)
    _mkdirs(data_dir)
    _mkdirs(lay.segments_dir, lay.quarantine_dir, lay.snapshots_dir, lay.tmp_dir, lay.logs_dir)
    if is_locked(data_dir):
        raise SnapshotError(f"data dir {data_dir} is in use by a running server; stop it before restoring")
    with DataDirLock(data_dir).acquire("snapshot-restore"), _Snapshot(snapshot_dir) as snap:
        finish_interrupted_restore(data_dir)
        m = snap.manifest
        ts = int(time.time())
        stage = lay.tmp_dir / f"{STAGE_PREFIX}{ts}_{os.getpid()}"
        staged = _layout(stage)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(mode=DIR_MODE)
        staged.segments_dir.mkdir(mode=DIR_MODE)
        try:
            _stage_catalog(snap, staged.catalog_path)
            _check_catalog(staged.catalog_path, m, data_dir)
            budget = _Budget(m, stage)
            total = len(m["segments"])
            for i, e in enumerate(m["segments"]):
                dest = staged.segments_dir / _staged_name(e)
                _stage_file(snap, e, dest, budget)
                _verify_segment(dest)
                if progress is not None:
                    progress("restore: verifying segments", i + 1, total)
            fsync_dir(staged.segments_dir)
            fsync_dir(stage)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        backup_dir = lay.tmp_dir / f"{BACKUP_PREFIX}{ts}"
        n = 0
        while backup_dir.exists():
            n += 1
            backup_dir = lay.tmp_dir / f"{BACKUP_PREFIX}{ts}_{n}"
        journal = {"stage": str(stage.relative_to(data_dir)), "backup": str(backup_dir.relative_to(data_dir)),
                   "snapshot_dir": str(snapshot_dir)}
        _write_json_atomic(data_dir / JOURNAL, journal)
        finish_interrupted_restore(data_dir)
    return {"restored_snapshot": str(snapshot_dir)}


def _read_journal(data_dir: Path) -> tuple[Path, Path] | None:
    """(stage, backup) of a pending restore, both checked to be ours: plain names under tmp/."""
    jpath = data_dir / JOURNAL
    try:
        raw = _read_small(jpath, MAX_SMALL_FILE_BYTES, "restore journal")
    except FileNotFoundError:
        return None
    except UnsafePathError as exc:
        raise SnapshotError(f"{exc.message}; nothing was changed") from None
    try:
        j = json.loads(raw)
        if not isinstance(j, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"restore journal {jpath} is malformed ({exc}); nothing was changed. Inspect it, "
                            f"then remove it to discard the interrupted restore") from None
    try:
        stage = resolve_rel(data_dir, j.get("stage"), "tmp", f"restore journal {jpath} 'stage'")
        backup_dir = resolve_rel(data_dir, j.get("backup"), "tmp", f"restore journal {jpath} 'backup'")
    except UnsafePathError as exc:
        raise SnapshotError(f"{exc.message}; nothing was changed") from None
    for p, prefix in ((stage, STAGE_PREFIX), (backup_dir, BACKUP_PREFIX)):
        if not p.name.startswith(prefix) or (os.path.lexists(p) and not stat.S_ISDIR(os.lstat(p).st_mode)):
            raise SnapshotError(f"restore journal {jpath} names {p}, which is not a {prefix}* directory; "
                                "nothing was changed")
    return stage, backup_dir


def finish_interrupted_restore(data_dir):
    """Roll a journaled restore forward: every step is a rename that is skipped once done."""
    data_dir = Path(data_dir)
    paths = _read_journal(data_dir)
    if paths is None:
        return False
    stage, backup_dir = paths
    lay, staged, kept = _layout(data_dir), _layout(stage), _layout(backup_dir)
    _mkdirs(kept.segments_dir)
    if staged.catalog_path.exists():
        for suffix in ("", "-wal", "-shm"):
            live = Path(str(lay.catalog_path) + suffix)
            if live.exists():
                os.replace(live, Path(str(kept.catalog_path) + suffix))
        if staged.segments_dir.exists():
            for entry in os.scandir(lay.segments_dir):
                os.replace(entry.path, kept.segments_dir / entry.name)
        fsync_dir(kept.segments_dir)
        fsync_dir(backup_dir)
        if staged.segments_dir.exists():
            for entry in os.scandir(staged.segments_dir):
                os.replace(entry.path, lay.segments_dir / entry.name)
            fsync_dir(lay.segments_dir)
        os.replace(staged.catalog_path, lay.catalog_path)
    fsync_dir(data_dir)
    shutil.rmtree(stage, ignore_errors=True)
    os.unlink(data_dir / JOURNAL)
    fsync_dir(data_dir)
    log.info("restore finished: previous state kept in %s", backup_dir)
    return True


# ---------------------------------------------------------------------------------- lifecycle
def verify(snapshot_dir, progress=None) -> dict:
    """Check a snapshot as restore would (manifest, every checksum, every segment's structure, the
    catalog's references) without writing a data dir; records the outcome in VERIFIED."""
    snapshot_dir = Path(snapshot_dir)
    with _Snapshot(snapshot_dir) as snap:
        m = snap.manifest
        try:
            _stage_catalog(snap, None)
            _check_catalog(snapshot_dir / m["catalog_file"], m, snapshot_dir)
            checked = 0
            with tempfile.TemporaryDirectory(prefix="vibrato-verify-") as tmp:
                budget = _Budget(m, Path(tmp))
                for i, e in enumerate(m["segments"]):
                    if _compressed(e):
                        dest = Path(tmp) / _staged_name(e)
                        _stage_file(snap, e, dest, budget)
                        checked += _verify_segment(dest)
                        dest.unlink()
                    else:
                        _stage_file(snap, e, None, None)
                        checked += _verify_segment(snapshot_dir / SEGMENTS / e["snapshot_file"])
                    if progress is not None:
                        progress("verify: segments", i + 1, len(m["segments"]))
        except SnapshotError as exc:
            _record_verification(snap, False, exc.message)
            raise
        _record_verification(snap, True, None)
    return {"snapshot_id": m.get("snapshot_id", snapshot_dir.name), "segments": len(m["segments"]),
            "bytes_checked": checked}


def _record_verification(snap: _Snapshot, ok: bool, error) -> None:
    marker = {"ok": ok, "verified_at": int(time.time()), "error": error,
              "manifest_sha256": hashlib.sha256(snap.manifest_bytes).hexdigest()}
    try:
        _write_json_atomic(snap.path / VERIFIED, marker)
    except OSError as exc:  # read-only media: the check itself still counts
        log.warning("could not record the verification of %s: %s", snap.path, exc)


def _verification(path: Path, manifest_bytes: bytes) -> str:
    try:
        marker = json.loads(_read_small(path / VERIFIED, MAX_SMALL_FILE_BYTES, "verification marker"))
    except (OSError, ValueError, VibratoError):
        return "no"
    if not isinstance(marker, dict) or marker.get("manifest_sha256") != hashlib.sha256(manifest_bytes).hexdigest():
        return "no"  # verified a different manifest
    return "yes" if marker.get("ok") is True else "failed"


def list_snapshots(snapshots_dir) -> list[dict]:
    """Every snapshot directory, oldest first, from its manifest alone (nothing is hashed):
    snapshot_id, path, created_at, size_bytes, segments, verified (yes/no/failed), error, and order
    (the sort key)."""
    snapshots_dir = Path(snapshots_dir)
    out = []
    try:
        names = sorted(os.listdir(snapshots_dir))
    except FileNotFoundError:
        return []
    for name in names:
        path = snapshots_dir / name
        if name.startswith(".") or not stat.S_ISDIR(os.lstat(path).st_mode):
            continue
        info = {"snapshot_id": name, "path": str(path), "created_at": None, "size_bytes": None, "segments": None,
                "verified": "no", "error": None}
        try:
            with _Snapshot(path, lock=False) as snap:
                m = snap.manifest
                created = m.get("created_at")
                info["created_at"] = created if _nonneg_int(created) else int(os.lstat(path).st_mtime)
                cat_bytes = m.get("catalog_bytes")
                if cat_bytes is None:
                    cat_bytes = os.lstat(path / m["catalog_file"]).st_size
                info["size_bytes"] = cat_bytes + sum(int(e.get("size_bytes", 0)) for e in m["segments"])
                info["segments"] = len(m["segments"])
                info["verified"] = _verification(path, snap.manifest_bytes)
                written_ns = os.stat(MANIFEST, dir_fd=snap.fd, follow_symlinks=False).st_mtime_ns
        except (SnapshotError, OSError) as exc:
            info["error"] = getattr(exc, "message", None) or str(exc)
            written_ns = 0
        # created_at has whole seconds; when the manifest was written orders snapshots within one
        info["order"] = (info["created_at"] is None, info["created_at"] or 0, written_ns, name)
        out.append(info)
    out.sort(key=lambda s: s["order"])
    return out


def prune(snapshots_dir, *, keep_last: int | None = None, older_than_secs: int | None = None,
          data_dir=None, now: float | None = None) -> dict:
    """Remove snapshots beyond the newest `keep_last` and/or created more than `older_than_secs` ago
    (with both: old ones go, the newest keep_last stay), plus `.partial` leftovers of creates that
    died. A snapshot that a restore or verify is reading is refused, not removed. With a data dir,
    the removed snapshots' segment pins are released, so the obsolete files they held get collected.
    Returns {'removed', 'abandoned', 'refused', 'kept'} (lists of snapshot ids)."""
    if keep_last is None and older_than_secs is None:
        raise SnapshotError("prune needs --keep-last and/or --older-than")
    snapshots_dir = Path(snapshots_dir)
    now = time.time() if now is None else now
    snaps = [s for s in list_snapshots(snapshots_dir) if s["error"] is None][::-1]  # newest first
    keep = snaps[:keep_last] if keep_last is not None else []
    res = {"removed": [], "abandoned": [], "refused": [], "kept": [s["snapshot_id"] for s in keep]}
    for s in snaps[len(keep):]:
        if older_than_secs is not None and s["created_at"] >= now - older_than_secs:
            res["kept"].append(s["snapshot_id"])
        elif _remove_locked(snapshots_dir, s["snapshot_id"]):
            res["removed"].append(s["snapshot_id"])
        else:
            res["refused"].append(s["snapshot_id"])
    for name in sorted(os.listdir(snapshots_dir)) if snapshots_dir.is_dir() else []:
        for suffix in (".partial", ".pruning"):
            if name.startswith(".") and name.endswith(suffix) and _remove_locked(snapshots_dir, name):
                res["abandoned"].append(name[1:-len(suffix)])
    gone = res["removed"] + res["abandoned"]
    if gone and data_dir is not None and _layout(data_dir).catalog_path.exists():
        with _open_catalog(data_dir) as cat:
            cat.write(lambda conn: [seg_sql.unpin(conn, sid) for sid in gone])
    return res


def _remove_locked(snapshots_dir: Path, name: str) -> bool:
    """Remove snapshots_dir/name under an exclusive flock; False when someone holds it."""
    path = snapshots_dir / plain_name(name, "snapshot directory")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        if not _lock_dir(fd, exclusive=True):
            return False
        doomed = path
        if not name.startswith("."):  # out of sight first: list and restore never see half a snapshot
            doomed = snapshots_dir / f".{name}.pruning"
            os.rename(path, doomed)
            fsync_dir(snapshots_dir)
        shutil.rmtree(doomed)
        fsync_dir(snapshots_dir)
        return True
    finally:
        os.close(fd)


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
                res["deletes_undone"] = undo_for_replay(data_dir, conn, col["id"], target_lsn)
                if res["removed"]:
                    lo, hi = res["id_start"], res["id_end"]
                    dead = [r["id"] for r in seg_sql.list_by_state(conn, col["id"], seg_sql.SERVING_STATES)
                            if r["vector_id_start"] >= lo and r["vector_id_end"] <= hi]
                    seg_sql.set_states(conn, dead, "obsolete")
                return res
            res = cat.write(txn)
            if progress is not None:
                progress("replay: done", 1, 1)
            log.info("replay-to-lsn %d on %s: removed %d rows, undid %d deletes", target_lsn, collection,
                     res["removed"], res["deletes_undone"])
        finally:
            cat.close()
    return {"replayed_to_lsn": int(target_lsn), "collection": collection}
