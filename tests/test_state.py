"""The engine's typed state (vibrato/engine/state.py): readiness reports, counters, and the segment
set's add/swap/append with the views queries take."""
import threading

import numpy as np
import pytest

from vibrato.engine import Engine
from vibrato.engine.state import Counter, Counters, Readiness, SegmentSet


def test_readiness_reports():
    r = Readiness()
    assert r.state() == (False, "recovering") and r.recovering
    r.finish("active_segments=2", [])
    assert r.state() == (True, "recovered: active_segments=2") and not r.recovering
    r.add_blocker("active segment s1 invalid: checksum mismatch")
    r.add_blocker("active segment s1 invalid: checksum mismatch")  # once only
    r.add_blocker("hot tier out of step")
    assert r.state() == (False, "degraded: active_segments=2, blockers=active segment s1 invalid: checksum "
                                "mismatch | hot tier out of step")
    assert r.blockers == ["active segment s1 invalid: checksum mismatch", "hot tier out of step"]


def test_readiness_after_recovery_failed_and_with_blockers_from_recovery():
    r = Readiness()
    r.finish(None, ["recovery failed: boom"])
    assert r.state() == (False, "degraded: recovery failed: boom")
    r = Readiness()
    r.finish("active_segments=0", ["integrity: x", "integrity: x"])
    assert r.state() == (False, "degraded: active_segments=0, blockers=integrity: x")


def test_counters_are_exact_under_threads():
    c = Counters()

    def work():
        for _ in range(5000):
            c.add(Counter.QUERY)
        c.add(Counter.INGEST_VECTORS, 7)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    d = c.as_dict()
    assert c[Counter.QUERY] == d["query_total"] == 20000 and d["ingest_vectors_total"] == 28
    assert set(d) == {m.value for m in Counter} and d["checkpoint_total"] == 0
    with pytest.raises(KeyError):
        c.add("query_total")  # a string is not a counter


def _rows(ids, dim=4):
    ids = np.asarray(ids, dtype=np.int64)
    vecs = np.ones((ids.shape[0], dim), np.float32)
    metas = [("", 0, 0, 100.0 + i, ["t"] if i % 2 else []) for i in ids.tolist()]
    return ids, ids + 1, vecs, metas


def test_segment_set_append_is_visible_to_new_views_only():
    s = SegmentSet(4, 16)
    before = s.view()
    s.append(*_rows(range(20)))
    assert before.hot.slices == () and s.hot_count() == 20
    assert [int(i) for sl in s.view().hot.slices for i in sl.chunk.ids[sl.lo:sl.hi]] == list(range(20))
    allowed = s.filters.evaluate(_flt(tags_all=["t"]))
    assert allowed.ids_in(0, 20).tolist() == list(range(1, 20, 2))
    ids, lsns, vecs, metas = s.hot_head(5)
    assert ids.tolist() == [0, 1, 2, 3, 4] and lsns.tolist() == [1, 2, 3, 4, 5] and len(metas) == 5


def test_segment_set_dead_ranges_are_never_allowed():
    s = SegmentSet(4, 16)
    s.append(*_rows(range(8)))
    s.set_dead_ranges([(3, 5)])
    assert s.dead_ranges == ((3, 5),)
    assert s.filters.evaluate(_flt(bpm_gte=0.0)).ids_in(0, 8).tolist() == [0, 1, 2, 6, 7]


def _flt(**kw):
    from vibrato.engine.validation import make_filter
    return make_filter(kw.get("tags_any"), kw.get("tags_all"), kw.get("bpm_gte"), kw.get("bpm_lte"))


def test_swap_replaces_inputs_and_hides_checkpointed_hot_rows(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 8)).astype(np.float32)
    with Engine.open(tmp_path / "d", dim=8, background=False, checkpoint_max_rows=100) as eng:
        eng.ingest_batch([{"vector": x} for x in X])
        held = eng.view()
        eng.checkpoint()
        eng.checkpoint()
        segs = eng.segment_set.handles
        assert [(s.id_start, s.id_end) for s in segs] == [(0, 99), (100, 199)]
        assert eng.segment_set.hot_count() == 100
        eng.compact()
        (merged,) = eng.segment_set.handles
        assert (merged.id_start, merged.id_end) == (0, 199)
        # a view taken before keeps what it saw; a new one sees the merged segment and the hot tail
        assert held.segments == () and sum(sl.hi - sl.lo for sl in held.hot.slices) == 300
        now = eng.view()
        assert [s.id for s in now.segments] == [merged.id]
        assert [int(i) for sl in now.hot.slices for i in sl.chunk.ids[sl.lo:sl.hi]] == list(range(200, 300))
        st = eng.stats()
        assert st["total_vectors"] == 300 and st["checkpoint_total"] == 2 and st["compaction_total"] == 1
