"""Snapshots: consistency with in-flight jobs, restore hardening against hostile snapshots, and the
snapshot lifecycle commands (list, verify, prune, create --out-dir). Real engines, real files."""
import json
import os
from pathlib import Path

import pytest

from enginetools import dump, payload
from vibrato.engine import Engine, snapshot as snapmod, snapshot_restore

DIM = 16


def ingest(eng, keys):
    for k in keys:
        v, m = payload(k, DIM)
        eng.ingest(v, m, k)


def open_engine(d, **kw):
    return Engine.open(d, dim=DIM, background=False, checkpoint_max_rows=20, pq_min_rows=64, **kw)


def snapshot_inside(monkeypatch, module, point):
    """Take a snapshot from inside a running job, when it reaches the fault point `point`."""
    taken = {}
    real = module.fault_point

    def hook(name):
        if name == point and "snap" not in taken:
            taken["snap"] = taken["engine"].snapshot()["details"]
        real(name)
    monkeypatch.setattr(module, "fault_point", hook)
    return taken


# ---------------------------------------------------------------------------- in-flight jobs
@pytest.mark.parametrize("job, point", [
    ("checkpoint", "checkpoint:registered"), ("checkpoint", "checkpoint:renamed"),
    ("checkpoint", "checkpoint:loaded"), ("compaction", "compaction:registered"),
    ("compaction", "compaction:renamed"), ("compaction", "compaction:loaded"),
])
def test_snapshot_during_inflight_job_restores_without_failed_segments(tmp_path, monkeypatch, job, point):
    from vibrato.engine import checkpoint, compaction

    eng = open_engine(tmp_path / "src")
    try:
        ingest(eng, [f"k{i}" for i in range(50)])
        if job == "compaction":
            eng.checkpoint()
            eng.checkpoint()
        expected = dump(eng)
        taken = snapshot_inside(monkeypatch, checkpoint if job == "checkpoint" else compaction, point)
        taken["engine"] = eng
        eng.checkpoint() if job == "checkpoint" else eng.compact()
        snap = taken["snap"]
    finally:
        eng.close()
    fresh = tmp_path / "fresh"
    snapshot_restore(fresh, snap["snapshot_dir"])
    with open_engine(fresh) as e2:
        stats = e2.stats()
        assert e2.readiness()[0], e2.readiness()[1]
        assert stats["failed_segments"] == 0, e2._recovery
        assert stats["checkpoint_jobs_inflight"] == 0 and stats["compaction_jobs_inflight"] == 0
        assert e2._recovery["jobs_rolled_back"] == 0 and e2._recovery["jobs_rolled_forward"] == 0
        assert dump(e2) == expected
        # the un-activated checkpoint's rows are pending again and checkpoint cleanly
        e2.checkpoint()
        while e2.compact()["state"] != "idle":
            pass
        assert dump(e2) == expected and e2.stats()["failed_segments"] == 0


# ---------------------------------------------------------------------------- hostile snapshots
def make_snapshot(tmp_path, *, compress=False, n=40):
    """A data dir with one checkpointed segment and an un-checkpointed tail, and a snapshot of it."""
    d = tmp_path / "d"
    with open_engine(d) as eng:
        ingest(eng, [f"k{i}" for i in range(n)])
        eng.checkpoint()
        ingest(eng, [f"t{i}" for i in range(3)])
        expected = dump(eng)
    res = snapmod.create(d, "default", compress=compress)
    return d, Path(res["snapshot_dir"]), expected


def rewrite_manifest(snap, fn):
    path = snap / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m, indent=2))


def resign_catalog(snap):
    """Recompute the manifest's catalog checksum and size, as a tamperer would."""
    cat = snap / "catalog.sqlite3"
    import hashlib
    rewrite_manifest(snap, lambda m: m.update(catalog_sha256=hashlib.sha256(cat.read_bytes()).hexdigest(),
                                              catalog_bytes=cat.stat().st_size))


def tamper_catalog(snap, sql, params=()):
    import apsw
    conn = apsw.Connection(str(snap / "catalog.sqlite3"))
    try:
        cid = conn.execute("SELECT id FROM collections").fetchone()[0]
        conn.execute(sql, {"cid": cid, **dict(params)})
    finally:
        conn.close()
    resign_catalog(snap)


