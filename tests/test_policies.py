"""Policy code tested directly: compaction.plan (which segments merge next), merge_topk (how tier
results combine), HotTier.drop_through (which hot rows a checkpoint hides), the hot tier's graph
branch (sealed chunks searched through the graph the background worker builds), and quarantine
expiry in the housekeeping loop."""
import time
from types import SimpleNamespace

import numpy as np
import pytest

from vibrato.catalog import orphans
from vibrato.config import Config
from vibrato.engine import Engine, maintenance
from vibrato.engine.compaction import choose_pq_m, plan
from vibrato.engine.hot import HotTier
from vibrato.engine.planner import merge_topk
from vibrato.errors import IntegrityError


# ---------------------------------------------------------------------------- compaction.plan
def seg(name, start, n, level, kind="raw"):
    return SimpleNamespace(id=name, id_start=start, id_end=start + n - 1, n=n, level=level, kind=kind)


def layout(*specs):
    """Adjacent segments from (level, rows[, kind]) specs, ids 0.. in order, named s0, s1, ..."""
    out, start = [], 0
    for i, spec in enumerate(specs):
        level, n, kind = (*spec, "raw")[:3]
        out.append(seg(f"s{i}", start, n, level, kind))
        start += n
    return out


def names(run):
    return [s.id for s in run]


@pytest.fixture
def cfg(tmp_path):
    return Config(data_dir=tmp_path, compaction_max_inputs=8, l2_merge_max_rows=1000)


def test_plan_nothing_to_do(cfg):
    assert plan([], cfg) == (None, None)
    assert plan(layout((0, 10)), cfg) == (None, None)
    assert plan(layout((0, 10), (1, 10), (2, 10, "archive")), cfg) == (None, None)


def test_plan_merges_adjacent_l0_first_in_id_order(cfg):
    segs = layout((1, 10), (1, 10), (0, 10), (0, 10), (0, 10))
    run, level = plan(list(reversed(segs)), cfg)  # input order does not matter: sorted by id
    assert names(run) == ["s2", "s3", "s4"] and level == 1


def test_plan_l0_run_is_capped_at_max_inputs(cfg):
    segs = layout(*[(0, 5)] * 11)
    run, level = plan(segs, cfg.replace(compaction_max_inputs=4))
    assert names(run) == ["s0", "s1", "s2", "s3"] and level == 1


def test_plan_only_merges_neighbours(cfg):
    # L0s separated by an L1 are not adjacent: the lone L0 is skipped, the next pair merges
    segs = layout((0, 10), (1, 10), (0, 10), (0, 10))
    run, level = plan(segs, cfg)
    assert names(run) == ["s2", "s3"] and level == 1
    # no two neighbouring L0s at all: L1s are next
    segs = layout((0, 10), (1, 10), (0, 10), (1, 10), (1, 10))
    run, level = plan(segs, cfg)
    assert names(run) == ["s3", "s4"] and level == 2


def test_plan_first_qualifying_run_wins(cfg):
    segs = layout((0, 10), (0, 10), (1, 10), (0, 10), (0, 10), (0, 10))
    run, _ = plan(segs, cfg)
    assert names(run) == ["s0", "s1"]


def test_plan_l2_needs_four_segments_or_a_raw_l2(cfg):
    three = layout((2, 100, "archive"), (2, 100, "archive"), (2, 100, "archive"))
    assert plan(three, cfg) == (None, None)
    four = layout(*[(2, 100, "archive")] * 4)
    run, level = plan(four, cfg)
    # every adjacent run of >= 2 that fits is a candidate; the smallest total wins, ties to the first
    assert names(run) == ["s0", "s1"] and level == 2


def test_plan_l2_picks_the_smallest_adjacent_run(cfg):
    segs = layout((2, 600, "archive"), (2, 300, "archive"), (2, 100, "archive"), (2, 50, "archive"),
                  (2, 900, "archive"))
    run, level = plan(segs, cfg)
    assert level == 2 and names(run) == ["s2", "s3"]  # 150 rows: the smallest run of two or more


def test_plan_l2_respects_the_row_cap(cfg):
    segs = layout((2, 600, "archive"), (2, 500, "archive"), (2, 700, "archive"), (2, 800, "archive"))
    assert plan(segs, cfg) == (None, None)  # no two neighbours fit in l2_merge_max_rows=1000
    assert names(plan(segs, cfg.replace(l2_merge_max_rows=1100))[0]) == ["s0", "s1"]


def test_plan_l2_raw_output_is_merged_even_below_four(cfg):
    segs = layout((2, 100, "archive"), (2, 20, "raw"))
    run, level = plan(segs, cfg)
    assert names(run) == ["s0", "s1"] and level == 2
    # a run that skips the raw L2 does not qualify on its account
    segs = layout((2, 20, "raw"), (1, 10), (2, 100, "archive"), (2, 100, "archive"))
    assert plan(segs, cfg) == (None, None)


