"""Snapshots: consistency with in-flight jobs, restore hardening against hostile snapshots, and the
snapshot lifecycle commands (list, verify, prune, create --out-dir). Real engines, real files."""
import json
import os
import shlex
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


# ---------------------------------------------------------------------------- lifecycle commands
def run(*args):
    from click.testing import CliRunner
    from vibrato.cli import cli
    return CliRunner().invoke(cli, [str(a) for a in args])


def listed(*args):
    res = run("snapshot-list", *args)
    assert res.exit_code == 0, res.output
    return [dict(kv.split("=", 1) for kv in shlex.split(line)) for line in res.stdout.splitlines()]


def test_list_and_verify(tmp_path):
    import hashlib

    d, snap, _ = make_snapshot(tmp_path)
    second = Path(snapmod.create(d, "default")["snapshot_dir"])
    rows = listed("--data-dir", d)
    assert [r["id"] for r in rows] == [snap.name, second.name]
    m = json.loads((snap / "manifest.json").read_text())
    assert rows[0]["created"] == str(m["created_at"]) and rows[0]["created_iso"].endswith("Z")
    assert int(rows[0]["size_bytes"]) == m["catalog_bytes"] + m["segments"][0]["size_bytes"]
    assert rows[0]["segments"] == "1" and rows[0]["verified"] == "no"

    res = run("snapshot-verify", "--snapshot-dir", snap)
    assert res.exit_code == 0, res.output
    assert f"verified={snap.name}" in res.stdout and "segments=1" in res.stdout
    assert [r["verified"] for r in listed("--data-dir", d)] == ["yes", "no"]
    assert (snap / "VERIFIED").stat().st_mode & 0o777 == 0o600
    snapshot_restore(tmp_path / "fresh", snap)  # the marker does not disturb a restore

    seg = next((snap / "segments").iterdir())
    raw = bytearray(seg.read_bytes())
    raw[100] ^= 1
    seg.write_bytes(bytes(raw))
    res = run("snapshot-verify", "--snapshot-dir", snap)
    assert res.exit_code == 1 and "segment checksum mismatch" in res.output
    assert listed("--data-dir", d)[0]["verified"] == "failed"

    # a segment whose checksum matches but whose structure is damaged (the manifest re-signed)
    rewrite_manifest(snap, lambda m: m["segments"][0].update(sha256=hashlib.sha256(bytes(raw)).hexdigest()))
    res = run("snapshot-verify", "--snapshot-dir", snap)
    assert res.exit_code == 1 and "is damaged" in res.output
    # a changed manifest invalidates an earlier result
    rewrite_manifest(second, lambda m: m.update(note="edited"))
    assert listed("--data-dir", d)[1]["verified"] == "no"
    res = run("snapshot-verify", "--snapshot-dir", tmp_path / "nowhere")
    assert res.exit_code == 1 and "not a snapshot directory" in res.output


def test_list_reports_a_broken_snapshot_dir(tmp_path):
    (tmp_path / "snaps" / "snap_1_x").mkdir(parents=True)
    (tmp_path / "snaps" / ".snap_2_y.partial").mkdir()
    rows = listed("--snapshots-dir", tmp_path / "snaps")
    assert len(rows) == 1 and rows[0]["id"] == "snap_1_x" and "error" in rows[0]


def fake_snapshots(snaps_dir, ages_secs, now):
    """Copies of one real snapshot with manifests back-dated by the given ages."""
    import shutil
    ids = []
    for i, age in enumerate(ages_secs):
        sid = f"snap_{int(now - age)}_{i:016x}"
        shutil.copytree(snaps_dir / "base", snaps_dir / sid)
        rewrite_manifest(snaps_dir / sid, lambda m: m.update(snapshot_id=sid, created_at=int(now - age)))
        ids.append(sid)
    return ids


@pytest.fixture
def aged(tmp_path):
    import time

    d, snap, _ = make_snapshot(tmp_path)
    snaps = d / "snapshots"
    os.rename(snap, snaps / "base")
    now = time.time()
    ids = fake_snapshots(snaps, [10 * 86400, 8 * 86400, 3 * 86400, 3600, 60], now)
    import shutil
    shutil.rmtree(snaps / "base")
    return d, snaps, ids


def test_prune_keep_last(aged):
    d, snaps, ids = aged
    res = run("snapshot-prune", "--data-dir", d, "--keep-last", 2)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [f"removed={i}" for i in ids[:3]][::-1] + ["kept=2"]
    assert sorted(p.name for p in snaps.iterdir()) == ids[3:]


def test_prune_older_than_and_combined(aged):
    d, snaps, ids = aged
    res = run("snapshot-prune", "--data-dir", d, "--older-than", "7d")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in snaps.iterdir()) == ids[2:]
    # both: older than 30 minutes goes, but the newest 3 always stay
    res = run("snapshot-prune", "--data-dir", d, "--older-than", "30m", "--keep-last", 3)
    assert res.exit_code == 0 and sorted(p.name for p in snaps.iterdir()) == ids[2:]
    res = run("snapshot-prune", "--data-dir", d, "--older-than", "30m", "--keep-last", 1)
    assert res.exit_code == 0 and sorted(p.name for p in snaps.iterdir()) == ids[4:]


