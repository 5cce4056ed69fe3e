"""HNSW index: recall against brute force, filters, graph bytes round trips, hostile input.

No timing assertions here (benchmarks live in perf/bench_hnsw.py).
"""
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vibrato import kernels
from vibrato._native import hnsw as native
from vibrato._native import segio
from vibrato.index import HnswIndex
from vibrato.pq import ProductQuantizer


def recall_at(ids, gt, k=10):
    """Mean |ids[i, :k] & gt[i, :k]| / k."""
    return float(np.mean([len(set(ids[i, :k].tolist()) & set(gt[i, :k].tolist())) / k for i in range(len(gt))]))


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def text(shared_data):
    d = shared_data / "text"
    return np.load(d / "base_128.npy"), np.load(d / "queries_128.npy"), np.load(d / "gt_128_ids.npy")


@pytest.fixture(scope="module")
def text_index(text):
    base, _, _ = text
    idx = HnswIndex(128, m=16, ef_construction=200, seed=0)
    idx.add(base, threads=2)  # exercises the locked parallel insert path
    return idx


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(11)
    x = unit_rows(rng, 3000, 32)
    idx = HnswIndex(32, m=8, ef_construction=100, seed=3)
    idx.add(x, threads=1)
    return idx, x, unit_rows(rng, 50, 32)


# ---------------------------------------------------------------------------------------- recall


def test_recall_text(text, text_index):
    _, queries, gt = text
    ids, scores = text_index.search(queries, k=10, ef=64)
    assert ids.shape == (500, 10) and ids.dtype == np.int64
    assert scores.shape == (500, 10) and scores.dtype == np.float32
    assert recall_at(ids, gt) >= 0.95
    assert np.all(np.diff(scores, axis=1) <= 0), "scores must be sorted best first"
    base = text[0]
    exact = np.einsum("qd,qkd->qk", queries.astype(np.float64), base[ids].astype(np.float64))
    np.testing.assert_allclose(scores, exact, rtol=1e-4, atol=1e-5)


def test_graph_shape(text_index):
    s = text_index.stats()
    assert s["n"] == 20000 and s["m0"] == 32
    assert s["max_degree_layer0"] <= 32
    counts = s["level_counts"]
    assert sum(counts) == 20000 and len(counts) - 1 == s["max_level"] <= native.MAX_LEVEL
    # level multiplier 1/ln(M): about n/M nodes reach level 1
    assert 0.5 * 20000 / 16 < sum(counts[1:]) < 2 * 20000 / 16


def test_single_query_is_2d_and_matches_batch(text, text_index):
    _, queries, _ = text
    one_ids, one_scores = text_index.search(queries[7], k=10, ef=64)
    ids, scores = text_index.search(queries[:10], k=10, ef=64)
    assert one_ids.shape == (1, 10)
    np.testing.assert_array_equal(one_ids[0], ids[7])
    np.testing.assert_array_equal(one_scores[0], scores[7])


def test_batch_threads_equal_single_thread(text, text_index):
    _, queries, _ = text
    a = text_index.search(queries[:200], k=10, ef=48, threads=1)
    b = text_index.search(queries[:200], k=10, ef=48, threads=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_concurrent_python_threads_search_safely(text, text_index):
    _, queries, _ = text
    want = text_index.search(queries[:100], k=10, ef=40)
    got, errors = {}, []

    def work(t):
        try:
            for _ in range(5):
                got[t] = text_index.search(queries[:100], k=10, ef=40)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for ids, scores in got.values():
        np.testing.assert_array_equal(ids, want[0])
        np.testing.assert_array_equal(scores, want[1])


def test_unnormalised_vectors_maximum_inner_product():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2000, 16)).astype(np.float32) * rng.uniform(0.1, 3, (2000, 1)).astype(np.float32)
    q = rng.standard_normal((40, 16)).astype(np.float32)
    idx = HnswIndex(16, m=12, ef_construction=100)
    idx.add(x, threads=1)
    ids, scores = idx.search(q, k=10, ef=100)
    gt = np.argsort(-(q @ x.T), axis=1)[:, :10]
    assert recall_at(ids, gt) >= 0.9


# ---------------------------------------------------------------------------------------- semantics


def test_determinism_with_seed_single_thread(small):
    idx, x, q = small
    again = HnswIndex(32, m=8, ef_construction=100, seed=3)
    again.add(x, threads=1)
    assert again.graph_bytes() == idx.graph_bytes()
    a, b = idx.search(q, k=10, ef=32), again.search(q, k=10, ef=32)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    other = HnswIndex(32, m=8, ef_construction=100, seed=4)
    other.add(x, threads=1)
    assert other.graph_bytes() != idx.graph_bytes()


def test_incremental_add_equals_one_add(small):
    idx, x, _ = small
    inc = HnswIndex(32, m=8, ef_construction=100, seed=3)
    for part in np.array_split(x, 7):
        inc.add(part, threads=1)
    assert inc.graph_bytes() == idx.graph_bytes()


# ---------------------------------------------------------------------------------------- reachability


def _py_unreachable(blob: bytes, m: int) -> list:
    """Reference for Graph.unreachable(), read straight from a graph blob: BFS on the top layer from
    the entry point, then on each lower layer seeded by everything reached above."""
    n, = struct.unpack_from("<Q", blob, 32)
    entry, top = struct.unpack_from("<II", blob, 40)
    if n == 0:
        return []
    levels = np.frombuffer(blob, np.uint8, count=n, offset=64)
    l0 = np.frombuffer(blob, np.uint32, count=n * (1 + 2 * m), offset=64 + ((n + 3) & ~3)).reshape(n, 1 + 2 * m)
    up = np.frombuffer(blob, np.uint32, count=int(levels.sum()) * (1 + m), offset=64 + ((n + 3) & ~3) + l0.nbytes)
    first_block = np.concatenate([[0], np.cumsum(levels.astype(np.int64))[:-1]])

    def links(r, level):
        row = l0[r] if level == 0 else up[(first_block[r] + level - 1) * (1 + m):][:1 + m]
        return row[1:1 + row[0]].tolist()

    seen = {entry}
    for level in range(top, -1, -1):
        todo = list(seen)
        while todo:
            for nb in links(todo.pop(), level):
                if nb not in seen:
                    seen.add(nb)
                    todo.append(nb)
    return sorted(set(range(n)) - seen)


