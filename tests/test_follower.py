"""A Follower (vibrato/engine/follower.py) serves the writer's data read-only and current: every write
the writer acknowledged is visible to the follower's next query, through checkpoints and compactions
running at the same time, with the same answers as the writer's."""
import os
import subprocess
import sys

import numpy as np
import pytest

from enginetools import churning
from vibrato.engine import Engine
from vibrato.engine.follower import Follower
from vibrato.engine.shared_state import FILE_NAME, SharedState
from vibrato.errors import StorageError

DIM = 16


def unit_rows(n, seed):
    X = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def writer(path, **kw):
    opts = dict(background=False, publish_state=True, checkpoint_max_rows=200, hot_exact_rows=64,
                pq_min_rows=1 << 30)
    opts.update(kw)
    return Engine.open(path, dim=DIM, **opts)


def items(X, lo, tag_every=4):
    return [{"vector": x, "metadata": {"tags": ["t"] if (lo + i) % tag_every == 0 else [], "bpm": float(lo + i)}}
            for i, x in enumerate(X)]


def top_ids(eng, q, **kw):
    return [r["id"] for r in eng.query(q, k=10, ef=200, search_tier="all", include_metadata=False, **kw)]


def test_follower_sees_every_write_through_checkpoint_and_compaction(tmp_path):
    X = unit_rows(900, 1)
    with writer(tmp_path / "d") as w:
        w.ingest_batch(items(X[:300], 0))
        w.checkpoint()
        with Follower.open(tmp_path / "d", dim=DIM) as f:
            assert f.segment_set.hot_count() == 100 and len(f.segment_set.handles) == 1
            for lo in range(300, 900, 100):
                w.ingest_batch(items(X[lo:lo + 100], lo))
                q = X[lo + 7]
                assert top_ids(f, q)[0] == lo + 7  # visible at once, hot tier
                if lo % 200 == 0:
                    w.checkpoint()
                if lo == 600:
                    while w.compact()["state"] != "idle":
                        pass
            for q in X[::37]:
                assert top_ids(f, q) == top_ids(w, q)
                flt = {"tags_any": ["t"], "bpm_gte": 100.0}
                assert top_ids(f, q, filter=flt) == top_ids(w, q, filter=flt)
            ws, fs = w.stats(), f.segment_set
            assert sorted(h.id for h in fs.handles) == sorted(h.id for h in w.segment_set.handles)
            assert fs.hot_count() == ws["hot_vectors"]
            got = f.query(X[5], k=3, include_metadata=True, search_tier="all")
            assert got[0]["id"] == 5 and got[0]["metadata"]["bpm"] == 5.0 and got[0]["metadata"]["tags"] == []


def test_read_your_writes_while_checkpoints_and_compactions_run(tmp_path):
    """A write acknowledged by the writer is found by the follower's next query, thousands of times,
    while another thread checkpoints and compacts as fast as it can."""
    X = unit_rows(2000, 2)
    with writer(tmp_path / "d", checkpoint_max_rows=64) as w, Follower.open(tmp_path / "d", dim=DIM) as f:
        with churning(w) as errors:
            misses = []
            for i, x in enumerate(X):
                vid, created = w.ingest(x, metadata={"tags": ["t"] if i % 3 == 0 else [], "bpm": float(i)})
                assert created and vid == i
                # exact: the filter allows this row alone, so no search strategy can miss it
                got = f.query(x, k=1, filter={"bpm_gte": float(i), "bpm_lte": float(i)}, search_tier="all",
                              include_metadata=False)
                if [r["id"] for r in got] != [i]:
                    misses.append(i)
                # and through the graphs, with room for their recall
                if i not in [r["id"] for r in f.query(x, k=10, ef=200, search_tier="all", include_metadata=False)]:
                    misses.append(("unfiltered", i))
                if i % 3 == 0:
                    got = f.query(x, k=10, ef=200, filter={"tags_any": ["t"]}, search_tier="all",
                                  include_metadata=False)
                    if i not in [r["id"] for r in got]:
                        misses.append(("tag", i))
        assert not errors and not misses, misses[:10]
        assert w.stats()["checkpoint_total"] > 10
        # every row once, nothing twice across tiers
        ids = [r["id"] for r in f.query(X[0], k=1000, ef=1000, search_tier="all", include_metadata=False)]
        assert len(ids) == len(set(ids)) == 1000