def test_plan_refuses_overlapping_segments(cfg):
    segs = [seg("a", 0, 10, 0), seg("b", 9, 10, 0)]
    with pytest.raises(IntegrityError, match="overlap"):
        plan(segs, cfg)


def test_choose_pq_m():
    assert choose_pq_m(128) == 16 and choose_pq_m(16) == 16 and choose_pq_m(24) == 12
    assert choose_pq_m(7) == 0 and choose_pq_m(1) == 0 and choose_pq_m(9) == 3


# ---------------------------------------------------------------------------- merge_topk
def arr(ids, scores):
    return np.array(ids, dtype=np.int64), np.array(scores, dtype=np.float32)


def test_merge_topk_keeps_the_best_score_per_id_then_top_k():
    a = arr([1, 2, 3], [0.9, 0.5, 0.1])
    b = arr([2, 4], [0.8, 0.7])  # id 2 again (e.g. hot and segment), with a better score
    ids, scores = merge_topk([a[0], b[0]], [a[1], b[1]], 3)
    assert ids.tolist() == [1, 2, 4]
    assert scores.tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert scores.dtype == np.float32


def test_merge_topk_ties_order_by_id_and_k_beyond_n():
    a = arr([7, 3], [0.5, 0.5])
    b = arr([5], [0.5])
    ids, scores = merge_topk([a[0], b[0]], [a[1], b[1]], 10)
    assert ids.tolist() == [3, 5, 7] and scores.tolist() == [0.5, 0.5, 0.5]


def test_merge_topk_one_target_keeps_its_order_and_orders_ties_by_id():
    ids, scores = merge_topk([arr([9, 4, 6], [0.9, 0.5, 0.1])[0]], [arr([9, 4, 6], [0.9, 0.5, 0.1])[1]], 2)
    assert ids.tolist() == [9, 4] and scores.dtype == np.float32
    a = arr([9, 8, 4, 6], [0.9, 0.5, 0.5, 0.1])  # a tie inside one target's answer
    ids, scores = merge_topk([a[0]], [a[1]], 3)
    assert ids.tolist() == [9, 4, 8] and scores.tolist() == pytest.approx([0.9, 0.5, 0.5])


def test_merge_topk_empty_inputs():
    for ids_list, scores_list in (([], []), ([np.empty(0, np.int64)], [np.empty(0, np.float32)])):
        ids, scores = merge_topk(ids_list, scores_list, 5)
        assert ids.shape == (0,) and scores.shape == (0,)
    ids, scores = merge_topk([np.array([1], np.int64)], [np.array([0.3], np.float64)], 0)
    assert ids.shape == (0,) and scores.dtype == np.float32


# ---------------------------------------------------------------------------- HotTier.drop_through
def filled(n, chunk_rows=16, dim=2, first_lsn=100):
    t = HotTier(dim, chunk_rows)
    append(t, 0, n, first_lsn)
    return t


def append(t, first_id, n, first_lsn):
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    vecs = np.stack([ids, ids], axis=1).astype(np.float32)
    t.append(ids, ids - first_id + first_lsn, vecs, [("", 0, 0, 0.0, []) for _ in range(n)])


def visible(t):
    return [int(i) for s in t.view().slices for i in s.chunk.ids[s.lo:s.hi]]


def test_drop_through_inside_the_first_chunk():
    t = filled(40)  # chunks of 16, 16, 8 (growing); lsn = 100 + id
    t.drop_through(105)
    assert visible(t) == list(range(6, 40)) and t.count() == 34 and len(t.chunks) == 3


def test_drop_through_pops_fully_dropped_sealed_chunks():
    t = filled(40)
    t.drop_through(115)  # exactly the first chunk
    assert len(t.chunks) == 2 and t.lo == 0 and visible(t) == list(range(16, 40))
    t.drop_through(120)
    assert len(t.chunks) == 2 and t.lo == 5 and visible(t) == list(range(21, 40))


def test_drop_through_keeps_the_growing_chunk_and_appends_after_it():
    t = filled(40)
    t.drop_through(139)  # everything
    assert t.count() == 0 and visible(t) == []
    assert len(t.chunks) == 1 and not t.chunks[0].sealed and t.lo == 8
    append(t, 40, 12, 140)  # fills the growing chunk (8 more) and opens a new one (4)
    assert visible(t) == list(range(40, 52)) and t.count() == 12
    ids, lsns, _, _ = t.view().head(100)
    assert ids.tolist() == list(range(40, 52)) and lsns.tolist() == list(range(140, 152))
    t.drop_through(147)  # the now-sealed chunk is fully dropped and popped
    assert len(t.chunks) == 1 and visible(t) == list(range(48, 52))


def test_drop_through_never_moves_backwards_and_ignores_old_lsns():
    t = filled(40)
    t.drop_through(109)
    t.drop_through(103)
    assert visible(t) == list(range(10, 40))
    t.drop_through(50)
    assert visible(t) == list(range(10, 40))
    empty = HotTier(2, 16)
    empty.drop_through(1000)
    assert empty.count() == 0 and empty.chunks == []