def _assert_every_node_reachable(idx: HnswIndex, x: np.ndarray, ef: int = 64) -> None:
    """(a) the graph walk from the entry point reaches every row; (b) every row's self-query returns
    itself as top-1 (or an exact duplicate of its vector). Rows have the ids 0..n-1."""
    lost = idx._unreachable()
    assert lost.size == 0, f"{lost.size} of {len(idx)} rows unreachable from the entry point: {lost[:20].tolist()}"
    ids, _ = idx.search(x, k=1, ef=ef)
    miss = np.flatnonzero(ids[:, 0] != np.arange(len(x)))
    miss = [int(i) for i in miss if ids[i, 0] < 0 or not np.array_equal(x[ids[i, 0]], x[i])]
    assert not miss, f"{len(miss)} rows not found by their own vector at ef={ef}: {miss[:20]}"


def test_unreachable_helper_matches_reference_on_an_orphan():
    """Graph.unreachable() agrees with a BFS read from the blob; a graph with an orphan still loads
    (unreachable rows are legal in a file, only a build must not create them)."""
    rng = np.random.default_rng(5)
    x = unit_rows(rng, 300, 8)
    idx = HnswIndex(8, m=4, ef_construction=32, seed=1)
    idx.add(x, threads=1)
    m, n = idx.m, len(idx)
    blob = bytearray(idx.graph_bytes())
    assert idx._unreachable().tolist() == _py_unreachable(bytes(blob), m)
    levels = np.frombuffer(bytes(blob), np.uint8, count=n, offset=64)
    entry, = struct.unpack_from("<I", blob, 40)
    orphan = int(next(r for r in np.flatnonzero(levels == 0) if r != entry))
    # Drop every layer-0 edge into `orphan` (a level-0 node has no upper in-edges).
    base0 = 64 + ((n + 3) & ~3)
    for r in range(n):
        at = base0 + r * (1 + 2 * m) * 4
        cnt, = struct.unpack_from("<I", blob, at)
        nbrs = list(struct.unpack_from(f"<{cnt}I", blob, at + 4))
        if orphan in nbrs:
            nbrs.remove(orphan)
            struct.pack_into(f"<I{cnt}I", blob, at, cnt - 1, *nbrs, 0)
    _fix_graph_crc(blob)
    loaded = HnswIndex.from_graph(x, bytes(blob))
    lost = loaded._unreachable()
    assert orphan in lost.tolist()
    assert lost.tolist() == _py_unreachable(bytes(blob), m)
    assert lost.dtype == np.int64
    assert HnswIndex(8)._unreachable().size == 0


@pytest.mark.parametrize("n,d,m,threads,seed", [
    *[(6024, 16, 16, 2, s) for s in range(6)],   # the crash-matrix case: 1-12 orphans per seed before the fix
    *[(6024, 16, 16, 4, s) for s in range(2)],   # more threads than this CI's cores: more interleavings
    *[(2500, 64, 8, 2, s) for s in range(2)],
])
def test_parallel_build_reaches_every_node(n, d, m, threads, seed):
    """A parallel build must not leave rows that no search can reach. The race it guards against: a
    thread entered layer 0 through a node still being inserted (empty layer-0 list), linked its own
    node only to it, and that node's own links then overwrote the reverse edge."""
    x = unit_rows(np.random.default_rng(seed), n, d)
    idx = HnswIndex(d, m=m, ef_construction=200, seed=seed)
    idx.add(x, threads=threads)
    _assert_every_node_reachable(idx, x)


def test_parallel_build_reaches_every_node_text(text, text_index):
    base = text[0]
    _assert_every_node_reachable(text_index, base)  # seed 0, threads=2
    other = HnswIndex(128, m=16, ef_construction=200, seed=7)
    other.add(base, threads=2)
    _assert_every_node_reachable(other, base)


def test_k_larger_than_n_pads():
    x = np.eye(5, 8, dtype=np.float32)
    idx = HnswIndex(8)
    idx.add(x)
    ids, scores = idx.search(x[2], k=10)
    assert ids[0, 0] == 2 and scores[0, 0] == pytest.approx(1.0)
    assert sorted(ids[0, :5].tolist()) == [0, 1, 2, 3, 4]
    assert (ids[0, 5:] == -1).all() and np.isneginf(scores[0, 5:]).all()


def test_search_one_is_search_without_the_padding():
    """HnswIndex.search_one (the serving path's walk, Graph.search_one on a FiniteArray) returns
    search()'s row with its -1 / -inf tail cut, ids offset by id_base; any other query converts."""
    from vibrato.engine.validation import check_vector
    rng = np.random.default_rng(3)
    x = unit_rows(rng, 300, 8)
    small_idx = HnswIndex(8)
    small_idx.add(x[:5])
    big = HnswIndex(8)
    big.add(x)
    g = HnswIndex.from_graph(x, big.graph_bytes(), id_base=1000)
    for index, k, ef in ((small_idx, 10, 10), (big, 10, 64), (g, 7, 30), (g, 1, 1)):
        for q in x[::37]:
            ids, scores = index.search(q, k=k, ef=ef)
            found = int((ids[0] >= 0).sum())
            one = index.search_one(check_vector(q, 8), k, ef)
            assert one[0].tolist() == ids[0, :found].tolist() and one[1].tolist() == scores[0, :found].tolist()
            plain = index.search_one(q.astype(np.float64), k, ef)  # not a FiniteArray: search()'s path
            assert plain[0].tolist() == one[0].tolist()
    assert len(small_idx.search_one(check_vector(x[0], 8), 10, 10)[0]) == 5
    with pytest.raises(ValueError, match="dimension"):
        big._g.search_one(np.ones(4, np.float32), 3, 10)