def test_a_follower_in_another_process(tmp_path):
    """The writer here, the follower in a child process: after each acknowledged batch the child's
    next query finds it."""
    X = unit_rows(300, 3)
    code = f"""
import sys, numpy as np
from vibrato.engine.follower import Follower
f = Follower.open({str(tmp_path / "d")!r}, dim={DIM})
for line in sys.stdin:
    q = np.array([float(v) for v in line.split()], dtype=np.float32)
    r = f.query(q, k=1, ef=64, search_tier="all", include_metadata=False)
    print(r[0]["id"] if r else -1, flush=True)
"""
    with writer(tmp_path / "d") as w:
        w.ingest_batch(items(X[:10], 0))
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        try:
            for lo in range(10, 300, 10):
                res = w.ingest_batch(items(X[lo:lo + 10], lo))
                if lo % 50 == 0:
                    w.checkpoint()
                if lo % 100 == 0:
                    w.compact()
                child.stdin.write(" ".join(repr(float(v)) for v in X[lo + 9]) + "\n")
                child.stdin.flush()
                assert int(child.stdout.readline()) == res[-1][0] == lo + 9
        finally:
            child.stdin.close()
            assert child.wait(30) == 0


def test_a_restarted_writer_is_followed(tmp_path):
    X = unit_rows(100, 4)
    w = writer(tmp_path / "d")
    w.ingest_batch(items(X[:50], 0))
    f = Follower.open(tmp_path / "d", dim=DIM)
    try:
        w.close()
        w = writer(tmp_path / "d")  # recovery; a new state file
        w.ingest_batch(items(X[50:], 50))
        w.checkpoint()
        assert top_ids(f, X[77])[0] == 77 and top_ids(f, X[3])[0] == 3
    finally:
        f.close()
        w.close()


def test_a_query_on_a_following_worker_sees_a_restarted_writers_writes(tmp_path, monkeypatch):
    """With its follow thread running, a query trusts the mapped file's `visible` without a sync. A
    new writer marks its predecessor's file retired before it replaces it, so the next query syncs
    onto the new file, here with the follow thread held asleep: only the query's check can notice."""
    import threading

    from vibrato.engine import follower as follower_mod
    go = threading.Event()
    monkeypatch.setattr(follower_mod, "_wait", lambda wake: go.wait())
    X = unit_rows(100, 4)
    w = writer(tmp_path / "d")
    w.ingest_batch(items(X[:50], 0))
    f = Follower.open(tmp_path / "d", dim=DIM)
    try:
        reported = []
        f.follow(reported.append)
        wait_for(lambda: reported)
        assert f._current(for_query=True)
        old = f.shared
        w.close()
        w = writer(tmp_path / "d")  # recovery; a new state file
        assert old.retired == 1 and w.shared_state.retired == 0
        w.ingest_batch(items(X[50:], 50))
        assert not f._current(for_query=True)
        assert top_ids(f, X[77])[0] == 77 and top_ids(f, X[3])[0] == 3
        assert f.shared is not old and not f.shared.retired
    finally:
        go.set()
        f.close()
        w.close()


def test_a_new_writer_marks_only_a_real_predecessor_file_retired(tmp_path):
    old = SharedState.create(tmp_path, 5)
    new = SharedState.create(tmp_path, 6)
    assert (old.retired, new.retired, new.lsn) == (1, 0, 6)
    old.close()
    new.close()
    # a symlink in its place (never opened by a follower) is replaced, its target left alone
    target = tmp_path / "elsewhere"
    target.write_bytes(b"VBSTATE1" + bytes(56))
    os.unlink(tmp_path / FILE_NAME)
    os.symlink(target, tmp_path / FILE_NAME)
    SharedState.create(tmp_path, 7).close()
    assert target.read_bytes() == b"VBSTATE1" + bytes(56)
    assert not (tmp_path / FILE_NAME).is_symlink()


def test_the_follower_never_writes(tmp_path):
    with writer(tmp_path / "d") as w, Follower.open(tmp_path / "d", dim=DIM) as f:
        w.ingest(unit_rows(1, 5)[0])
        with pytest.raises(StorageError, match="read-only"):
            f.catalog.write(lambda conn: None)
        with pytest.raises(PermissionError):
            f.shared.publish_lsn(10 ** 9)
        assert not hasattr(f, "ingest")


def test_state_file_is_validated(tmp_path):
    with writer(tmp_path / "d"):
        pass
    path = tmp_path / "d" / "tmp" / FILE_NAME
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_bytes(b"X" * 64)
    with pytest.raises(Exception, match="not a Vibrato serving state"):
        SharedState.open(path.parent)
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="expected 64"):
        SharedState.open(path.parent)
    os.unlink(path)
    os.symlink("/etc/passwd", path)
    with pytest.raises(Exception, match="symlink"):
        SharedState.open(path.parent)


