"""The data dir against other local users and a tampered catalog: layout and modes (files 0600,
dirs 0700), ownership/permission checks by the engine and every CLI command, LOCK/pepper/catalog
symlinks refused, and catalog paths that point outside segments/ or quarantine/ never acted on.

Tests run as root; "another user" is `nobody`, reached with setpriv (skipped where unavailable).
"""
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import apsw
import numpy as np
import pytest
from click.testing import CliRunner

from server_util import run_cli
from vibrato import apikeys, datadir
from vibrato.cli import cli
from vibrato.engine import Engine, maintenance, snapshot_create
from vibrato.engine.lock import is_locked
from vibrato.segment import SegmentReader

DIM = 8
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.fixture(autouse=True)
def no_env_pepper(monkeypatch):
    monkeypatch.delenv("VIBRATO_API_PEPPER", raising=False)


def _nobody_ids():
    import grp
    import pwd
    try:
        return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    except KeyError:
        return None


def need_other_user():
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another local user")
    if shutil.which("setpriv") is None or _nobody_ids() is None:
        pytest.skip("setpriv or the nobody/nogroup accounts are unavailable")
    return _nobody_ids()


def _parent(mode):
    d = Path(tempfile.mkdtemp(prefix="vibrato-sec-", dir="/tmp"))
    os.chmod(d, mode)
    return d