def test_empty_index():
    idx = HnswIndex(4)
    assert len(idx) == 0
    ids, scores = idx.search(np.ones(4, np.float32), k=3)
    assert (ids == -1).all() and np.isneginf(scores).all()
    g = HnswIndex.from_graph(np.empty((0, 4), np.float32), idx.graph_bytes(), id_base=7)
    assert len(g) == 0
    g.add(np.eye(4, dtype=np.float32))  # borrowed (empty) vectors: add must switch to owned storage
    assert g.search(np.eye(4, dtype=np.float32), k=1)[0][:, 0].tolist() == [7, 8, 9, 10]
    idx.add(np.empty((0, 4), np.float32))
    assert len(idx) == 0


BAD = [
    (lambda: HnswIndex(0), r"dim must be in \[1, 4096\], got 0"),
    (lambda: HnswIndex(5000), r"dim must be in \[1, 4096\], got 5000"),
    (lambda: HnswIndex(8, m=1), r"m must be in \[2, 1024\], got 1"),
    (lambda: HnswIndex(8, ef_construction=0), r"ef_construction must be in \[1, 65536\], got 0"),
    (lambda: HnswIndex(8, m=True), "m must be an int"),
    (lambda: HnswIndex(8).add(np.ones((2, 7), np.float32)), "X has dimension 7, the index has dimension 8"),
    (lambda: HnswIndex(8).add(np.ones(8, np.float32)), "2-D"),
    (lambda: HnswIndex(8).add(np.ones((2, 8), np.int32)), "floating dtype"),
    (lambda: HnswIndex(8).add([[1.0] * 8]), "numpy array"),
    (lambda: HnswIndex(8).add(np.full((2, 8), np.nan, np.float32)), "non-finite value at"),
    (lambda: HnswIndex(8).add(np.ones((2, 8), np.float32), threads=0), r"threads must be in \[1, 256\]"),
    (lambda: HnswIndex(8).search(np.ones(7, np.float32)), "Q has dimension 7"),
    (lambda: HnswIndex(8).search(np.ones((1, 1, 8), np.float32)), "2-D"),
    (lambda: HnswIndex(8).search(np.ones(8, np.float32), k=0), r"k must be in \[1, 65536\], got 0"),
    (lambda: HnswIndex(8).search(np.ones(8, np.float32), ef=0), r"ef must be in \[1, 65536\], got 0"),
    (lambda: HnswIndex(8).search(np.ones(8, np.float32), allowed=np.ones(3, bool)), r"shape \(0,\)"),
    (lambda: HnswIndex(8).search(np.ones(8, np.float32), allowed=np.ones(3, np.float32)), "dtype bool"),
    (lambda: HnswIndex(8).search(np.ones(8, np.float32), allowed=[1, 2]), "bool mask over rows"),
    (lambda: HnswIndex(8).search(np.ones(8, np.float32), allowed=np.array([1, 2])), "dtype bool"),
    (lambda: HnswIndex(8).search(np.ones(8, np.float32), mode="fast"), "mode must be one of"),
    (lambda: HnswIndex(8).search(np.array([np.inf] * 8, np.float32)), "non-finite"),
    (lambda: HnswIndex.from_graph(np.ones((2, 8), np.float64), b""), "float32"),
    (lambda: HnswIndex.from_graph(np.ones((8, 2), np.float32).T, b""), "C-contiguous"),
    (lambda: HnswIndex.from_graph(np.ones((2, 8), np.float32), 17), "bytes-like"),
    (lambda: HnswIndex.from_graph(np.ones((2, 8), np.float32), b"x" * 10), "graph truncated"),
]


@pytest.mark.parametrize("call,message", BAD)
def test_bad_input_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_float64_input_is_converted():
    idx = HnswIndex(4)
    idx.add(np.eye(4))
    ids, _ = idx.search(np.array([0.0, 0.0, 1.0, 0.0]), k=1)
    assert ids[0, 0] == 2


# ---------------------------------------------------------------------------------------- filters


@pytest.mark.parametrize("selectivity", [0.001, 0.01, 0.1, 0.5, 1.0])
def test_filtered_recall(text, text_index, selectivity):
    base, queries, _ = text
    q = queries[:200]
    rng = np.random.default_rng(int(selectivity * 1000))
    mask = rng.random(len(base)) < selectivity
    scores = np.where(mask[None, :], q @ base.T, -np.inf)
    gt = np.argsort(-scores, axis=1)[:, :10]
    ids, sc = text_index.search(q, k=10, ef=64, allowed=mask)
    assert mask[ids[ids >= 0]].all(), "a disallowed row was returned"
    assert (ids >= 0).all()  # at least 20 rows are allowed, k = 10
    assert recall_at(ids, gt) >= 0.95
    # a single query (mask walked per query) equals its row of the batch (allowed rows listed once)
    one_ids, one_scores = text_index.search(q[3], k=10, ef=64, allowed=mask)
    np.testing.assert_array_equal(one_ids[0], ids[3])
    np.testing.assert_array_equal(one_scores[0], sc[3])


