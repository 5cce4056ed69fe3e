"""The query planner (engine/planner.py): its per-target choices, its agreement with the native cost
model, and results identical to the mask-per-segment search it replaced, over hot chunks (with and
without a graph), raw segments and PQ archive segments, for filters of every selectivity."""
import numpy as np
import pytest

from vibrato import kernels
from vibrato.engine import Engine, planner
from vibrato.engine.filters import Allowed
from vibrato.index import HnswIndex


def unit(rng, n, d):
    X = rng.standard_normal((n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


# ---------------------------------------------------------------------------- the replaced search
def _old_topk(scores, k):
    n = scores.shape[0]
    if k >= n:
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


def reference_search(view, q, k, ef, mask, search_tier):
    """The search before the planner: a bool mask over every id, sliced per segment and hot slice."""
    include_hot, pred = planner.tier_filter(search_tier)
    ids, scores = [], []
    if include_hot:
        for s in view.hot.slices:
            ch = s.chunk
            rows_ids = ch.ids[s.lo:s.hi]
            allowed = None
            if mask is not None:
                inside = rows_ids < mask.shape[0]
                allowed = np.zeros(s.hi - s.lo, dtype=bool)
                allowed[inside] = mask[rows_ids[inside]]
                if not allowed.any():
                    continue
            if ch.index is not None and (allowed is None or allowed.sum() > 4 * k):
                full = np.zeros(ch.capacity, dtype=bool)
                full[s.lo:s.hi] = True if allowed is None else allowed
                i, sc = ch.index.search(q, k=k, ef=max(ef, k), allowed=full)
                i, sc = i.reshape(-1), sc.reshape(-1)
                ids.append(ch.ids[i[i >= 0]])
                scores.append(sc[i >= 0])
                continue
            sc = kernels.dot_many(q, ch.vectors[s.lo:s.hi], threads=1)
            rows = None if allowed is None else np.flatnonzero(allowed)
            if rows is not None:
                sc = sc[rows]
            take = _old_topk(sc, k)
            scores.append(sc[take])
            ids.append(rows_ids[take] if rows is None else rows_ids[rows[take]])
    for seg in view.segments:
        if not pred(seg):
            continue
        if mask is None:
            allowed = None if seg.all_live else seg.live
        else:
            allowed = np.zeros(seg.n, dtype=bool)
            hi = min(mask.shape[0], seg.id_end + 1)
            if hi > seg.id_start:
                allowed[:hi - seg.id_start] = mask[seg.id_start:hi]
            allowed &= seg.live
        if allowed is not None and not allowed.any():
            continue
        if seg.index is not None:
            i, sc = seg.index.search(q, k=k, ef=max(ef, k), allowed=allowed)
            i, sc = i.reshape(-1), sc.reshape(-1)
            ids.append(i[i >= 0])
            scores.append(sc[i >= 0])
            continue
        rows, _ = seg.pq.adc_scan(q, seg.codes, max(k * seg.rerank_factor, ef, 32), allowed)
        rows = np.asarray(rows, dtype=np.int64)
        exact = kernels.dot_many(q, seg.vectors, rows, threads=1)
        take = _old_topk(exact, k)
        ids.append(rows[take] + seg.id_start)
        scores.append(exact[take])
    return planner.merge_topk(ids, scores, k)


# ---------------------------------------------------------------------------- fixture
TAGS = {"p0_1": 0.001, "p1": 0.01, "p10": 0.1, "p50": 0.5, "p100": 1.0}


@pytest.fixture(scope="module")
def tiered(tmp_path_factory):
    """An engine with an L2 archive, L1/L0 raw segments, and hot chunks with and without a graph."""
    rng = np.random.default_rng(11)
    dim, n_seg, n_hot = 16, 6000, 2600
    X = unit(rng, n_seg + n_hot, dim)
    u = rng.random(n_seg + n_hot)
    tags = [[t for t, p in TAGS.items() if u[i] < p] for i in range(n_seg + n_hot)]
    bpm = (60 + np.arange(n_seg + n_hot) % 100).astype(np.float32)
    eng = Engine.open(tmp_path_factory.mktemp("planner") / "d", dim=dim, background=False,
                      checkpoint_max_rows=1000, hot_exact_rows=16, pq_min_rows=256, compaction_max_inputs=2)

    def batch(lo, hi):
        eng.ingest_batch([{"vector": X[i], "metadata": {"tags": tags[i], "bpm": float(bpm[i]),
                                                        "source_file": f"s{i // 100}.wav", "start_time_ms": i}}
                          for i in range(lo, hi)])
    for lo in range(0, 4000, 1000):
        batch(lo, lo + 1000)
        eng.checkpoint()
    while eng.compact()["state"] != "idle":
        pass
    for lo in range(4000, n_seg, 1000):
        batch(lo, lo + 1000)
        eng.checkpoint()
    batch(n_seg, n_seg + n_hot)
    slices = eng.view().hot.slices
    sealed = [sl.chunk for sl in slices if sl.chunk.sealed]
    assert len(sealed) >= 2 and slices[0].lo > 0, "want a partly checkpointed and a whole sealed chunk"
    for ch in sealed:  # graphs as the background worker builds them
        ch.index = HnswIndex(dim, m=16, ef_construction=100, seed=0)
        ch.index.add(ch.vectors, threads=1)
    kinds = {(s.level, s.kind) for s in eng.segment_set.handles}
    assert any(k == "archive" for _, k in kinds) and any(k == "raw" for _, k in kinds), kinds
    archives = [s for s in eng.segment_set.handles if s.kind == "archive"]
    assert all(s.index is not None for s in archives)  # format version 2: archives carry a graph
    archives[0].index = None  # ... and one searched as a version-1 (0.3.0) archive is: PQ scan + rerank
    yield eng, X, tags, bpm
    eng.close()


FILTERS = [{"tags_all": [t]} for t in TAGS] + [
    {"tags_any": ["p0_1", "p1"]}, {"tags_all": ["p10", "p50"]}, {"tags_all": ["p1"], "bpm_gte": 100.0},
    {"bpm_gte": 100.0, "bpm_lte": 101.0}, {"bpm_gte": 70.0}, {"tags_any": ["missing"]}]


@pytest.mark.parametrize("flt", [None] + FILTERS, ids=lambda f: "none" if f is None else str(f))
def test_results_match_the_mask_per_segment_search(tiered, flt):
    eng, X, _, _ = tiered
    from vibrato.engine.validation import check_filter
    rng = np.random.default_rng(5)
    view = eng.view()
    allowed = eng.segment_set.filters.evaluate(check_filter(flt, eng.config.limits)) if flt is not None else None
    mask = None if allowed is None else allowed.to_mask()
    for qi in rng.choice(X.shape[0], 12, replace=False).tolist():
        q = X[qi]
        for k, ef, tier in ((10, 64, "all"), (3, 16, "active"), (40, 100, "archive"), (1, 1, "all")):
            got = planner.search(view, q, k, ef, allowed, tier)
            want = reference_search(view, q, k, ef, mask, tier)
            np.testing.assert_array_equal(got[0], want[0], err_msg=f"{flt} {k} {ef} {tier}")
            np.testing.assert_array_equal(got[1], want[1])


def test_plan_choices_follow_the_allowed_count(tiered):
    eng, _, _, _ = tiered
    view = eng.view()
    limits = eng.config.limits
    from vibrato.engine.validation import check_filter

    def steps(flt, k=10, ef=64):
        allowed = eng.segment_set.filters.evaluate(check_filter(flt, limits)) if flt is not None else None
        return allowed, planner.plan(view, allowed, k, ef, "all")

    _, unfiltered = steps(None)
    assert {s.kind for s in unfiltered} <= {"graph", "pq", "exact"}
    assert all(s.kind == "exact" and s.rows is None for s in unfiltered if getattr(s.target, "chunk", None)
               and s.target.chunk.index is None)
    allowed, rare = steps({"tags_all": ["p0_1"]})
    assert allowed.sparse
    for s in rare:  # a 0.1% filter: no target builds a mask
        assert s.kind in ("skip", "exact") and s.mask is None, s
    _, none = steps({"tags_any": ["missing"]})
    assert all(s.kind == "skip" for s in none)
    allowed, wide = steps({"tags_all": ["p50"]})
    raw = [s for s in wide if not hasattr(s.target, "chunk") and s.target.index is not None]
    assert raw and all(s.kind == "graph" and s.mask is not None and s.mask.shape == (s.target.n,) for s in raw)
    archive = [s for s in wide if not hasattr(s.target, "chunk") and s.target.index is None]
    assert archive and all(s.kind == "pq" and s.mask.shape == (s.target.n,) for s in archive)
    graphed = [s for s in wide if getattr(s.target, "chunk", None) is not None and s.target.chunk.index is not None]
    assert graphed and all(s.kind in ("graph", "exact") for s in graphed)
    _, everyone = steps({"tags_all": ["p100"]})
    segs = [s for s in everyone if not hasattr(s.target, "chunk")]
    assert segs and all(s.kind in ("graph", "pq") and s.mask is None for s in segs)  # all rows allowed: no mask


def test_a_wide_filter_scans_raw_segments_on_their_int8_codes(tiered, monkeypatch):
    """Where the native search would scan many allowed rows of a raw segment, the plan says `scan`:
    the segment's int8 codes are read from its file on first use (none is built in memory), and the
    result is the exact top-k of its allowed rows, with their float scores."""
    eng, X, _, _ = tiered
    from vibrato.engine.validation import check_filter
    monkeypatch.setattr(planner, "SCAN_CODES_MIN_ROWS", 200)  # the fixture's segments are small

    def no_build(self):
        raise AssertionError("a segment whose file holds scan codes must not build them")
    monkeypatch.setattr(HnswIndex, "build_scan_codes", no_build)
    view = eng.view()
    allowed = eng.segment_set.filters.evaluate(check_filter({"tags_all": ["p50"]}, eng.config.limits))
    mask = allowed.to_mask()
    scans = [s for s in planner.plan(view, allowed, 10, 64, "all") if s.kind == "scan"]
    assert scans and all(s.target.ram_codes is None and s.target.level <= 1 for s in scans)
    assert all(s.target.kind != "archive" for s in scans)
    rng = np.random.default_rng(3)
    for step in scans:
        seg = step.target
        rows = np.flatnonzero(step.mask)
        np.testing.assert_array_equal(rows + seg.id_start, np.flatnonzero(mask[seg.id_start:seg.id_end + 1] & seg.live) + seg.id_start)
        before = seg.index.stats()["scan_code_searches"]
        for qi in rng.choice(X.shape[0], 8, replace=False).tolist():
            ids, scores = planner._run(step, X[qi], 10, 64)
            exact = kernels.dot_many(X[qi], seg.vectors, rows, threads=1)
            take = planner.topk(exact, 10)
            np.testing.assert_array_equal(ids, rows[take] + seg.id_start)
            np.testing.assert_array_equal(scores, exact[take])
        assert seg.index.has_scan_codes
        assert seg.index.stats()["scan_code_searches"] == before + 8


def test_a_large_hot_slice_is_ranked_on_its_int8_codes_and_rescored_exactly(tmp_path, monkeypatch):
    """The growing hot chunk (and a sealed one before its graph) is scanned on the scan codes kept
    beside its vectors: the result is the exact top-k of its rows, with float scores, also across
    ties, and the codes are those of the rows as appended."""
    rng = np.random.default_rng(21)
    X = unit(rng, 3000, 24)
    X[2040:2056] = X[42]  # exact ties, across the chunk boundary: the lower id wins as in the float scan
    eng = Engine.open(tmp_path / "d", dim=24, background=False, hot_exact_rows=2048, checkpoint_max_rows=10**6)
    try:
        for lo in range(0, 3000, 700):
            eng.ingest_batch([{"vector": X[i]} for i in range(lo, min(3000, lo + 700))])
        view = eng.view()
        assert [s.hi - s.lo for s in view.hot.slices] == [2048, 952]
        codes, scale = kernels.scan_codes(X)
        ch = view.hot.slices[0].chunk
        np.testing.assert_array_equal(ch.codes, codes[:2048])
        np.testing.assert_array_equal(ch.scale, scale[:2048])
        monkeypatch.setattr(planner, "SCAN_CODES_MIN_ROWS", 900)  # both slices take the codes path
        calls = []
        real = planner._hnsw.codes_topk
        monkeypatch.setattr(planner._hnsw, "codes_topk", lambda *a: calls.append(1) or real(*a))
        for qi in [42, 7, 2999] + rng.choice(3000, 10, replace=False).tolist():
            for k, ef in ((10, 64), (1, 1), (5, 16)):
                ids, scores = planner.search(view, X[qi], k, ef, None, "all")
                exact = kernels.dot_many(X[qi], X, threads=1)
                want = planner.topk(exact, k)
                np.testing.assert_array_equal(ids, want)
                np.testing.assert_array_equal(scores, exact[want])
        assert len(calls) == 2 * 13 * 3
    finally:
        eng.close()


def test_hot_codes_scan_with_a_k_whose_rescore_depth_exceeds_the_beam_limit(tmp_path):
    """8 * k rescored rows would pass the native limit on a beam (MAX_EF) for a k allowed by a raised
    --max-k: the depth is capped as the segment scan caps it, and the answer is still every row, exact."""
    rng = np.random.default_rng(4)
    X = unit(rng, 3000, 8)
    eng = Engine.open(tmp_path / "d", dim=8, background=False, hot_exact_rows=4096, checkpoint_max_rows=10**6)
    try:
        eng.ingest_batch([{"vector": x} for x in X])
        view = eng.view()
        k = planner.MAX_EF // planner.SCAN_CODES_RERANK_PER_K + 1
        ids, scores = planner.search(view, X[0], k, 64, None, "all")
        exact = kernels.dot_many(X[0], X, threads=1)
        want = planner.topk(exact, k)
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_array_equal(scores, exact[want])
    finally:
        eng.close()


@pytest.mark.parametrize("n", [500, 3000])
def test_native_scans_never_claims_a_scan_the_native_search_would_not_make(n):
    rng = np.random.default_rng(n)
    X = unit(rng, n, 16)
    index = HnswIndex(16, m=8, ef_construction=40, seed=1)
    index.add(X, threads=1)
    q = X[0]
    claimed = 0
    for allowed_n in sorted(set(np.unique(np.geomspace(1, n - 1, 40).astype(int)).tolist())):
        for k, ef in ((1, 1), (10, 64), (10, 16), (50, 200)):
            mask = np.zeros(n, dtype=bool)
            mask[rng.choice(n, allowed_n, replace=False)] = True
            if not planner.native_scans(allowed_n, n, k, max(ef, k)):
                continue
            claimed += 1
            before = index.stats()
            index.search(q, k=k, ef=max(ef, k), allowed=mask)
            after = index.stats()
            assert after["scan_searches"] == before["scan_searches"] + 1, (allowed_n, k, ef)
            assert after["graph_searches"] == before["graph_searches"]
            assert after["scan_fallbacks"] == before["scan_fallbacks"]
    assert claimed > 10


def test_topk_breaks_ties_by_lower_position():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        scores = rng.integers(0, 5, n).astype(np.float32)
        k = int(rng.integers(1, n + 3))
        want = np.lexsort((np.arange(n), -scores))[:k]
        np.testing.assert_array_equal(planner.topk(scores, k), want)


def test_f32_floats_are_the_shortest_float32_reprs():
    vals = np.array([0.1, 1 / 3, 120.5, 98.6, -0.0, 1e-40, 3.4e38, 1e-7, np.nan, np.inf, -np.inf], np.float32)
    got = planner.f32_floats(vals)
    for g, v in zip(got, vals):
        w = float(str(np.float32(v)))
        assert (g == w and str(g) == str(w)) or (np.isnan(g) and np.isnan(w)), (g, w)
    assert all(type(g) is float for g in got)


def test_query_metadata_comes_in_one_batch_per_segment(tiered, monkeypatch):
    eng, X, tags, bpm = tiered
    view = eng.view()
    small = np.array([0, 5, 4500, 10 ** 6], dtype=np.int64)  # one row of a segment or none
    expect_small = view.metadata_many(small)
    # several rows of each segment: one batched decode per segment, no per-row call
    ids = np.concatenate([np.arange(s.id_start, s.id_start + 7) for s in view.segments]
                         + [np.array([8599, 10 ** 6, 3, 0, 5, 4500])]).astype(np.int64)
    for seg in view.segments:
        monkeypatch.setattr(seg.reader, "metadata", lambda row: pytest.fail("metadata fetched one row at a time"))
    metas = view.metadata_many(ids)
    assert metas[-5] is None and expect_small[3] is None
    assert metas[-3:] == expect_small[:3] and [m["start_time_ms"] for m in expect_small[:3]] == [0, 5, 4500]
    for vid, m in zip(ids.tolist(), metas):
        if vid < X.shape[0]:
            assert m["tags"] == sorted(tags[vid]) and m["bpm"] == float(bpm[vid]) and m["start_time_ms"] == vid
    res = eng.query(X[5000], k=5, filter={"tags_all": ["p10"]})
    assert res and all("p10" in r["metadata"]["tags"] for r in res)
    assert all(type(r["score"]) is float and str(r["score"]) == str(np.float32(r["score"])) for r in res)


def test_allowed_sparse_and_dense_agree():
    mask = np.zeros(100, dtype=bool)
    mask[[3, 4, 50, 99]] = True
    dense, sparse = Allowed(100, mask=mask.copy()), Allowed(100, ids=np.flatnonzero(mask))
    for lo, hi in ((0, 100), (4, 51), (90, 130), (-5, 3), (100, 120)):
        np.testing.assert_array_equal(dense.ids_in(lo, hi), sparse.ids_in(lo, hi))
        np.testing.assert_array_equal(dense.mask_in(lo, hi), sparse.mask_in(lo, hi))
    assert dense.count == sparse.count == 4
    with pytest.raises(ValueError):
        dense.mask_in(0, 100)[0] = True  # a view of the shared mask is read-only


def test_a_query_on_one_whole_segment_takes_the_walk_alone_with_the_merged_order(tmp_path, monkeypatch):
    """A compacted collection (one segment, nothing hot) is searched by the segment's walk alone
    (HnswIndex.search_one, no per-step work): the same ids and scores as the general path, ties
    to the lower id, for engine-checked queries; other inputs take search() and agree too."""
    rng = np.random.default_rng(33)
    X = unit(rng, 1500, 16)
    X[700:712] = X[5]  # exact ties: the lower id first, as merge_topk orders them
    eng = Engine.open(tmp_path / "d", dim=16, background=False)
    try:
        eng.ingest_batch([{"vector": v, "metadata": {"tags": ["t"] if i % 5 == 0 else []}} for i, v in enumerate(X)])
        eng.checkpoint()
        while eng.compact()["state"] != "idle":
            pass
        view = eng.view()
        steps = planner.plan(view, None, 10, 32, "all")
        assert len(steps) == 1 and planner._whole_segment_walk(steps[0]) and view.hot.count == 0
        from vibrato.engine.validation import check_vector
        calls = []
        real = HnswIndex.search
        monkeypatch.setattr(HnswIndex, "search", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
        for qi in [5, 700, 3] + rng.choice(1500, 10, replace=False).tolist():
            for k, ef in ((10, 32), (1, 1), (20, 8)):
                q = check_vector(X[qi], 16)
                ids, scores = planner.search(view, q, k, ef, None, "all")
                assert not calls  # the walk alone
                want = planner.merge_topk(*map(list, zip(planner._run(steps[0], q, k, ef))), k)
                np.testing.assert_array_equal(ids, want[0])
                np.testing.assert_array_equal(scores, want[1])
                calls.clear()
                raw_ids, raw_scores = planner.search(view, X[qi], k, ef, None, "all")  # not engine-checked
                assert calls
                np.testing.assert_array_equal(raw_ids, ids)
                np.testing.assert_array_equal(raw_scores, scores)
                calls.clear()
        q = check_vector(X[5], 16)
        assert planner.search(view, q, 10, 32, None, "all")[0][:12].tolist() == [5] + list(range(700, 709))
        # a filtered scan of that one segment: its native order is the merged order too
        from vibrato.engine.validation import check_filter
        monkeypatch.setattr(planner, "SCAN_CODES_MIN_ROWS", 50)
        allowed = eng.segment_set.filters.evaluate(check_filter({"tags_any": ["t"]}, eng.config.limits))
        scan, = planner.plan(view, allowed, 10, 32, "all")
        assert scan.kind == "scan"
        for qi in [5, 700, 3, 1499]:
            ids, scores = planner.search(view, X[qi], 10, 32, allowed, "all")
            want = planner.merge_topk(*map(list, zip(planner._run(scan, X[qi], 10, 32))), 10)
            np.testing.assert_array_equal(ids, want[0])
            np.testing.assert_array_equal(scores, want[1])
        assert planner.search(view, X[5], 4, 32, allowed, "all")[0].tolist() == [5, 700, 705, 710]
    finally:
        eng.close()


def test_the_walk_alone_is_decided_once_per_view_and_every_change_makes_a_new_view(tmp_path):
    """SegmentSet.view() hands every query the same View until a change; planner.walk_alone decides
    once per view and tier. An ingest, a delete, a checkpoint or a compaction makes a new view, so a
    query never walks alone over rows it must not return or past rows it must."""
    rng = np.random.default_rng(34)
    X = unit(rng, 900, 16)
    eng = Engine.open(tmp_path / "d", dim=16, background=False)
    try:
        eng.ingest_batch([{"vector": v} for v in X[:800]])
        eng.checkpoint()
        while eng.compact()["state"] != "idle":
            pass
        view = eng.view()
        assert eng.view() is view and eng.view().alone is view.alone
        seg = planner.walk_alone(view, "all")
        assert seg is view.segments[0] and view.alone == {"all": seg}
        assert planner.walk_alone(view, "archive") is None and planner.walk_alone(view, "active") is seg
        # an ingest: the new row is hot, so no walk alone on the next view, and it is found
        eng.ingest(X[850])
        hot_view = eng.view()
        assert hot_view is not view and planner.walk_alone(hot_view, "all") is None
        assert eng.query(X[850], k=1, search_tier="all", include_metadata=False)[0]["id"] == 800
        assert planner.walk_alone(hot_view, "archive") is None  # the one segment is active (L1)
        eng.checkpoint()
        while eng.compact()["state"] != "idle":
            pass
        view = eng.view()
        assert planner.walk_alone(view, "all") is not None
        # a delete: the segment has a dead row, so it is walked with its mask, and the row is gone
        top = eng.query(X[7], k=1, search_tier="all", include_metadata=False)[0]["id"]
        eng.delete([top])
        after = eng.view()
        assert after is not view and planner.walk_alone(after, "all") is None
        assert top not in [r["id"] for r in eng.query(X[7], k=10, search_tier="all", include_metadata=False)]
        assert eng.view() is after
    finally:
        eng.close()


def test_a_selective_scan_reads_the_rows_its_evaluation_keeps(tiered, monkeypatch):
    """A scan step of an untouched segment under a selective filter carries the allowed rows as uint32,
    listed once per evaluation (Allowed.rows_in), and the native scan reading them returns what the
    scan collecting them from the mask returns: the exact top-k of the allowed rows."""
    eng, X, _, _ = tiered
    from vibrato.engine.validation import check_filter
    monkeypatch.setattr(planner, "SCAN_CODES_MIN_ROWS", 100)  # the fixture's segments are small
    view = eng.view()
    allowed = eng.segment_set.filters.evaluate(check_filter({"tags_any": ["p10"]}, eng.config.limits))
    scans = [s for s in planner.plan(view, allowed, 10, 64, "all") if s.kind == "scan"]
    listed = [s for s in scans if s.rows is not None]
    assert listed and all(s.target.all_live for s in listed)
    again = {id(s.target): s for s in planner.plan(view, allowed, 10, 64, "all") if s.kind == "scan"}
    for step in listed:
        seg = step.target
        np.testing.assert_array_equal(step.rows, np.flatnonzero(step.mask))
        assert step.rows.dtype == np.uint32 and step.rows.shape == (step.count,)
        assert again[id(seg)].rows is step.rows  # listed once per evaluation
        for qi in (3, 77, 4001):
            got = planner._run(step, X[qi], 10, 64)
            from_mask = planner._run(step._replace(rows=None), X[qi], 10, 64)
            np.testing.assert_array_equal(got[0], from_mask[0])
            np.testing.assert_array_equal(got[1], from_mask[1])
            exact = kernels.dot_many(X[qi], seg.vectors, step.rows.astype(np.int64), threads=1)
            np.testing.assert_array_equal(got[0], step.rows[planner.topk(exact, 10)].astype(np.int64) + seg.id_start)


def test_allowed_rows_are_checked_against_the_mask_and_the_index():
    rng = np.random.default_rng(4)
    X = unit(rng, 600, 8)
    idx = HnswIndex(8, m=8, ef_construction=32, seed=1)
    idx.add(X, threads=1)
    mask = np.zeros(600, bool)
    mask[::7] = True
    rows = np.flatnonzero(mask).astype(np.uint32)
    a = idx.search(X[3], k=5, ef=16, allowed=mask, mode="scan", allowed_rows=rows)
    b = idx.search(X[3], k=5, ef=16, allowed=mask, mode="scan")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    bad = rows.copy()
    bad[-1] = 600  # past the last row: refused in C before any read
    for kwargs in ({"allowed_rows": rows.astype(np.int64)}, {"allowed_rows": rows[:-1]}, {"allowed_rows": bad}):
        with pytest.raises(ValueError):
            idx.search(X[3], k=5, ef=16, allowed=mask, mode="scan", **kwargs)
    with pytest.raises(ValueError):
        idx.search(X[3], k=5, ef=16, mode="scan", allowed_rows=rows)
