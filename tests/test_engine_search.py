"""Engine query and identify semantics: tiers, filters, tombstones, archive rerank, identify across
tier boundaries with the hole guard, and input validation messages."""
import numpy as np
import pytest

from vibrato.engine import Engine, replay_to_lsn
from vibrato.errors import BadRequestError, NotReadyError


def unit(rng, n, d):
    X = rng.standard_normal((n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


@pytest.fixture
def eng(tmp_path):
    e = Engine.open(tmp_path / "d", dim=16, background=False, checkpoint_max_rows=100, pq_min_rows=256)
    yield e
    e.close()


def test_validation_messages(eng):
    v = np.ones(16, np.float32)
    with pytest.raises(BadRequestError, match="dimension mismatch: expected 16, got 3"):
        eng.ingest([1.0, 2.0, 3.0])
    with pytest.raises(BadRequestError, match="dimension mismatch at index 1: expected 16, got 2"):
        eng.ingest_batch([{"vector": v}, {"vector": [1.0, 2.0]}])
    bad = v.astype(np.float64).copy()
    bad[3] = 1e39
    with pytest.raises(BadRequestError, match=r"vector\[3\] is not finite: 1e\+39 is outside the float32 range"):
        eng.ingest(bad)
    with pytest.raises(BadRequestError, match=r"vectors\[0\].metadata.bpm"):
        eng.ingest_batch([{"vector": v, "metadata": {"bpm": float("nan")}}])
    with pytest.raises(BadRequestError, match="start_time_ms"):
        eng.ingest(v, {"start_time_ms": -1})
    with pytest.raises(BadRequestError, match="duration_ms must be between 0 and 65535, got 65536"):
        eng.ingest(v, {"duration_ms": 65536})
    with pytest.raises(BadRequestError, match=r"vectors\[0\].metadata.duration_ms"):
        eng.ingest_batch([{"vector": v, "metadata": {"duration_ms": 2**16}}])
    with pytest.raises(BadRequestError, match=r"tags has 65 tags, exceeding the limit of 64 \(--max-tags\)"):
        eng.ingest(v, {"tags": [f"t{i}" for i in range(65)]})
    with pytest.raises(BadRequestError, match=r"bpm_gte \(130.0\) must not be greater than filter.bpm_lte \(120.0\)"):
        eng.query(v, filter={"bpm_gte": 130, "bpm_lte": 120})
    with pytest.raises(BadRequestError, match="filter.tags is not a known filter clause"):
        eng.query(v, filter={"tags": ["x"]})
    with pytest.raises(BadRequestError, match=r"k=1001 exceeds the limit of 1000 \(--max-k\)"):
        eng.query(v, k=1001)
    with pytest.raises(BadRequestError, match="search_tier"):
        eng.query(v, search_tier="cold")
    with pytest.raises(BadRequestError, match="identify requires at least one vector"):
        eng.identify([])
    with pytest.raises(BadRequestError, match=r"dimension mismatch at vectors\[1\]: expected 16, got 2"):
        eng.identify([v, [1.0, 2.0]])
    with pytest.raises(BadRequestError, match=r"vectors has 4097 items, exceeding the limit of 4096"):
        eng.identify([v] * 4097)
    with pytest.raises(BadRequestError, match=r"vectors has 10001 items, exceeding the limit of 10000 \(--max-batch\)"):
        eng.ingest_batch([{"vector": v}] * 10001)
    # NUL is refused in every string, as over HTTP (CONTRACT.md §2)
    with pytest.raises(BadRequestError, match=r"metadata.tags\[1\] contains a NUL character"):
        eng.ingest(v, {"tags": ["a", "b\x00c"]})
    with pytest.raises(BadRequestError, match=r"vectors\[0\].metadata.source_file contains a NUL character"):
        eng.ingest_batch([{"vector": v, "metadata": {"source_file": "a\x00b"}}])
    with pytest.raises(BadRequestError, match=r"idempotency_key contains a NUL character"):
        eng.ingest(v, idempotency_key="k\x00")
    with pytest.raises(BadRequestError, match=r"filter.tags_any\[0\] contains a NUL character"):
        eng.query(v, filter={"tags_any": ["\x00"]})
    with pytest.raises(BadRequestError, match=r"metadata.tags\[0\] is 129 bytes, exceeding the limit of 128 bytes"):
        eng.ingest(v, {"tags": ["x" * 129]})
    assert eng.identify([[1.0]], k=0) == []  # k=0 short-circuits before the dimension check
    assert eng.query(v, k=0) == []
    assert eng.stats()["total_vectors"] == 0, "nothing invalid was written"
    assert eng.ingest(v, {"duration_ms": 65535})[1]  # the bound itself is accepted


def test_tags_and_keys_are_normalised(eng):
    v = np.ones(16, np.float32)
    vid, created = eng.ingest(v, {"tags": [" Drums", "drums", "KICK ", "", "Écho"]}, idempotency_key="  k1 ")
    assert created
    assert eng.ingest(v, {"tags": ["drums", "kick", "Écho"]}, idempotency_key="k1") == (vid, False)
    meta = eng.query(v, k=1)[0]["metadata"]
    assert meta["tags"] == ["drums", "kick", "Écho"]
    assert eng.ingest(v, idempotency_key="   ")[1] is True  # blank key = no key


def test_tombstones_and_replayed_ids_never_returned(tmp_path):
    d = tmp_path / "d"
    rng = np.random.default_rng(1)
    X = unit(rng, 200, 16)
    with Engine.open(d, dim=16, background=False, checkpoint_max_rows=1000) as e:
        e.ingest_batch([{"vector": x} for x in X[:100]])
    replay_to_lsn(d, "default", 60)  # ids 60..99 are gone for good
    with Engine.open(d, dim=16, background=False, checkpoint_max_rows=1000) as e:
        e.ingest_batch([{"vector": x} for x in X[100:]])  # ids 100..199: a gap of dead ids below
        e.checkpoint()  # one segment [0..199] whose rows 60..99 are tombstones
        for q in X[55:105]:
            ids = [r["id"] for r in e.query(q, k=50, ef=200, search_tier="all")]
            assert not set(ids) & set(range(60, 100))
        res = e.query(np.zeros(16, np.float32) + 1e-3, k=200, ef=400, search_tier="all")
        assert len(res) == 160 and all(not 60 <= r["id"] < 100 for r in res)


def test_search_tiers(tmp_path):
    rng = np.random.default_rng(2)
    X = unit(rng, 1200, 16)
    with Engine.open(tmp_path / "d", dim=16, background=False, checkpoint_max_rows=200) as e:
        for i in range(0, 1000, 200):
            e.ingest_batch([{"vector": x} for x in X[i:i + 200]])
            e.checkpoint()
            if i in (400, 800):
                e.compact()  # L0s -> L1; the second time L1 + L1 -> L2 archive follows below
        while e.compact()["state"] != "idle":
            pass
        e.ingest_batch([{"vector": x} for x in X[1000:1200]])
        e.checkpoint()  # an L0 next to the archive
        e.ingest_batch([{"vector": x} for x in X[:5] * -1])  # hot rows 1200..1204
        levels = {s.level for s in e.segment_set.handles}
        assert 2 in levels
        archive_ids = {i for s in e.segment_set.handles if s.level >= 2 for i in range(s.id_start, s.id_end + 1)}
        active_ids = set(range(1200)) - archive_ids
        q_arch = X[min(archive_ids)]
        q_act = X[min(active_ids)] if active_ids else None
        assert e.query(q_arch, k=1, search_tier="archive")[0]["id"] == min(archive_ids)
        assert all(r["id"] in archive_ids for r in e.query(q_arch, k=20, search_tier="archive"))
        act = e.query(q_arch, k=20, search_tier="active")
        assert all(r["id"] not in archive_ids for r in act)
        assert e.query(q_arch, k=1, search_tier="all")[0]["id"] == min(archive_ids)
        if q_act is not None:
            assert e.query(q_act, k=1, search_tier="active")[0]["id"] == min(active_ids)
        hot = e.query(-X[0], k=1, search_tier="active")[0]
        assert hot["id"] == 1200


def test_archive_scores_are_exact_and_recall_holds(tmp_path, shared_data):
    base = np.load(shared_data / "text" / "base_128.npy")
    queries = np.load(shared_data / "text" / "queries_128.npy")[:200]
    gt = np.load(shared_data / "text" / "gt_128_ids.npy")[:200, :10]
    with Engine.open(tmp_path / "d", dim=128, background=False, checkpoint_max_rows=5000,
                     compaction_max_inputs=2) as e:
        for i in range(0, len(base), 5000):
            e.ingest_batch([{"vector": x} for x in base[i:i + 5000]])
            e.checkpoint()
        while e.compact()["state"] != "idle":
            pass
        assert all(s.kind == "archive" and s.index is not None for s in e.segment_set.handles), \
            [(s.kind, s.index) for s in e.segment_set.handles]
        # the walk scores PQ codes held in memory (not the mapped file); the vectors only rescore
        assert all(s.ram_codes.flags.owndata and s.ram_codes.shape == (s.n, s.pq.m) for s in e.segment_set.handles)
        recall = {}
        for ef in (64, 256):
            hits = 0
            for q, g in zip(queries, gt):
                res = e.query(q, k=10, ef=ef, search_tier="archive", include_metadata=False)
                for r in res[:3]:
                    exact = float(np.dot(base[r["id"]].astype(np.float64), q.astype(np.float64)))
                    assert abs(r["score"] - exact) < 1e-4  # CONTRACT.md D14: exact, not PQ-approximate, scores
                hits += len({r["id"] for r in res} & set(g.tolist()))
            recall[ef] = hits / gt.size
        # SPEC's 0.95 for every tier at the default breadth; more breadth buys more recall
        assert recall[64] >= 0.95 and recall[256] >= max(recall[64], 0.98), recall


def test_filtered_queries_on_segments_and_hot(tmp_path):
    rng = np.random.default_rng(3)
    X = unit(rng, 3000, 16)
    with Engine.open(tmp_path / "d", dim=16, background=False, checkpoint_max_rows=1000) as e:
        items = [{"vector": x, "metadata": {"tags": [f"g{i % 50}"] + (["rare"] if i % 997 == 0 else []),
                                             "bpm": float(60 + i % 100)}} for i, x in enumerate(X)]
        e.ingest_batch(items[:2000])
        e.checkpoint()
        e.checkpoint()
        e.ingest_batch(items[2000:])
        for q in X[:20]:
            for flt, pred in (({"tags_any": ["rare"]}, lambda i: i % 997 == 0),
                              ({"tags_all": ["g7"], "bpm_lte": 80}, lambda i: i % 50 == 7 and 60 + i % 100 <= 80),
                              ({"bpm_gte": 100.5, "bpm_lte": 101.5}, lambda i: 60 + i % 100 == 101)):
                allowed = [i for i in range(3000) if pred(i)]
                res = e.query(q, k=10, ef=64, filter=flt, search_tier="all", include_metadata=False)
                assert all(pred(r["id"]) for r in res)
                best = sorted(allowed, key=lambda i: -float(X[i] @ q))[:10]
                assert len({r["id"] for r in res} & set(best)) >= min(9, len(best))
        assert e.query(X[0], filter={"tags_any": ["nope"]}) == []
        assert e.query(X[0], filter={"tags_all": ["g1", "g2"]}) == []


def test_identify_spans_tiers_with_exact_scores(tmp_path, shared_data):
    frames = np.load(shared_data / "audio" / "frames.npy")[:3000]
    with Engine.open(tmp_path / "d", dim=128, background=False, checkpoint_max_rows=1000) as e:
        e.ingest_batch([{"vector": f, "metadata": {"source_file": "a.wav", "start_time_ms": i * 40,
                                                   "duration_ms": 40}} for i, f in enumerate(frames[:1000])])
        e.checkpoint()  # ids 0..999 in a segment
        e.ingest_batch([{"vector": f, "metadata": {"source_file": "a.wav", "start_time_ms": (1000 + i) * 40,
                                                   "duration_ms": 40}} for i, f in enumerate(frames[1000:])])
        q = frames[980:1030]  # spans the segment / hot boundary
        res = e.identify(q, k=3)
        assert res[0]["id"] == 980
        want = float(np.mean(np.sum(q.astype(np.float64) * frames[980:1030], axis=1)))
        assert abs(res[0]["score"] - want) < 1e-5
        assert res[0]["start_timestamp_ms"] == 980 * 40 and res[0]["duration_ms"] == 50 * 40
        assert res[0]["metadata"]["source_file"] == "a.wav"
        bare = e.identify(q, k=1, include_metadata=False)[0]
        assert "metadata" not in bare and bare["start_timestamp_ms"] == 980 * 40 and bare["duration_ms"] == 2000
        # archive tier only: the match is not in an archive
        assert all(r["id"] != 980 for r in e.identify(q, k=3, search_tier="archive"))


def test_window_scores_in_place_equal_the_gathered_windows(tmp_path):
    """Windows inside a segment are scored from the mapped rows; windows spanning two segments or a
    segment and the hot tier, and windows in the hot tier, are gathered: every one must equal the mean
    per-row inner product of the rows gathered by id, and a window with a deleted row is a hole."""
    rng = np.random.default_rng(11)
    X = unit(rng, 700, 16)
    L = 20
    with Engine.open(tmp_path / "d", dim=16, background=False) as e:
        for lo, hi in ((0, 300), (300, 310), (310, 500)):  # the middle segment is shorter than a window
            e.ingest_batch([{"vector": x} for x in X[lo:hi]])
            e.checkpoint()
        e.ingest_batch([{"vector": x} for x in X[500:]])
        e.delete(ids=[120])
        view = e.view()
        assert len(view.segments) == 3
        q = unit(rng, L, 16).reshape(-1)
        starts = np.array([0, 50, 101, 110, 121, 290, 300, 305, 470, 490, 600, 680, 681, 700], dtype=np.int64)
        got = view.window_scores(starts, q, L)
        for s, score in zip(starts.tolist(), got.tolist()):
            ids = np.arange(s, s + L, dtype=np.int64)
            if s + L > 700 or s <= 120 < s + L:
                assert score == -np.inf, s
                continue
            vecs, found = view.vectors_for(ids)
            assert found.all()
            want = float(np.dot(vecs.reshape(-1).astype(np.float64), q.astype(np.float64))) / L
            assert score == pytest.approx(want, abs=1e-5), s
        archive_only = view.window_scores(starts, q, L, search_tier="archive")
        assert np.isneginf(archive_only).all()


def test_identify_hole_guard(tmp_path):
    d = tmp_path / "d"
    rng = np.random.default_rng(5)
    X = unit(rng, 200, 16)
    with Engine.open(d, dim=16, background=False) as e:
        e.ingest_batch([{"vector": x} for x in X[:100]])
        e.checkpoint()
    replay_to_lsn(d, "default", 60)
    with Engine.open(d, dim=16, background=False) as e:
        e.ingest_batch([{"vector": x} for x in X[100:]])
        res = e.identify(X[50:70], k=5)
        assert all(not (r["id"] <= 99 and r["id"] + 19 >= 60) for r in res), res
        assert e.identify(X[20:40], k=1)[0]["id"] == 20


def test_not_ready_while_recovering(tmp_path):
    e = Engine.open(tmp_path / "d", dim=4, background=False, recover_async=True)
    try:
        ready, report = e.readiness()
        if not ready:
            assert report == "recovering"
            with pytest.raises(NotReadyError):
                e.ingest([0, 0, 0, 1])
    finally:
        e.close()
    e = Engine.open(tmp_path / "d", dim=4, background=False)
    assert e.readiness()[0]
    e.close()


def test_identify_accuracy_on_audio_set(tmp_path, shared_data):
    """Noisy 3 s excerpts against every stored track, data split over segments and the hot tier."""
    d = shared_data / "audio"
    frames, queries = np.load(d / "frames.npy"), np.load(d / "queries.npy")
    truth, frame_track = np.load(d / "queries_truth.npy"), np.load(d / "frame_track.npy")
    with Engine.open(tmp_path / "d", dim=128, background=False, checkpoint_max_rows=15000) as e:
        for i in range(0, len(frames), 5000):
            e.ingest_batch([{"vector": f, "metadata": {"source_file": f"track{frame_track[j]}.wav"}}
                            for j, f in enumerate(frames[i:i + 5000], start=i)])
        e.checkpoint()
        e.checkpoint()  # 30k rows in two segments, the rest hot
        correct = 0
        for q, (track, start) in zip(queries, truth):
            res = e.identify(q, k=5, ef=100, include_metadata=True)
            correct += bool(res and res[0]["id"] == start and res[0]["metadata"]["source_file"] == f"track{track}.wav")
        assert correct >= 95, f"{correct}/100 excerpts identified"


def test_identify_finds_a_match_under_a_component_common_to_every_query_frame(tmp_path):
    """Noise and the room add a component common to every frame of an excerpt. The raw noisy frames'
    nearest neighbours are then the stored frames that resemble it ("hiss" rows here) wherever they
    are; identify's centred probes still find the excerpt, and the score is the exact mean inner
    product of the frames as given (CONTRACT.md D1)."""
    rng = np.random.default_rng(11)
    dim, tracks, per = 32, 40, 120
    walk = np.cumsum(rng.standard_normal((tracks, per, dim)).astype(np.float32), axis=1)
    walk -= walk.mean(axis=1, keepdims=True)
    frames = walk.reshape(-1, dim)
    frames /= np.linalg.norm(frames, axis=1, keepdims=True)
    hiss = rng.standard_normal(dim).astype(np.float32)
    hiss /= np.linalg.norm(hiss)
    stored = np.concatenate([frames, hiss + 0.05 * rng.standard_normal((400, dim)).astype(np.float32)])
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    start = 7 * per + 23
    q = frames[start:start + 60] + 1.2 * hiss + 0.15 * rng.standard_normal((60, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    raw_hits = stored[np.argsort(-(q @ stored.T), axis=1)[:, :32]]
    assert np.mean(np.abs(raw_hits @ hiss) > 0.9) > 0.5  # the raw frames' neighbours are mostly hiss
    with Engine.open(tmp_path / "d", dim=dim, background=False, checkpoint_max_rows=2000) as e:
        e.ingest_batch([{"vector": v} for v in stored])
        e.checkpoint()
        res = e.identify(q, k=3, ef=64, include_metadata=False)
    assert res[0]["id"] == start
    want = float(np.mean(np.sum(q.astype(np.float64) * stored[start:start + 60], axis=1)))
    assert abs(res[0]["score"] - want) < 1e-5
    assert [r["score"] for r in res] == sorted((r["score"] for r in res), reverse=True)


def test_identify_votes_count_a_split_offset_once_and_keep_neighbours():
    from vibrato.engine.identify import probes, vote
    # an excerpt cut between frames 100 and 101 splits its votes; a lone start gets more raw votes
    starts = np.array([100] * 5 + [101] * 5 + [500] * 7 + [900])
    best = vote(starts, keep=1, spread=1)
    assert 100 in best and 101 in best and 500 not in best  # 5 + 5 beats 7; neighbours 99, 101 kept
    assert vote(np.array([-3, -1]), keep=4, spread=4).shape[0] == 0
    assert set(vote(np.array([0, 0, 5]), keep=4, spread=4).tolist()) == {0, 1, 4, 5, 6}
    short = np.eye(4, dtype=np.float32)
    assert probes(short) is short  # too few frames to centre
    rng = np.random.default_rng(0)
    long = rng.standard_normal((40, 8)).astype(np.float32)
    p = probes(long)
    assert p.shape == long.shape and np.allclose(np.linalg.norm(p, axis=1), 1, atol=1e-5)