@pytest.mark.parametrize("selectivity", [0.02, 0.1, 0.5])
@pytest.mark.parametrize("mode", ["graph", "scan"])
def test_filtered_recall_each_strategy(text, text_index, selectivity, mode):
    base, queries, _ = text
    q = queries[:100]
    mask = np.random.default_rng(7).random(len(base)) < selectivity
    gt = np.argsort(-np.where(mask[None, :], q @ base.T, -np.inf), axis=1)[:, :10]
    ids, _ = text_index.search(q, k=10, ef=64, allowed=mask, mode=mode)
    assert mask[ids].all()
    assert recall_at(ids, gt) >= (0.999 if mode == "scan" else 0.95)


def test_filter_fewer_allowed_than_k(text_index, text):
    base, queries, _ = text
    allowed = np.zeros(len(base), bool)
    allowed[[5, 17, 19999]] = True
    ids, scores = text_index.search(queries[:3], k=10, allowed=allowed)
    for row in ids:
        assert sorted(row[:3].tolist()) == [5, 17, 19999] and (row[3:] == -1).all()
    assert np.isneginf(scores[:, 3:]).all()
    ids, _ = text_index.search(queries[0], k=5, allowed=np.zeros(len(base), bool))
    assert (ids == -1).all()


def test_filter_strategy_counters(text, text_index):
    base, queries, _ = text
    before = text_index.stats()
    text_index.search(queries[:4], k=10, allowed=np.arange(len(base)) < 50)  # 0.25%: exact scan
    mid = text_index.stats()
    assert mid["scan_searches"] - before["scan_searches"] == 4
    text_index.search(queries[:4], k=10, allowed=np.ones(len(base), bool))  # 100%: plain graph search
    assert text_index.stats()["graph_searches"] - mid["graph_searches"] == 4


@pytest.mark.parametrize("selectivity", [0.02, 0.1, 0.5])
def test_scan_on_int8_codes_returns_the_exact_top_k(text, selectivity):
    """A filtered exact scan ranks on the int8 scan codes, then rescores the best rows on the float
    vectors: the same rows and bit-identical scores as the float scan, single and batched (the batch
    lists a sparse filter's rows once)."""
    base, queries, _ = text
    idx = HnswIndex(128, m=8, ef_construction=40, seed=0)
    idx.add(base[:8000], threads=1)
    mask = np.random.default_rng(int(selectivity * 100)).random(8000) < selectivity
    q = queries[:50]
    want = idx.search(q, k=10, ef=64, allowed=mask, mode="scan")
    assert not idx.has_scan_codes and idx.stats()["scan_code_searches"] == 0
    idx.build_scan_codes()
    idx.build_scan_codes()  # a no-op once built
    assert idx.has_scan_codes and idx.stats()["scan_codes"]
    got = idx.search(q, k=10, ef=64, allowed=mask, mode="scan")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    one = idx.search(q[7], k=10, ef=64, allowed=mask, mode="scan")
    np.testing.assert_array_equal(one[0][0], want[0][7])
    assert idx.stats()["scan_code_searches"] == 51
    # auto mode scans on the codes too where its cost model picks a scan
    auto = idx.search(q, k=10, ef=64, allowed=mask)
    assert mask[auto[0]].all()


def _exact_topk(x, q, mask, k):
    rows = np.flatnonzero(mask)
    scores = x[rows].astype(np.float64) @ q.astype(np.float64)
    return rows[np.argsort(-scores, kind="stable")[:k]]


@pytest.mark.parametrize("codes", [False, True])
def test_masked_scans_return_the_top_k_of_exactly_the_allowed_rows(small, codes):
    """The scan gathers allowed rows 64 mask bytes at a time (vb_mask_collect): runs that cross a
    word or a 256-row batch, the last partial word, single rows at either end, dense and sparse
    masks all give the exact top k of exactly those rows, on the float vectors and on the codes."""
    shared, x, q = small
    idx = HnswIndex.from_graph(x.copy(), shared.graph_bytes())  # codes built here stay here
    n = len(x)  # 3000: not a multiple of 64
    if codes:
        idx.build_scan_codes()
    rng = np.random.default_rng(5)
    masks = {"first": np.arange(n) == 0, "last": np.arange(n) == n - 1,
             "run across words": (np.arange(n) >= 60) & (np.arange(n) < 700),
             "tail word": np.arange(n) >= n - 45, "10%": rng.random(n) < 0.1, "90%": rng.random(n) < 0.9,
             "every 64th": np.arange(n) % 64 == 63}
    for name, mask in masks.items():
        for qi in q[:5]:
            got, scores = idx.search(qi, k=10, ef=10, allowed=mask, mode="scan")
            got = got[0][got[0] >= 0]
            want = _exact_topk(x, qi, mask, 10)
            assert mask[got].all(), name
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_graph_walk_on_int8_codes_keeps_recall_and_exact_scores(text):
    """Once the codes are built (a segment's first filtered scan builds them), graph walks read them
    and rescore their beam on the float vectors: recall as the float walk's, every score the exact
    float inner product of its row, best first; filtered walks return allowed rows only."""
    base, queries, _ = text
    x = base[:8000]
    idx = HnswIndex(128, m=8, ef_construction=40, seed=0)
    idx.add(x, threads=1)
    q = queries[:100]
    exact = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]

    def recall(ids):
        return np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(ids, exact)])

    floats = idx.search(q, k=10, ef=64, mode="graph")
    assert idx.stats()["code_walks"] == 0
    idx.build_scan_codes()
    ids, scores = idx.search(q, k=10, ef=64, mode="graph")
    assert idx.stats()["code_walks"] == len(q)
    assert recall(ids) >= recall(floats[0]) - 0.01
    np.testing.assert_array_equal(scores, np.stack([[kernels.dot(qi, x[r]) for r in row] for qi, row in zip(q, ids)]))
    assert (np.diff(scores, axis=1) <= 0).all()
    both = [(i, r) for i in range(len(q)) for r in set(ids[i].tolist()) & set(floats[0][i].tolist())]
    assert len(both) > 8 * len(q)
    for i, r in both:  # a row found by both walks has the same score
        assert scores[i][ids[i] == r][0] == floats[1][i][floats[0][i] == r][0]
    mask = np.random.default_rng(5).random(8000) < 0.3
    got, _ = idx.search(q, k=10, ef=64, allowed=mask, mode="graph")
    assert mask[got[got >= 0]].all() and (got >= 0).all()
    assert idx.stats()["code_walks"] == 2 * len(q)


