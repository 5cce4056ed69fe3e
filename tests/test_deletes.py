"""Deletes and purge in the engine (CONTRACT.md D40): every tier, filters, identify's hole guard,
restart, checkpoint/compaction races, followers, replay-to-lsn, idempotency keys, and physical
erasure checked by grepping every file of the data dir for the deleted bytes. Real SQLite, real
segment files, real child processes killed with SIGKILL.
"""
import os
import signal
import textwrap
from pathlib import Path

import numpy as np
import pytest

from enginetools import dump, payload, run_python
from vibrato.catalog import deletes as del_sql
from vibrato.config import Limits
from vibrato.engine import Engine, replay_to_lsn
from vibrato.engine.follower import Follower
from vibrato.errors import BadRequestError

DIM = 16
OPTS = dict(dim=DIM, background=False, checkpoint_max_rows=200, hot_exact_rows=64, pq_min_rows=256)


def unit_rows(n, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(X, lo, hi, tracks_of=100):
    return [{"vector": X[i], "metadata": {"source_file": f"track-{i // tracks_of:04d}.wav", "start_time_ms": (i % tracks_of) * 40,
                                          "duration_ms": 40, "bpm": float(100 + i % 7),
                                          "tags": ["odd" if i % 2 else "even"]},
             "idempotency_key": f"key-{i}"} for i in range(lo, hi)]


def tiered_engine(path, X):
    """Rows 0..599 in an L2 archive (PQ codes + graph), 600..999 in L1, 1000..1199 in L0, the rest in
    the hot tier."""
    eng = Engine.open(path, **OPTS)
    for bounds in (((0, 200), (200, 400)), ((400, 500), (500, 600)), ((600, 800), (800, 1000))):
        for lo, hi in bounds:
            eng.ingest_batch(items(X, lo, hi))
            eng.checkpoint()
        eng.compact()  # the two L0s -> one L1
        if bounds[0][0] == 400:
            eng.compact()  # the two L1s -> the L2 archive
    eng.ingest_batch(items(X, 1000, 1200))
    eng.checkpoint()
    eng.ingest_batch(items(X, 1200, X.shape[0]))
    return eng


def ids_of(res):
    return [r["id"] for r in res]


def grep_data_dir(data_dir, needles: dict) -> list:
    """(needle name, file) for every file under data_dir whose bytes contain a needle."""
    hits = []
    for root, _dirs, files in os.walk(data_dir):
        for f in files:
            p = os.path.join(root, f)
            if os.path.islink(p):
                continue
            with open(p, "rb") as fh:
                blob = fh.read()
            hits.extend((name, p) for name, needle in needles.items() if needle in blob)
    return hits


@pytest.fixture
def X():
    return unit_rows(1400)


def test_deleted_rows_leave_every_tier_and_k_results_still_come_back(tmp_path, X):
    eng = tiered_engine(tmp_path / "d", X)
    try:
        levels = eng.stats()["segments_by_level"]
        assert "L2_archive" in levels and "L1_raw" in levels and "L0_raw" in levels, levels
        victims = [3, 250, 599, 700, 999, 1005, 1250, 1399]
        for vid in victims:  # each is its own best match before
            assert ids_of(eng.query(X[vid], k=1, ef=64, search_tier="all"))[0] == vid
        out = eng.delete(ids=victims + [5000, 3])  # unknown and repeated ids count nothing
        assert out["deleted"] == len(victims) and out["lsn"] > 0
        for vid in victims:
            for tier in ("all", "active", "archive"):
                res = eng.query(X[vid], k=10, ef=64, search_tier=tier)
                assert vid not in ids_of(res)
            res = eng.query(X[vid], k=25, ef=64, search_tier="all", filter={"tags_any": ["odd", "even"]})
            assert vid not in ids_of(res) and len(res) == 25
            assert eng.view().metadata(vid) is None
        # the search widens past deleted rows: k live rows come back
        res = eng.query(X[700], k=50, ef=50, search_tier="all")
        assert len(res) == 50
        st = eng.stats()
        assert st["deleted_vectors"] == len(victims) and st["total_vectors"] == X.shape[0] - len(victims)
        assert st["delete_vectors_total"] == len(victims)
        assert eng.delete(ids=victims) == {"deleted": 0, "lsn": None}
    finally:
        eng.close()


def test_delete_by_track_and_by_filter(tmp_path, X):
    eng = tiered_engine(tmp_path / "d", X)
    try:
        assert eng.delete(filter={"source_file": "track-0002.wav"})["deleted"] == 100
        assert eng.delete(filter={"source_file": ["track-0005.wav", "track-0012.wav", "nope.wav"]})["deleted"] == 200
        # the query's clauses, alone and with source_file
        assert eng.delete(filter={"source_file": "track-0007.wav", "tags_all": ["odd"]})["deleted"] == 50
        n = eng.delete(filter={"tags_all": ["even"], "bpm_gte": 103, "bpm_lte": 103})["deleted"]
        want = {i for i in range(X.shape[0]) if i % 2 == 0 and 100 + i % 7 == 103
                and i // 100 not in (2, 5, 12)}
        assert n == len(want)
        live = set(dump(eng))
        gone = {i for i in range(X.shape[0]) if i // 100 in (2, 5, 12)} | {i for i in range(700, 800) if i % 2} | want
        assert live == set(range(X.shape[0])) - gone
        for vid in (250, 520, 1250, 701):
            assert vid not in ids_of(eng.query(X[vid], k=10, ef=64, search_tier="all"))
    finally:
        eng.close()


@pytest.mark.parametrize("bad", [dict(), dict(ids=[1], filter={"tags_all": ["x"]}), dict(filter={}),
                                 dict(ids=[-1]), dict(ids=["1"]), dict(ids=[1.5]), dict(ids=[True]),
                                 dict(filter={"source_file": []}), dict(filter={"source_file": 3}),
                                 dict(filter={"color": "red"}), dict(ids=list(range(11)))])
def test_bad_deletes_are_refused_before_anything_changes(tmp_path, X, bad):
    eng = Engine.open(tmp_path / "d", limits=Limits(max_delete_ids=10), **OPTS)
    try:
        eng.ingest_batch(items(X, 0, 20))
        with pytest.raises(BadRequestError):
            eng.delete(**bad)
        assert eng.stats()["deleted_vectors"] == 0 and eng.stats()["total_vectors"] == 20
    finally:
        eng.close()


def test_deletes_survive_restart_checkpoint_and_compaction_and_ids_are_never_reused(tmp_path, X):
    d = tmp_path / "d"
    eng = tiered_engine(d, X)
    victims = [10, 650, 1100, 1210, 1390]
    try:
        eng.delete(ids=victims)
    finally:
        eng.close()
    eng = Engine.open(d, **OPTS)
    try:
        assert not set(victims) & set(dump(eng))
        eng.checkpoint()
        eng.checkpoint()
        while eng.compact()["state"] != "idle":
            pass
        assert not set(victims) & set(dump(eng))
        assert eng.stats()["total_vectors"] == X.shape[0] - len(victims)
        # a retried keyed ingest answers the old id, created=false, and does not bring the row back
        again = eng.ingest_batch(items(X, 1100, 1101))
        assert again == [(1100, False)]
        assert 1100 not in set(dump(eng))
        # new rows get new ids
        new = eng.ingest(X[0], {"source_file": "new.wav"})
        assert new == (X.shape[0], True)
    finally:
        eng.close()


def test_a_delete_during_a_checkpoint_is_not_undone_by_its_publish(tmp_path, X):
    """The checkpoint builds its segment from hot rows read before the delete commits; publishing it
    must not bring the deleted rows back (state.SegmentSet masks every handle it adds)."""
    from vibrato.engine import checkpoint as ck, pipeline
    from vibrato.engine.faults import fault_point

    class DeleteBeforePublish(ck.Checkpoint):
        def publish(self, handle):
            self.engine.delete(ids=[7, 120])  # commits after the handle was loaded, before it is published
            super().publish(handle)

    eng = Engine.open(tmp_path / "d", **OPTS)
    try:
        eng.ingest_batch(items(X, 0, 150))
        ids, lsns, vecs, metas = eng.segment_set.hot_head(1000)
        pipeline.run(eng, DeleteBeforePublish(eng, "chk_race", ids, lsns, vecs, metas), background=False,
                     fault=fault_point)
        assert eng.stats()["hot_vectors"] == 0 and eng.stats()["active_segments"] == 1
        assert not {7, 120} & set(dump(eng))
        for vid in (7, 120):
            assert vid not in ids_of(eng.query(X[vid], k=5, ef=64, search_tier="all"))
        assert eng.stats()["total_vectors"] == 148
    finally:
        eng.close()


def test_identify_treats_a_deleted_frame_as_a_hole(tmp_path):
    rng = np.random.default_rng(3)
    frames = unit_rows(600, seed=9)
    eng = Engine.open(tmp_path / "d", **OPTS)
    try:
        eng.ingest_batch([{"vector": frames[i], "metadata": {"source_file": f"t{i // 200}.wav",
                                                             "start_time_ms": i * 40, "duration_ms": 40}}
                          for i in range(600)])
        eng.checkpoint()
        q = frames[250:280] + 0.01 * rng.standard_normal((30, DIM)).astype(np.float32)
        assert eng.identify(q, k=1, ef=64)[0]["id"] == 250
        eng.delete(ids=[265])
        for r in eng.identify(q, k=5, ef=64):
            assert not r["id"] <= 265 < r["id"] + 30
    finally:
        eng.close()


def test_follower_sees_a_delete_at_its_next_sync(tmp_path, X):
    d = tmp_path / "d"
    eng = Engine.open(d, publish_state=True, **OPTS)
    try:
        eng.ingest_batch(items(X, 0, 300))
        eng.checkpoint()
        eng.ingest_batch(items(X, 300, 400))
        eng.delete(ids=[5])
        fol = Follower.open(d, dim=DIM)
        try:
            assert 5 not in ids_of(fol.query(X[5], k=5, ef=64, search_tier="all"))
            # its filter index was built from the loaded segment's columns: the delete masks them too
            assert 5 not in ids_of(fol.query(X[5], k=5, ef=64, search_tier="all",
                                             filter={"tags_any": ["odd", "even"]}))
            for vid in (50, 350):
                assert vid in ids_of(fol.query(X[vid], k=5, ef=64, search_tier="all"))
            eng.delete(ids=[50, 350])
            for vid in (50, 350):  # segment row and hot row, with no reload in between
                assert vid not in ids_of(fol.query(X[vid], k=5, ef=64, search_tier="all"))
            eng.checkpoint()  # a reload: the new segment's handle is masked too
            assert 350 not in ids_of(fol.query(X[350], k=5, ef=64, search_tier="all"))
        finally:
            fol.close()
    finally:
        eng.close()


def test_purge_erases_every_byte_of_the_deleted_rows(tmp_path, X):
    d = tmp_path / "d"
    eng = tiered_engine(d, X)
    try:
        victims = list(range(300, 400)) + list(range(1200, 1300))  # track 3 (archive) and 12 (hot)
        eng.delete(filter={"source_file": ["track-0003.wav", "track-0012.wav"]})
        eng.delete(ids=[1395])  # a row of the growing hot chunk
        victims.append(1395)
        needles = {f"vec{v}": X[v].tobytes() for v in victims}
        needles.update({"track3": b"track-0003.wav", "track12": b"track-0012.wav"})
        assert grep_data_dir(d, needles), "the deleted bytes were on disk before the purge"
        out = eng.compact(purge=True)
        assert out["state"] == "completed"
        assert out["details"]["purged_ids"] == len(victims)
        assert grep_data_dir(d, needles) == []  # while the engine keeps running
        keep = {"vec0": X[0].tobytes(), "vec1399": X[1399].tobytes(), "track4": b"track-0004.wav"}
        assert len(grep_data_dir(d, keep)) >= 3  # the grep does find what was not deleted
        assert not set(victims) & set(dump(eng))
        assert eng.compact(purge=True)["details"]["purged_ids"] == 0
    finally:
        eng.close()
    assert grep_data_dir(d, needles) == []
    eng = Engine.open(d, **OPTS)
    try:
        assert not set(victims) & set(dump(eng))
        assert eng.stats()["total_vectors"] == X.shape[0] - len(victims)
    finally:
        eng.close()


def test_purge_vacuums_a_catalog_from_before_secure_delete(tmp_path, X):
    d = tmp_path / "d"
    eng = Engine.open(d, **OPTS)
    try:
        eng.ingest_batch(items(X, 0, 50))
        eng.checkpoint()
        eng.catalog.write(lambda c: c.execute(
            "INSERT INTO catalog_meta(key, value) VALUES ('vacuum_before_purge', '1')"))
        eng.delete(ids=[4])
        out = eng.compact(purge=True)["details"]
        assert out["vacuumed"] is True
        assert eng.catalog.read(del_sql.needs_vacuum) is False
        assert grep_data_dir(d, {"vec4": X[4].tobytes()}) == []
    finally:
        eng.close()


def test_replay_to_lsn_restores_a_delete_only_while_its_payload_exists(tmp_path, X):
    d = tmp_path / "d"
    eng = Engine.open(d, **OPTS)
    try:
        eng.ingest_batch(items(X, 0, 100))
        eng.checkpoint()
        before = eng.catalog.read(lambda c: c.execute("SELECT MAX(lsn) FROM wal_entries").fetchone()[0])
        eng.delete(ids=[1])
        eng.delete(ids=[2])
        eng.compact(purge=True)  # 1 and 2 erased
        eng.delete(ids=[3])      # not purged: its payload is still in the segment
    finally:
        eng.close()
    replay_to_lsn(d, "default", before)
    eng = Engine.open(d, **OPTS)
    try:
        live = set(dump(eng))
        assert 3 in live and 1 not in live and 2 not in live
        assert eng.stats()["deleted_vectors"] == 2
        assert ids_of(eng.query(X[3], k=1, ef=64, search_tier="all")) == [3]
    finally:
        eng.close()


# ------------------------------------------------------------------------------ crash windows
CHILD = textwrap.dedent("""
    import sys, random
    sys.path.insert(0, {tests!r})
    from enginetools import payload
    from vibrato.engine import Engine
    data_dir, ledger_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rnd = random.Random(seed)
    eng = Engine.open(data_dir, dim={dim}, background=False, checkpoint_max_rows=40, hot_exact_rows=16,
                      pq_min_rows=64)
    ledger = open(ledger_path, "a", buffering=1)
    top = eng.stats()["next_id"]
    if top == 0:
        res = eng.ingest_batch([dict(zip(("vector", "metadata"), payload(f"r{{i}}", {dim}))) for i in range(400)])
        top = len(res)
        ledger.write("ingested 400\\n")
    while True:
        op = rnd.random()
        if op < 0.6:
            ids = sorted(rnd.sample(range(top), rnd.randint(1, 6)))
            ledger.write("attempt " + ",".join(map(str, ids)) + "\\n")
            eng.delete(ids=ids)
            ledger.write("ack " + ",".join(map(str, ids)) + "\\n")
        elif op < 0.75:
            eng.ingest_batch([dict(zip(("vector", "metadata"), payload(f"x{{seed}}-{{rnd.random()}}", {dim})))])
        elif op < 0.85:
            eng.checkpoint()
        elif op < 0.95:
            eng.compact()
        else:
            eng.compact(purge=True)
""")


def run_delete_child(data_dir, ledger, seed, env_extra=None, kill_after=None):
    code = CHILD.format(tests=str(Path(__file__).parent), dim=DIM)
    return run_python(code, [data_dir, ledger, seed], env_extra, kill_after)


def verify_deletes(data_dir, ledger):
    attempts, acked = [], set()
    for line in Path(ledger).read_text().splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "attempt":
            attempts.append(tuple(int(x) for x in rest.split(",")))
        elif kind == "ack":
            acked.add(tuple(int(x) for x in rest.split(",")))
    eng = Engine.open(data_dir, dim=DIM, background=False)
    try:
        live = set(dump(eng))
        deleted = set(eng.catalog.read(del_sql.all_ids, eng.cid).tolist())
        assert not live & deleted
        for ids in acked:  # an acknowledged delete never resurfaces
            assert not set(ids) & live, ids
        for ids in attempts:  # an unacknowledged one applied entirely or not at all (ids deleted
            if ids not in acked:  # by an earlier delete count as applied either way)
                fresh = set(ids) - {i for a in acked for i in a} - {i for a in attempts if a != ids for i in a}
                state = {i in deleted for i in fresh}
                assert len(state) <= 1, (ids, state)
        attempted = {i for a in attempts for i in a}
        assert all(i in live for i in range(400) if i not in attempted)
        assert eng.stats()["total_vectors"] == len(live)
    finally:
        eng.close()


@pytest.mark.parametrize("seed", range(int(os.environ.get("VIBRATO_CRASH_SEEDS", "6")) // 2 or 1))
def test_sigkill_while_deleting(tmp_path, seed):
    data_dir, ledger = tmp_path / "data", tmp_path / "ledger"
    rng = np.random.default_rng(seed)
    for round_ in range(2):
        rc, err = run_delete_child(data_dir, ledger, seed * 10 + round_, kill_after=float(rng.uniform(1.5, 3.5)))
        assert rc == -signal.SIGKILL, f"child exited {rc}: {err[-2000:]}"
        verify_deletes(data_dir, ledger)


@pytest.mark.parametrize("point", ["delete:committed", "purge:checkpointed", "purge:rewritten", "purge:erased"])
def test_sigkill_at_each_delete_and_purge_step(tmp_path, point):
    data_dir, ledger = tmp_path / "data", tmp_path / "ledger"
    rc, err = run_delete_child(data_dir, ledger, 11, env_extra={"VIBRATO_FAULT": f"{point}=kill"}, kill_after=60)
    assert rc == -signal.SIGKILL, f"the child never reached {point} (rc {rc}): {err[-2000:]}"
    verify_deletes(data_dir, ledger)
    if point == "delete:committed":  # committed, never acknowledged: it applies after the restart
        last = [line for line in Path(ledger).read_text().splitlines() if line.startswith("attempt")][-1]
        ids = {int(x) for x in last.split(" ")[1].split(",")}
        eng = Engine.open(data_dir, dim=DIM, background=False)
        try:
            assert not ids & set(dump(eng))
        finally:
            eng.close()
    eng = Engine.open(data_dir, dim=DIM, background=False)
    try:  # the next purge finishes what the killed one started
        deleted = eng.catalog.read(del_sql.all_ids, eng.cid).tolist()
        eng.compact(purge=True)
        assert eng.catalog.read(del_sql.unpurged, eng.cid).shape[0] == 0
        needles = {f"r{i}": payload(f"r{i}", DIM)[0].tobytes() for i in deleted if i < 400}
    finally:
        eng.close()
    assert grep_data_dir(data_dir, needles) == []


@pytest.mark.parametrize("keep", [15, 300])
def test_k_live_results_when_most_rows_are_deleted(tmp_path, X, keep):
    eng = tiered_engine(tmp_path / "d", X)
    try:
        live = np.sort(np.random.default_rng(keep).choice(X.shape[0], keep, replace=False))
        gone = np.setdiff1d(np.arange(X.shape[0]), live)
        for b in range(0, gone.shape[0], 500):
            eng.delete(ids=gone[b:b + 500].tolist())
        for qi in range(0, X.shape[0], 97):
            for tier in ("all", "active", "archive"):
                res = eng.query(X[qi], k=10, ef=16, search_tier=tier)
                in_tier = [i for i in live.tolist() if tier == "all" or (tier == "archive") == (i < 600)]
                assert set(ids_of(res)) <= set(live.tolist())
                assert len(res) == min(10, len(in_tier)), (tier, qi)
        assert eng.stats()["total_vectors"] == keep
    finally:
        eng.close()