@pytest.mark.parametrize("bad", ["7", "7w", "d", "-1d", "1.5h"])
def test_prune_rejects_bad_ages_and_needs_a_rule(tmp_path, bad):
    res = run("snapshot-prune", "--data-dir", tmp_path / "d", "--older-than", bad)
    assert res.exit_code == 2 and "unit s, m, h or d" in res.output
    res = run("snapshot-prune", "--data-dir", tmp_path / "d")
    assert res.exit_code == 2 and "--keep-last" in res.output


def test_prune_refuses_a_snapshot_being_read(aged):
    import fcntl

    d, snaps, ids = aged
    fd = os.open(snaps / ids[0], os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # what a restore or verify holds
        res = run("snapshot-prune", "--data-dir", d, "--keep-last", 3)
        assert res.exit_code == 1 and ids[0] in res.output and "being read" in res.output
        assert f"removed={ids[1]}" in res.stdout
        assert sorted(p.name for p in snaps.iterdir()) == [ids[0]] + ids[2:]
    finally:
        os.close(fd)
    # and while prune holds a snapshot, a restore refuses it
    fd = os.open(snaps / ids[0], os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(snapmod.SnapshotError, match="being pruned"):
            snapshot_restore(d.parent / "fresh", snaps / ids[0])
    finally:
        os.close(fd)


def test_prune_removes_abandoned_partials_but_not_a_create_in_progress(tmp_path):
    import fcntl

    d, snap, _ = make_snapshot(tmp_path)
    snaps = snap.parent
    (snaps / ".snap_1_dead.partial" / "segments").mkdir(parents=True)
    live = snaps / ".snap_2_live.partial"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running create holds
        res = run("snapshot-prune", "--data-dir", d, "--keep-last", 5)
        assert res.exit_code == 0, res.output
        assert "removed_partial=snap_1_dead" in res.stdout and "kept=1" in res.stdout
        assert live.exists() and snap.exists() and not (snaps / ".snap_1_dead.partial").exists()
    finally:
        os.close(fd)


def test_prune_releases_pins_so_obsolete_segments_get_collected(tmp_path):
    from vibrato.catalog import segments as seg_sql
    from vibrato.engine.maintenance import gc_obsolete

    d = tmp_path / "d"
    eng = open_engine(d)
    try:
        ingest(eng, [f"k{i}" for i in range(40)])
        eng.checkpoint()
        eng.checkpoint()
        snap = Path(eng.snapshot()["details"]["snapshot_dir"])
        sid = snap.name
        inputs = eng.catalog.read(seg_sql.list_by_state, eng.cid, ["active"])
        # a create killed after its rename but before it unpinned leaves its pins behind
        eng.catalog.write(seg_sql.pin, sid, [r["id"] for r in inputs])
        eng.compact()
        files = [d / r["path"] for r in inputs]
        assert all(f.exists() for f in files), "pinned inputs are kept"
        res = run("snapshot-prune", "--data-dir", d, "--keep-last", 0)  # while the engine runs
        assert res.exit_code == 0 and f"removed={sid}" in res.stdout, res.output
        assert not snap.exists()
        assert sid not in {p for p in eng.catalog.read(
            lambda c: [r[0] for r in c.execute("SELECT snapshot_id FROM snapshot_pins")])}
        assert gc_obsolete(eng) == 2 and not any(f.exists() for f in files)
    finally:
        eng.close()


def test_create_out_dir_restore_list_and_prune(tmp_path):
    d = tmp_path / "d"
    with open_engine(d) as eng:
        ingest(eng, [f"k{i}" for i in range(30)])
        eng.checkpoint()
        ingest(eng, ["tail"])
        expected = dump(eng)
    out = tmp_path / "offdisk" / "vibrato"
    res = run("snapshot-create", "--data-dir", d, "--out-dir", out)
    assert res.exit_code == 0, res.output
    kv = dict(line.split("=", 1) for line in res.stdout.splitlines())
    snap = Path(kv["snapshot_dir"])
    assert snap.parent == out and snap.name == kv["snapshot_id"] and kv["segments"] == "1"
    assert not list((d / "snapshots").iterdir())
    assert out.stat().st_mode & 0o777 == 0o700 and (tmp_path / "offdisk").stat().st_mode & 0o777 == 0o700
    m = json.loads((snap / "manifest.json").read_text())
    assert all(not os.path.isabs(e["source_path"]) and "/" not in e["snapshot_file"] for e in m["segments"])
    assert [r["id"] for r in listed("--snapshots-dir", out)] == [snap.name]
    assert run("snapshot-verify", "--snapshot-dir", snap).exit_code == 0
    res = run("snapshot-restore", "--data-dir", tmp_path / "fresh", "--snapshot-dir", snap)
    assert res.exit_code == 0, res.output
    with open_engine(tmp_path / "fresh") as e2:
        assert dump(e2) == expected
    res = run("snapshot-prune", "--snapshots-dir", out, "--keep-last", 0)
    assert res.exit_code == 0 and f"removed={snap.name}" in res.stdout
    assert listed("--snapshots-dir", out) == []