def test_codes_topk_over_rows_without_a_graph(small):
    """native.codes_topk (a hot chunk's scan on codes): the exact top k, ties to the lower row,
    padded when there are fewer rows than k; shapes are checked before any native work."""
    _, x, q = small
    x = x[:700].copy()  # (the fixture is shared: not changed in place)
    x[300:305] = x[10]  # exact ties: the lower row first
    codes, scale = kernels.scan_codes(x)
    for qi, k, depth in ((x[10], 10, 80), (q[0], 1, 1), (q[1], 25, 25), (q[2], 5, 10_000)):
        rows, scores = native.codes_topk(qi, codes, scale, x, k, depth)
        exact = kernels.dot_many(qi, x, threads=1)
        want = np.argsort(-exact, kind="stable")[:k]
        np.testing.assert_array_equal(rows, want)
        np.testing.assert_array_equal(scores, exact[want])
    rows, scores = native.codes_topk(q[0], codes[:3], scale[:3], x[:3], 5, 40)
    assert rows.tolist()[3:] == [-1, -1] and np.isneginf(scores[3:]).all() and sorted(rows[:3].tolist()) == [0, 1, 2]
    assert native.codes_topk(q[0], codes, scale, x, 0, 8)[0].shape == (0,)
    with pytest.raises(ValueError, match="do not match"):
        native.codes_topk(q[0], codes[:-1], scale, x, 5, 40)
    with pytest.raises(ValueError, match="dimension"):
        native.codes_topk(q[0][:-1], codes, scale, x, 5, 40)


def _codes_scan_reference(q, codes, scale, x, rows, k, depth):
    """What a scan on int8 codes returns, in numpy: the best `depth` of `rows` by their code scores
    (ties to the lower row), rescored exactly, the best k of those (ties to the lower row)."""
    from vibrato._native import distance as D
    code_scores = D.dot_sq8(q, codes, scale, rows.astype(np.int64))
    kept = rows[np.lexsort((rows, -code_scores))[:depth]]
    exact = kernels.dot_many(q, x, kept.astype(np.int64), threads=1)
    best = np.lexsort((kept, -exact))[:k]
    return kept[best], exact[best]


def test_scans_on_codes_keep_the_best_rows_by_code_then_rescore(small):
    """A segment's filtered scan on int8 codes and a hot chunk's codes_topk keep their best `depth`
    rows by quickselect over a thresholded buffer: exactly the best `depth` by (code score, row), with
    many exact ties on the codes and on the scores, rescored to the exact best k; exactly `depth`
    rows are rescored (the distance counter)."""
    _, x, q = small
    rng = np.random.default_rng(12)
    x = x[:3000].copy()
    x[1000:1400] = x[rng.integers(0, 50, 400)]  # duplicates: ties on the codes and the exact scores
    x[2000:2300] = x[7]  # more copies of one row than `depth`: the cut falls inside a tie
    idx = HnswIndex(32, m=8, ef_construction=40, seed=3)
    idx.add(x, threads=1)
    idx.build_scan_codes()
    codes, scale = kernels.scan_codes(x)
    for share in (0.3, 0.6, 1.0 - 1e-3):
        mask = rng.random(3000) < share
        rows = np.flatnonzero(mask)
        for qi, k, ef in ((q[0], 10, 64), (x[1000], 10, 10), (q[3], 3, 200), (x[5], 40, 64), (x[7], 10, 64)):
            depth = min(max(8 * k, ef), native.MAX_EF)
            want_rows, want_scores = _codes_scan_reference(qi, codes, scale, x, rows, k, depth)
            hot = native.codes_topk(qi, codes[rows], scale[rows], x[rows], k, depth)
            np.testing.assert_array_equal(rows[hot[0]], want_rows)
            np.testing.assert_array_equal(hot[1], want_scores)
            for listed in (None, rows.astype(np.uint32)):
                before = idx.stats()
                ids, scores = idx.search(qi, k=k, ef=ef, allowed=mask, mode="scan", allowed_rows=listed)
                np.testing.assert_array_equal(ids[0], want_rows)
                np.testing.assert_array_equal(scores[0], want_scores)
                after = idx.stats()  # every allowed row scored on its code, exactly `depth` rescored
                assert after["scan_code_searches"] == before["scan_code_searches"] + 1
                assert after["distances"] - before["distances"] == rows.shape[0] + depth


def test_scan_codes_are_dropped_by_add_and_skipped_for_few_rows(small):
    _, x, q = small
    idx = HnswIndex(32, m=8, ef_construction=40, seed=3)
    idx.add(x[:2000], threads=1)
    idx.build_scan_codes()
    few = np.zeros(2000, bool)
    few[::100] = True  # 20 rows: fewer than the rescore depth, the float scan runs
    idx.search(q[0], k=10, allowed=few, mode="scan")
    assert idx.stats()["scan_code_searches"] == 0
    idx.add(x[2000:], threads=1)  # the codes would not cover the new rows
    assert not idx.has_scan_codes
    mask = np.zeros(3000, bool)
    mask[1::3] = True
    want = idx.search(q, k=5, ef=32, allowed=mask, mode="scan")
    idx.build_scan_codes()
    got = idx.search(q, k=5, ef=32, allowed=mask, mode="scan")
    np.testing.assert_array_equal(got[0], want[0])
    assert (got[0] >= 2000).any(), "rows added after the first codes are scanned on the new codes"