# ---------------------------------------------------------------------------- hot-chunk graphs
class CountingIndex:
    """Wraps a chunk's graph to prove the query went through it."""

    def __init__(self, index):
        self.index, self.calls = index, 0

    def search(self, *a, **kw):
        self.calls += 1
        return self.index.search(*a, **kw)


def test_sealed_hot_chunks_are_searched_through_the_background_built_graph(tmp_path):
    dim, n = 16, 2100
    rng = np.random.default_rng(7)
    X = rng.standard_normal((n, dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    bpm = (90 + np.arange(n) % 60).astype(np.float32)
    # hot_exact_rows shrunk to its minimum (chunks of 1,024 rows) WITH the background worker on;
    # checkpoints only when checkpoint_max_rows is reached, so every row stays hot
    eng = Engine.open(tmp_path / "d", dim=dim, background=True, hot_exact_rows=16, checkpoint_max_rows=100_000,
                      checkpoint_interval_secs=0, compaction_interval_secs=0, audio_colocated=False)
    try:
        for lo in range(0, n, 500):
            eng.ingest_batch([{"vector": X[i], "metadata": {"bpm": float(bpm[i])}} for i in range(lo, min(n, lo + 500))])
        sealed = [sl.chunk for sl in eng.view().hot.slices if sl.chunk.sealed]
        assert len(sealed) == 2 and eng.segment_set.hot_count() == n
        deadline = time.monotonic() + 60
        while any(ch.index is None for ch in sealed) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(ch.index is not None for ch in sealed), "the background worker built no graph"
        cfg = eng.config
        assert all(ch.index.m == cfg.hnsw_m and ch.index.ef_construction == cfg.l0_ef_construction
                   for ch in sealed)  # a short-lived graph: compaction rebuilds these rows' graph
        assert eng.stats()["active_segments"] == 0
        for ch in sealed:
            ch.index = CountingIndex(ch.index)

        def exact(q, k, allowed):
            scores = X[allowed] @ q
            order = np.lexsort((np.flatnonzero(allowed), -scores))[:k]
            return set(np.flatnonzero(allowed)[order].tolist())

        everyone = np.ones(n, dtype=bool)
        wide = bpm >= 100  # most rows: still the graph branch
        narrow = bpm == 95  # 35 rows: at most 4 * k allowed per chunk -> exact scan
        for qi in rng.choice(n, 25, replace=False).tolist():
            q = X[qi]
            got = [r["id"] for r in eng.query(q, k=10, ef=256, include_metadata=False)]
            assert got[0] == qi and set(got) == exact(q, 10, everyone)
            got = [r["id"] for r in eng.query(q, k=10, ef=256, filter={"bpm_gte": 100}, include_metadata=False)]
            assert set(got) == exact(q, 10, wide)
            got = [r["id"] for r in eng.query(q, k=5, ef=256, filter={"bpm_gte": 95, "bpm_lte": 95},
                                              include_metadata=False)]
            assert set(got) == exact(q, 5, narrow)
        assert all(ch.index.calls > 0 for ch in sealed), "a sealed chunk was scanned instead of searched"
    finally:
        eng.close()


# ---------------------------------------------------------------------------- quarantine expiry
def quarantine(eng, name, size=8):
    path = eng.config.quarantine_dir / name
    path.write_bytes(b"x" * size)
    eng.catalog.write(orphans.insert, eng.cid, f"segments/{name}", f"quarantine/{name}", size)
    return path


def test_housekeeping_expires_quarantined_files(tmp_path):
    with Engine.open(tmp_path / "d", dim=8, background=False, orphan_ttl_hours=1) as eng:
        old, fresh = quarantine(eng, "old.vdb"), quarantine(eng, "fresh.vdb")
        def backdate(conn):  # quarantined two hours ago
            conn.execute("UPDATE orphan_files SET quarantined_at = quarantined_at - 7200 "
                         "WHERE quarantine_path = 'quarantine/old.vdb'")
        eng.catalog.write(backdate)
        assert maintenance.quarantine_gc(eng) == 1
        assert not old.exists() and fresh.exists()
        assert eng.stats()["quarantine_files"] == 1
        maintenance.run_once(eng)  # nothing else expired
        assert fresh.exists() and eng.stats()["quarantine_files"] == 1


def test_background_loop_expires_quarantined_files_after_start_up(tmp_path):
    with Engine.open(tmp_path / "d", dim=8, background=True, orphan_ttl_hours=0, checkpoint_interval_secs=0,
                     compaction_interval_secs=0, audio_colocated=False) as eng:
        path = quarantine(eng, "late.vdb")  # quarantined after recovery ran
        deadline = time.monotonic() + 30  # housekeeping runs every 5 s
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not path.exists(), "the housekeeping loop did not expire the quarantined file"
        assert eng.stats()["quarantine_files"] == 0