def test_seq_stays_odd_while_any_change_is_in_progress(tmp_path):
    s = SharedState.create(tmp_path, 5)
    assert (s.seq, s.lsn, s.pid) == (0, 5, os.getpid())
    s.begin_change()
    s.begin_change()  # a checkpoint and a compaction overlapping
    s.end_change()
    assert s.seq % 2 == 1
    s.end_change()
    assert s.seq == 2
    s.publish_lsn(4)  # never backwards
    s.publish_lsn(9)
    assert s.lsn == 9
    s.close()


def test_follower_serves_archive_segments_like_the_writer(tmp_path):
    """Compaction all the way to PQ archive segments: the follower loads them and answers as the writer
    does, filters included (their filter columns come from the segments)."""
    X = unit_rows(3000, 6)
    with writer(tmp_path / "d", checkpoint_max_rows=500, pq_min_rows=256, compaction_max_inputs=2) as w:
        with Follower.open(tmp_path / "d", dim=DIM) as f:
            for lo in range(0, 3000, 500):
                w.ingest_batch(items(X[lo:lo + 500], lo))
                w.checkpoint()
            while w.compact()["state"] != "idle":
                pass
            assert any(s.kind == "archive" for s in w.segment_set.handles)
            late = Follower.open(tmp_path / "d", dim=DIM)  # saw none of it as hot rows
            try:
                for q in X[::97]:
                    for eng in (f, late):
                        assert top_ids(eng, q) == top_ids(w, q)
                        flt = {"tags_any": ["t"]}
                        assert top_ids(eng, q, filter=flt) == top_ids(w, q, filter=flt)
                assert sorted(h.kind for h in late.segment_set.handles) == sorted(
                    h.kind for h in w.segment_set.handles)
            finally:
                late.close()


def test_a_checkpoint_between_the_seq_read_and_the_wal_read_is_caught(tmp_path, monkeypatch):
    """The seqlock's window, made deterministic: the writer checkpoints the very rows the follower is
    about to read from the WAL, after it read seq. The follower must notice seq moved and load the new
    segment instead of answering without those rows."""
    from vibrato.catalog import wal
    X = unit_rows(200, 7)
    with writer(tmp_path / "d", checkpoint_max_rows=1000) as w, Follower.open(tmp_path / "d", dim=DIM) as f:
        w.ingest_batch(items(X[:100], 0))
        f.sync()
        w.ingest_batch(items(X[100:], 100))  # acknowledged: the follower has not read these yet
        real_read, armed = f.catalog.read, [True]

        def read(fn, *args):
            if fn is wal.pending and armed:
                armed.clear()
                assert w.checkpoint()["state"] == "completed"  # rows 0..199 leave the WAL for a segment
            return real_read(fn, *args)
        monkeypatch.setattr(f.catalog, "read", read)
        got = f.query(X[150], k=1, filter={"bpm_gte": 150.0, "bpm_lte": 150.0}, search_tier="all",
                      include_metadata=False)
        assert not armed and [r["id"] for r in got] == [150]
        assert len(f.segment_set.handles) == 1 and f.segment_set.hot_count() == 0


def test_segments_being_compacted_stay_visible_through_a_reload(tmp_path):
    """A compaction marks its inputs `compacting` (without moving seq) and the writer serves them
    until its output is activated; a follower that reloads for another change meanwhile (a
    checkpoint) must keep them. Here the compaction in flight is the catalog state alone."""
    from vibrato.catalog import segments as seg_sql
    X = unit_rows(600, 4)
    with writer(tmp_path / "d") as w:
        for lo in (0, 200):
            w.ingest_batch(items(X[lo:lo + 200], lo))
            w.checkpoint()
        with Follower.open(tmp_path / "d", dim=DIM) as f:
            inputs = [h.id for h in w.segment_set.handles]
            assert len(inputs) == 2 and top_ids(f, X[5])[0] == 5
            w.catalog.write(lambda conn: seg_sql.set_states(conn, inputs, "compacting"))
            w.ingest_batch(items(X[400:600], 400))
            w.checkpoint()  # moves seq: the follower reloads while the inputs are `compacting`
            for i in (5, 205, 405):
                got = f.query(X[i], k=1, filter={"bpm_gte": float(i), "bpm_lte": float(i)}, search_tier="all",
                              include_metadata=False)
                assert [r["id"] for r in got] == [i]
            assert sorted(h.id for h in f.segment_set.handles) == sorted(h.id for h in w.segment_set.handles)
            w.catalog.write(lambda conn: seg_sql.set_states(conn, inputs, "active"))