# ---------------------------------------------------------------------------------------- graph bytes


def test_graph_bytes_round_trip(small):
    idx, x, q = small
    back = HnswIndex.from_graph(x.copy(), idx.graph_bytes())
    assert len(back) == len(idx) and back.dim == 32 and back.m == 8 and back.ef_construction == 100
    a, b = idx.search(q, k=10, ef=40), back.search(q, k=10, ef=40)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert back.graph_bytes() == idx.graph_bytes()
    # adding after from_graph copies the vectors once and continues the same level sequence
    more = unit_rows(np.random.default_rng(9), 100, 32)
    ref = HnswIndex(32, m=8, ef_construction=100, seed=3)
    ref.add(x, threads=1)
    ref.add(more, threads=1)
    back.add(more, threads=1)
    assert back.graph_bytes() == ref.graph_bytes()
    assert not back.stats()["borrowed_vectors"]


def test_from_graph_read_only_mmap(tmp_path, small):
    idx, x, q = small
    path = tmp_path / "vectors.f32"
    x.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=x.shape)
    view = np.frombuffer(mm, dtype=np.float32).reshape(x.shape)
    assert not view.flags.writeable
    g = HnswIndex.from_graph(view, memoryview(idx.graph_bytes()), id_base=1000)
    assert g.stats()["borrowed_vectors"]
    assert np.shares_memory(g.vectors(), view), "from_graph must not copy the vectors"
    a, b = idx.search(q, k=10, ef=40), g.search(q, k=10, ef=40)
    np.testing.assert_array_equal(a[0] + 1000, b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert g.id_base == 1000
    ids, _ = g.search(q[0], k=3, allowed=(np.arange(len(x)) >= 5) & (np.arange(len(x)) < 8))
    assert sorted(ids[0].tolist()) == [1005, 1006, 1007]


def test_vectors_stay_valid_across_add():
    idx = HnswIndex(4)
    idx.add(np.eye(4, dtype=np.float32))
    v = idx.vectors()
    idx.add(np.ones((500, 4), np.float32))  # reallocates the index's buffer
    np.testing.assert_array_equal(v, np.eye(4, dtype=np.float32))
    assert idx.vectors().shape == (504, 4)


def test_from_graph_shape_mismatch(small):
    idx, x, _ = small
    with pytest.raises(ValueError, match=r"vectors have shape \(2999, 32\) but the graph has 3000 nodes"):
        HnswIndex.from_graph(np.ascontiguousarray(x[:-1]), idx.graph_bytes())


# ---------------------------------------------------------------------------------------- SIMD levels


def test_recall_at_scalar_level(shared_data):
    code = f"""
import numpy as np
from vibrato.index import HnswIndex
from vibrato.pq import ProductQuantizer
from vibrato._native import hnsw
assert hnsw.isa_level() == 0
base = np.load(r"{shared_data}/text/base_128.npy")[:5000]
q = np.load(r"{shared_data}/text/queries_128.npy")[:100]
gt = np.argsort(-(q @ base.T), axis=1)[:, :10]
idx = HnswIndex(128, m=16, ef_construction=100)
idx.add(base, threads=1)
ids, _ = idx.search(q, k=10, ef=64)
r = np.mean([len(set(ids[i]) & set(gt[i])) / 10 for i in range(100)])
m = np.random.default_rng(0).random(5000) < 0.05
ids, _ = idx.search(q, k=10, ef=64, allowed=m)
gtf = np.argsort(-np.where(m[None], q @ base.T, -np.inf), axis=1)[:, :10]
rf = np.mean([len(set(ids[i]) & set(gtf[i])) / 10 for i in range(100)])
print(r, rf)
"""
    env = dict(os.environ, VIBRATO_SIMD="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r, rf = map(float, out.stdout.split())
    assert r >= 0.95 and rf >= 0.95


# ---------------------------------------------------------------------------------------- hostile input


def _fuzz_base():
    idx = HnswIndex(8, m=3, ef_construction=16, seed=1)
    idx.add(unit_rows(np.random.default_rng(1), 60, 8), threads=1)
    return idx


FUZZ_INDEX = _fuzz_base()
FUZZ_GRAPH = FUZZ_INDEX.graph_bytes()
FUZZ_VECTORS = FUZZ_INDEX.vectors().copy()
FUZZ_Q = unit_rows(np.random.default_rng(3), 4, 8)
INTERESTING = [0, 1, 2, 3, 7, 8, 59, 60, 61, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1,
               2**63 - 1, 2**63, 2**64 - 1]


def _fix_graph_crc(blob: bytearray) -> None:
    if len(blob) >= 4:
        blob[-4:] = struct.pack("<I", segio.crc32c(bytes(blob[:-4])))


def _exercise(idx: HnswIndex) -> None:
    """A loaded index must be fully usable: search, filtered search, re-serialise."""
    n = len(idx)
    ids, scores = idx.search(FUZZ_Q, k=5, ef=8)
    assert all(-1 <= i < n for i in ids.ravel().tolist())
    if n:
        mask = np.zeros(n, bool)
        mask[::3] = True
        for mode in ("auto", "graph"):
            ids, _ = idx.search(FUZZ_Q, k=3, ef=4, allowed=mask, mode=mode)
            assert all(i == -1 or mask[i] for i in ids.ravel().tolist())
    HnswIndex.from_graph(np.ascontiguousarray(idx.vectors()), idx.graph_bytes())


mutation = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("u32"), st.integers(0, 10**6), st.sampled_from(INTERESTING)),
    st.tuples(st.just("u64"), st.integers(0, 10**6), st.sampled_from(INTERESTING)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
)


def _mutate(buf: bytearray, ops, header_bias: bool) -> bytearray:
    for op in ops:
        if not buf:
            break
        kind = op[0]
        if kind == "append":
            buf += op[1]
            continue
        # half of the positions land in the first 128 bytes, where the counts and offsets live
        pos = op[1] % (min(len(buf), 128) if header_bias and op[1] % 2 else len(buf))
        if kind == "truncate":
            del buf[pos:]
        elif kind == "flip":
            buf[pos] ^= 1 << op[2]
        else:
            width = 4 if kind == "u32" else 8
            val = op[2] & ((1 << (8 * width)) - 1)
            chunk = val.to_bytes(width, "little")[:len(buf) - pos]
            buf[pos:pos + len(chunk)] = chunk
    return buf


FUZZ_SETTINGS = settings(max_examples=1500, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow])