@pytest.fixture
def shared_parent():
    """A directory other local users can traverse (pytest's tmp dirs are 0700 root)."""
    d = _parent(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sticky_parent():
    """Like /tmp: anyone may create entries in it, only their owner may rename or remove them."""
    d = _parent(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _open(data, **kw):
    return Engine.open(data, dim=DIM, background=False, audio_colocated=False, **kw)


def _populate(data, n=40, checkpoint=True):
    rng = np.random.default_rng(7)
    with _open(data) as eng:
        eng.ingest_batch([{"vector": v} for v in rng.standard_normal((n, DIM)).astype(np.float32)])
        if checkpoint:
            eng.checkpoint()


def _catalog(data):
    return apsw.Connection(str(data / "catalog.sqlite3"))


def _segment_rows(data):
    conn = _catalog(data)
    try:
        return [dict(zip(("id", "path", "state"), r)) for r in conn.execute("SELECT id, path, state FROM segments")]
    finally:
        conn.close()


def _modes(root):
    bad = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_IMODE(st.st_mode) & 0o077:
                bad.append(f"{p} {stat.S_IMODE(st.st_mode):04o}")
    if stat.S_IMODE(os.lstat(root).st_mode) & 0o077:
        bad.append(f"{root} {stat.S_IMODE(os.lstat(root).st_mode):04o}")
    return bad


# ---------------------------------------------------------------------------- layout and modes
def test_key_create_makes_the_whole_private_layout(tmp_path):
    data = tmp_path / "new"
    result = CliRunner().invoke(cli, ["key-create", "--data-dir", str(data), "--name", "ops"])
    assert result.exit_code == 0, result.output
    for sub in datadir.LAYOUT:
        assert (data / sub).is_dir(), sub
        assert stat.S_IMODE(os.stat(data / sub).st_mode) == 0o700, sub
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    for name in ("catalog.sqlite3", "api_pepper"):
        assert stat.S_IMODE(os.stat(data / name).st_mode) == 0o600, name
    # and the server starts on it as on any data dir
    with _open(data) as eng:
        assert eng.readiness()[0]


def test_no_file_or_dir_is_open_to_group_or_others(tmp_path):
    old = os.umask(0o022)
    try:
        data = tmp_path / "data"
        runner = CliRunner()
        assert runner.invoke(cli, ["key-create", "--data-dir", str(data), "--name", "a"]).exit_code == 0
        rng = np.random.default_rng(3)
        with _open(data, checkpoint_max_rows=20) as eng:
            for _ in range(3):
                eng.ingest_batch([{"vector": v} for v in rng.standard_normal((25, DIM)).astype(np.float32)])
                eng.checkpoint()
            eng.compact()
            eng.ingest_batch([{"vector": v} for v in rng.standard_normal((5, DIM)).astype(np.float32)])
            # WAL and SHM exist while the engine runs
            assert (data / "catalog.sqlite3-wal").exists()
            assert _modes(data) == []
        snapshot_create(data, "default")
        assert list((data / "snapshots").iterdir())
        assert _modes(data) == []
    finally:
        os.umask(old)


def test_existing_catalog_and_lock_are_tightened(tmp_path):
    data = tmp_path / "data"
    _populate(data, checkpoint=False)
    os.chmod(data / "catalog.sqlite3", 0o644)
    os.chmod(data / "LOCK", 0o644)
    with _open(data):
        assert stat.S_IMODE(os.stat(data / "catalog.sqlite3").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(data / "catalog.sqlite3-wal").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(data / "LOCK").st_mode) == 0o600


def test_another_user_cannot_take_a_shared_lock(shared_parent):
    need_other_user()
    if shutil.which("flock") is None:
        pytest.skip("flock(1) unavailable")
    data = shared_parent / "data"
    with _open(data):
        pass
    r = subprocess.run([*NOBODY, "flock", "-s", "-n", str(data / "LOCK"), "true"], capture_output=True, text=True)
    assert r.returncode != 0, "another user could open and flock LOCK"
    with _open(data) as eng:  # and the server still starts
        assert eng.readiness()[0]


# ---------------------------------------------------------------------------- ownership and permissions
def test_world_writable_data_dir_is_refused_everywhere(tmp_path):
    data = tmp_path / "data"
    _populate(data)
    os.chmod(data, 0o777)
    with pytest.raises(datadir.UnsafeDataDirError, match="writable by group/others") as exc:
        _open(data)
    assert f"chmod 700 {data}" in exc.value.message
    runner = CliRunner()
    for args in (["key-create", "--name", "x"], ["key-list"], ["key-revoke", "--key-id", "vbk_1"],
                 ["snapshot-create"], ["replay-to-lsn", "--target-lsn", "0"],
                 ["snapshot-restore", "--snapshot-dir", str(tmp_path / "nope")]):
        result = runner.invoke(cli, [args[0], "--data-dir", str(data), *args[1:]])
        assert result.exit_code == 1, (args, result.output)
        assert "writable by group/others" in result.stderr and f"chmod 700 {data}" in result.stderr, args
    assert not (data / "snapshots").exists() or not list((data / "snapshots").iterdir())
    proc = run_cli("serve-v2", "--data-dir", data, "--dim", DIM, "--port", 0, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "writable by group/others" in proc.stderr and str(data) in proc.stderr


@pytest.mark.parametrize("name", ["catalog.sqlite3", "api_pepper", "LOCK", "segments"])
def test_group_writable_files_are_refused(tmp_path, name):
    data = tmp_path / "data"
    _populate(data)
    apikeys.load_pepper(data)
    os.chmod(data / name, 0o770 if name == "segments" else 0o660)
    with pytest.raises(datadir.UnsafeDataDirError, match=name):
        _open(data)


def test_data_dir_owned_by_another_user_is_refused(tmp_path):
    uid, gid = need_other_user()
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chown(data, uid, gid)  # an attacker pre-created the directory
    result = CliRunner().invoke(cli, ["key-create", "--data-dir", str(data), "--name", "ops"])
    assert result.exit_code == 1 and "owned by nobody" in result.stderr and "chown" in result.stderr, result.output
    assert list(data.iterdir()) == []
    with pytest.raises(datadir.UnsafeDataDirError, match="owned by nobody"):
        _open(data)
    assert list(data.iterdir()) == []


def test_server_refuses_a_data_dir_prepared_by_another_user(sticky_parent):
    """The attacker creates the data dir and an admin key in it; the server must not start on it."""
    need_other_user()
    data = sticky_parent / "data"
    env = {k: v for k, v in os.environ.items() if k != "VIBRATO_API_PEPPER"}
    r = subprocess.run([*NOBODY, *run_cli_argv("key-create", "--data-dir", data, "--name", "evil")],
                       capture_output=True, text=True, env=env, cwd="/tmp", timeout=120)
    assert r.returncode == 0, r.stderr
    assert os.stat(data).st_uid != 0 and (data / "catalog.sqlite3").exists()
    proc = run_cli("serve-v2", "--data-dir", data, "--dim", DIM, "--port", 0, "--bootstrap-admin-key", timeout=60)
    assert proc.returncode == 1
    assert "owned by nobody" in proc.stderr and "BOOTSTRAP_ADMIN_KEY" not in proc.stdout
    with pytest.raises(datadir.UnsafeDataDirError):
        _open(data)


def run_cli_argv(*args):
    import sys
    return [sys.executable, "-m", "vibrato.cli", *map(str, args)]


def test_ancestor_writable_by_others_is_refused(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o777)  # no sticky bit: anyone may rename the data dir away
    with pytest.raises(datadir.UnsafeDataDirError, match="chmod go-w"):
        _open(parent / "data")
    assert not (parent / "data").exists()


# ---------------------------------------------------------------------------- symlinks
def test_lock_symlink_is_refused_and_its_target_untouched(tmp_path):
    data = tmp_path / "data"
    _populate(data, checkpoint=False)
    secret = tmp_path / "root-only"
    secret.write_text("secret\n")
    os.chmod(secret, 0o600)
    before = os.stat(secret)
    (data / "LOCK").unlink()
    (data / "LOCK").symlink_to(secret)
    with pytest.raises(datadir.UnsafeDataDirError, match="LOCK.*symlink"):
        _open(data)
    with pytest.raises(datadir.UnsafeDataDirError, match="symlink"):
        is_locked(data)
    result = CliRunner().invoke(cli, ["replay-to-lsn", "--data-dir", str(data), "--target-lsn", "0"])
    assert result.exit_code == 1 and "symlink" in result.stderr
    after = os.stat(secret)
    assert secret.read_text() == "secret\n" and after.st_mode == before.st_mode and after.st_mtime == before.st_mtime
    # a dangling link (O_CREAT would create its target) is refused the same way
    (data / "LOCK").unlink()
    (data / "LOCK").symlink_to(tmp_path / "created-by-lock")
    with pytest.raises(datadir.UnsafeDataDirError, match="symlink"):
        _open(data)
    assert not (tmp_path / "created-by-lock").exists()


@pytest.mark.parametrize("name", ["catalog.sqlite3", "api_pepper"])
def test_catalog_and_pepper_symlinks_are_refused(tmp_path, name):
    data = tmp_path / "data"
    _populate(data, checkpoint=False)
    apikeys.load_pepper(data)
    real = tmp_path / f"real-{name}"
    os.replace(data / name, real)
    (data / name).symlink_to(real)
    with pytest.raises(datadir.UnsafeDataDirError, match="symlink"):
        _open(data)
    result = CliRunner().invoke(cli, ["key-list", "--data-dir", str(data)])
    assert result.exit_code == 1 and "symlink" in result.stderr
    if name == "api_pepper":
        with pytest.raises(datadir.UnsafeDataDirError, match="symlink"):
            apikeys.load_pepper(data)


def test_symlinked_segment_file_is_a_blocker_and_not_followed(tmp_path):
    data = tmp_path / "data"
    _populate(data)
    [row] = [r for r in _segment_rows(data) if r["state"] == "active"]
    seg = data / row["path"]
    outside = tmp_path / "outside.vdb"
    os.replace(seg, outside)
    seg.symlink_to(outside)
    with pytest.raises(OSError):
        SegmentReader.open(seg)
    stray = data / "segments" / "stray.vdb"
    stray.symlink_to(tmp_path / "stray-target")
    with _open(data) as eng:
        ready, report = eng.readiness()
        assert not ready and "symlink" in report, report
        assert "stray.vdb is a symlink" in report
    assert seg.is_symlink() and outside.exists() and stray.is_symlink()
    assert not list((data / "quarantine").iterdir())
    assert [r["state"] for r in _segment_rows(data) if r["id"] == row["id"]] == ["active"]


# ---------------------------------------------------------------------------- hostile catalog rows
def _insert_segment(data, seg_id, path, state, id_start=10_000):
    conn = _catalog(data)
    try:
        cid = conn.execute("SELECT id FROM collections").fetchone()[0]
        now = int(time.time())
        conn.execute("INSERT INTO segments(id, collection_id, level, kind, path, row_count, live_count, "
                     "vector_id_start, vector_id_end, start_lsn, end_lsn, state, size_bytes, created_at, "
                     "updated_at) VALUES (?, ?, 0, 'raw', ?, 1, 1, ?, ?, NULL, NULL, ?, 1, ?, ?)",
                     (seg_id, cid, path, id_start, id_start, state, now, now))
    finally:
        conn.close()


@pytest.mark.parametrize("state", ["obsolete", "active", "building", "failed", "compacting"])
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "nested", "subdir"])
def test_catalog_path_outside_segments_is_a_blocker_and_untouched(tmp_path, state, kind):
    data = tmp_path / "data"
    _populate(data)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "outside").write_text("keep me\n")
    (data / "segments" / "sub").mkdir()
    (data / "segments" / "sub" / "x.vdb").write_text("keep me\n")
    path = {"absolute": str(victim / "outside"), "dotdot": "../victim/outside",
            "nested": "segments/../../victim/outside", "subdir": "segments/sub/x.vdb"}[kind]
    # A relative path is taken against the data dir: '../victim/outside' names tmp_path/victim/outside.
    _insert_segment(data, "seg_evil", path, state)
    with _open(data) as eng:
        ready, report = eng.readiness()
        assert not ready, report
        assert "unsafe catalog row: segment seg_evil" in report and "not touched" in report, report
        maintenance.run_once(eng)  # the background GC skips the row as well
        maintenance.gc_obsolete(eng)
    assert (victim / "outside").read_text() == "keep me\n"
    assert (data / "segments" / "sub" / "x.vdb").read_text() == "keep me\n"
    assert [r["state"] for r in _segment_rows(data) if r["id"] == "seg_evil"] == [state]
    with _open(data) as eng:  # still blocked next start
        assert not eng.readiness()[0]


def test_orphan_quarantine_path_outside_quarantine_is_untouched(tmp_path):
    data = tmp_path / "data"
    _populate(data)
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    conn = _catalog(data)
    try:
        cid = conn.execute("SELECT id FROM collections").fetchone()[0]
        conn.execute("INSERT INTO orphan_files(collection_id, original_path, quarantine_path, reason, size_bytes, "
                     "quarantined_at) VALUES (?, 'segments/x.vdb', ?, 'unregistered_segment', 1, 0)",
                     (cid, str(victim)))
    finally:
        conn.close()
    with _open(data, orphan_ttl_hours=0, quarantine_max_files=0) as eng:
        ready, report = eng.readiness()
        assert not ready and "unsafe catalog row: orphan" in report, report
    assert victim.read_text() == "keep me\n"


def test_a_clean_data_dir_has_no_blockers(tmp_path):
    data = tmp_path / "data"
    _populate(data)
    with _open(data) as eng:
        ready, report = eng.readiness()
        assert ready and report.startswith("recovered:"), report