def test_visible_follows_lsn_unless_the_server_publishes_it(tmp_path):
    s = SharedState.create(tmp_path, 5)
    assert s.visible == 5
    s.publish_lsn(7)
    assert (s.lsn, s.visible) == (7, 7)
    s.defer_visible = True  # the writer with query workers: its handlers publish it after them
    s.publish_lsn(9)
    assert (s.lsn, s.visible) == (9, 7)
    s.publish_visible(9)
    s.publish_visible(8)  # never backwards
    assert s.visible == 9
    s.close()


def test_followers_state_slots_and_what_it_refuses(tmp_path):
    from vibrato.datadir import UnsafePathError
    from vibrato.engine.shared_state import PROGRESS_FILE, FollowerProgress
    w = FollowerProgress.create(tmp_path, 3)
    f = FollowerProgress.open(tmp_path)
    assert f.slots == 3 and [w.read(i) for i in range(3)] == [(0, 0)] * 3
    f.report(2, 1234, 77)
    assert w.read(2) == (1234, 77) and w.read(1) == (0, 0)
    with pytest.raises(IndexError):
        f.report(3, 1, 1)
    f.close()
    w.close()
    path = tmp_path / PROGRESS_FILE
    path.write_bytes(b"VBSTATE1" + bytes(8 + 16 * 3))  # another file's magic
    with pytest.raises(UnsafePathError):
        FollowerProgress.open(tmp_path)
    path.write_bytes(b"VBFOLLW1" + (9).to_bytes(8, "little") + bytes(16 * 3))  # slot count disagrees
    with pytest.raises(UnsafePathError):
        FollowerProgress.open(tmp_path)
    path.write_bytes(b"VBFOLLW1" + bytes(3))  # truncated
    with pytest.raises(ValueError):
        FollowerProgress.open(tmp_path)
    path.unlink()
    (tmp_path / "elsewhere").write_bytes(b"VBFOLLW1" + (1).to_bytes(8, "little") + bytes(16))
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePathError):
        FollowerProgress.open(tmp_path)


def wait_for(cond, timeout=20.0):
    import time
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_follow_thread_keeps_a_follower_current_without_queries(tmp_path):
    """follow(): the follower catches up and loads new segments with no query asking, and reports
    each lsn it applied; a query then finds it current (no catch-up of its own)."""
    X = unit_rows(600, 4)
    with writer(tmp_path / "d") as w:
        w.ingest_batch(items(X[:100], 0))
        with Follower.open(tmp_path / "d", dim=DIM) as f:
            reported = []
            f.follow(reported.append)
            for lo in range(100, 600, 100):
                w.ingest_batch(items(X[lo:lo + 100], lo))
                wait_for(lambda: reported and reported[-1] >= w.shared_state.lsn)
                assert f._current(for_query=True)
                assert top_ids(f, X[lo + 3])[0] == lo + 3
            w.checkpoint()
            while w.compact()["state"] != "idle":
                pass
            wait_for(lambda: sorted(h.id for h in f.segment_set.handles) == sorted(h.id for h in w.segment_set.handles))
            assert f.segment_set.hot_count() == w.segment_set.hot_count()
            assert reported == sorted(reported)
            for q in X[::41]:
                assert top_ids(f, q) == top_ids(w, q)
        assert not f._follower.is_alive()  # close() stopped it


def test_a_query_waits_for_no_segment_reload_once_it_has_every_visible_write(tmp_path, monkeypatch):
    """With the follow thread running, a segment-set change (seq moved) does not make a query sync:
    the rows it moved are already in the follower's hot tier. A write past what it applied does."""
    X = unit_rows(300, 5)
    with writer(tmp_path / "d") as w:
        w.ingest_batch(items(X[:200], 0))
        with Follower.open(tmp_path / "d", dim=DIM) as f:
            f._follower = object()  # as if follow() ran, without a thread that would catch up first
            syncs = []
            real = Follower.sync
            monkeypatch.setattr(Follower, "sync", lambda self: (syncs.append(1), real(self)))
            w.checkpoint()  # seq moves; every row stays visible through the hot tier
            assert top_ids(f, X[17])[0] == 17 and syncs == []
            w.ingest_batch(items(X[200:210], 200))
            assert top_ids(f, X[205])[0] == 205 and syncs == [1]
            f._follower = None