def tree(path):
    """Every entry under path with its type, size and mtime: to prove a refused restore touched nothing."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root) / name
            st = p.lstat()
            if name == "LOCK" or p.is_dir():  # the command's own lock, and dirs a staging copy came and went in
                out[str(p.relative_to(path))] = st.st_mode
            else:
                out[str(p.relative_to(path))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


SEG_ROW = ("INSERT INTO segments(id, collection_id, level, kind, path, row_count, live_count, vector_id_start, "
           "vector_id_end, state, created_at, updated_at) VALUES ('seg_evil', :cid, 0, 'raw', :path, 1, 1, "
           "100000, 100000, :state, 0, 0)")


@pytest.mark.parametrize("state", ["obsolete", "active", "building", "deleted"])
@pytest.mark.parametrize("bad", ["/VICTIM", "../../victim", "segments/../../victim", "quarantine/x.vdb"])
def test_restore_refuses_catalog_segment_paths_outside_segments(tmp_path, state, bad):
    d, snap, expected = make_snapshot(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = bad.replace("/VICTIM", str(victim))
    tamper_catalog(snap, SEG_ROW, {"path": path, "state": state})
    before = tree(d)
    with pytest.raises(snapmod.SnapshotError, match="not a plain file name|not inside segments/"):
        snapshot_restore(d, snap)
    assert tree(d) == before and victim.read_text() == "precious"
    fresh = tmp_path / "fresh"
    with pytest.raises(snapmod.SnapshotError):
        snapshot_restore(fresh, snap)
    assert not (fresh / "catalog.sqlite3").exists() and not list((fresh / "tmp").iterdir())
    with pytest.raises(snapmod.SnapshotError):
        snapmod.verify(snap)
    with open_engine(d) as eng:
        assert dump(eng) == expected
    assert victim.read_text() == "precious"


def test_restore_refuses_quarantine_paths_outside_quarantine(tmp_path):
    d, snap, _ = make_snapshot(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    tamper_catalog(snap, "INSERT INTO orphan_files(collection_id, original_path, quarantine_path, reason, "
                         "size_bytes, quarantined_at) VALUES (:cid, 'segments/x.vdb', :q, 'r', 1, 0)",
                   {"q": str(victim)})
    before = tree(d)
    with pytest.raises(snapmod.SnapshotError, match="quarantine"):
        snapshot_restore(d, snap)
    assert tree(d) == before and victim.read_text() == "precious"


def test_cli_restore_of_tampered_snapshot_exits_nonzero(tmp_path):
    from click.testing import CliRunner
    from vibrato.cli import cli

    d, snap, _ = make_snapshot(tmp_path)
    tamper_catalog(snap, SEG_ROW, {"path": "/etc/passwd", "state": "obsolete"})
    before = tree(d)
    res = CliRunner().invoke(cli, ["snapshot-restore", "--data-dir", str(d), "--snapshot-dir", str(snap)])
    assert res.exit_code == 1 and "/etc/passwd" in res.output and "not inside segments/" in res.output
    assert tree(d) == before


@pytest.mark.parametrize("which", ["segment", "catalog", "manifest", "segments-dir"])
def test_restore_refuses_symlinks_inside_the_snapshot(tmp_path, which):
    d, snap, _ = make_snapshot(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    if which == "segment":
        target = next((snap / "segments").iterdir())
    elif which == "segments-dir":
        target = snap / "segments"
    else:
        target = snap / ("catalog.sqlite3" if which == "catalog" else "manifest.json")
    moved = outside / target.name
    os.rename(target, moved)  # identical content, reached through a symlink: still refused
    os.symlink(moved, target)
    before = tree(d)
    with pytest.raises(snapmod.SnapshotError, match="symlink|cannot be opened safely"):
        snapshot_restore(d, snap)
    assert tree(d) == before
    with pytest.raises(snapmod.SnapshotError, match="symlink|cannot be opened safely"):
        snapmod.verify(snap)


def test_compressed_snapshot_round_trip_records_sizes(tmp_path):
    d, snap, expected = make_snapshot(tmp_path, compress=True)
    m = json.loads((snap / "manifest.json").read_text())
    (e,) = m["segments"]
    assert e["compression"] == "zstd" and e["snapshot_file"].endswith(".vdb.zst")
    assert e["uncompressed_bytes"] == os.path.getsize(d / e["source_path"]) > e["size_bytes"]
    assert m["total_bytes"] == e["uncompressed_bytes"]
    snapmod.verify(snap)
    fresh = tmp_path / "fresh"
    snapshot_restore(fresh, snap)
    with open_engine(fresh) as e2:
        assert dump(e2) == expected and e2.stats()["failed_segments"] == 0


@pytest.mark.parametrize("legacy", [False, True])
def test_zstd_bomb_is_capped_at_the_declared_size(tmp_path, monkeypatch, legacy):
    import hashlib
    import zstandard

    d, snap, _ = make_snapshot(tmp_path, compress=True)
    m = json.loads((snap / "manifest.json").read_text())
    seg = snap / "segments" / m["segments"][0]["snapshot_file"]
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    assert len(bomb) < 8192
    seg.write_bytes(bomb)

    def edit(m):
        e = m["segments"][0]
        e.update(sha256=hashlib.sha256(bomb).hexdigest(), size_bytes=len(bomb))
        if legacy:  # a manifest from before sizes were recorded per file: the total still caps it
            del e["uncompressed_bytes"]
    rewrite_manifest(snap, edit)
    written = []
    real = snapmod._write_all
    monkeypatch.setattr(snapmod, "_write_all", lambda fd, b: (written.append(len(b)), real(fd, b)))
    before = tree(d)
    with pytest.raises(snapmod.SnapshotError, match="decompresses to more than"):
        snapshot_restore(d, snap)
    assert sum(written) <= m["catalog_bytes"] + m["total_bytes"], "stopped writing at the cap"
    assert tree(d) == before


@pytest.mark.parametrize("journal", [
    '{"stage": "../../victim", "backup": "tmp/restore_backup_1"}',
    '{"stage": "tmp/restore_stage_1", "backup": "../victim"}',
    '{"stage": "/VICTIM", "backup": "tmp/restore_backup_1"}',
    '{"stage": "tmp/../../victim", "backup": "tmp/restore_backup_1"}',
    '{"stage": "tmp/logs", "backup": "tmp/restore_backup_1"}',
    '{"stage": "tmp/restore_stage_1"}',
    '{"stage": "tmp/restore_stage_1", "backup": ',
    '["tmp/restore_stage_1"]',
    '{"stage": "tmp/restore_stage_1", "backup": "tmp/restore_backup_1", "pad": "' + "x" * 70000 + '"}',
])
def test_planted_restore_journal_is_refused_and_touches_nothing(tmp_path, journal):
    d = tmp_path / "d"
    with open_engine(d) as eng:
        ingest(eng, ["a", "b"])
        expected = dump(eng)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "catalog.sqlite3").write_text("precious")
    (victim / "segments").mkdir()
    (d / "RESTORE_JOURNAL").write_text(journal.replace("/VICTIM", str(victim)))
    before = tree(d)
    with pytest.raises(snapmod.SnapshotError, match="restore journal"):
        open_engine(d)
    with pytest.raises(snapmod.SnapshotError, match="restore journal"):
        snapmod.finish_interrupted_restore(d)
    assert tree(d) == before
    assert (victim / "catalog.sqlite3").read_text() == "precious" and (victim / "segments").is_dir()
    os.unlink(d / "RESTORE_JOURNAL")
    with open_engine(d) as eng:
        assert dump(eng) == expected


def test_symlinked_restore_journal_is_refused(tmp_path):
    d = tmp_path / "d"
    with open_engine(d):
        pass
    real = tmp_path / "journal"
    real.write_text('{"stage": "tmp/restore_stage_1", "backup": "tmp/restore_backup_1"}')
    os.symlink(real, d / "RESTORE_JOURNAL")
    with pytest.raises(snapmod.SnapshotError, match="symlink"):
        snapmod.finish_interrupted_restore(d)
    assert real.exists()


def test_snapshot_and_restore_create_private_files(tmp_path):
    d, snap, _ = make_snapshot(tmp_path)
    for p in [snap, *snap.rglob("*")]:
        want = 0o700 if p.is_dir() else 0o600
        assert p.stat().st_mode & 0o777 == want, p
    fresh = tmp_path / "fresh"
    snapshot_restore(fresh, snap)
    snapshot_restore(fresh, snap)  # a second restore keeps the first one's state as a backup
    assert fresh.stat().st_mode & 0o777 == 0o700
    assert (fresh / "catalog.sqlite3").stat().st_mode & 0o777 == 0o600
    for p in (fresh / "segments").iterdir():
        assert p.stat().st_mode & 0o777 == 0o600, p
    backups = list((fresh / "tmp").glob("restore_backup_*"))
    assert len(backups) == 2 and any((b / "catalog.sqlite3").exists() for b in backups)
    for p in backups + [q for b in backups for q in b.rglob("*")]:
        assert p.stat().st_mode & 0o777 == (0o700 if p.is_dir() else 0o600), p