@FUZZ_SETTINGS
@given(ops=st.lists(mutation, min_size=1, max_size=3), fix_crc=st.booleans(), header_bias=st.booleans())
def test_fuzz_graph_blob(ops, fix_crc, header_bias):
    blob = _mutate(bytearray(FUZZ_GRAPH), ops, header_bias)
    if fix_crc:
        _fix_graph_crc(blob)
    try:
        idx = HnswIndex.from_graph(FUZZ_VECTORS, bytes(blob))
    except ValueError as e:
        assert str(e)
        return
    _exercise(idx)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(data=st.binary(min_size=0, max_size=300), prefix=st.booleans())
def test_fuzz_random_bytes(data, prefix):
    blob = (b"VBHNSWG1" + data) if prefix else data
    with pytest.raises(ValueError):
        HnswIndex.from_graph(FUZZ_VECTORS, blob)


def _graph_with(field_off, fmt, value, fix=True):
    blob = bytearray(FUZZ_GRAPH)
    struct.pack_into(fmt, blob, field_off, value)
    if fix:
        _fix_graph_crc(blob)
    return bytes(blob)


def _layer0_slot(node, j):
    n = len(FUZZ_INDEX)
    return 64 + ((n + 3) & ~3) + node * (1 + 2 * FUZZ_INDEX.m) * 4 + 4 * j


@pytest.mark.parametrize("blob,message", [
    (_graph_with(32, "<Q", 2**32 - 17), "node count"),
    (_graph_with(32, "<Q", 2**40), "node count"),
    (_graph_with(20, "<I", 1), r"M=1 out of range \[2, 1024\]"),
    (_graph_with(16, "<I", 0), "dimension 0"),
    (_graph_with(40, "<I", 60), r"entry point 60 out of range \[0, 60\)"),
    (_graph_with(48, "<Q", 2**62), "size mismatch"),
    (_graph_with(_layer0_slot(5, 0), "<I", 33), "node 5 has 33 links on layer 0, above M0=6"),
    (_graph_with(_layer0_slot(5, 1), "<I", 60), r"node 5 links to 60 on layer 0, out of range \[0, 60\)"),
    (_graph_with(64 + 7, "<B", 17), "node 7 has level 17, above the limit 16"),
    (_graph_with(_layer0_slot(5, 1), "<I", 60, fix=False), "checksum mismatch"),
    (FUZZ_GRAPH[:-9], "size mismatch"),
])
def test_graph_errors_say_what_is_wrong(blob, message):
    with pytest.raises(ValueError, match=message):
        HnswIndex.from_graph(FUZZ_VECTORS, blob)


def test_upper_layer_link_to_lower_node_rejected():
    """A link on layer l must point at a node that has layer l (else search would read out of bounds)."""
    n = len(FUZZ_INDEX)
    levels = np.frombuffer(FUZZ_GRAPH, np.uint8, count=n, offset=64)
    low = int(np.flatnonzero(levels == 0)[0])
    up0 = 64 + ((n + 3) & ~3) + n * (1 + 2 * FUZZ_INDEX.m) * 4
    first = int(np.flatnonzero(levels > 0)[0])
    blob = bytearray(FUZZ_GRAPH)
    struct.pack_into("<II", blob, up0, 1, low)  # first upper block: 1 link, to a level-0 node
    _fix_graph_crc(blob)
    with pytest.raises(ValueError, match=f"node {first} links to {low} on layer 1, but node {low} only reaches level 0"):
        HnswIndex.from_graph(FUZZ_VECTORS, bytes(blob))


def test_from_graph_can_read_the_graph_in_place(small):
    """borrow_graph: levels and links on every layer are used from the caller's bytes (a segment's
    mapped section), with the same answers and the same graph; the bytes are kept alive by the index
    and never written, also across an add()."""
    import gc
    idx, x, q = small
    blob = bytearray(idx.graph_bytes())
    pristine = bytes(blob)
    g = HnswIndex.from_graph(x.copy(), memoryview(blob), borrow_graph=True)
    assert g.stats()["borrowed_graph"]
    copied = HnswIndex.from_graph(x.copy(), pristine)
    assert not copied.stats()["borrowed_graph"]
    shape = ("level_counts", "edges_layer0", "edges_upper", "max_level", "entry")
    assert len(g.stats()["level_counts"]) > 2  # upper layers are walked through the borrowed levels
    assert {k: g.stats()[k] for k in shape} == {k: copied.stats()[k] for k in shape}
    del blob
    gc.collect()
    a, b = idx.search(q, k=10, ef=40), g.search(q, k=10, ef=40)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert g.graph_bytes() == pristine
    more = unit_rows(np.random.default_rng(9), 100, 32)
    g.add(more, threads=1)  # copies the graph into owned memory first
    assert not g.stats()["borrowed_graph"] and len(g) == len(idx) + 100
    ref = HnswIndex.from_graph(x.copy(), pristine)
    ref.add(more, threads=1)
    assert g.graph_bytes() == ref.graph_bytes()


