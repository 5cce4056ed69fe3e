"""PQ benchmarks (report, don't assert): training and encoding throughput on the text set, and ADC scan
throughput per kernel on 1M codes (m=16), each next to faiss (IndexPQ / ProductQuantizer, faiss-cpu
1.15.1) measured in the same run.

Run (results: printed table, perf/results/bench_pq.json, and pytest-benchmark's own table):

    .venv/bin/python -m pytest perf/bench_pq.py -s -q

Figures are medians over rounds (this 2-core machine is shared and noisy); compare ratios, not absolute
numbers. Every benchmark checks its result, so a fast wrong kernel fails.

Notes on fairness:
  * training: both train on the 20,000 x 128 base, 256 centroids per subspace, 15 Lloyd iterations
    (faiss's default of 25 lowered to match). Vibrato adds a k-means++ initialisation (faiss draws random
    rows), and stops a subspace early once no assignment changes.
  * encode: vibrato ProductQuantizer.encode vs faiss ProductQuantizer.compute_codes on the same 20,000 rows.
  * ADC: 1,000,000 rows of codes (the text base's codes tiled 50 times), top-100 by inner product for one
    query. faiss IndexPQ(128, 16, 8, METRIC_INNER_PRODUCT) trained on the same base holds the same code
    bytes (copied in), so both scan the same 16 MB; faiss's search also builds its table per query, as
    vibrato's adc_scan does. `threads` is pinned per case (faiss via omp_set_num_threads).
"""
import json
import os
import platform
import statistics
from pathlib import Path

import numpy as np
import pytest

from vibrato._native import cpu
from vibrato._native import pq as P
from vibrato.pq import ProductQuantizer
from benchlib import paired_times

faiss = pytest.importorskip("faiss")

ROOT = Path(__file__).resolve().parent
DATA = Path(os.environ.get("VIBRATO_SHARED_DATA", ROOT.parents[1] / "shared" / "data"))
N_SCAN = 1_000_000
M = 16
ITERS = 15
RESULTS = {}  # case -> {"median_s", "rate", "unit"}
PAIRED = {}  # case -> paired A/B medians


def paired(case, ours, peer, rounds):
    """Median of t(peer)/t(ours) over alternating calls: robust to the load drifting between tests."""
    to, tp = paired_times(ours, peer, rounds)
    PAIRED[case] = {"speedup_vs_peer": statistics.median(b / a for a, b in zip(to, tp)),
                    "ours_median_s": statistics.median(to), "peer_median_s": statistics.median(tp)}


@pytest.fixture(scope="module")
def base():
    path = DATA / "text" / "base_128.npy"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return np.load(path)


@pytest.fixture(scope="module")
def query(base):
    return np.load(DATA / "text" / "queries_128.npy")[0]


@pytest.fixture(scope="module")
def pq(base):
    return ProductQuantizer(128, M).train(base, iters=ITERS)


