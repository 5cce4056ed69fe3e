"""Product quantization: codec exactness, bounded distortion, deterministic training, the archive quality
bar on the text set, ADC tables and scans at every SIMD level against numpy, masks and ties, bad inputs,
and fuzzed codebook bytes. No timing assertions (benchmarks live in perf/bench_pq.py)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import vibrato.kernels as K
from vibrato._native import cpu
from vibrato._native import pq as P
from vibrato.pq import ProductQuantizer

LEVELS = cpu.available_levels()
KERNELS = P.kernels()  # every ADC kernel this CPU runs: scalar, avx2, avx512 (gathers), avx512vbmi


@pytest.fixture(scope="module", params=LEVELS, ids=[cpu.level_name(lvl) for lvl in LEVELS])
def level(request):
    return request.param


@pytest.fixture(scope="module", params=KERNELS)
def kernel(request):
    return request.param


def mixture(n, d, seed, centers=64, spread=0.15):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d))
    x = c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, d))
    return np.ascontiguousarray(x, dtype=np.float32)


@pytest.fixture(scope="module")
def data32():
    return mixture(4000, 32, seed=1)


@pytest.fixture(scope="module")
def pq32(data32):
    return ProductQuantizer(32, 8).train(data32, iters=10, seed=3)


def adc_ref(table, codes):
    """numpy reference: table lookups summed in float64."""
    m = table.shape[0]
    if len(codes) == 0:
        return np.zeros(0)
    return table.astype(np.float64)[np.arange(m), codes].sum(axis=1)


def sq_dists(X, pq):
    """(n, m, 256) squared L2 of each subvector to each centroid, float64."""
    sub = X.astype(np.float64).reshape(len(X), pq.m, 1, pq.dsub)
    return ((sub - pq.centroids.astype(np.float64)[None]) ** 2).sum(-1)


# -- construction -------------------------------------------------------------------------------------


def test_attributes():
    pq = ProductQuantizer(128, 16)
    assert (pq.dim, pq.m, pq.nbits, pq.ksub, pq.dsub) == (128, 16, 8, 256, 8)
    assert not pq.is_trained and pq.centroids is None
    assert "untrained" in repr(pq)


@pytest.mark.parametrize("args,message", [
    ((130, 16), r"m must divide dim: dim=130 is not a multiple of m=16"),
    ((128, 16, 4), r"nbits must be 8"),
    ((128, 16, 16), r"nbits must be 8"),
    ((128, 0), r"m must be in \[1, dim=128\]"),
    ((8, 16), r"m must be in \[1, dim=8\]"),
    ((0, 1), r"dim must be in \[1, 65536\]"),
    ((1 << 17, 1), r"dim must be in \[1, 65536\]"),
    ((128.0, 16), r"dim must be an int"),
    ((128, "16"), r"m must be an int"),
])
def test_constructor_rejects(args, message):
    with pytest.raises(ValueError, match=message):
        ProductQuantizer(*args)


# -- codec --------------------------------------------------------------------------------------------


def test_codebook_points_decode_exactly(pq32):
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, (3000, pq32.m), dtype=np.uint8)
    X = pq32.decode(codes)
    assert X.shape == (3000, 32) and X.dtype == np.float32
    # decode is a pure lookup
    np.testing.assert_array_equal(X[7, 4:8], pq32.centroids[1, codes[7, 1]])
    # each centroid is distinct within its subspace, so a vector made of centroids encodes back exactly
    for j in range(pq32.m):
        assert len(np.unique(pq32.centroids[j], axis=0)) == 256
    for lvl in LEVELS:
        np.testing.assert_array_equal(P.encode(pq32.centroids, X, level=lvl), codes)
    np.testing.assert_array_equal(pq32.encode(X, threads=2), codes)


def test_encode_is_nearest_centroid(data32, pq32, level):
    X = data32[:1500]
    codes = P.encode(pq32.centroids, X, level=level)
    d = sq_dists(X, pq32)
    chosen = np.take_along_axis(d, codes[..., None].astype(np.int64), axis=2)[..., 0]
    best = d.min(axis=2)
    assert np.all(chosen <= best + 1e-5 * (1 + best))
    # away from float ties the code is exactly numpy's argmin (the lowest index)
    srt = np.sort(d, axis=2)
    clear = (srt[..., 1] - srt[..., 0]) > 1e-4 * (1 + srt[..., 0])
    np.testing.assert_array_equal(codes[clear], d.argmin(axis=2)[clear])


def test_encode_ties_pick_lowest_index():
    X = mixture(600, 4, seed=2)
    pq = ProductQuantizer(4, 1).train(X, iters=2)
    cb = pq.centroids.copy()
    cb[0, 200] = cb[0, 17]  # an exact duplicate: code 17 must win
    x = np.ascontiguousarray(cb[0, [17, 200]])
    for lvl in LEVELS:
        np.testing.assert_array_equal(P.encode(cb, x, level=lvl)[:, 0], [17, 17])
        np.testing.assert_array_equal(P.encode(cb, x, level=lvl, pairwise=True)[:, 0], [17, 17])


def test_distortion_bounded(data32, pq32):
    X = data32
    mse = float(((pq32.decode(pq32.encode(X)) - X) ** 2).sum(1).mean())
    total = float(((X - X.mean(0)) ** 2).sum(1).mean())
    # a random codebook with the data's scale, and one of random training rows (k-means' raw material)
    rng = np.random.default_rng(9)
    rand = (rng.standard_normal((8, 256, 4)) * X.std()).astype(np.float32)
    rows = np.ascontiguousarray(X[rng.choice(len(X), 256, replace=False)].reshape(256, 8, 4).transpose(1, 0, 2))
    mse_rand = float(((P.decode(rand, P.encode(rand, X)) - X) ** 2).sum(1).mean())
    mse_rows = float(((P.decode(rows, P.encode(rows, X)) - X) ** 2).sum(1).mean())
    assert mse < 0.25 * total
    assert mse < 0.25 * mse_rand
    assert mse < 0.8 * mse_rows
    # the reported inertia is the sample's distortion at the last assignment (same order of magnitude)
    assert 0.5 * mse * len(X) < pq32.train_info["inertia"] < 2.0 * mse * len(X)


def test_few_distinct_points_reconstruct_exactly():
    # 100 distinct rows repeated: k-means++ never picks a point twice while another is uncovered,
    # so every distinct subvector becomes a centroid and distortion is exactly zero.
    base = mixture(100, 16, seed=4)
    X = np.ascontiguousarray(np.repeat(base, 5, axis=0))
    pq = ProductQuantizer(16, 4).train(X, iters=5)
    np.testing.assert_array_equal(pq.decode(pq.encode(X)), X)


# -- training -----------------------------------------------------------------------------------------


def test_training_deterministic_across_threads_and_runs(data32):
    ref = ProductQuantizer(32, 8).train(data32, iters=6, seed=11, threads=1)
    for threads in (1, 2, 3, None):
        again = ProductQuantizer(32, 8).train(data32, iters=6, seed=11, threads=threads)
        np.testing.assert_array_equal(again.centroids, ref.centroids)
        assert again.train_info == ref.train_info
    other = ProductQuantizer(32, 8).train(data32, iters=6, seed=12)
    assert not np.array_equal(other.centroids, ref.centroids)


@pytest.mark.parametrize("m", [1, 2, 3])  # m < 2 * threads: the assignment pass itself is split
def test_training_deterministic_few_subspaces(m):
    X = mixture(3000, 6, seed=m)
    one = ProductQuantizer(6, m).train(X, iters=5, threads=1)
    two = ProductQuantizer(6, m).train(X, iters=5, threads=2)
    np.testing.assert_array_equal(one.centroids, two.centroids)


def test_subsample_is_seeded(data32):
    a = ProductQuantizer(32, 8).train(data32, iters=4, sample=1000, seed=5)
    b = ProductQuantizer(32, 8).train(data32, iters=4, sample=1000, seed=5, threads=2)
    c = ProductQuantizer(32, 8).train(data32, iters=4, sample=1000, seed=6)
    assert a.train_info["rows_used"] == 1000
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert not np.array_equal(a.centroids, c.centroids)
    full = ProductQuantizer(32, 8).train(data32, iters=4, sample=10**9)
    assert full.train_info["rows_used"] == len(data32)


def test_empty_clusters_reseeded_deterministically():
    # Start from centroids far away from the data: all but 16 clusters are empty at the first update and
    # must be re-seeded (farthest points, no unseeded RNG), identically for every thread count.
    X = mixture(2000, 8, seed=7)
    init = np.full((2, 256, 4), 1000.0, np.float32)
    init[:, :16] = X[:16].reshape(16, 2, 4).transpose(1, 0, 2)
    runs = [ProductQuantizer(8, 2).train(X, init=init, iters=10, threads=t) for t in (1, 2, 3)]
    assert runs[0].train_info["reseeded"] >= 2 * 240
    for r in runs[1:]:
        np.testing.assert_array_equal(r.centroids, runs[0].centroids)
        assert r.train_info == runs[0].train_info
    assert np.abs(runs[0].centroids).max() < 100  # nothing left at the far-away start
    for j in range(2):
        assert len(np.unique(runs[0].centroids[j], axis=0)) == 256


def test_warm_start_from_own_centroids_is_a_fixed_point(data32, pq32):
    # Lloyd from converged centroids on the same sample does not move them far.
    again = ProductQuantizer(32, 8).train(data32, init=pq32.centroids, iters=3)
    mse0 = float(((pq32.decode(pq32.encode(data32)) - data32) ** 2).mean())
    mse1 = float(((again.decode(again.encode(data32)) - data32) ** 2).mean())
    assert mse1 <= mse0 * 1.001


# -- the archive quality bar (CONTRACT.md §5: recall@10 >= 0.9 after rerank) ----------------------------


@pytest.fixture(scope="module")
def text(shared_data):
    d = shared_data / "text"
    return np.load(d / "base_128.npy"), np.load(d / "queries_128.npy"), np.load(d / "gt_128_ids.npy")


@pytest.mark.parametrize("m,candidates", [(16, 100), (32, 40)])
def test_quality_bar_recall_after_rerank(text, m, candidates):
    base, queries, gt = text
    pq = ProductQuantizer(128, m).train(base)
    codes = pq.encode(base)
    hits = 0
    for q, truth in zip(queries, gt):
        rows, approx = pq.adc_scan(q, codes, candidates, threads=1)
        assert len(rows) == candidates and np.all(np.diff(approx) <= 0)
        exact = K.dot_many(q, base, rows)
        top = rows[np.argsort(-exact, kind="stable")[:10]]
        hits += len(np.intersect1d(top, truth[:10]))
    recall = hits / (10 * len(queries))
    print(f"m={m} candidates={candidates} recall@10={recall:.4f}")
    assert recall >= 0.9


# -- ADC ----------------------------------------------------------------------------------------------


def test_adc_table_ip_and_l2(pq32, level):
    q = mixture(1, 32, seed=8)[0]
    sub = q.astype(np.float64).reshape(8, 1, 4)
    cb = pq32.centroids.astype(np.float64)
    ip = P.adc_table(pq32.centroids, q, 0, level=level)
    l2 = P.adc_table(pq32.centroids, q, 1, level=level)
    np.testing.assert_allclose(ip, (sub * cb).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l2, ((sub - cb) ** 2).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(pq32.adc_table(q), P.adc_table(pq32.centroids, q, 0))
    np.testing.assert_array_equal(pq32.adc_table(q, metric="l2"), P.adc_table(pq32.centroids, q, 1))
    # the summed IP table is the inner product with the reconstruction
    codes = pq32.encode(mixture(50, 32, seed=10))
    np.testing.assert_allclose(adc_ref(ip, codes), pq32.decode(codes).astype(np.float64) @ q, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 12, 16, 17, 20, 24, 31, 32, 36, 48, 64])
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 131, 1000])
def test_adc_scores_every_kernel(kernel, m, n):
    rng = np.random.default_rng(m * 1000 + n)
    codes = rng.integers(0, 256, (n, m), dtype=np.uint8)
    table = rng.standard_normal((m, 256)).astype(np.float32)
    got = P.adc_scores(table, codes, kernel=kernel)
    np.testing.assert_allclose(got, adc_ref(table, codes), rtol=1e-5, atol=1e-5 * m)
    # every kernel adds in the same order as the scalar reference: equal bit for bit
    np.testing.assert_array_equal(got, P.adc_scores(table, codes, kernel="scalar"))


def check_topk(rows, scores, ref, k, allowed=None):
    """rows/scores form a valid top-k of ref (float64 reference scores) up to float32 rounding."""
    eligible = np.arange(len(ref)) if allowed is None else np.flatnonzero(allowed)
    assert len(rows) == min(k, len(eligible)) == len(scores)
    assert rows.dtype == np.int64 and scores.dtype == np.float32
    assert len(np.unique(rows)) == len(rows)
    assert np.all(np.diff(scores) <= 0)
    if len(rows) == 0:
        return
    assert np.all(np.isin(rows, eligible))
    tol = 1e-5 * (1 + np.abs(ref).max())
    np.testing.assert_allclose(scores, ref[rows], rtol=0, atol=tol)
    rest = np.setdiff1d(eligible, rows)
    if len(rest):
        assert ref[rest].max() <= scores[-1] + tol


@pytest.mark.parametrize("n,m,k", [(1, 16, 1), (100, 16, 5), (5000, 16, 10), (70_001, 16, 100),
                                   (3000, 8, 300), (3000, 32, 7), (999, 12, 50), (2000, 3, 2000)])
def test_adc_scan_matches_numpy_every_level(level, n, m, k):
    rng = np.random.default_rng(n + m + k)
    codes = rng.integers(0, 256, (n, m), dtype=np.uint8)
    table = rng.standard_normal((m, 256)).astype(np.float32)
    rows, scores = P.adc_scan(table, codes, k, level=level, threads=1)
    check_topk(rows, scores, adc_ref(table, codes), k)
    r0, s0 = P.adc_scan(table, codes, k, kernel="scalar", threads=1)
    np.testing.assert_array_equal(rows, r0)
    np.testing.assert_array_equal(scores, s0)


def test_adc_scan_every_kernel_and_thread_count_identical(kernel):
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 256, (200_003, 16), dtype=np.uint8)
    table = rng.standard_normal((16, 256)).astype(np.float32)
    ref = P.adc_scan(table, codes, 64, kernel="scalar", threads=1)
    for threads in (1, 2, 3, None):
        got = P.adc_scan(table, codes, 64, kernel=kernel, threads=threads)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


def test_adc_scan_ties_keep_lower_rows_first():
    # Integer tables give many exactly equal scores: the order must be (score desc, row asc), for
    # every thread count and kernel (per-thread heaps are merged by the same total order).
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 256, (120_000, 4), dtype=np.uint8)
    table = rng.integers(0, 3, (4, 256)).astype(np.float32)
    ref = adc_ref(table, codes)
    order = np.lexsort((np.arange(len(ref)), -ref))[:500]
    for kern in KERNELS:
        for threads in (1, 2, 3):
            rows, scores = P.adc_scan(table, codes, 500, kernel=kern, threads=threads)
            np.testing.assert_array_equal(rows, order)
            np.testing.assert_array_equal(scores, ref[order].astype(np.float32))


@pytest.mark.parametrize("density", [0.0, 0.0005, 0.01, 0.1, 0.5, 1.0])
def test_allowed_mask_respected(level, density):
    rng = np.random.default_rng(int(density * 1e4))
    n, m, k = 50_000, 16, 20
    codes = rng.integers(0, 256, (n, m), dtype=np.uint8)
    table = rng.standard_normal((m, 256)).astype(np.float32)
    allowed = rng.random(n) < density
    allowed[:300] = density >= 0.5  # a fully allowed / fully masked run of blocks
    ref = adc_ref(table, codes)
    for threads in (1, 2):
        rows, scores = P.adc_scan(table, codes, k, allowed=allowed, level=level, threads=threads)
        check_topk(rows, scores, ref, k, allowed)
        assert len(rows) == min(k, int(allowed.sum()))


def test_k_bigger_than_rows_and_empty_codes(pq32):
    q = mixture(1, 32, seed=12)[0]
    codes = pq32.encode(mixture(30, 32, seed=13))
    rows, scores = pq32.adc_scan(q, codes, 1000)
    assert sorted(rows.tolist()) == list(range(30))
    rows, scores = pq32.adc_scan(q, np.empty((0, 8), np.uint8), 10)
    assert rows.shape == (0,) and scores.shape == (0,)
    allowed = np.zeros(30, bool)
    allowed[[3, 29]] = True
    rows, _ = pq32.adc_scan(q, codes, 10, allowed=allowed)
    assert sorted(rows.tolist()) == [3, 29]


def test_scan_table_reuses_a_table(pq32):
    q = mixture(1, 32, seed=14)[0]
    codes = pq32.encode(mixture(500, 32, seed=15))
    a = pq32.adc_scan(q, codes, 10)
    b = pq32.scan_table(pq32.adc_table(q), codes, 10)
    np.testing.assert_array_equal(a[0], b[0])


def run_python(code, **env):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_scan_readonly_mmap_ending_at_a_page_boundary(tmp_path):
    # codes as a read-only mmap whose last row ends exactly at the end of the mapping: a kernel that
    # reads past a row would fault. Run in a child so a fault is a test failure, not a crashed session.
    rng = np.random.default_rng(6)
    n, m = 4096, 16  # 64 KiB: a whole number of pages
    codes = rng.integers(0, 256, (n, m), dtype=np.uint8)
    path = tmp_path / "codes.u8"
    codes.tofile(path)
    table = rng.standard_normal((m, 256)).astype(np.float32)
    np.save(tmp_path / "table.npy", table)
    ref = P.adc_scan(table, codes, 25, kernel="scalar")
    out = run_python(f"""
        import numpy as np
        from vibrato._native import pq as P
        table = np.load({str(tmp_path / 'table.npy')!r})
        codes = np.memmap({str(path)!r}, dtype=np.uint8, mode="r", shape=({n}, {m}))
        assert not codes.flags.writeable
        for start in (0, 1, 7, 63):  # the tail rows end on the page boundary for every alignment
            view = codes[start:]
            for kern in P.kernels():
                rows, scores = P.adc_scan(table, view, 25, kernel=kern)
                ref = P.adc_scores(table, np.array(view), kernel="scalar")
                assert np.array_equal(P.adc_scores(table, view, kernel=kern), ref), kern
        rows, scores = P.adc_scan(table, codes, 25)
        print(" ".join(map(str, rows.tolist())))
    """)
    assert out.split() == [str(r) for r in ref[0]]


@pytest.mark.parametrize("name", [cpu.level_name(lvl) for lvl in LEVELS])
def test_vibrato_simd_env_gives_same_topk(tmp_path, name):
    rng = np.random.default_rng(8)
    X = mixture(3000, 32, seed=16)
    pq = ProductQuantizer(32, 8).train(X, iters=4)
    (tmp_path / "pq.bin").write_bytes(pq.to_bytes())
    np.save(tmp_path / "X.npy", X)
    q = rng.standard_normal(32).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    out = run_python(f"""
        import numpy as np
        from vibrato.pq import ProductQuantizer
        from vibrato._native import pq as P
        pq = ProductQuantizer.from_bytes(open({str(tmp_path / 'pq.bin')!r}, "rb").read())
        X, q = np.load({str(tmp_path / 'X.npy')!r}), np.load({str(tmp_path / 'q.npy')!r})
        codes = pq.encode(X)
        np.save({str(tmp_path / 'codes.npy')!r}, codes)
        rows, scores = pq.adc_scan(q, codes, 50)
        print(P.kernel_name(), " ".join(map(str, rows.tolist())))
    """, VIBRATO_SIMD=name)
    kern, *rows = out.split()
    assert kern == name  # one dispatch: the level VIBRATO_SIMD names is the PQ kernel set used
    codes = np.load(tmp_path / "codes.npy")
    table = pq.adc_table(q)
    ref_rows, _ = P.adc_scan(table, codes, 50, kernel="scalar")
    assert [int(r) for r in rows] == ref_rows.tolist()
    check_topk(np.array(rows, dtype=np.int64), P.adc_scan(table, codes, 50)[1], adc_ref(table, codes), 50)


def test_every_vibrato_simd_level_gives_identical_pq_results(tmp_path):
    """VIBRATO_SIMD=scalar/avx2/avx512/avx512vbmi (each that runs here, in its own process) selects its
    own kernels (avx512 = AVX-512F gathers, avx512vbmi = byte permutes) and every PQ result is the same:
    codes from encode, ADC scores and top-k (rows and scores, bit for bit) on one table, including a
    masked scan and a row count that leaves kernel tails."""
    rng = np.random.default_rng(21)
    X = mixture(3001, 32, seed=23)
    pq = ProductQuantizer(32, 8).train(X, iters=4)
    (tmp_path / "pq.bin").write_bytes(pq.to_bytes())
    np.save(tmp_path / "X.npy", X)
    table = pq.adc_table(rng.standard_normal(32).astype(np.float32))
    np.save(tmp_path / "table.npy", table)
    allowed = rng.random(len(X)) < 0.3
    np.save(tmp_path / "allowed.npy", allowed)
    results = {}
    for name in [cpu.level_name(lvl) for lvl in LEVELS]:
        out = tmp_path / f"{name}.npz"
        run_python(f"""
            import numpy as np
            from vibrato._native import cpu, pq as P
            from vibrato.pq import ProductQuantizer
            assert cpu.level_name(cpu.selected_level()) == {name!r} == P.kernel_name()
            pq = ProductQuantizer.from_bytes(open({str(tmp_path / 'pq.bin')!r}, "rb").read())
            X, table = np.load({str(tmp_path / 'X.npy')!r}), np.load({str(tmp_path / 'table.npy')!r})
            allowed = np.load({str(tmp_path / 'allowed.npy')!r})
            codes = pq.encode(X)
            rows, scores = P.adc_scan(table, codes, 40)
            mrows, mscores = P.adc_scan(table, codes, 40, allowed=allowed)
            np.savez({str(out)!r}, codes=codes, all=P.adc_scores(table, codes), rows=rows, scores=scores,
                     mrows=mrows, mscores=mscores)
        """, VIBRATO_SIMD=name)
        results[name] = dict(np.load(out))
    ref = results["scalar"]
    for name, got in results.items():
        for key in ref:
            np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{name}: {key}")
    check_topk(ref["rows"], ref["scores"], adc_ref(table, ref["codes"]), 40)
    check_topk(ref["mrows"], ref["mscores"], adc_ref(table, ref["codes"]), 40, allowed)


# -- bad inputs: ValueErrors naming the argument ----------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    X = mixture(600, 16, seed=20)
    return X, ProductQuantizer(16, 4).train(X, iters=2)


def bad_calls(X, pq):
    untrained = ProductQuantizer(16, 4)
    codes = pq.encode(X[:10])
    q = X[0]
    return [
        (lambda: untrained.encode(X), "not trained"),
        (lambda: untrained.decode(codes), "not trained"),
        (lambda: untrained.adc_table(q), "not trained"),
        (lambda: untrained.adc_scan(q, codes, 5), "not trained"),
        (lambda: untrained.to_bytes(), "not trained"),
        (lambda: untrained.train(X[:255]), "at least 256 rows"),
        (lambda: untrained.train(X.astype(np.float64)), "X must have dtype float32"),
        (lambda: untrained.train(X[:, :8]), r"X must have shape \(n, 16\)"),
        (lambda: untrained.train(np.asfortranarray(X)), "X must be C-contiguous"),
        (lambda: untrained.train(X.tolist()), "X must be a numpy float32 array"),
        (lambda: untrained.train(X, sample=100), "sample must be an int >= 256"),
        (lambda: untrained.train(X, iters=-1), "iters must be an int"),
        (lambda: untrained.train(X, seed=-1), "seed must be an int"),
        (lambda: untrained.train(X, threads=0), "threads must be in"),
        (lambda: untrained.train(X, init=np.zeros((4, 256, 3), np.float32)), "init must be"),
        (lambda: untrained.train(np.where(np.arange(600)[:, None] == 321, np.nan, X).astype(np.float32)),
         "X row 321 contains a non-finite value"),
        (lambda: pq.encode(X[:, :8]), r"X must have shape \(n, 16\)"),
        (lambda: pq.encode(X.astype(np.float16)), "X must have dtype float32"),
        (lambda: pq.encode(X[::2]), "X must be C-contiguous"),
        (lambda: pq.decode(codes.astype(np.int32)), "codes must have dtype uint8"),
        (lambda: pq.decode(codes[:, :3].copy()), "codes must have m=4 columns"),
        (lambda: pq.decode(codes[0]), "codes must be 2-D"),
        (lambda: pq.adc_table(q[:8]), "q must have dim=16 values"),
        (lambda: pq.adc_table(q.astype(np.float64)), "q must have dtype float32"),
        (lambda: pq.adc_table(np.full(16, np.nan, np.float32)), "q contains a non-finite value"),
        (lambda: pq.adc_table(q, metric="cos"), "metric must be 'ip' or 'l2'"),
        (lambda: pq.adc_scan(q, codes, 0), "k must be an int >= 1"),
        (lambda: pq.adc_scan(q, codes, True), "k must be an int >= 1"),
        (lambda: pq.adc_scan(q, codes, 5, threads=0), "threads must be in"),
        (lambda: pq.adc_scan(q, codes.astype(np.int8), 5), "codes must have dtype uint8"),
        (lambda: pq.adc_scan(q, np.asfortranarray(codes), 5), "codes must be C-contiguous"),
        (lambda: pq.adc_scan(q, codes, 5, allowed=np.ones(9, bool)), "allowed must have one entry per row"),
        (lambda: pq.adc_scan(q, codes, 5, allowed=np.ones(10, np.uint8)), "allowed must have dtype bool"),
        (lambda: pq.scan_table(np.ones((3, 256), np.float32), codes, 5), r"table must have shape \(4, 256\)"),
        (lambda: P.adc_scores(np.ones((4, 255), np.float32), codes), r"table must have shape \(m, 256\)"),
        (lambda: P.adc_scan(pq.adc_table(q), codes, 5, kernel="sse9"), "kernel 'sse9' cannot run"),
        (lambda: P.encode(pq.centroids, X, level=99), "cannot run on this CPU"),
        (lambda: P.encode(np.ones((4, 128, 4), np.float32), X), r"codebook must have shape \(m, 256, dsub\)"),
        (lambda: ProductQuantizer.from_bytes("not bytes"), "buf must be a bytes-like object"),
        (lambda: ProductQuantizer.from_bytes(b""), "shorter than the 32-byte PQ header"),
    ]


def test_bad_inputs_are_clear_value_errors(small):
    for call, message in bad_calls(*small):
        with pytest.raises(ValueError, match=message):
            call()


# -- serialisation ------------------------------------------------------------------------------------


def test_bytes_roundtrip(small, tmp_path):
    X, pq = small
    buf = pq.to_bytes()
    assert len(buf) == 32 + 256 * 16 * 4 + 4 and buf[:4] == b"VBPQ"
    for form in (buf, bytearray(buf), memoryview(buf), np.frombuffer(buf, np.uint8)):
        back = ProductQuantizer.from_bytes(form)
        assert (back.dim, back.m, back.nbits, back.dsub) == (16, 4, 8, 4) and back.is_trained
        np.testing.assert_array_equal(back.centroids, pq.centroids)
        np.testing.assert_array_equal(back.encode(X), pq.encode(X))
    # from a read-only mmap, at an unaligned offset
    path = tmp_path / "cb.bin"
    path.write_bytes(b"xyz" + buf)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    np.testing.assert_array_equal(ProductQuantizer.from_bytes(mm[3:]).centroids, pq.centroids)
    with pytest.raises(ValueError):
        pq.centroids[0, 0, 0] = 1.0  # the codebook is read-only


# A CRC32C in Python so fuzzed buffers can carry a valid checksum and reach the deeper checks.
_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ (0x82F63B78 if _c & 1 else 0)
    _CRC_TABLE.append(_c)


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def with_crc(body):
    return bytes(body) + crc32c(body).to_bytes(4, "little")


def test_crc32c_reference():
    assert crc32c(b"123456789") == 0xE3069283


def header(dim=2, m=1, nbits=8, ksub=256, version=1, magic=b"VBPQ", payload=None):
    payload = 256 * dim * 4 if payload is None else payload
    return (magic + version.to_bytes(4, "little") + dim.to_bytes(4, "little") + m.to_bytes(4, "little")
            + nbits.to_bytes(4, "little") + ksub.to_bytes(4, "little") + payload.to_bytes(8, "little"))


GOOD_PAYLOAD = np.arange(512, dtype="<f4").tobytes()


@pytest.mark.parametrize("buf,message", [
    (with_crc(header() + GOOD_PAYLOAD)[:-1], "length does not match"),
    (with_crc(header() + GOOD_PAYLOAD) + b"\0", "length does not match"),
    (with_crc(header(magic=b"VBPX") + GOOD_PAYLOAD), "bad magic"),
    (with_crc(header(version=2) + GOOD_PAYLOAD), "unsupported PQ format version"),
    (with_crc(header(nbits=4) + GOOD_PAYLOAD), "unsupported nbits"),
    (with_crc(header(ksub=16) + GOOD_PAYLOAD), "ksub does not match"),
    (with_crc(header(dim=0) + GOOD_PAYLOAD), "dim out of range"),
    (with_crc(header(dim=0xFFFFFFFF) + GOOD_PAYLOAD), "dim out of range"),
    (with_crc(header(m=0) + GOOD_PAYLOAD), "m out of range"),
    (with_crc(header(m=3) + GOOD_PAYLOAD), "m out of range"),
    (with_crc(header(dim=3, m=2, payload=2048) + GOOD_PAYLOAD), "m does not divide dim"),
    (with_crc(header(payload=2**63) + GOOD_PAYLOAD), "payload length"),
    (with_crc(header(dim=65536, m=1) + GOOD_PAYLOAD), "length does not match"),  # claims 64 MiB, has 2 KiB
    (header() + GOOD_PAYLOAD + b"\0\0\0\0", "checksum mismatch"),
    (with_crc(header() + np.full(512, np.nan, "<f4").tobytes()), "non-finite"),
    (with_crc(header() + np.full(512, np.inf, "<f4").tobytes()), "non-finite"),
    (header()[:31], "shorter than the 32-byte PQ header"),
])
def test_corrupt_bytes_rejected(buf, message):
    with pytest.raises(ValueError, match=message):
        ProductQuantizer.from_bytes(buf)


def test_valid_handmade_buffer_parses():
    pq = ProductQuantizer.from_bytes(with_crc(header() + GOOD_PAYLOAD))
    assert (pq.dim, pq.m, pq.dsub) == (2, 1, 2)
    np.testing.assert_array_equal(pq.centroids.ravel(), np.arange(512, dtype=np.float32))


_FUZZ_PQ = ProductQuantizer.from_bytes(with_crc(header(dim=2, m=2) + GOOD_PAYLOAD))
VALID = _FUZZ_PQ.to_bytes()


@st.composite
def mutated(draw):
    buf = bytearray(VALID)
    kind = draw(st.sampled_from(["truncate", "flip", "field", "extend", "splice"]))
    if kind == "truncate":
        buf = buf[:draw(st.integers(0, len(buf) - 1))]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, len(buf) - 1))
            buf[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "field":  # a header field set to a hostile value
        off = draw(st.sampled_from([4, 8, 12, 16, 20, 24, 28]))
        val = draw(st.sampled_from([0, 1, 2, 3, 255, 256, 65536, 65537, 2**31 - 1, 2**31, 2**32 - 1]))
        buf[off:off + 4] = val.to_bytes(4, "little")
    elif kind == "extend":
        buf += draw(st.binary(min_size=1, max_size=64))
    else:
        pos = draw(st.integers(32, len(buf) - 4))
        chunk = draw(st.binary(min_size=1, max_size=16))
        buf[pos:pos + len(chunk)] = chunk
    fix = draw(st.booleans()) and len(buf) >= 4
    if fix:  # re-checksum so the structural and value checks are reached too
        buf = bytearray(with_crc(buf[:-4]))
    return bytes(buf)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(buf=mutated())
def test_fuzz_from_bytes(buf):
    try:
        pq = ProductQuantizer.from_bytes(buf)
    except ValueError as e:
        assert "invalid PQ codebook bytes" in str(e)
        return
    # accepted: then it is a consistent, finite, usable codebook
    assert pq.dim % pq.m == 0 and pq.centroids.shape == (pq.m, 256, pq.dsub)
    assert np.isfinite(pq.centroids).all()
    assert len(buf) == 36 + 256 * pq.dim * 4
    x = np.zeros((1, pq.dim), np.float32)
    assert pq.encode(x).shape == (1, pq.m)


def test_adc_tables_are_adc_table_per_query(pq32, data32):
    Q = data32[:7]
    tables = pq32.adc_tables(Q)
    assert tables.shape == (7, pq32.m, 256) and tables.dtype == np.float32
    for i in range(7):
        np.testing.assert_allclose(tables[i], pq32.adc_table(Q[i]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(pq32.adc_tables(Q[:1])[0], pq32.adc_table(Q[0]))
    with pytest.raises(ValueError, match="Q must have shape"):
        pq32.adc_tables(Q[:, :16])