def test_from_graph_borrow_still_validates(small):
    idx, x, _ = small
    blob = bytearray(idx.graph_bytes())
    blob[64 + 4 * (-(-len(x) // 4)) + 7] ^= 0x7F  # the top byte of node 0's first layer-0 link (CRC fixed)
    import struct
    from vibrato._native import segio
    blob[-4:] = struct.pack("<I", segio.crc32c(bytes(blob[:-4])))
    with pytest.raises(ValueError, match="out of range|links"):
        HnswIndex.from_graph(x.copy(), memoryview(blob), borrow_graph=True)


# ------------------------------------------------------------------------ walk on PQ codes (archives)
@pytest.fixture(scope="module")
def text_codes(text):
    base, queries, _ = text
    pq = ProductQuantizer(128, 16)
    pq.train(base, seed=1)
    return pq, pq.encode(base), pq.adc_tables(queries)


def test_code_walk_rescores_exactly_and_reaches_the_recall_of_the_vectors(text, text_index, text_codes):
    """Walking on the codes only chooses which rows to rescore: every returned score is the exact
    inner product, best first, and a beam of 2 ef rescored gets within 0.02 of the exact walk."""
    base, queries, gt = text
    _, codes, luts = text_codes
    for ef in (64, 256):
        exact_ids, _ = text_index.search(queries, k=10, ef=ef)
        ids, scores = text_index.search(queries, k=10, ef=ef, codes=codes, luts=luts, rerank=2 * ef)
        np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, base[ids]), rtol=1e-5, atol=1e-6)
        assert (np.diff(scores, axis=1) <= 0).all()
        assert recall_at(ids, gt, 10) >= recall_at(exact_ids, gt, 10) - 0.02
    narrow, _ = text_index.search(queries, k=10, ef=16, codes=codes, luts=luts, rerank=16)
    wide, _ = text_index.search(queries, k=10, ef=16, codes=codes, luts=luts, rerank=256)
    assert recall_at(wide, gt, 10) > recall_at(narrow, gt, 10) + 0.05  # the rescored beam is what rerank widens


def test_code_walk_with_a_filter_returns_only_allowed_rows(text, text_index, text_codes):
    base, queries, _ = text
    _, codes, luts = text_codes
    allowed = np.random.default_rng(4).random(len(text_index)) < 0.1
    ids, scores = text_index.search(queries[:50], k=10, ef=64, allowed=allowed, codes=codes, luts=luts[:50],
                                    rerank=128)
    assert allowed[ids].all()
    exact = np.stack([np.sort(base[allowed] @ q)[::-1][:10] for q in queries[:50]])
    assert np.mean(np.isclose(scores, exact, atol=1e-6)) > 0.95


def test_code_walk_rejects_mismatched_codes_and_tables(text, text_index, text_codes):
    _, queries, _ = text
    _, codes, luts = text_codes
    with pytest.raises(ValueError, match="codes have shape"):
        text_index.search(queries[:2], k=10, ef=64, codes=codes[:-1], luts=luts[:2], rerank=64)
    with pytest.raises(ValueError, match="luts have shape"):
        text_index.search(queries[:2], k=10, ef=64, codes=codes, luts=luts[:3], rerank=64)
    with pytest.raises(ValueError, match="rerank"):
        text_index.search(queries[:2], k=10, ef=64, codes=codes, luts=luts[:2], rerank=10**6)
    with pytest.raises(ValueError, match="codes and luts go together"):
        text_index.search(queries[:2], k=10, ef=64, codes=codes, rerank=64)


def test_scan_codes_made_elsewhere_are_attached_in_place_and_search_as_built_ones(small):
    """attach_scan_codes (a segment's mapped codes): searches walk and scan on them exactly as on
    codes the index built itself, without copying them; a mismatch or a second set is refused."""
    _, x, q = small
    x = np.ascontiguousarray(x[:2500])
    built = HnswIndex(32, m=8, ef_construction=40, seed=3)
    built.add(x, threads=1)
    attached = HnswIndex.from_graph(x, built.graph_bytes())
    built.build_scan_codes()
    codes, scale = kernels.scan_codes(x)
    codes.flags.writeable = scale.flags.writeable = False  # read in place, as from a mapping
    for bad, match in (((codes[:-1], scale[:-1]), "do not match"), ((codes, scale.astype(np.float64)), "float32"),
                       ((codes.astype(np.uint8), scale), "int8")):
        with pytest.raises(ValueError, match=match):
            attached.attach_scan_codes(*bad)
    assert not attached.has_scan_codes
    attached.attach_scan_codes(codes, scale)
    assert attached.has_scan_codes
    with pytest.raises(ValueError, match="already"):
        attached.attach_scan_codes(codes, scale)
    mask = np.zeros(len(x), bool)
    mask[::7] = True
    for kw in ({"mode": "graph"}, {"mode": "scan", "allowed": mask}, {"mode": "graph", "allowed": mask}):
        want, got = built.search(q, k=10, ef=48, **kw), attached.search(q, k=10, ef=48, **kw)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    stats = attached.stats()
    assert stats["code_walks"] == 2 * len(q) and stats["scan_code_searches"] == len(q)
    del codes, scale  # the index keeps them alive
    np.testing.assert_array_equal(attached.search(q[:3], k=5, ef=32)[0], built.search(q[:3], k=5, ef=32)[0])