@pytest.fixture(scope="module")
def codes_1m(pq, base):
    codes = np.tile(pq.encode(base), (N_SCAN // len(base), 1))
    assert codes.shape == (N_SCAN, M) and codes.flags.c_contiguous
    return codes


@pytest.fixture(scope="module")
def faiss_index(base, codes_1m):
    faiss.omp_set_num_threads(1)
    index = faiss.IndexPQ(128, M, 8, faiss.METRIC_INNER_PRODUCT)
    index.train(base)
    faiss.copy_array_to_vector(codes_1m.ravel(), index.codes)
    index.ntotal = N_SCAN
    return index


def record(benchmark, case, items, unit):
    med = benchmark.stats.stats.median
    RESULTS[case] = {"median_s": med, "rate": items / med, "unit": unit}
    benchmark.extra_info[unit] = round(items / med)


def pedantic(benchmark, fn, rounds):
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


# -- training -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
def test_train_vibrato(benchmark, base, threads):
    benchmark.group = "pq train (20k x 128, m=16, 15 iters)"
    out = pedantic(benchmark, lambda: ProductQuantizer(128, M).train(base, iters=ITERS, threads=threads), 5)
    assert out.is_trained and np.isfinite(out.centroids).all()
    record(benchmark, f"train vibrato {threads}t", len(base), "vectors/s")


@pytest.mark.parametrize("threads", [1, 2])
def test_train_faiss(benchmark, base, threads):
    benchmark.group = "pq train (20k x 128, m=16, 15 iters)"

    def run():
        faiss.omp_set_num_threads(threads)
        fpq = faiss.ProductQuantizer(128, M, 8)
        fpq.cp.niter = ITERS
        fpq.train(base)
        return fpq

    pedantic(benchmark, run, 5)
    record(benchmark, f"train faiss {threads}t", len(base), "vectors/s")


# -- encode -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
def test_encode_vibrato(benchmark, pq, base, threads):
    benchmark.group = "pq encode (20k x 128, m=16)"
    codes = pedantic(benchmark, lambda: pq.encode(base, threads=threads), 9)
    np.testing.assert_array_equal(codes[:2000], pq.encode(base[:2000], threads=1))
    record(benchmark, f"encode vibrato {threads}t", len(base), "vectors/s")


def test_encode_vibrato_pairwise(benchmark, pq, base):
    """The same encode through one distance-kernel call per centroid (vb_distance_ops_t.l2sq_ny)."""
    benchmark.group = "pq encode (20k x 128, m=16)"
    codes = pedantic(benchmark, lambda: P.encode(pq.centroids, base, threads=1, pairwise=True), 3)
    assert (codes == pq.encode(base)).mean() > 0.999
    record(benchmark, "encode vibrato 1t pairwise", len(base), "vectors/s")


@pytest.mark.parametrize("threads", [1, 2])
def test_encode_faiss(benchmark, base, threads):
    benchmark.group = "pq encode (20k x 128, m=16)"
    fpq = faiss.ProductQuantizer(128, M, 8)
    fpq.cp.niter = ITERS
    fpq.train(base)

    def run():
        faiss.omp_set_num_threads(threads)
        return fpq.compute_codes(base)

    codes = pedantic(benchmark, run, 9)
    assert codes.shape == (len(base), M)
    record(benchmark, f"encode faiss {threads}t", len(base), "vectors/s")


# -- ADC scan -----------------------------------------------------------------------------------------

KERNELS = P.kernels()


@pytest.fixture(scope="module")
def scan_ref(pq, query, codes_1m):
    return P.adc_scan(pq.adc_table(query), codes_1m, 100, kernel="scalar", threads=1)


@pytest.mark.parametrize("kernel", KERNELS)
def test_adc_scan_vibrato(benchmark, pq, query, codes_1m, scan_ref, kernel):
    benchmark.group = "adc scan top-100 (1M codes, m=16)"
    rows, scores = pedantic(
        benchmark, lambda: P.adc_scan(pq.adc_table(query), codes_1m, 100, kernel=kernel, threads=1), 9)
    np.testing.assert_array_equal(rows, scan_ref[0])
    record(benchmark, f"adc vibrato {kernel} 1t", N_SCAN, "codes/s")


def test_adc_scan_vibrato_default_2t(benchmark, pq, query, codes_1m, scan_ref):
    benchmark.group = "adc scan top-100 (1M codes, m=16)"
    rows, _ = pedantic(benchmark, lambda: pq.adc_scan(query, codes_1m, 100, threads=2), 9)
    np.testing.assert_array_equal(rows, scan_ref[0])
    record(benchmark, f"adc vibrato {P.kernel_name()} 2t", N_SCAN, "codes/s")


def test_adc_scan_vibrato_mask10(benchmark, pq, query, codes_1m):
    benchmark.group = "adc scan top-100 (1M codes, m=16)"
    allowed = np.random.default_rng(0).random(N_SCAN) < 0.1
    rows, _ = pedantic(benchmark, lambda: pq.adc_scan(query, codes_1m, 100, allowed=allowed, threads=1), 9)
    assert allowed[rows].all()
    record(benchmark, f"adc vibrato {P.kernel_name()} 1t, 10% mask", N_SCAN, "codes/s")


@pytest.mark.parametrize("threads", [1, 2])
def test_adc_scan_faiss(benchmark, faiss_index, query, threads):
    benchmark.group = "adc scan top-100 (1M codes, m=16)"
    q = query[None, :].copy()

    def run():
        faiss.omp_set_num_threads(threads)
        return faiss_index.search(q, 100)

    D, I = pedantic(benchmark, run, 9)
    assert (I >= 0).all() and np.all(np.diff(D[0]) <= 1e-6)
    record(benchmark, f"adc faiss {threads}t", N_SCAN, "codes/s")


# -- quality next to faiss (report only; tests/test_pq.py asserts the bar) -------------------------------

QUALITY = {}


@pytest.mark.parametrize("m,candidates", [(16, 100), (32, 40)])
def test_recall_after_rerank_vs_faiss(base, m, candidates):
    """recall@10 after exact rerank of the best `candidates` ADC rows, vibrato and faiss IndexPQ (IP)."""
    import vibrato.kernels as K
    queries = np.load(DATA / "text" / "queries_128.npy")
    gt = np.load(DATA / "text" / "gt_128_ids.npy")[:, :10]
    pq = ProductQuantizer(128, m).train(base)
    codes = pq.encode(base)
    faiss.omp_set_num_threads(1)
    index = faiss.IndexPQ(128, m, 8, faiss.METRIC_INNER_PRODUCT)
    index.train(base)
    index.add(base)
    _, fI = index.search(queries, candidates)

    def recall(cands):
        hits = 0
        for q, c, truth in zip(queries, cands, gt):
            exact = K.dot_many(q, base, c.astype(np.int64))
            hits += len(np.intersect1d(c[np.argsort(-exact, kind="stable")[:10]], truth))
        return hits / gt.size

    ours = recall([pq.adc_scan(q, codes, candidates, threads=1)[0] for q in queries])
    theirs = recall(fI)
    QUALITY[f"m={m}, {candidates} candidates"] = {"vibrato": ours, "faiss": theirs}
    assert ours >= 0.9


# -- paired A/B ---------------------------------------------------------------------------------------


def test_paired_vs_faiss(base, pq, query, codes_1m, faiss_index):
    """Alternating vibrato / faiss calls, 1 thread each: the ratios to quote."""
    faiss.omp_set_num_threads(1)
    q = query[None, :].copy()
    for kernel in KERNELS:
        paired(f"adc scan 1M x 16, top-100, {kernel} vs faiss",
               lambda: P.adc_scan(pq.adc_table(query), codes_1m, 100, kernel=kernel, threads=1),
               lambda: faiss_index.search(q, 100), rounds=15)
    fpq = faiss.ProductQuantizer(128, M, 8)
    fpq.cp.niter = ITERS
    fpq.train(base)
    paired("encode 20k x 128 vs faiss compute_codes", lambda: pq.encode(base, threads=1),
           lambda: fpq.compute_codes(base), rounds=9)

    def faiss_train():
        f = faiss.ProductQuantizer(128, M, 8)
        f.cp.niter = ITERS
        f.train(base)

    paired("train 20k x 128, 15 iters vs faiss", lambda: ProductQuantizer(128, M).train(base, iters=ITERS, threads=1),
           faiss_train, rounds=5)


# -- summary ------------------------------------------------------------------------------------------


def test_zz_report():
    """Prints the table with ratios against faiss and saves perf/results/bench_pq.json."""
    if not (RESULTS or QUALITY or PAIRED):
        pytest.skip("no benchmark ran")
    peers = {"train": "train faiss", "encode": "encode faiss", "adc": "adc faiss"}
    lines = [f"{'case':42s} {'median':>10s} {'rate':>14s}  ratio vs faiss (same threads)"]
    for case, r in RESULTS.items():
        kind = case.split()[0]
        threads = "2t" if " 2t" in case else "1t"
        peer = RESULTS.get(f"{peers[kind]} {threads}")
        ratio = f"{r['rate'] / peer['rate']:.2f}x" if peer and "faiss" not in case else ""
        lines.append(f"{case:42s} {r['median_s'] * 1e3:8.2f}ms {r['rate'] / 1e6:9.2f} M {r['unit']:9s} {ratio}")
    lines += ["", "recall@10 after exact rerank (text split, gt[:, :10])"]
    for case, r in QUALITY.items():
        lines.append(f"  {case:30s} vibrato {r['vibrato']:.4f}   faiss IndexPQ {r['faiss']:.4f}")
    lines += ["", f"{'paired A/B, 1 thread each':52s} {'vibrato':>10s} {'faiss':>10s}  speedup"]
    for case, r in PAIRED.items():
        lines.append(f"{case:52s} {r['ours_median_s'] * 1e3:8.2f}ms {r['peer_median_s'] * 1e3:8.2f}ms  "
                     f"{r['speedup_vs_peer']:.2f}x")
    print("\n" + "\n".join(lines))
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    meta = {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
            "simd_level": cpu.level_name(cpu.selected_level()), "pq_kernel": P.kernel_name(),
            "faiss": faiss.__version__, "numpy": np.__version__}
    (out / "bench_pq.json").write_text(json.dumps({"meta": meta, "results": RESULTS, "paired": PAIRED,
                                                      "quality": QUALITY}, indent=1))