def test_the_writer_wakes_the_follow_thread(tmp_path, monkeypatch):
    """With a wake socket the follow thread sleeps until the writer publishes (its idle look here
    set to a minute, so only the wake-up can make it catch up in time)."""
    from vibrato.engine import follower as follower_mod
    from vibrato.engine.shared_state import wake_socket
    monkeypatch.setattr(follower_mod, "FOLLOW_IDLE_SECS", 60.0)
    X = unit_rows(300, 6)
    with writer(tmp_path / "d") as w:
        w.ingest_batch(items(X[:100], 0))
        with Follower.open(tmp_path / "d", dim=DIM) as f:
            path = tmp_path / "d" / "tmp" / "f.wake"
            w.shared_state.wake_followers([str(path)])
            reported = []
            wake = wake_socket(path)
            f.follow(reported.append, wake)
            for lo in (100, 200):
                w.ingest_batch(items(X[lo:lo + 100], lo))
                wait_for(lambda: reported and reported[-1] >= w.shared_state.lsn, timeout=20)
            w.checkpoint()  # end_change wakes it too: it loads the new segment
            wait_for(lambda: len(f.segment_set.handles) == 1, timeout=20)
        assert not f._follower.is_alive()  # close() woke it to stop, well before its idle minute
        wake.close()


def test_a_query_never_sees_a_sync_halfway(tmp_path, monkeypatch):
    """While one thread's sync has read new WAL rows but not yet the deletes before them, a query on
    another thread must not take the follower for current (it would return a deleted row)."""
    import threading
    X = unit_rows(50, 7)
    with writer(tmp_path / "d") as w:
        w.ingest_batch(items(X[:20], 0))
        with Follower.open(tmp_path / "d", dim=DIM) as f:
            f._follower = object()  # as if follow() ran: the query's lock-free check applies
            entered, release = threading.Event(), threading.Event()
            real = Follower._catch_up_deletes

            def held(self):
                entered.set()
                release.wait(20)
                real(self)
            monkeypatch.setattr(Follower, "_catch_up_deletes", held)
            assert w.delete(ids=[5])["deleted"] == 1  # acknowledged
            w.ingest_batch(items(X[20:21], 20))         # and a later write
            t = threading.Thread(target=f.sync)         # the follow thread's sync, paused mid-way
            t.start()
            try:
                assert entered.wait(20)
                assert not f._current(for_query=True) and not f._current()
                got = []
                q = threading.Thread(target=lambda: got.append(top_ids(f, X[5])[:1]))
                q.start()  # it must wait for that sync (the lock), then see the delete
                release.set()
                t.join()
                q.join()
                assert got and got[0] != [5]
            finally:
                release.set()
                t.join()
                f._follower = None


def test_a_lagging_follower_does_not_answer_from_a_sync_a_checkpoint_overtook(tmp_path, monkeypatch):
    """A follower behind the writer starts a sync; a checkpoint retires the rows it is about to read
    from the WAL. Paused at its seq re-check (which will send it back to reload the segments), that
    sync has moved its working lsn past the rows it lacks: a query must not take it for current."""
    import threading
    X = unit_rows(120, 8)
    with writer(tmp_path / "d") as w:
        w.ingest_batch(items(X[:50], 0))
        with Follower.open(tmp_path / "d", dim=DIM) as f:
            f._follower = object()
            w.ingest_batch(items(X[50:100], 50))  # acknowledged while this follower lags
            entered, release = threading.Event(), threading.Event()
            real_shared, sync_thread = f.shared, []

            class PauseAtRecheck:  # the sync thread's third read of seq is its re-check
                reads = 0

                def __getattr__(self, name):
                    return getattr(real_shared, name)

                @property
                def seq(self):
                    if threading.current_thread() in sync_thread:
                        PauseAtRecheck.reads += 1
                        if PauseAtRecheck.reads == 3:
                            entered.set()
                            release.wait(20)
                    return real_shared.seq
            real = Follower._catch_up

            def overtaken(self):
                monkeypatch.setattr(Follower, "_catch_up", real)
                w.checkpoint()  # between its seq read and its WAL read
                real(self)
            monkeypatch.setattr(Follower, "_catch_up", overtaken)
            f.shared = PauseAtRecheck()
            t = threading.Thread(target=f.sync)
            sync_thread.append(t)
            t.start()
            try:
                assert entered.wait(20)
                assert not f._current(for_query=True)
                got = []
                q = threading.Thread(target=lambda: got.append(top_ids(f, X[77])[:1]))
                q.start()
                release.set()
                t.join()
                q.join()
                assert got == [[77]]
            finally:
                release.set()
                t.join()
                f.shared = real_shared
                f._follower = None
